"""Building blocks: named dense layers, norms, attention, MLP and AdaLN-Zero modulation.

Every parameter carries logical axis names (`nnx.with_partitioning`); the trainer maps them to
mesh axes. Parameters are stored in `param_dtype`; matmuls run in `dtype`; norms, softmax and
RoPE work in float32, and so does the models' residual stream (a bfloat16 branch output added
to it is promoted), which keeps deep stacks of small residual updates from rounding away.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from avgen.config import ADALN
from avgen.kernels import attention
from avgen.models import rope as rope_lib
from avgen.parallel import context_parallel
from avgen.parallel.sharding import constrain, param_for_compute

Shape = int | Sequence[int]
Names = Sequence[str | None]

ACT = ("batch", "length", "act_embed")
ACT_HEADS = ("batch", "length", "act_heads", None)
ACT_MLP = ("batch", "length", "act_mlp")


def _shape(s: Shape) -> tuple[int, ...]:
  return (s,) if isinstance(s, int) else tuple(s)


def param(rngs: nnx.Rngs, init, shape: Shape, names: Names, dtype) -> nnx.Param:
  """A parameter with logical axis names, one per dimension."""
  shape = _shape(shape)
  if len(names) != len(shape):
    raise ValueError(f"param: {len(names)} logical names {tuple(names)} for shape {shape}")
  return nnx.Param(nnx.with_partitioning(init, tuple(names))(rngs.params(), shape, dtype))


class Dense(nnx.Module):
  """y = x . W + b, contracting x's trailing `in_shape` axes with W [*in_shape, *out_shape]."""

  def __init__(self, in_shape: Shape, out_shape: Shape, names: Names, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32, use_bias: bool = True,
               zero_init: bool = False):
    self.in_shape, self.out_shape = _shape(in_shape), _shape(out_shape)
    n_in, n_out = len(self.in_shape), len(self.out_shape)
    if len(names) != n_in + n_out:
      raise ValueError(f"Dense: {len(names)} names {tuple(names)} for kernel "
                       f"{self.in_shape + self.out_shape}")
    if zero_init:
      init = nnx.initializers.zeros_init()
    else:
      init = nnx.initializers.xavier_uniform(
          in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)))
    self.kernel = param(rngs, init, self.in_shape + self.out_shape, names, param_dtype)
    self.names = tuple(names)
    self.bias = (param(rngs, nnx.initializers.zeros_init(), self.out_shape, names[n_in:], param_dtype)
                 if use_bias else None)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    n_in = len(self.in_shape)
    if x.shape[x.ndim - n_in:] != self.in_shape:
      raise ValueError(f"Dense: input {x.shape} does not end in {self.in_shape}")
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    kernel = param_for_compute(self.kernel[...], self.names)  # gathered over fsdp
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class RMSNorm(nnx.Module):
  """x / rms(x) (* scale), computed in float32, returned in x's dtype."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs | None = None, use_scale: bool = True,
               names: Names = ("embed",), eps: float = 1e-6, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = param(rngs, nnx.initializers.ones_init(), dim, names, param_dtype) if use_scale else None

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + self.eps)
    if self.scale is not None:
      y = y * self.scale[...].astype(jnp.float32)
    return y.astype(x.dtype)


class LayerNorm(nnx.Module):
  """(x - mean) / std (* scale + bias), in float32; `affine=False` for AdaLN-modulated norms."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs | None = None, affine: bool = True,
               names: Names = ("embed",), eps: float = 1e-6, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = param(rngs, nnx.initializers.ones_init(), dim, names, param_dtype) if affine else None
    self.bias = param(rngs, nnx.initializers.zeros_init(), dim, names, param_dtype) if affine else None

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, -1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), -1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
    if self.scale is not None:
      y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


