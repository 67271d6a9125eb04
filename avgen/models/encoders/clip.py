"""CLIP text and vision towers (transformers' CLIPTextModel / CLIPVisionModel, + projections).

Both towers are pre-LN transformers with biased q/k/v/out projections. The text tower is causal
and pools the hidden state at the end-of-text token; the vision tower prepends a class token to
the patch embeddings and pools that token. The optional projections map pooled states into the
shared image-text space (what CLIP score compares).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from avgen.models.encoders.common import (Conv, Dense, Embedding, FeedForward, SelfAttention,
                                          check_rank, key_visible, layer_norm)
from avgen.models.layers import param


@dataclasses.dataclass(frozen=True)
class CLIPTowerConfig:
  """The fields of transformers' CLIPTextConfig / CLIPVisionConfig that shape the computation."""
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int | None = None  # None: no projection head in the checkpoint
  # text only
  vocab_size: int = 49408
  max_position_embeddings: int = 77
  eos_token_id: int = 49407
  # vision only
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3

  @classmethod
  def from_dict(cls, d: dict[str, Any], **overrides) -> "CLIPTowerConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in {**d, **overrides}.items() if k in names})


@struct.dataclass
class CLIPTextOutput:
  last_hidden_state: jax.Array  # [B, L, hidden] after the final LayerNorm
  pooler_output: jax.Array  # [B, hidden] at each row's end-of-text token
  text_embeds: jax.Array | None  # [B, projection_dim] (None without a projection)
  hidden_states: tuple[jax.Array, ...]  # input of each layer, then the last layer's output


@struct.dataclass
class CLIPVisionOutput:
  last_hidden_state: jax.Array  # [B, 1 + patches, hidden] (no post LayerNorm, as in transformers)
  pooler_output: jax.Array  # [B, hidden]: post-LayerNormed class token
  image_embeds: jax.Array | None  # [B, projection_dim]
  hidden_states: tuple[jax.Array, ...]


class CLIPLayer(nnx.Module):
  """x += attn(ln1(x)); x += mlp(ln2(x))."""

  def __init__(self, cfg: CLIPTowerConfig, *, rngs: nnx.Rngs, dtype):
    d, h = cfg.hidden_size, cfg.num_attention_heads
    if d % h:
      raise ValueError(f"CLIP: hidden_size {d} is not divisible by num_attention_heads {h}")
    self.layer_norm1 = layer_norm(d, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)
    self.self_attn = SelfAttention(d, h, d // h, rngs=rngs, dtype=dtype)
    self.layer_norm2 = layer_norm(d, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)
    self.mlp = FeedForward(d, cfg.intermediate_size, cfg.hidden_act, rngs=rngs, dtype=dtype,
                           what="CLIP hidden_act")

  def __call__(self, x: jax.Array, visible: jax.Array | None) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x), visible=visible)
    return x + self.mlp(self.layer_norm2(x))


def _run_layers(layers, x, visible):
  hidden = [x]
  for layer in layers:
    x = layer(x, visible)
    hidden.append(x)
  return x, tuple(hidden)


