"""The one attention entry point of avgen.

`attention(q, k, v, kv_lengths=..., mask=..., impl=...)` with layout [batch, length, heads,
head_dim]. `mask` is a dense bool array or a `masks.BlockMask` (a block-structured rule whose
empty tiles the pallas kernels skip). Backends:
  xla    plain einsum + softmax in float32; the reference every other backend is tested against.
  cudnn  `jax.nn.dot_product_attention(implementation="cudnn")` (GPU only).
  pallas our own flash kernels: Mosaic GPU (wgmma/TMA, warp-specialized) on Hopper for
         bf16/fp16 with head_dim in {64, 128, 192, 256} and no dense-array mask; the portable
         Pallas kernel (Triton) for everything else on NVIDIA GPUs; the same portable kernel
         with interpret=True on the CPU (slow: for tests). No TPU kernel yet.
  auto   on NVIDIA GPUs: pallas for a BlockMask (on Hopper always when the Mosaic kernel takes
         the call, elsewhere when it skips enough tiles), else cuDNN when it accepts the shape,
         else xla; on other platforms xla. Logs once per fallback reason.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from avgen.kernels import masks as masks_lib

IMPLS = ("auto", "xla", "cudnn", "pallas")

# Off Hopper, auto picks the portable (Triton) kernel for a BlockMask that leaves at most this
# share of the tiles to visit; on Hopper the Mosaic GPU kernel takes every BlockMask it supports.
# Measured on H100 (benchmarks/results/attention.md): cuDNN given the same rule as a dense mask
# array runs 1.87x its dense time, the Mosaic kernel ~1.2x cuDNN dense with nothing skipped and
# 0.37x at 26% of the tiles; the Triton kernel is 3.4x dense and 0.93x at 26%.
AUTO_PALLAS_MAX_TILE_FRACTION = 0.5

_log = logging.getLogger(__name__)


@functools.cache
def _log_once(message: str) -> None:
  _log.warning(message)


def _key_mask(kv_lengths: jax.Array | None, mask, lk: int) -> jax.Array | None:
  """Combines key padding and an explicit mask into one boolean [b|1, h|1, lq|1, lk] mask."""
  mask = _dense(mask)
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


def _dense(mask):
  if isinstance(mask, masks_lib.BlockMask):
    return jnp.asarray(mask.dense())
  return mask


def cudnn_attention(q, k, v, *, kv_lengths=None, mask=None):
  """cuDNN fused attention; raises if cuDNN refuses the shape or dtype."""
  mask = _dense(mask)
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


def _is_hopper() -> bool:
  device = jax.devices()[0]
  return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


def pallas_attention(q, k, v, *, kv_lengths=None, mask=None):
  """Our flash kernels: Mosaic GPU on Hopper where it applies, else the portable kernel."""
  from avgen.kernels import flash_mosaic_gpu, flash_pallas  # noqa: PLC0415 - heavy imports
  platform = jax.default_backend()
  if platform == "cpu":
    return flash_pallas.flash_attention(q, k, v, kv_lengths=kv_lengths, mask=mask, interpret=True)
  if platform != "gpu":
    raise ValueError(f"attention: impl='pallas' has no kernel for platform {platform!r} yet; "
                     "use impl='xla'")
  if _is_hopper():
    reason = flash_mosaic_gpu.refusal(q, k, mask)
    if reason is None:
      return flash_mosaic_gpu.flash_attention(q, k, v, kv_lengths=kv_lengths, mask=mask)
    _log_once(f"attention(impl='pallas') uses the portable Triton kernel: {reason}")
  return flash_pallas.flash_attention(q, k, v, kv_lengths=kv_lengths, mask=mask, interpret=False)


def _auto_wants_pallas(q, k, mask) -> bool:
  if not isinstance(mask, masks_lib.BlockMask):
    return False
  if _is_hopper():
    from avgen.kernels import flash_mosaic_gpu  # noqa: PLC0415 - GPU-only import
    if flash_mosaic_gpu.refusal(q, k, mask) is None:
      return True
  return mask.visible_tile_fraction(128, 64) <= AUTO_PALLAS_MAX_TILE_FRACTION


def attention(q, k, v, *, kv_lengths=None, mask=None, impl: str = "auto"):
  """Scaled dot-product attention, [b, l, h, d] in and out.

  Args:
    q: [b, lq, h, d]; k, v: [b, lk, h, d] (same heads: expand grouped KV before calling).
    kv_lengths: optional int [b]; keys at index >= length are padding.
    mask: optional bool [b|1, h|1, lq|1, lk] (True means "may attend"), or a masks.BlockMask
      over (lq, lk) tokens.
    impl: one of IMPLS.
  """
  if impl not in IMPLS:
    raise ValueError(f"attention: unknown impl {impl!r}; expected one of {IMPLS}")
  if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"attention: want q [b,lq,h,d], k=v [b,lk,h,d]; got {q.shape}, {k.shape}, "
                     f"{v.shape}")
  if isinstance(mask, masks_lib.BlockMask) and mask.shape != (q.shape[1], k.shape[1]):
    raise ValueError(f"attention: BlockMask covers (lq, lk)={mask.shape} but q, k have lengths "
                     f"{(q.shape[1], k.shape[1])}")
  if impl == "xla":
    return xla_attention(q, k, v, kv_lengths=kv_lengths, mask=mask)
  if impl == "pallas":
    return pallas_attention(q, k, v, kv_lengths=kv_lengths, mask=mask)
  reason = _cudnn_refusal(q, k)
  if impl == "cudnn":
    if reason is not None:
      raise ValueError(f"attention: impl='cudnn' cannot run here: {reason}")
    return cudnn_attention(q, k, v, kv_lengths=kv_lengths, mask=mask)
  if jax.default_backend() == "gpu" and _auto_wants_pallas(q, k, mask):
    return pallas_attention(q, k, v, kv_lengths=kv_lengths, mask=mask)
  if reason is None:
    # e.g. kv length 77 with q 16,640 is refused (seen on H100, jax 0.11).
    mask_shape = None if mask is None else (1, 1, *mask.shape) if isinstance(
        mask, masks_lib.BlockMask) else tuple(mask.shape)
    reason = _cudnn_trace_refusal(q.shape, k.shape, q.dtype, kv_lengths is not None, mask_shape)
  if reason is None:
    return cudnn_attention(q, k, v, kv_lengths=kv_lengths, mask=mask)
  if jax.default_backend() == "gpu":
    _log_once(f"attention(impl='auto') falls back to xla: {reason}")
  return xla_attention(q, k, v, kv_lengths=kv_lengths, mask=mask)
