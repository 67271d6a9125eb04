"""Wav2Vec2 (transformers' Wav2Vec2Model): conv feature encoder + transformer, all hidden states.

Feature encoder: strided 1-D convs over the raw waveform. `feat_extract_norm="group"` (base
models) normalises only the first conv's output, per channel over time; `"layer"` (large /
robust models) LayerNorms every conv's output over channels. The transformer adds a grouped,
weight-normalised convolutional position embedding and is post-LN, or pre-LN with a final
LayerNorm when `do_stable_layer_norm` (large / robust models).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from avgen.models.encoders.common import (Conv, Dense, SelfAttention, activation, check_rank,
                                          key_visible, layer_norm)
from avgen.models.layers import param


@dataclasses.dataclass(frozen=True)
class Wav2Vec2Config:
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-5
  feat_extract_norm: str = "group"
  feat_extract_activation: str = "gelu"
  conv_dim: tuple[int, ...] = (512,) * 7
  conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
  conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
  conv_bias: bool = False
  num_conv_pos_embeddings: int = 128
  num_conv_pos_embedding_groups: int = 16
  do_stable_layer_norm: bool = False

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Wav2Vec2Config":
    if d.get("add_adapter") or d.get("adapter_attn_dim"):
      raise ValueError("Wav2Vec2Config: adapter layers (add_adapter / adapter_attn_dim) are not "
                       "supported; use a checkpoint without them")
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
    cfg = cls(**kw)
    if not len(cfg.conv_dim) == len(cfg.conv_stride) == len(cfg.conv_kernel):
      raise ValueError(f"Wav2Vec2Config: conv_dim, conv_stride, conv_kernel differ in length: "
                       f"{cfg.conv_dim}, {cfg.conv_stride}, {cfg.conv_kernel}")
    if cfg.feat_extract_norm not in ("group", "layer"):
      raise ValueError(f"Wav2Vec2Config: feat_extract_norm must be 'group' or 'layer', got "
                       f"{cfg.feat_extract_norm!r}")
    return cfg


@struct.dataclass
class Wav2Vec2Output:
  last_hidden_state: jax.Array  # [B, T, hidden]
  extract_features: jax.Array  # [B, T, conv_dim[-1]]: LayerNormed conv features
  # The input of each transformer layer, then the last layer's output (before the final
  # LayerNorm of stable-layer-norm models), as transformers 5 reports them.
  hidden_states: tuple[jax.Array, ...]
  frame_mask: jax.Array | None  # [B, T] bool: frames computed from real samples


class ChannelNorm(nnx.Module):
  """torch GroupNorm with one group per channel: normalise each channel over time."""

  def __init__(self, channels: int, *, rngs: nnx.Rngs, dtype, eps: float = 1e-5):
    self.scale = param(rngs, nnx.initializers.ones_init(), channels, ("conv_out",), dtype)
    self.bias = param(rngs, nnx.initializers.zeros_init(), channels, ("conv_out",), dtype)
    self.eps = eps

  def __call__(self, x):  # [B, T, C]
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


class FeatureConv(nnx.Module):
  """conv -> (norm) -> activation."""

  def __init__(self, cfg: Wav2Vec2Config, i: int, *, rngs: nnx.Rngs, dtype):
    c_in = cfg.conv_dim[i - 1] if i else 1
    c_out = cfg.conv_dim[i]
    self.conv = Conv(c_in, c_out, (cfg.conv_kernel[i],), strides=(cfg.conv_stride[i],),
                     use_bias=cfg.conv_bias, rngs=rngs, dtype=dtype)
    if cfg.feat_extract_norm == "layer":
      # torch's nn.LayerNorm default eps, not config.layer_norm_eps.
      self.norm = layer_norm(c_out, 1e-5, rngs=rngs, dtype=dtype, names=("conv_out",))
    elif i == 0:
      self.norm = ChannelNorm(c_out, rngs=rngs, dtype=dtype)
    else:
      self.norm = None
    self.act = activation(cfg.feat_extract_activation, what="Wav2Vec2 feat_extract_activation")

  def __call__(self, x):
    x = self.conv(x)
    if self.norm is not None:
      x = self.norm(x)
    return self.act(x)


class PositionalConv(nnx.Module):
  """Grouped conv over time ('same' length), GELU; its weight norm is folded in at conversion."""

  def __init__(self, cfg: Wav2Vec2Config, *, rngs: nnx.Rngs, dtype):
    k = cfg.num_conv_pos_embeddings
    self.conv = Conv(cfg.hidden_size, cfg.hidden_size, (k,), padding=((k // 2, k // 2),),
                     groups=cfg.num_conv_pos_embedding_groups, rngs=rngs, dtype=dtype)
    # An even kernel padded by k/2 on both sides yields one frame too many; the last is dropped.
    self.trim = 1 if k % 2 == 0 else 0
    self.act = activation(cfg.feat_extract_activation, what="Wav2Vec2 feat_extract_activation")

  def __call__(self, x):
    y = self.conv(x)
    if self.trim:
      y = y[:, :-self.trim]
    return self.act(y)


class Wav2Vec2Layer(nnx.Module):
  """Post-LN: x = ln(x + attn(x)); x = final_ln(x + ff(x)).
  Stable (pre-LN): x += attn(ln(x)); x += ff(final_ln(x))."""

  def __init__(self, cfg: Wav2Vec2Config, *, rngs: nnx.Rngs, dtype):
    d, h = cfg.hidden_size, cfg.num_attention_heads
    if d % h:
      raise ValueError(f"Wav2Vec2: hidden_size {d} is not divisible by num_attention_heads {h}")
    self.attention = SelfAttention(d, h, d // h, rngs=rngs, dtype=dtype)
    self.layer_norm = layer_norm(d, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=dtype)
    self.intermediate_dense = Dense(d, cfg.intermediate_size, ("embed", "mlp"), **kw)
    self.output_dense = Dense(cfg.intermediate_size, d, ("mlp", "embed"), **kw)
    self.act = activation(cfg.hidden_act, what="Wav2Vec2 hidden_act")
    self.final_layer_norm = layer_norm(d, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)
    self.stable = cfg.do_stable_layer_norm

  def feed_forward(self, x):
    return self.output_dense(self.act(self.intermediate_dense(x)))

  def __call__(self, x, visible):
    if self.stable:
      x = x + self.attention(self.layer_norm(x), visible=visible)
      return x + self.feed_forward(self.final_layer_norm(x))
    x = self.layer_norm(x + self.attention(x, visible=visible))
    return self.final_layer_norm(x + self.feed_forward(x))


class Wav2Vec2Encoder(nnx.Module):
  """Waveform [B, S] (normalised as the checkpoint's feature extractor does) -> Wav2Vec2Output."""

  def __init__(self, cfg: Wav2Vec2Config, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.config, self.width, self.dtype = cfg, cfg.hidden_size, dtype
    self.conv_layers = nnx.List([FeatureConv(cfg, i, rngs=rngs, dtype=dtype)
                                 for i in range(len(cfg.conv_dim))])
    self.projection_norm = layer_norm(cfg.conv_dim[-1], cfg.layer_norm_eps, rngs=rngs, dtype=dtype,
                                      names=("conv_out",))
    self.projection = Dense(cfg.conv_dim[-1], cfg.hidden_size, ("conv_out", "embed"), rngs=rngs,
                            dtype=dtype, param_dtype=dtype)
    self.pos_conv = PositionalConv(cfg, rngs=rngs, dtype=dtype)
    self.encoder_norm = layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)
    self.layers = nnx.List([Wav2Vec2Layer(cfg, rngs=rngs, dtype=dtype)
                            for _ in range(cfg.num_hidden_layers)])

  def num_frames(self, num_samples):
    """Frames the conv stack makes from `num_samples` samples (int or int array)."""
    for k, s in zip(self.config.conv_kernel, self.config.conv_stride):
      num_samples = (num_samples - k) // s + 1
    return num_samples

  def __call__(self, waveform: jax.Array,
               attention_mask: jax.Array | None = None) -> Wav2Vec2Output:
    """attention_mask [B, S]: True for real samples (padding on the right)."""
    check_rank(waveform, 2, "Wav2Vec2Encoder waveform", "[B, samples]")
    if self.num_frames(waveform.shape[1]) < 1:
      raise ValueError(f"Wav2Vec2Encoder: {waveform.shape[1]} samples are too few for one frame "
                       f"(conv kernels {self.config.conv_kernel}, strides "
                       f"{self.config.conv_stride})")
    if attention_mask is not None and attention_mask.shape != waveform.shape:
      raise ValueError(f"Wav2Vec2Encoder: attention_mask {attention_mask.shape} != waveform "
                       f"{waveform.shape}")
    x = waveform.astype(self.dtype)[..., None]
    for conv in self.conv_layers:
      x = conv(x)
    features = self.projection_norm(x)
    x = self.projection(features)
    frame_mask = None
    if attention_mask is not None:
      lengths = self.num_frames(jnp.sum(attention_mask.astype(jnp.int32), axis=-1))
      frame_mask = jnp.arange(x.shape[1])[None, :] < lengths[:, None]
      x = jnp.where(frame_mask[..., None], x, 0)  # padded frames must not leak into pos_conv
    visible = key_visible(frame_mask)
    x = x + self.pos_conv(x)
    if not self.config.do_stable_layer_norm:
      x = self.encoder_norm(x)
    hidden = []
    for layer in self.layers:
      hidden.append(x)
      x = layer(x, visible)
    hidden.append(x)
    if self.config.do_stable_layer_norm:
      x = self.encoder_norm(x)
    return Wav2Vec2Output(x, features, tuple(hidden), frame_mask)
