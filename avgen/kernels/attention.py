"""The one attention entry point of avgen.

`attention(q, k, v, kv_lengths=..., mask=..., impl=...)` with layout [batch, length, heads,
head_dim]. `mask` is a dense bool array or a `masks.BlockMask` (a block-structured rule whose
empty tiles the pallas kernels skip). Backends:
  xla    plain einsum + softmax in float32; the reference every other backend is tested against.
  cudnn  `jax.nn.dot_product_attention(implementation="cudnn")` (GPU only).
  pallas our own flash kernels: Mosaic GPU (wgmma/TMA, warp-specialized) on Hopper for
         bf16/fp16 with head_dim in {64, 128, 192, 256} and no dense-array mask; the portable
         Pallas kernel (Triton) for everything else on NVIDIA GPUs; the same portable kernel
         with interpret=True on the CPU (slow: for tests). On TPUs the Mosaic TPU kernel
         (flash_tpu: bf16/f16/f32, head_dim <= 256, no dense-array mask; tests run it on the
         CPU in TPU interpret mode).
  auto   on NVIDIA GPUs: pallas for a BlockMask (on Hopper always when the Mosaic kernel takes
         the call, elsewhere when it skips enough tiles), else cuDNN when it accepts the shape,
         else xla; on TPUs pallas whenever flash_tpu takes the call, else xla; on other
         platforms xla. Logs once per fallback reason.

Block API (context-parallel ring attention computes one (query block, key block) pair at a time):
`attention_block_forward` returns a block's output and its logsumexp (natural log, -inf for a row
that sees no key), and `attention_block_backward` takes the whole attention's output and
logsumexp, so per-block gradients sum to the exact ones. Masks for a block of a sharded sequence
come as a `TokenRule` (a BlockMask rule whose token tables are arrays, traced ones included).
Their `auto` is pallas on GPUs and on TPUs (where flash_tpu takes the call), xla elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenRule:
  """A `masks.BlockMask` rule whose token tables are arrays (traced ones too).

  What a block of a sharded sequence carries: the ring builds one per block pair from the local
  query block's tables and the visiting key block's. Query i sees key j iff some (a, b, w) in
  `pairs` has q_modality[i] == a, k_modality[j] == b and |q_time[i] - k_time[j]| <= w (float32).
  Tokens whose modality is outside [0, num_modalities) (-1: padding, as
  `BlockMask.token_arrays` writes it) see nothing and are seen by nothing. Kernels skip tiles
  from the tables' per-tile time ranges (`tile_classes`), which may visit a few tiles that an
  exact BlockMask would skip, never the reverse.
  """
  q_modality: jax.Array  # int32 [lq]
  q_time: jax.Array      # float32 [lq]
  k_modality: jax.Array  # int32 [lk]
  k_time: jax.Array      # float32 [lk]
  pairs: tuple = dataclasses.field(metadata=dict(static=True))
  num_modalities: int = dataclasses.field(metadata=dict(static=True))

  @classmethod
  def from_block_mask(cls, mask: masks_lib.BlockMask) -> TokenRule:
    lq, lk = mask.shape
    qm, qt, km, kt = (jnp.asarray(t) for t in mask.token_arrays(lq, lk))
    return cls(qm, qt, km, kt, tuple(mask.pairs()), mask.num_modalities)

  @property
  def shape(self) -> tuple[int, int]:
    return self.q_modality.shape[0], self.k_modality.shape[0]

  def padded(self, lq: int, lk: int) -> TokenRule:
    """The rule over longer sequences; the added tokens are padding (modality -1)."""
    def grow(mod, time, n):
      if n < mod.shape[0]:
        raise ValueError(f"TokenRule: padded length {n} is shorter than the tables "
                         f"({mod.shape[0]})")
      return (jnp.pad(mod.astype(jnp.int32), (0, n - mod.shape[0]), constant_values=-1),
              jnp.pad(time.astype(jnp.float32), (0, n - time.shape[0])))
    return TokenRule(*grow(self.q_modality, self.q_time, lq),
                     *grow(self.k_modality, self.k_time, lk), self.pairs, self.num_modalities)

  def dense(self) -> jax.Array:
    """bool [1, 1, lq, lk]: True where the query may attend the key."""
    q_mod, k_mod = self.q_modality[:, None], self.k_modality[None, :]
    dt = jnp.abs(self.q_time[:, None] - self.k_time[None, :])  # float32, as the kernels compute
    visible = jnp.zeros(self.shape, bool)
    for a, b, w in self.pairs:
      visible |= (q_mod == a) & (k_mod == b) & (dt <= np.float32(w))
    return visible[None, None]

  def window_only(self) -> float | None:
    """w when every modality pair is allowed with the one finite window w, else None."""
    windows = {w for _, _, w in self.pairs}
    if len(self.pairs) == self.num_modalities ** 2 and len(windows) == 1:
      (w,) = windows
      return w if math.isfinite(w) else None
    return None

  def tile_classes(self, block_q: int, block_k: int) -> jax.Array:
    """int8 [ceil(lq/bq), ceil(lk/bk)] of masks.SKIP / PARTIAL / FULL, from each tile's time
    range per modality: SKIP when no pair can be within its window, FULL when every pair is."""
    lq, lk = self.shape
    nq, nk = -(-lq // block_q), -(-lk // block_k)
    rule = self.padded(nq * block_q, nk * block_k)
    m = self.num_modalities

    def ranges(mod, time, n, block):
      mod, time = mod.reshape(n, block), time.reshape(n, block)
      onehot = mod[:, :, None] == jnp.arange(m)[None, None, :]           # [n, block, M]
      lo = jnp.where(onehot, time[:, :, None], jnp.inf).min(axis=1)        # [n, M]
      hi = jnp.where(onehot, time[:, :, None], -jnp.inf).max(axis=1)
      foreign = jnp.any((mod < 0) | (mod >= m), axis=1)                    # padding in the tile
      return lo, hi, onehot.any(axis=1), foreign

    qlo, qhi, qhas, q_foreign = ranges(rule.q_modality, rule.q_time, nq, block_q)
    klo, khi, khas, k_foreign = ranges(rule.k_modality, rule.k_time, nk, block_k)
    windows = {(a, b): w for a, b, w in self.pairs}
    some = jnp.zeros((nq, nk), bool)
    # A tile with padding tokens leaves them to the per-element rule.
    every = ~q_foreign[:, None] & ~k_foreign[None, :]
    for a in range(m):
      for b in range(m):
        present = qhas[:, a, None] & khas[None, :, b]
        if (a, b) not in windows:
          every &= ~present
          continue
        w = np.float32(windows[a, b])
        # Float subtraction is monotone, so these bound the tokens' own |t_q - t_k| exactly.
        gap = jnp.maximum(qlo[:, a, None] - khi[None, :, b], klo[None, :, b] - qhi[:, a, None])
        spread = jnp.maximum(qhi[:, a, None] - klo[None, :, b], khi[None, :, b] - qlo[:, a, None])
        some |= present & (gap <= w)
        every &= ~present | (spread <= w)
    return jnp.where(every & some, masks_lib.FULL,
                     jnp.where(some, masks_lib.PARTIAL, masks_lib.SKIP)).astype(jnp.int8)

  def call_tile_classes(self, lq_pad: int, lk_pad: int, block_q: int, block_k: int, *,
                        kv_len=None) -> jax.Array:
    """int8 [b|1, 1, lq_pad/bq, lk_pad/bk]: the rule and key padding (`kv_len` int [b] within
    [0, lk], None: all keys) of one kernel call over lengths padded to the tiles."""
    lq, lk = self.shape
    padding = masks_lib.call_tile_classes(lq, lk, lq_pad, lk_pad, block_q, block_k,
                                          kv_len=kv_len)
    return jnp.minimum(padding, self.padded(lq_pad, lk_pad).tile_classes(block_q, block_k))


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
  if isinstance(mask, TokenRule):
    return mask.dense()
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


def _tpu_refusal(q, k, mask) -> str | None:
  from avgen.kernels import flash_tpu  # noqa: PLC0415 - heavy import
  return flash_tpu.refusal(q, k, mask)


def pallas_attention(q, k, v, *, kv_lengths=None, mask=None):
  """Our flash kernels: Mosaic GPU on Hopper where it applies, else the portable kernel; the
  Mosaic TPU kernel on TPUs."""
  from avgen.kernels import flash_mosaic_gpu, flash_pallas, flash_tpu  # noqa: PLC0415
  platform = jax.default_backend()
  if platform == "tpu":
    reason = flash_tpu.refusal(q, k, mask)
    if reason is not None:
      raise ValueError(f"attention: impl='pallas' on TPU cannot take {reason}; use impl='xla' "
                       "or 'auto'")
    return flash_tpu.flash_attention(q, k, v, kv_lengths=kv_lengths, mask=mask)
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
  _check_rule_shape("attention", mask, q, k)
  if impl == "xla":
    return xla_attention(q, k, v, kv_lengths=kv_lengths, mask=mask)
  if impl == "pallas":
    return pallas_attention(q, k, v, kv_lengths=kv_lengths, mask=mask)
  reason = _cudnn_refusal(q, k)
  if impl == "cudnn":
    if reason is not None:
      raise ValueError(f"attention: impl='cudnn' cannot run here: {reason}")
    return cudnn_attention(q, k, v, kv_lengths=kv_lengths, mask=mask)
  if jax.default_backend() == "tpu":
    reason = _tpu_refusal(q, k, mask)
    if reason is None:
      return pallas_attention(q, k, v, kv_lengths=kv_lengths, mask=mask)
    _log_once(f"attention(impl='auto') falls back to xla on TPU: {reason}")
    return xla_attention(q, k, v, kv_lengths=kv_lengths, mask=mask)
  if jax.default_backend() == "gpu" and _auto_wants_pallas(q, k, mask):
    return pallas_attention(q, k, v, kv_lengths=kv_lengths, mask=mask)
  if reason is None:
    # e.g. kv length 77 with q 16,640 is refused (seen on H100, jax 0.11).
    mask_shape = None if mask is None else (1, 1, *mask.shape) if isinstance(
        mask, (masks_lib.BlockMask, TokenRule)) else tuple(mask.shape)
    reason = _cudnn_trace_refusal(q.shape, k.shape, q.dtype, kv_lengths is not None, mask_shape)
  if reason is None:
    return cudnn_attention(q, k, v, kv_lengths=kv_lengths, mask=mask)
  if mask is None and k.shape[1] % CUDNN_KEY_MULTIPLE:
    padded = _cudnn_with_padded_keys(q, k, v, kv_lengths)
    if padded is not None:
      return padded
  if jax.default_backend() == "gpu":
    _log_once(f"attention(impl='auto') falls back to xla: {reason}")
  return xla_attention(q, k, v, kv_lengths=kv_lengths, mask=mask)


# cuDNN refuses some key lengths (77, the text encoders' length, with 16,640 queries: H100 and
# H200, jax 0.11) that it may take once padded to this multiple, the padding hidden by kv_lengths.
CUDNN_KEY_MULTIPLE = 64


def _cudnn_with_padded_keys(q, k, v, kv_lengths):
  """cuDNN on keys and values zero-padded to a multiple of CUDNN_KEY_MULTIPLE, the padding
  masked by kv_lengths (the same result); None if cuDNN refuses the padded shape too."""
  length = k.shape[1]
  padded = -(-length // CUDNN_KEY_MULTIPLE) * CUDNN_KEY_MULTIPLE
  k_shape = (k.shape[0], padded, *k.shape[2:])
  if _cudnn_trace_refusal(q.shape, k_shape, q.dtype, True, None) is not None:
    return None
  if kv_lengths is None:
    kv_lengths = jnp.full((k.shape[0],), length, jnp.int32)
  pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
  return cudnn_attention(q, jnp.pad(k, pad), jnp.pad(v, pad),
                         kv_lengths=jnp.minimum(kv_lengths, length))


def _check_rule_shape(name, mask, q, k):
  if isinstance(mask, (masks_lib.BlockMask, TokenRule)) and mask.shape != (q.shape[1], k.shape[1]):
    raise ValueError(f"{name}: {type(mask).__name__} covers (lq, lk)={mask.shape} but q, k have "
                     f"lengths {(q.shape[1], k.shape[1])}")


# ---- Block API: one (query block, key block) pair of a larger attention.

BLOCK_IMPLS = ("auto", "xla", "pallas")
_LN2 = math.log(2.0)
_LOG2E = math.log2(math.e)


def _check_block_call(name, q, k, v, impl, mask=None):
  if impl not in BLOCK_IMPLS:
    raise ValueError(f"{name}: unknown impl {impl!r}; expected one of {BLOCK_IMPLS} (cuDNN "
                     "returns no logsumexp)")
  if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"{name}: want q [b,lq,h,d], k=v [b,lk,h,d]; got {q.shape}, {k.shape}, "
                     f"{v.shape}")
  if impl == "auto":
    platform = jax.default_backend()
    if platform == "tpu":
      reason = _tpu_refusal(q, k, mask)
      if reason is None:
        return "pallas"
      _log_once(f"{name}(impl='auto') falls back to xla on TPU: {reason}")
    return "pallas" if platform == "gpu" else "xla"
  return impl


def _xla_logits(q, k, kv_lengths, mask):
  """float32 logits [b, h, lq, lk] and the visibility mask [b|1, h|1, lq|1, lk] (or None)."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  return logits, _key_mask(kv_lengths, mask, k.shape[1])


