"""VideoMAE encoder (transformers' VideoMAEModel): tubelet patches + fixed sin/cos positions + ViT.

Attention has biases on queries and values only (`qv_bias`). With `use_mean_pooling` the
encoder has no final LayerNorm; a video-classification checkpoint then LayerNorms the mean token
(`fc_norm`), which is its clip-level feature.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from avgen.models.encoders.common import (Conv, Dense, SelfAttention, activation, check_rank,
                                          layer_norm, sinusoid_table)


@dataclasses.dataclass(frozen=True)
class VideoMAEConfig:
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  num_frames: int = 16
  tubelet_size: int = 2
  qv_bias: bool = True
  use_mean_pooling: bool = True

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "VideoMAEConfig":
    d = dict(d)
    if "qkv_bias" in d:  # the name older configs use for the same switch
      d.setdefault("qv_bias", d.pop("qkv_bias"))
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

  @property
  def grid(self) -> tuple[int, int, int]:
    return (self.num_frames // self.tubelet_size, self.image_size // self.patch_size,
            self.image_size // self.patch_size)


@struct.dataclass
class VideoMAEOutput:
  last_hidden_state: jax.Array  # [B, t*h*w, hidden] (tokens in t, h, w order)
  pooler_output: jax.Array  # [B, hidden]: mean token, through fc_norm when the checkpoint has it
  hidden_states: tuple[jax.Array, ...]  # input of each layer, then the last layer's output


class VideoMAELayer(nnx.Module):
  """x += attn(ln_before(x)); x += mlp(ln_after(x))."""

  def __init__(self, cfg: VideoMAEConfig, *, rngs: nnx.Rngs, dtype):
    d, h = cfg.hidden_size, cfg.num_attention_heads
    if d % h:
      raise ValueError(f"VideoMAE: hidden_size {d} is not divisible by num_attention_heads {h}")
    self.layernorm_before = layer_norm(d, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)
    self.attention = SelfAttention(d, h, d // h, rngs=rngs, dtype=dtype, q_bias=cfg.qv_bias,
                                   k_bias=False, v_bias=cfg.qv_bias)
    self.layernorm_after = layer_norm(d, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=dtype)
    self.intermediate = Dense(d, cfg.intermediate_size, ("embed", "mlp"), **kw)
    self.output = Dense(cfg.intermediate_size, d, ("mlp", "embed"), **kw)
    self.act = activation(cfg.hidden_act, what="VideoMAE hidden_act")

  def __call__(self, x):
    x = x + self.attention(self.layernorm_before(x))
    return x + self.output(self.act(self.intermediate(self.layernorm_after(x))))


class VideoMAEEncoder(nnx.Module):
  """Video [B, T, H, W, C] (channel-last, normalised as its checkpoint expects) -> output."""

  def __init__(self, cfg: VideoMAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               fc_norm: bool = False):
    if cfg.num_frames % cfg.tubelet_size or cfg.image_size % cfg.patch_size:
      raise ValueError(f"VideoMAE: num_frames {cfg.num_frames} / image_size {cfg.image_size} must "
                       f"be multiples of tubelet_size {cfg.tubelet_size} / patch_size "
                       f"{cfg.patch_size}")
    self.config, self.width, self.dtype = cfg, cfg.hidden_size, dtype
    p, tub = cfg.patch_size, cfg.tubelet_size
    self.patch_embedding = Conv(cfg.num_channels, cfg.hidden_size, (tub, p, p), strides=(tub, p, p),
                                rngs=rngs, dtype=dtype)
    self.layers = nnx.List([VideoMAELayer(cfg, rngs=rngs, dtype=dtype)
                            for _ in range(cfg.num_hidden_layers)])
    self.layernorm = (None if cfg.use_mean_pooling else
                      layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs, dtype=dtype))
    # torch's default LayerNorm eps: the classifier head does not use config.layer_norm_eps.
    self.fc_norm = layer_norm(cfg.hidden_size, 1e-5, rngs=rngs, dtype=dtype) if fc_norm else None

  def __call__(self, video: jax.Array) -> VideoMAEOutput:
    check_rank(video, 5, "VideoMAEEncoder video", "[B, T, H, W, C]")
    c = self.config
    want = (c.num_frames, c.image_size, c.image_size, c.num_channels)
    if video.shape[1:] != want:
      raise ValueError(f"VideoMAEEncoder: video {video.shape[1:]} must be {want} (T, H, W, C)")
    x = self.patch_embedding(video)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    # The positions are a fixed table (not a checkpoint tensor), built in float64 like the original.
    x = x + jnp.asarray(sinusoid_table(x.shape[1], c.hidden_size), self.dtype)
    hidden = []
    for layer in self.layers:
      hidden.append(x)
      x = layer(x)
    hidden.append(x)
    if self.layernorm is not None:
      x = self.layernorm(x)
    pooled = jnp.mean(x.astype(jnp.float32), axis=1).astype(x.dtype)
    if self.fc_norm is not None:
      pooled = self.fc_norm(pooled)
    return VideoMAEOutput(x, pooled, tuple(hidden))
