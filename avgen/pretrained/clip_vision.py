"""clip_vision: transformers CLIPVisionModel / CLIPVisionModelWithProjection / CLIPModel."""

from __future__ import annotations

import pathlib

from flax import nnx

from avgen.models.encoders.clip import CLIPVisionEncoder
from avgen.pretrained.clip_text import layer_arrays, tower_config
from avgen.pretrained.safetensors_io import Tensors, assign, conv, linear

DEFAULT_SOURCE = "openai/clip-vit-large-patch14"
WHAT = "clip_vision"


def build(path: pathlib.Path, dtype) -> CLIPVisionEncoder:
  return CLIPVisionEncoder(tower_config(path, "vision"), rngs=nnx.Rngs(0), dtype=dtype)


def load_from_dir(path: pathlib.Path, dtype) -> CLIPVisionEncoder:
  path = pathlib.Path(path)
  abstract = nnx.eval_shape(lambda: build(path, dtype))
  cfg = abstract.config
  t = Tensors.from_dir(path, what=WHAT).with_prefix(
      ["vision_model.", ""], marker="embeddings.patch_embedding.weight")
  arrays = {
      "patch_embedding/kernel": conv(t["embeddings.patch_embedding.weight"]),
      "class_embedding": t["embeddings.class_embedding"],
      "position_embedding": t["embeddings.position_embedding.weight"],
      "pre_layrnorm/scale": t["pre_layrnorm.weight"],
      "pre_layrnorm/bias": t["pre_layrnorm.bias"],
      "post_layernorm/scale": t["post_layernorm.weight"],
      "post_layernorm/bias": t["post_layernorm.bias"],
      **layer_arrays(t, "encoder.layers", "layers", cfg.num_hidden_layers, cfg.num_attention_heads),
  }
  if cfg.projection_dim:
    arrays["visual_projection/kernel"] = linear(t.at_root("visual_projection.weight"))
  t.check_all_used(ignore=[r"^text_model\.", r"^text_projection\.", r"^logit_scale$",
                           r"position_ids$"])
  return assign(abstract, arrays, what=WHAT)