def _flash_module(q, k, mask):
  """The kernel module for a pallas block call and its extra arguments."""
  from avgen.kernels import flash_mosaic_gpu, flash_pallas, flash_tpu  # noqa: PLC0415
  platform = jax.default_backend()
  if platform == "tpu":
    reason = flash_tpu.refusal(q, k, mask)
    if reason is not None:
      raise ValueError(f"attention block: impl='pallas' on TPU cannot take {reason}; use "
                       "impl='xla' or 'auto'")
    return flash_tpu, {}
  if platform == "cpu":
    return flash_pallas, {"interpret": True}
  if platform != "gpu":
    raise ValueError(f"attention block: impl='pallas' has no kernel for platform {platform!r} "
                     "yet; use impl='xla'")
  if _is_hopper():
    reason = flash_mosaic_gpu.refusal(q, k, mask)
    if reason is None:
      return flash_mosaic_gpu, {}
    _log_once(f"attention block (impl='pallas') uses the portable Triton kernel: {reason}")
  return flash_pallas, {"interpret": False}


def attention_block_forward(q, k, v, *, kv_lengths=None, mask=None, impl: str = "auto"):
  """Attention of queries over one block of keys, with the block's logsumexp.

  Blocks over disjoint key sets merge exactly: lse = logaddexp(lse_1, lse_2) and
  out = exp(lse_1 - lse) out_1 + exp(lse_2 - lse) out_2.

  Args:
    q: [b, lq, h, d]; k, v: [b, lk, h, d].
    kv_lengths: optional int [b]; keys at index >= length (within this block) are invisible.
    mask: None, a `TokenRule` or `masks.BlockMask` over (lq, lk), or a dense bool
      [b|1, h|1, lq|1, lk] (not taken by the Hopper kernel).
    impl: one of BLOCK_IMPLS: "xla" (the reference), "pallas" (Mosaic GPU on Hopper where it
      takes the call, else the portable kernel; flash_tpu on TPUs; interpret mode on the CPU),
      "auto" (pallas on GPUs and, where flash_tpu takes the call, TPUs; xla elsewhere).

  Returns:
    out: float32 [b, lq, h, d], softmax-weighted over this block's visible keys; 0 for a row
      that sees none. The pallas kernels round it to q.dtype first.
    lse: float32 [b, h, lq], the NATURAL log of sum_j exp(q . k_j / sqrt(d)) over the visible
      keys; -inf for a row that sees none. (The kernels keep it in base 2 with +inf for such
      rows; this API converts.)
  """
  impl = _check_block_call("attention_block_forward", q, k, v, impl, mask)
  _check_rule_shape("attention_block_forward", mask, q, k)
  if impl == "pallas":
    module, kw = _flash_module(q, k, mask)
    out, lse2 = module.block_forward(q, k, v, kv_lengths=kv_lengths, mask=mask, **kw)
    return out.astype(jnp.float32), jnp.where(jnp.isfinite(lse2), lse2 * _LN2, -jnp.inf)
  logits, visible = _xla_logits(q, k, kv_lengths, mask)
  if visible is not None:
    logits = jnp.where(visible, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.exp(logits - row_max[..., None])
  denom = jnp.sum(weights, axis=-1)
  seen = denom > 0
  probs = weights / jnp.where(seen, denom, 1.0)[..., None]
  out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  lse = jnp.where(seen, jnp.log(jnp.where(seen, denom, 1.0)) + row_max, -jnp.inf)
  return out, lse


def attention_block_backward(q, k, v, out, lse, d_out, *, kv_lengths=None, mask=None,
                             impl: str = "auto"):
  """Gradients of a larger attention through one of its key blocks.

  `out` and `lse` are the WHOLE attention's (all key blocks merged, lse in natural log as
  `attention_block_forward` returns it, -inf for rows that see no key anywhere) and d_out the
  cotangent of `out`. The block's probabilities are then the global ones, P = exp(S - lse), so
  each block's dk and dv are exactly the whole attention's gradients for its keys, and the dq of
  all key blocks sum to the whole dq.

  Args:
    q, k, v, kv_lengths, mask, impl: as `attention_block_forward`, for this block.
    out: [b, lq, h, d]; lse: float [b, h, lq]; d_out: [b, lq, h, d].

  Returns:
    float32 (dq [b, lq, h, d], dk [b, lk, h, d], dv [b, lk, h, d]); the pallas kernels round
    them to q.dtype first.
  """
  impl = _check_block_call("attention_block_backward", q, k, v, impl, mask)
  _check_rule_shape("attention_block_backward", mask, q, k)
  b, lq, h, _ = q.shape
  if out.shape != q.shape or d_out.shape != q.shape or lse.shape != (b, h, lq):
    raise ValueError(f"attention_block_backward: want out and d_out {q.shape} and lse "
                     f"{(b, h, lq)}; got {out.shape}, {d_out.shape}, {lse.shape}")
  lse = lse.astype(jnp.float32)
  d_out32 = d_out.astype(jnp.float32)
  # delta_i = <dO_i, O_i>: the softmax backward's row term, from the global output.
  delta = jnp.einsum("bqhd,bqhd->bhq", d_out32, out.astype(jnp.float32))
  if impl == "pallas":
    module, kw = _flash_module(q, k, mask)
    lse2 = jnp.where(jnp.isfinite(lse), lse * _LOG2E, jnp.inf)
    grads = module.block_backward(q, k, v, d_out.astype(q.dtype), lse2, delta,
                                  kv_lengths=kv_lengths, mask=mask, **kw)
    return tuple(g.astype(jnp.float32) for g in grads)
  scale = q.shape[-1] ** -0.5
  logits, visible = _xla_logits(q, k, kv_lengths, mask)
  seen = jnp.isfinite(lse)[..., None]
  keep = seen if visible is None else visible & seen
  probs = jnp.where(keep, jnp.exp(logits - jnp.where(seen, lse[..., None], 0.0)), 0.0)
  dv = jnp.einsum("bhqk,bqhd->bkhd", probs, d_out32)
  dp = jnp.einsum("bqhd,bkhd->bhqk", d_out32, v.astype(jnp.float32))
  ds = probs * (dp - delta[..., None]) * scale
  dq = jnp.einsum("bhqk,bkhd->bqhd", ds, k.astype(jnp.float32))
  dk = jnp.einsum("bhqk,bqhd->bkhd", ds, q.astype(jnp.float32))
  return dq, dk, dv
