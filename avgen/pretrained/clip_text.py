"""clip_text: transformers CLIPTextModel / CLIPTextModelWithProjection / CLIPModel checkpoints.

A full CLIPModel checkpoint (e.g. openai/clip-vit-large-patch14) gives the text tower with its
projection; the vision half is left to `clip_vision`.
"""

from __future__ import annotations

import pathlib

from flax import nnx

from avgen.models.encoders.clip import CLIPTextEncoder, CLIPTowerConfig
from avgen.pretrained.safetensors_io import (CheckpointError, Tensors, assign, heads_bias, heads_in,
                                             heads_out, linear, read_config)

DEFAULT_SOURCE = "openai/clip-vit-large-patch14"
WHAT = "clip_text"
_PROJECTED = ("CLIPModel", "CLIPTextModelWithProjection")


def tower_config(path: pathlib.Path, tower: str) -> CLIPTowerConfig:
  """The `tower` ("text" / "vision") config of a CLIP checkpoint dir, with its projection size.

  A projection exists when the saved architecture has one (transformers always writes
  `architectures`); without that field, a full CLIPModel config (model_type "clip") implies it.
  """
  what = f"clip_{tower}"
  raw = read_config(path, what=what)
  arch = raw.get("architectures") or []
  if raw.get("model_type") == "clip" or f"{tower}_config" in raw:
    sub = dict(raw.get(f"{tower}_config") or {})
    projected = not arch or "CLIPModel" in arch
    proj = raw.get("projection_dim", sub.get("projection_dim", 512))
  else:
    sub = raw
    want = "CLIPTextModelWithProjection" if tower == "text" else "CLIPVisionModelWithProjection"
    projected = want in arch
    proj = raw.get("projection_dim", 512)
    if raw.get("model_type") not in (None, f"clip_{tower}_model"):
      raise CheckpointError(f"{what}: {path}/config.json has model_type {raw.get('model_type')!r}, "
                            f"not a CLIP {tower} model")
  if not sub:
    raise CheckpointError(f"{what}: {path}/config.json has no {tower}_config")
  return CLIPTowerConfig.from_dict(sub, projection_dim=proj if projected else None)


def build(path: pathlib.Path, dtype) -> CLIPTextEncoder:
  return CLIPTextEncoder(tower_config(path, "text"), rngs=nnx.Rngs(0), dtype=dtype)


def layer_arrays(t: Tensors, prefix: str, out: str, n_layers: int, heads: int) -> dict:
  """CLIPEncoderLayer weights `prefix.{i}.*` -> our `out/{i}/*` paths (shared with clip_vision)."""
  arrays = {}
  for i in range(n_layers):
    src, dst = f"{prefix}.{i}", f"{out}/{i}"
    for norm in ("layer_norm1", "layer_norm2"):
      arrays[f"{dst}/{norm}/scale"] = t[f"{src}.{norm}.weight"]
      arrays[f"{dst}/{norm}/bias"] = t[f"{src}.{norm}.bias"]
    for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
      w, b = t[f"{src}.self_attn.{theirs}.weight"], t[f"{src}.self_attn.{theirs}.bias"]
      arrays[f"{dst}/self_attn/{ours}/kernel"] = heads_in(w, heads)
      arrays[f"{dst}/self_attn/{ours}/bias"] = heads_bias(b, heads)
    arrays[f"{dst}/self_attn/out/kernel"] = heads_out(t[f"{src}.self_attn.out_proj.weight"], heads)
    arrays[f"{dst}/self_attn/out/bias"] = t[f"{src}.self_attn.out_proj.bias"]
    for fc in ("fc1", "fc2"):
      arrays[f"{dst}/mlp/{fc}/kernel"] = linear(t[f"{src}.mlp.{fc}.weight"])
      arrays[f"{dst}/mlp/{fc}/bias"] = t[f"{src}.mlp.{fc}.bias"]
  return arrays


def load_from_dir(path: pathlib.Path, dtype) -> CLIPTextEncoder:
  path = pathlib.Path(path)
  abstract = nnx.eval_shape(lambda: build(path, dtype))
  cfg = abstract.config
  t = Tensors.from_dir(path, what=WHAT).with_prefix(
      ["text_model.", ""], marker="embeddings.token_embedding.weight")
  arrays = {
      "token_embedding/embedding": t["embeddings.token_embedding.weight"],
      "position_embedding": t["embeddings.position_embedding.weight"],
      "final_layer_norm/scale": t["final_layer_norm.weight"],
      "final_layer_norm/bias": t["final_layer_norm.bias"],
      **layer_arrays(t, "encoder.layers", "layers", cfg.num_hidden_layers, cfg.num_attention_heads),
  }
  if cfg.projection_dim:
    arrays["text_projection/kernel"] = linear(t.at_root("text_projection.weight"))
  t.check_all_used(ignore=[r"^vision_model\.", r"^visual_projection\.", r"^logit_scale$",
                           r"position_ids$"])
  return assign(abstract, arrays, what=WHAT)
