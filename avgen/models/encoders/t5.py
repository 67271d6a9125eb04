"""T5 encoder (transformers' T5EncoderModel): v1.1 / Flan-T5 (gated GELU) and the original (ReLU).

RMS norms with a scale only, no biases anywhere, unscaled dot-product attention, and a learned
relative-position bias (bucketed distances, computed by the first layer and shared by all).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from avgen.models.encoders.common import (Dense, Embedding, activation, attention, check_rank,
                                          key_visible)
from avgen.models.layers import RMSNorm, param


@dataclasses.dataclass(frozen=True)
class T5Config:
  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_heads: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "T5Config":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

  @property
  def gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  @property
  def act(self) -> str:
    # transformers maps "gated-gelu" to the tanh approximation (gelu_new), as the original
    # mesh-tensorflow models were trained with it.
    name = self.feed_forward_proj.split("-")[-1]
    return "gelu_new" if self.feed_forward_proj == "gated-gelu" else name


@struct.dataclass
class T5EncoderOutput:
  last_hidden_state: jax.Array  # [B, L, d_model]
  # The input of each block, then last_hidden_state (transformers' convention for T5).
  hidden_states: tuple[jax.Array, ...]


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """Bidirectional bucket [q, k] of the distance k - q (int64, numpy: the length is static).

  Half the buckets hold keys after the query. Within a half, distances below num_buckets/4 get
  their own bucket and larger ones share log-spaced buckets up to max_distance. Computed in
  float32 like the original so that distances on a bucket edge land in the same bucket.
  """
  rel = np.arange(length)[None, :] - np.arange(length)[:, None]
  half = num_buckets // 2
  buckets = (rel > 0).astype(np.int64) * half
  dist = np.abs(rel)
  exact = half // 2
  with np.errstate(divide="ignore"):
    scaled = (np.log(dist.astype(np.float32) / np.float32(exact))
              / np.float32(math.log(max_distance / exact)) * np.float32(half - exact))
  large = exact + np.where(dist < exact, 0, scaled).astype(np.int64)
  large = np.minimum(large, half - 1)
  return buckets + np.where(dist < exact, dist, large)


class T5SelfAttention(nnx.Module):

  def __init__(self, cfg: T5Config, *, relative_bias: bool, rngs: nnx.Rngs, dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=dtype, use_bias=False)
    hd = (cfg.num_heads, cfg.d_kv)
    self.q = Dense(cfg.d_model, hd, ("embed", "heads", "kv"), **kw)
    self.k = Dense(cfg.d_model, hd, ("embed", "heads", "kv"), **kw)
    self.v = Dense(cfg.d_model, hd, ("embed", "heads", "kv"), **kw)
    self.o = Dense(hd, cfg.d_model, ("heads", "kv", "embed"), **kw)
    self.relative_attention_bias = (
        param(rngs, nnx.initializers.normal(0.02),
              (cfg.relative_attention_num_buckets, cfg.num_heads), (None, "heads"), dtype)
        if relative_bias else None)
    self.cfg = cfg

  def position_bias(self, length: int) -> jax.Array:
    """[1, H, L, L] from the learned per-bucket, per-head table."""
    buckets = relative_position_buckets(length, self.cfg.relative_attention_num_buckets,
                                        self.cfg.relative_attention_max_distance)
    values = jnp.take(self.relative_attention_bias[...], jnp.asarray(buckets), axis=0)
    return jnp.transpose(values, (2, 0, 1))[None]

  def __call__(self, x, bias, visible):
    # T5 folds the 1/sqrt(d) scale into its initialisation, so logits are unscaled.
    return self.o(attention(self.q(x), self.k(x), self.v(x), scale=1.0, bias=bias, visible=visible))


class T5FeedForward(nnx.Module):
  """wo(act(wi_0 x) * wi_1 x) when gated, else wo(act(wi x))."""

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=dtype, use_bias=False)
    if cfg.gated:
      self.wi_0 = Dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw)
      self.wi_1 = Dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw)
    else:
      self.wi = Dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw)
    self.wo = Dense(cfg.d_ff, cfg.d_model, ("mlp", "embed"), **kw)
    self.act = activation(cfg.act, what="T5 feed_forward_proj")
    self.gated = cfg.gated

  def __call__(self, x):
    h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
    return self.wo(h)


class T5Block(nnx.Module):
  """x += attn(rms(x)); x += ff(rms(x))."""

  def __init__(self, cfg: T5Config, *, relative_bias: bool, rngs: nnx.Rngs, dtype):
    norm = lambda: RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.layer_norm_epsilon, param_dtype=dtype)
    self.attn_norm = norm()
    self.attn = T5SelfAttention(cfg, relative_bias=relative_bias, rngs=rngs, dtype=dtype)
    self.ff_norm = norm()
    self.ff = T5FeedForward(cfg, rngs=rngs, dtype=dtype)

  def __call__(self, x, bias, visible):
    x = x + self.attn(self.attn_norm(x), bias, visible)
    return x + self.ff(self.ff_norm(x))


class T5Encoder(nnx.Module):
  """Token ids [B, L] (+ mask) -> T5EncoderOutput. Any L: positions are relative."""

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, dtype=jnp.float32):
    if cfg.num_layers < 1:
      raise ValueError(f"T5Encoder: num_layers must be >= 1, got {cfg.num_layers}")
    self.config, self.width = cfg, cfg.d_model
    self.embed_tokens = Embedding(cfg.vocab_size, cfg.d_model, rngs=rngs, dtype=dtype)
    self.blocks = nnx.List([T5Block(cfg, relative_bias=i == 0, rngs=rngs, dtype=dtype)
                            for i in range(cfg.num_layers)])
    self.final_layer_norm = RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.layer_norm_epsilon,
                                    param_dtype=dtype)

  def __call__(self, input_ids: jax.Array,
               attention_mask: jax.Array | None = None) -> T5EncoderOutput:
    check_rank(input_ids, 2, "T5Encoder input_ids", "[B, L]")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
      raise ValueError(f"T5Encoder: attention_mask {attention_mask.shape} != input_ids "
                       f"{input_ids.shape}")
    x = self.embed_tokens(input_ids)
    bias = self.blocks[0].attn.position_bias(input_ids.shape[1])
    visible = key_visible(attention_mask)
    hidden = []
    for block in self.blocks:
      hidden.append(x)
      x = block(x, bias, visible)
    x = self.final_layer_norm(x)
    return T5EncoderOutput(x, tuple(hidden) + (x,))
