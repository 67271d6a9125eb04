"""Text encoders: (ids, mask) -> states [B, L, text_width] for the DiT's cross-attention.

`byte` is a small trainable transformer over `ByteTokenizer` ids (nothing to download). Frozen
CLIP / T5 ports will implement the same `TextEncoder` protocol under their config names.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx

from avgen.models import tokenizer
from avgen.models.layers import ACT, MLP, Attention, LayerNorm, param
from avgen.parallel.sharding import constrain

ENCODERS = ("byte",)
PLANNED = ("clip_text", "t5_encoder")


@runtime_checkable
class TextEncoder(Protocol):
  """What the DiT needs from a text encoder."""

  width: int  # last dim of the states

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """ids int [B, L], mask bool [B, L] (a prefix of True) -> states [B, L, width]."""
    ...


class TextLayer(nnx.Module):
  """Pre-LN transformer layer; padded keys are masked by length."""

  def __init__(self, width: int, num_heads: int, mlp_ratio: float, *, rngs: nnx.Rngs, impl: str,
               dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm1 = LayerNorm(width, rngs=rngs, param_dtype=param_dtype)
    self.attn = Attention(width, num_heads, qk_norm=False, impl=impl, **kw)
    self.norm2 = LayerNorm(width, rngs=rngs, param_dtype=param_dtype)
    self.mlp = MLP(width, int(width * mlp_ratio), **kw)

  def __call__(self, x: jax.Array, lengths: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x), kv_lengths=lengths)
    x = x + self.mlp(self.norm2(x))
    return constrain(x, ACT)


class ByteTextEncoder(nnx.Module):
  """Token + learned position embeddings, `depth` pre-LN layers, final LayerNorm."""

  def __init__(self, width: int, depth: int, num_heads: int, max_len: int, *, rngs: nnx.Rngs,
               mlp_ratio: float = 4.0, impl: str = "auto", dtype=jnp.float32, param_dtype=jnp.float32):
    self.width, self.max_len = width, max_len
    self.token_embed = param(rngs, nnx.initializers.normal(0.02), (tokenizer.VOCAB_SIZE, width),
                             ("vocab", "embed"), param_dtype)
    self.pos_embed = param(rngs, nnx.initializers.normal(0.02), (max_len, width), (None, "embed"),
                           param_dtype)
    self.layers = nnx.List([
        TextLayer(width, num_heads, mlp_ratio, rngs=rngs, impl=impl, dtype=dtype, param_dtype=param_dtype)
        for _ in range(depth)])
    self.norm = LayerNorm(width, rngs=rngs, param_dtype=param_dtype)

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    if ids.ndim != 2 or mask.shape != ids.shape:
      raise ValueError(f"ByteTextEncoder: ids and mask must both be [B, L]; got {ids.shape}, {mask.shape}")
    if ids.shape[1] > self.max_len:
      raise ValueError(f"ByteTextEncoder: text length {ids.shape[1]} > caption_max_len {self.max_len}")
    lengths = jnp.sum(mask, -1).astype(jnp.int32)
    x = jnp.take(self.token_embed[...], ids, axis=0) + self.pos_embed[: ids.shape[1]]
    x = constrain(x, ACT)  # float32 residual stream; the layers' matmuls run in dtype
    for layer in self.layers:
      x = layer(x, lengths)
    return self.norm(x)


def build_text_encoder(config, rngs: nnx.Rngs) -> ByteTextEncoder:
  """The encoder named by `config.model.text_encoder`."""
  m = config.model
  if m.text_encoder == "byte":
    return ByteTextEncoder(m.text_width, m.text_depth, m.text_heads, config.data.caption_max_len,
                           rngs=rngs, mlp_ratio=m.mlp_ratio, impl=m.attention_impl,
                           dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype))
  if m.text_encoder in PLANNED:
    raise NotImplementedError(f"model.text_encoder={m.text_encoder!r} is not built yet; use 'byte'")
  raise ValueError(f"model.text_encoder: unknown encoder {m.text_encoder!r}; known: {ENCODERS + PLANNED}")
