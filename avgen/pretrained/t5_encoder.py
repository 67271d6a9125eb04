"""t5_encoder: the encoder of transformers T5EncoderModel / T5Model / T5ForConditionalGeneration."""

from __future__ import annotations

import pathlib

from flax import nnx

from avgen.models.encoders.t5 import T5Config, T5Encoder
from avgen.pretrained.safetensors_io import (CheckpointError, Tensors, assign, heads_in, heads_out,
                                             linear, read_config)

# The v1.1 encoder family modern text-to-AV models use; the XXL encoder is ~4.7B parameters.
DEFAULT_SOURCE = "google/t5-v1_1-xxl"
WHAT = "t5_encoder"


def config(path: pathlib.Path) -> T5Config:
  raw = read_config(path, what=WHAT)
  if raw.get("model_type") not in (None, "t5"):
    raise CheckpointError(f"{WHAT}: {path}/config.json has model_type {raw.get('model_type')!r}, "
                          "not 't5'")
  return T5Config.from_dict(raw)


def build(path: pathlib.Path, dtype) -> T5Encoder:
  return T5Encoder(config(path), rngs=nnx.Rngs(0), dtype=dtype)


def load_from_dir(path: pathlib.Path, dtype) -> T5Encoder:
  path = pathlib.Path(path)
  abstract = nnx.eval_shape(lambda: build(path, dtype))
  cfg = abstract.config
  t = Tensors.from_dir(path, what=WHAT)
  # T5EncoderModel ties encoder.embed_tokens to `shared`; files may hold either or both.
  if "shared.weight" in t:
    embed = t["shared.weight"]
    if "encoder.embed_tokens.weight" in t:
      t["encoder.embed_tokens.weight"]  # pylint: disable=pointless-statement  (a tied copy)
  else:
    embed = t["encoder.embed_tokens.weight"]
  h = cfg.num_heads
  arrays = {"embed_tokens/embedding": embed,
            "final_layer_norm/scale": t["encoder.final_layer_norm.weight"]}
  for i in range(cfg.num_layers):
    src, dst = f"encoder.block.{i}.layer", f"blocks/{i}"
    att = f"{src}.0.SelfAttention"
    arrays[f"{dst}/attn_norm/scale"] = t[f"{src}.0.layer_norm.weight"]
    for name in ("q", "k", "v"):
      arrays[f"{dst}/attn/{name}/kernel"] = heads_in(t[f"{att}.{name}.weight"], h)
    arrays[f"{dst}/attn/o/kernel"] = heads_out(t[f"{att}.o.weight"], h)
    if i == 0:
      arrays[f"{dst}/attn/relative_attention_bias"] = t[f"{att}.relative_attention_bias.weight"]
    arrays[f"{dst}/ff_norm/scale"] = t[f"{src}.1.layer_norm.weight"]
    ff = f"{src}.1.DenseReluDense"
    for name in (("wi_0", "wi_1", "wo") if cfg.gated else ("wi", "wo")):
      arrays[f"{dst}/ff/{name}/kernel"] = linear(t[f"{ff}.{name}.weight"])
  t.check_all_used(ignore=[r"^decoder\.", r"^lm_head\."])
  return assign(abstract, arrays, what=WHAT)
