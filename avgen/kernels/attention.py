"""The one attention entry point of avgen.

`attention(q, k, v, kv_lengths=..., mask=..., impl=...)` with layout [batch, length, heads,
head_dim]. Backends:
  xla    plain einsum + softmax in float32; the reference every other backend is tested against.
  cudnn  `jax.nn.dot_product_attention(implementation="cudnn")` (GPU only).
  pallas our own flash kernels (a later issue).
  auto   cudnn on NVIDIA GPUs when it accepts the shape, else xla; logs once per reason.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

IMPLS = ("auto", "xla", "cudnn")

_log = logging.getLogger(__name__)


@functools.cache
def _log_once(message: str) -> None:
  _log.warning(message)


def _key_mask(kv_lengths: jax.Array | None, mask: jax.Array | None, lk: int) -> jax.Array | None:
  """Combines key padding and an explicit mask into one boolean [b|1, h|1, lq|1, lk] mask."""
  combined = None
  if kv_lengths is not None:
    combined = (jnp.arange(lk)[None, :] < kv_lengths[:, None])[:, None, None, :]
  if mask is not None:
    if mask.ndim != 4:
      raise ValueError(f"attention: mask must have rank 4 [b, h, lq, lk] (broadcastable), got {mask.shape}")
    combined = mask if combined is None else jnp.logical_and(combined, mask)
  return combined


def xla_attention(q, k, v, *, kv_lengths=None, mask=None):
  """Reference attention; a query row with no visible key returns zeros (not NaN)."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  visible = _key_mask(kv_lengths, mask, k.shape[1])
  if visible is not None:
    logits = jnp.where(visible, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.exp(logits - jax.lax.stop_gradient(row_max))
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  probs = weights / jnp.where(denom == 0, 1.0, denom)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


def cudnn_attention(q, k, v, *, kv_lengths=None, mask=None):
  """cuDNN fused attention; raises if cuDNN refuses the shape or dtype."""
  if mask is not None:
    mask = jnp.broadcast_to(mask, (q.shape[0], mask.shape[1], q.shape[1], k.shape[1]))
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask, key_value_seq_lengths=kv_lengths, implementation="cudnn")


def _cudnn_refusal(q, k) -> str | None:
  """Why cuDNN cannot take this call, checked before tracing into it (None if it can)."""
  if jax.default_backend() != "gpu":
    return f"platform is {jax.default_backend()}, not gpu"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"dtype {q.dtype} (cuDNN needs bf16/fp16)"
  if q.shape[-1] not in (64, 128, 256) or q.shape[-1] != k.shape[-1]:
    return f"head_dim {q.shape[-1]}"
  return None


@functools.cache
def _cudnn_trace_refusal(q_shape, k_shape, dtype, with_lengths: bool, mask_shape) -> str | None:
  """Traces cuDNN's forward and backward abstractly (cached per shape) to find refusals early.

  cuDNN refuses some lengths only in its backward rule, which under `jax.checkpoint` runs long
  after `attention()` returned, where no try/except can fall back. Tracing both here costs no
  device time and lets `auto` decide once per shape.
  """
  q = jax.ShapeDtypeStruct(q_shape, dtype)
  k = jax.ShapeDtypeStruct(k_shape, dtype)
  lengths = jax.ShapeDtypeStruct((q_shape[0],), jnp.int32) if with_lengths else None
  mask = jax.ShapeDtypeStruct(mask_shape, jnp.bool_) if mask_shape is not None else None

  def loss(q, k, v, lengths, mask):
    return cudnn_attention(q, k, v, kv_lengths=lengths, mask=mask).astype(jnp.float32).sum()

  try:
    jax.eval_shape(jax.grad(loss, argnums=(0, 1, 2)), q, k, k, lengths, mask)
  except Exception as e:  # noqa: BLE001 - any refusal means "use another backend"
    return f"cuDNN refused q {q_shape} k {k_shape}: {str(e).splitlines()[0][:200]}"
  return None


def attention(q, k, v, *, kv_lengths=None, mask=None, impl: str = "auto"):
  """Scaled dot-product attention, [b, l, h, d] in and out.

  Args:
    q: [b, lq, h, d]; k, v: [b, lk, h, d] (same heads: expand grouped KV before calling).
    kv_lengths: optional int [b]; keys at index >= length are padding.
    mask: optional bool [b|1, h|1, lq|1, lk]; True means "may attend".
    impl: one of IMPLS.
  """
  if impl not in IMPLS:
    raise ValueError(f"attention: unknown impl {impl!r}; expected one of {IMPLS}")
  if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"attention: want q [b,lq,h,d], k=v [b,lk,h,d]; got {q.shape}, {k.shape}, {v.shape}")
  if impl == "xla":
    return xla_attention(q, k, v, kv_lengths=kv_lengths, mask=mask)
  reason = _cudnn_refusal(q, k)
  if impl == "cudnn":
    if reason is not None:
      raise ValueError(f"attention: impl='cudnn' cannot run here: {reason}")
    return cudnn_attention(q, k, v, kv_lengths=kv_lengths, mask=mask)
  if reason is None:
    # e.g. kv length 77 with q 16,640 is refused (seen on H100, jax 0.11).
    reason = _cudnn_trace_refusal(q.shape, k.shape, q.dtype, kv_lengths is not None,
                                  None if mask is None else tuple(mask.shape))
  if reason is None:
    return cudnn_attention(q, k, v, kv_lengths=kv_lengths, mask=mask)
  if jax.default_backend() == "gpu":
    _log_once(f"attention(impl='auto') falls back to xla: {reason}")
  return xla_attention(q, k, v, kv_lengths=kv_lengths, mask=mask)
