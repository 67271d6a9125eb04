"""videomae: transformers VideoMAEModel and its task-head checkpoints (pretraining, classifier)."""

from __future__ import annotations

import pathlib

from flax import nnx

from avgen.models.encoders.videomae import VideoMAEConfig, VideoMAEEncoder
from avgen.pretrained.safetensors_io import (CheckpointError, Tensors, assign, conv, heads_bias,
                                             heads_in, heads_out, linear, read_config)

DEFAULT_SOURCE = "MCG-NJU/videomae-base"
WHAT = "videomae"


def config(path: pathlib.Path) -> VideoMAEConfig:
  raw = read_config(path, what=WHAT)
  if raw.get("model_type") not in (None, "videomae"):
    raise CheckpointError(f"{WHAT}: {path}/config.json has model_type {raw.get('model_type')!r}, "
                          "not 'videomae'")
  return VideoMAEConfig.from_dict(raw)


def build(path: pathlib.Path, dtype) -> VideoMAEEncoder:
  cfg = config(path)
  arch = read_config(path, what=WHAT).get("architectures") or []
  fc_norm = cfg.use_mean_pooling and "VideoMAEForVideoClassification" in arch
  return VideoMAEEncoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, fc_norm=fc_norm)


def load_from_dir(path: pathlib.Path, dtype) -> VideoMAEEncoder:
  path = pathlib.Path(path)
  abstract = nnx.eval_shape(lambda: build(path, dtype))
  cfg = abstract.config
  t = Tensors.from_dir(path, what=WHAT).with_prefix(
      ["videomae.", ""], marker="embeddings.patch_embeddings.projection.weight")
  h = cfg.num_attention_heads
  arrays = {
      "patch_embedding/kernel": conv(t["embeddings.patch_embeddings.projection.weight"]),
      "patch_embedding/bias": t["embeddings.patch_embeddings.projection.bias"],
  }
  for i in range(cfg.num_hidden_layers):
    src, dst = f"encoder.layer.{i}", f"layers/{i}"
    att = f"{src}.attention.attention"
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
      arrays[f"{dst}/attention/{ours}/kernel"] = heads_in(t[f"{att}.{theirs}.weight"], h)
    if cfg.qv_bias:
      # The original checkpoints name these q_bias / v_bias; transformers 5 saves query/value.bias.
      for ours, new, old in (("q", "query.bias", "q_bias"), ("v", "value.bias", "v_bias")):
        key = f"{att}.{new}" if f"{att}.{new}" in t else f"{att}.{old}"
        arrays[f"{dst}/attention/{ours}/bias"] = heads_bias(t[key], h)
    arrays[f"{dst}/attention/out/kernel"] = heads_out(t[f"{src}.attention.output.dense.weight"], h)
    arrays[f"{dst}/attention/out/bias"] = t[f"{src}.attention.output.dense.bias"]
    for norm in ("layernorm_before", "layernorm_after"):
      arrays[f"{dst}/{norm}/scale"] = t[f"{src}.{norm}.weight"]
      arrays[f"{dst}/{norm}/bias"] = t[f"{src}.{norm}.bias"]
    arrays[f"{dst}/intermediate/kernel"] = linear(t[f"{src}.intermediate.dense.weight"])
    arrays[f"{dst}/intermediate/bias"] = t[f"{src}.intermediate.dense.bias"]
    arrays[f"{dst}/output/kernel"] = linear(t[f"{src}.output.dense.weight"])
    arrays[f"{dst}/output/bias"] = t[f"{src}.output.dense.bias"]
  if not cfg.use_mean_pooling:
    arrays["layernorm/scale"] = t["layernorm.weight"]
    arrays["layernorm/bias"] = t["layernorm.bias"]
  if abstract.fc_norm is not None:
    arrays["fc_norm/scale"] = t.at_root("fc_norm.weight")
    arrays["fc_norm/bias"] = t.at_root("fc_norm.bias")
  # Pretraining decoders and classifier heads sit outside the prefix.
  ignore = [rf"^(?!{t.prefix.replace('.', '[.]')})"] if t.prefix else []
  t.check_all_used(ignore=ignore)
  return assign(abstract, arrays, what=WHAT)