class CLIPTextEncoder(nnx.Module):
  """Token ids [B, L] -> CLIPTextOutput; L <= max_position_embeddings."""

  def __init__(self, cfg: CLIPTowerConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.config, self.dtype = cfg, dtype
    d = cfg.hidden_size
    self.width = d
    self.token_embedding = Embedding(cfg.vocab_size, d, rngs=rngs, dtype=dtype)
    self.position_embedding = param(rngs, nnx.initializers.normal(0.01),
                                    (cfg.max_position_embeddings, d), (None, "embed"), dtype)
    self.layers = nnx.List([CLIPLayer(cfg, rngs=rngs, dtype=dtype)
                            for _ in range(cfg.num_hidden_layers)])
    self.final_layer_norm = layer_norm(d, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)
    self.text_projection = (
        Dense(d, cfg.projection_dim, ("embed", "mlp"), use_bias=False, rngs=rngs, dtype=dtype,
              param_dtype=dtype) if cfg.projection_dim else None)

  def __call__(self, input_ids: jax.Array,
               attention_mask: jax.Array | None = None) -> CLIPTextOutput:
    """attention_mask: bool/int [B, L], True for real tokens (padding on the right)."""
    check_rank(input_ids, 2, "CLIPTextEncoder input_ids", "[B, L]")
    length = input_ids.shape[1]
    if length > self.config.max_position_embeddings:
      raise ValueError(f"CLIPTextEncoder: {length} tokens > max_position_embeddings "
                       f"{self.config.max_position_embeddings}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
      raise ValueError(f"CLIPTextEncoder: attention_mask {attention_mask.shape} != input_ids "
                       f"{input_ids.shape}")
    x = self.token_embedding(input_ids) + self.position_embedding[:length].astype(self.dtype)
    visible = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is not None:
      visible = visible & key_visible(attention_mask)
    x, hidden = _run_layers(self.layers, x, visible)
    x = self.final_layer_norm(x)
    pooled = x[jnp.arange(x.shape[0]), self.eos_positions(input_ids)]
    embeds = self.text_projection(pooled) if self.text_projection is not None else None
    return CLIPTextOutput(x, pooled, embeds, hidden)

  def eos_positions(self, input_ids: jax.Array) -> jax.Array:
    """Where each row's end-of-text token is.

    Configs written before transformers fixed eos_token_id (they say 2) rely on end-of-text
    being the largest id in the vocabulary; later ones name it, and the first occurrence counts
    (padding may reuse the same id).
    """
    if self.config.eos_token_id == 2:
      return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)


class CLIPVisionEncoder(nnx.Module):
  """Images [B, H, W, C] (channel-last, already CLIP-normalized) -> CLIPVisionOutput."""

  def __init__(self, cfg: CLIPTowerConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.config, self.dtype = cfg, dtype
    d, p = cfg.hidden_size, cfg.patch_size
    if cfg.image_size % p:
      raise ValueError(f"CLIP vision: image_size {cfg.image_size} is not a multiple of "
                       f"patch_size {p}")
    self.width = d
    self.patch_embedding = Conv(cfg.num_channels, d, (p, p), strides=(p, p), use_bias=False,
                                rngs=rngs, dtype=dtype)
    self.class_embedding = param(rngs, nnx.initializers.normal(1.0), d, ("embed",), dtype)
    num_pos = (cfg.image_size // p) ** 2 + 1
    self.position_embedding = param(rngs, nnx.initializers.normal(0.02), (num_pos, d),
                                    (None, "embed"), dtype)
    self.pre_layrnorm = layer_norm(d, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)
    self.layers = nnx.List([CLIPLayer(cfg, rngs=rngs, dtype=dtype)
                            for _ in range(cfg.num_hidden_layers)])
    self.post_layernorm = layer_norm(d, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)
    self.visual_projection = (
        Dense(d, cfg.projection_dim, ("embed", "mlp"), use_bias=False, rngs=rngs, dtype=dtype,
              param_dtype=dtype) if cfg.projection_dim else None)

  def __call__(self, pixels: jax.Array) -> CLIPVisionOutput:
    check_rank(pixels, 4, "CLIPVisionEncoder pixels", "[B, H, W, C]")
    c = self.config
    if pixels.shape[1:] != (c.image_size, c.image_size, c.num_channels):
      raise ValueError(f"CLIPVisionEncoder: pixels {pixels.shape[1:]} must be "
                       f"{(c.image_size, c.image_size, c.num_channels)} (resize before encoding)")
    patches = self.patch_embedding(pixels)
    b = patches.shape[0]
    patches = patches.reshape(b, -1, patches.shape[-1])
    cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, patches.shape[-1]))
    x = jnp.concatenate([cls, patches], axis=1) + self.position_embedding[...].astype(self.dtype)
    x = self.pre_layrnorm(x)
    x, hidden = _run_layers(self.layers, x, None)
    pooled = self.post_layernorm(x[:, 0])
    embeds = self.visual_projection(pooled) if self.visual_projection is not None else None
    return CLIPVisionOutput(x, pooled, embeds, hidden)


# The image statistics CLIP was trained with (OpenAI's preprocessing; transformers'
# CLIPImageProcessor uses the same numbers).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess_images(images: jax.Array, size: int) -> jax.Array:
  """Images [B, H, W, 3] (uint8, or float in [0, 1]) -> CLIP vision input [B, size, size, 3].

  Shorter side resized to `size` (antialiased bicubic), centre crop, then CLIP's normalisation.
  Close to, not bit-identical with, CLIPImageProcessor (which resamples with PIL), so CLIP
  scores computed here can differ from the PyTorch pipeline's in the third decimal.
  """
  check_rank(images, 4, "preprocess_images", "[B, H, W, 3]")
  if images.shape[-1] != 3:
    raise ValueError(f"preprocess_images: expected 3 channels last, got shape {images.shape}")
  x = images.astype(jnp.float32)
  if images.dtype == jnp.uint8:
    x = x / 255.0
  b, h, w, _ = x.shape
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  x = jax.image.resize(x, (b, nh, nw, 3), method="bicubic", antialias=True)
  top, left = (nh - size) // 2, (nw - size) // 2
  x = jnp.clip(x[:, top:top + size, left:left + size], 0.0, 1.0)
  return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
