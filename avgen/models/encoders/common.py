"""Pieces shared by the pretrained-encoder ports: activations, attention, embeddings, convs.

The ports reproduce the PyTorch originals to float32 rounding, so each function here states the
convention it follows (e.g. exact-erf vs tanh GELU) rather than picking whichever is fastest.
Parameters are stored and matmuls run in `dtype`; norms and softmax run in float32.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avgen.models.layers import Dense, LayerNorm, param


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names -> functions with the same formula.
ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str, *, what: str):
  if name not in ACTIVATIONS:
    raise ValueError(f"{what}: activation {name!r} is not supported; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
              bias: jax.Array | None = None, visible: jax.Array | None = None) -> jax.Array:
  """softmax(scale * q.k + bias) v over [B, L, H, D] inputs, softmax in float32.

  bias broadcasts to [B, H, Lq, Lk]; `visible` (bool, same broadcast) hides keys. A masked key
  gets the most negative float, as the originals do, so a row with no visible key averages all
  keys instead of producing NaN (those rows are padding; nothing reads them).
  """
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if visible is not None:
    logits = jnp.where(visible, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


class Embedding(nnx.Module):
  """Lookup table [num, width]."""

  def __init__(self, num: int, width: int, *, rngs: nnx.Rngs, dtype, names=("vocab", "embed")):
    self.embedding = param(rngs, nnx.initializers.normal(0.02), (num, width), names, dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0)


class Conv(nnx.Module):
  """N-d convolution on channel-last input; kernel [*window, in / groups, out] (torch ConvNd)."""

  def __init__(self, in_ch: int, out_ch: int, window: Sequence[int], *, rngs: nnx.Rngs, dtype,
               strides: Sequence[int] | None = None,
               padding: Sequence[tuple[int, int]] | str = "VALID",
               groups: int = 1, use_bias: bool = True):
    window = tuple(window)
    if in_ch % groups or out_ch % groups:
      raise ValueError(f"Conv: groups={groups} must divide in {in_ch} and out {out_ch} channels")
    self.strides = tuple(strides) if strides is not None else (1,) * len(window)
    self.padding, self.groups, self.dtype = padding, groups, dtype
    names = (None,) * len(window) + ("conv_in", "conv_out")
    self.kernel = param(rngs, nnx.initializers.lecun_normal(), window + (in_ch // groups, out_ch),
                        names, dtype)
    self.bias = (param(rngs, nnx.initializers.zeros_init(), out_ch, ("conv_out",), dtype)
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    n = self.kernel.ndim - 2
    spatial = "".join("DHW"[3 - n:])  # 1-d "W", 2-d "HW", 3-d "DHW"
    dims = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.strides, self.padding,
        dimension_numbers=dims, feature_group_count=self.groups,
        preferred_element_type=jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class SelfAttention(nnx.Module):
  """q, k, v, out projections split into heads (Dense kernels [width, heads, head_dim])."""

  def __init__(self, width: int, num_heads: int, head_dim: int, *, rngs: nnx.Rngs, dtype,
               q_bias: bool = True, k_bias: bool = True, v_bias: bool = True,
               out_bias: bool = True):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=dtype)
    self.q = Dense(width, (num_heads, head_dim), ("embed", "heads", "kv"), use_bias=q_bias, **kw)
    self.k = Dense(width, (num_heads, head_dim), ("embed", "heads", "kv"), use_bias=k_bias, **kw)
    self.v = Dense(width, (num_heads, head_dim), ("embed", "heads", "kv"), use_bias=v_bias, **kw)
    self.out = Dense((num_heads, head_dim), width, ("heads", "kv", "embed"), use_bias=out_bias,
                     **kw)
    self.scale = head_dim ** -0.5

  def __call__(self, x: jax.Array, *, bias=None, visible=None, scale: float | None = None):
    o = attention(self.q(x), self.k(x), self.v(x), scale=self.scale if scale is None else scale,
                  bias=bias, visible=visible)
    return self.out(o)


class FeedForward(nnx.Module):
  """Dense -> activation -> Dense, with biases (CLIP, Wav2Vec2, VideoMAE)."""

  def __init__(self, width: int, hidden: int, act: str, *, rngs: nnx.Rngs, dtype, what: str):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=dtype)
    self.fc1 = Dense(width, hidden, ("embed", "mlp"), **kw)
    self.fc2 = Dense(hidden, width, ("mlp", "embed"), **kw)
    self.act = activation(act, what=what)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.act(self.fc1(x)))


def layer_norm(width: int, eps: float, *, rngs: nnx.Rngs, dtype, names=("embed",)) -> LayerNorm:
  return LayerNorm(width, rngs=rngs, eps=eps, names=names, param_dtype=dtype)


def key_visible(mask: jax.Array | None) -> jax.Array | None:
  """bool key mask [B, Lk] -> [B, 1, 1, Lk] for `attention`."""
  return None if mask is None else mask.astype(bool)[:, None, None, :]


def check_rank(x: jax.Array, rank: int, what: str, layout: str) -> None:
  if x.ndim != rank:
    raise ValueError(f"{what}: expected {layout} (rank {rank}), got shape {x.shape}")


def sinusoid_table(length: int, width: int) -> np.ndarray:
  """Fixed sin/cos position table [length, width]: sin on even, cos on odd channels."""
  pos = np.arange(length, dtype=np.float64)[:, None]
  rate = np.power(10000.0, 2 * (np.arange(width) // 2) / width)
  table = pos / rate
  table[:, 0::2] = np.sin(table[:, 0::2])
  table[:, 1::2] = np.cos(table[:, 1::2])
  return table.astype(np.float32)


__all__ = ["ACTIVATIONS", "Conv", "Dense", "Embedding", "FeedForward", "LayerNorm", "SelfAttention",
           "activation", "attention", "check_rank", "key_visible", "layer_norm", "sinusoid_table"]