class Attention(nnx.Module):
  """Multi-head attention projections; queries from x, keys/values from a context.

  `qkv` and `output` are separate so that the DiT can project each modality with its own
  weights and attend over the joint sequence in one call.
  """

  def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs, context_width: int | None = None,
               qk_norm: bool = True, zero_out: bool = False, impl: str = "auto",
               dtype=jnp.float32, param_dtype=jnp.float32):
    if width % num_heads:
      raise ValueError(f"Attention: width {width} is not divisible by num_heads {num_heads}")
    head_dim = width // num_heads
    context_width = context_width or width
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.q = Dense(width, (num_heads, head_dim), ("embed", "heads", "kv"), **kw)
    self.k = Dense(context_width, (num_heads, head_dim), ("embed", "heads", "kv"), **kw)
    self.v = Dense(context_width, (num_heads, head_dim), ("embed", "heads", "kv"), **kw)
    self.out = Dense((num_heads, head_dim), width, ("heads", "kv", "embed"), zero_init=zero_out, **kw)
    norm = lambda: RMSNorm(head_dim, rngs=rngs, names=("kv",), param_dtype=param_dtype)
    self.q_norm = norm() if qk_norm else None
    self.k_norm = norm() if qk_norm else None
    self.impl = impl

  def qkv(self, x: jax.Array, context: jax.Array | None = None):
    """q [B, Lq, H, D] from x; k, v [B, Lk, H, D] from context (x if None); QK-normed."""
    context = x if context is None else context
    q, k, v = self.q(x), self.k(context), self.v(context)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    return constrain(q, ACT_HEADS), constrain(k, ACT_HEADS), constrain(v, ACT_HEADS)

  def attend(self, q, k, v, *, kv_lengths=None, mask=None) -> jax.Array:
    if mask is None:  # queries may be split over the mesh's context axis; keys stay whole
      return context_parallel.query_split_attention(q, k, v, kv_lengths=kv_lengths, impl=self.impl)
    return attention(q, k, v, kv_lengths=kv_lengths, mask=mask, impl=self.impl)

  def output(self, o: jax.Array) -> jax.Array:
    return self.out(o)

  def __call__(self, x: jax.Array, context: jax.Array | None = None, *, rope_q=None, rope_k=None,
               kv_lengths=None, mask=None) -> jax.Array:
    """Attention of x over context; `rope_q`/`rope_k` are (cos, sin) tables or None."""
    q, k, v = self.qkv(x, context)
    if rope_q is not None:
      q = rope_lib.apply_rope(q, *rope_q)
    if rope_k is not None:
      k = rope_lib.apply_rope(k, *rope_k)
    return self.output(self.attend(q, k, v, kv_lengths=kv_lengths, mask=mask))


class MLP(nnx.Module):
  """Dense -> GELU (tanh) -> Dense."""

  def __init__(self, width: int, hidden: int, *, rngs: nnx.Rngs, zero_out: bool = False,
               dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.fc1 = Dense(width, hidden, ("embed", "mlp"), **kw)
    self.fc2 = Dense(hidden, width, ("mlp", "embed"), zero_init=zero_out, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.gelu(self.fc1(x), approximate=True)
    if h.ndim == 3:
      h = constrain(h, ACT_MLP)
    return self.fc2(h)


class AdaLN(nnx.Module):
  """Conditioning vector c [B, C] -> `n` modulation vectors [B, 1, width] (shift, scale, gate...).

  Zero-initialised (AdaLN-Zero): shifts and scales start at 0 and gates at 0, so a gated block
  starts as the identity.
  """

  def __init__(self, cond_width: int, width: int, n: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, names: Names = ("embed", None, "mlp")):
    self.n = n
    self.proj = Dense(cond_width, (n, width), names, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                      zero_init=True)

  def vectors(self, c: jax.Array) -> jax.Array:
    """[B, n, width]: all n modulation vectors in one array."""
    return self.proj(jax.nn.silu(c))

  def __call__(self, c: jax.Array) -> tuple[jax.Array, ...]:
    y = self.vectors(c)
    return tuple(y[:, None, i] for i in range(self.n))


class AdaLNOffset(nnx.Module):
  """adaLN-single (PixArt-alpha): one AdaLN projection computes modulation vectors m [B, n, width]
  for a whole stack of blocks; each block adds its own learned offsets [n, width] to them.

  A per-block AdaLN costs n x width^2 parameters (25 M at width 2048 with n = 6; with two
  modalities, 1.2 B in the 2B model's 24 blocks); an offset costs n x width. Zero-initialised,
  with the shared projection zero-initialised too, so gated blocks still start as the identity.
  """

  def __init__(self, width: int, n: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32,
               names: Names = (None, "mlp")):
    self.n = n
    self.offset = param(rngs, nnx.initializers.zeros_init(), (n, width), names, param_dtype)

  def __call__(self, m: jax.Array) -> tuple[jax.Array, ...]:
    if m.shape[1:] != self.offset.shape:
      raise ValueError(f"AdaLNOffset: modulation vectors must be [B, *{self.offset.shape}], got {m.shape}")
    y = m + self.offset[...].astype(m.dtype)
    return tuple(y[:, None, i] for i in range(self.n))


def block_adaln(kind: str, width: int, n: int, **kw) -> nnx.Module:
  """A block's modulation: its own projection of c ("per_block") or offsets to the stack's
  shared vectors ("single"). Both are called on what the stack passes down and return n vectors."""
  if kind == "per_block":
    return AdaLN(width, width, n, **kw)
  if kind == "single":
    return AdaLNOffset(width, n, rngs=kw["rngs"], param_dtype=kw.get("param_dtype", jnp.float32))
  raise ValueError(f"model.adaln={kind!r}: expected one of {ADALN}")


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  return x * (1 + scale.astype(x.dtype)) + shift.astype(x.dtype)
