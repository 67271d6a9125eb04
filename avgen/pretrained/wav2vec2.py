"""wav2vec2: transformers Wav2Vec2Model and its task-head checkpoints (ForCTC, ForPreTraining)."""

from __future__ import annotations

import pathlib

import numpy as np
from flax import nnx

from avgen.models.encoders.wav2vec2 import Wav2Vec2Config, Wav2Vec2Encoder
from avgen.pretrained.safetensors_io import (CheckpointError, Tensors, assign, conv, heads_bias,
                                             heads_in, heads_out, linear, read_config)

DEFAULT_SOURCE = "facebook/wav2vec2-large-robust"
WHAT = "wav2vec2"


def config(path: pathlib.Path) -> Wav2Vec2Config:
  raw = read_config(path, what=WHAT)
  if raw.get("model_type") not in (None, "wav2vec2"):
    raise CheckpointError(f"{WHAT}: {path}/config.json has model_type {raw.get('model_type')!r}, "
                          "not 'wav2vec2'")
  try:
    return Wav2Vec2Config.from_dict(raw)
  except ValueError as e:
    raise CheckpointError(f"{WHAT}: {path}/config.json: {e}") from None


def build(path: pathlib.Path, dtype) -> Wav2Vec2Encoder:
  return Wav2Vec2Encoder(config(path), rngs=nnx.Rngs(0), dtype=dtype)


def folded_weight_norm(t: Tensors, prefix: str) -> np.ndarray:
  """The effective weight of torch's weight_norm(conv, dim=2): g * v / |v| (norm over out, in).

  Newer torch saves (g, v) as parametrizations.weight.original0/1, older as weight_g/_v; a
  checkpoint with the norm removed has a plain weight.
  """
  for g_key, v_key in ((f"{prefix}.parametrizations.weight.original0",
                        f"{prefix}.parametrizations.weight.original1"),
                       (f"{prefix}.weight_g", f"{prefix}.weight_v")):
    if g_key in t and v_key in t:
      g = np.asarray(t[g_key], np.float64)
      v = np.asarray(t[v_key], np.float64)
      norm = np.sqrt(np.sum(v * v, axis=(0, 1), keepdims=True))
      return (g * v / norm).astype(np.float32)
  return np.asarray(t[f"{prefix}.weight"])


def load_from_dir(path: pathlib.Path, dtype) -> Wav2Vec2Encoder:
  path = pathlib.Path(path)
  abstract = nnx.eval_shape(lambda: build(path, dtype))
  cfg = abstract.config
  t = Tensors.from_dir(path, what=WHAT).with_prefix(
      ["wav2vec2.", ""], marker="feature_projection.projection.weight")
  arrays = {}
  for i in range(len(cfg.conv_dim)):
    src, dst = f"feature_extractor.conv_layers.{i}", f"conv_layers/{i}"
    arrays[f"{dst}/conv/kernel"] = conv(t[f"{src}.conv.weight"])
    if cfg.conv_bias:
      arrays[f"{dst}/conv/bias"] = t[f"{src}.conv.bias"]
    if cfg.feat_extract_norm == "layer" or i == 0:
      arrays[f"{dst}/norm/scale"] = t[f"{src}.layer_norm.weight"]
      arrays[f"{dst}/norm/bias"] = t[f"{src}.layer_norm.bias"]
  arrays.update({
      "projection_norm/scale": t["feature_projection.layer_norm.weight"],
      "projection_norm/bias": t["feature_projection.layer_norm.bias"],
      "projection/kernel": linear(t["feature_projection.projection.weight"]),
      "projection/bias": t["feature_projection.projection.bias"],
      "pos_conv/conv/kernel": conv(folded_weight_norm(t, "encoder.pos_conv_embed.conv")),
      "pos_conv/conv/bias": t["encoder.pos_conv_embed.conv.bias"],
      "encoder_norm/scale": t["encoder.layer_norm.weight"],
      "encoder_norm/bias": t["encoder.layer_norm.bias"],
  })
  h = cfg.num_attention_heads
  for i in range(cfg.num_hidden_layers):
    src, dst = f"encoder.layers.{i}", f"layers/{i}"
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
      arrays[f"{dst}/attention/{ours}/kernel"] = heads_in(t[f"{src}.attention.{theirs}.weight"], h)
      arrays[f"{dst}/attention/{ours}/bias"] = heads_bias(t[f"{src}.attention.{theirs}.bias"], h)
    arrays[f"{dst}/attention/out/kernel"] = heads_out(t[f"{src}.attention.out_proj.weight"], h)
    arrays[f"{dst}/attention/out/bias"] = t[f"{src}.attention.out_proj.bias"]
    for norm in ("layer_norm", "final_layer_norm"):
      arrays[f"{dst}/{norm}/scale"] = t[f"{src}.{norm}.weight"]
      arrays[f"{dst}/{norm}/bias"] = t[f"{src}.{norm}.bias"]
    for dense in ("intermediate_dense", "output_dense"):
      arrays[f"{dst}/{dense}/kernel"] = linear(t[f"{src}.feed_forward.{dense}.weight"])
      arrays[f"{dst}/{dense}/bias"] = t[f"{src}.feed_forward.{dense}.bias"]
  # Task heads (CTC, quantizer, classifier) sit outside the prefix; masked_spec_embed is a
  # training-time mask token.
  ignore = [r"masked_spec_embed$"] + ([rf"^(?!{t.prefix.replace('.', '[.]')})"] if t.prefix else [])
  t.check_all_used(ignore=ignore)
  return assign(abstract, arrays, what=WHAT)
