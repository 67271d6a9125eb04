"""Pallas Mosaic TPU flash attention (forward + backward) with block-sparse masks.

The TPU sibling of flash_pallas.py, with the same interface (`flash_attention`, `block_forward`,
`block_backward`, base-2 logsumexp with +inf for rows that see no key) so attention.py routes to
either. Layout in and out is [b, l, h, d]; the wrapper pads the lengths to the tiles, pads d to 64
or a multiple of 128, and transposes to [b, h, l, d] so every block's last two dims are
(tokens, head_dim), as Mosaic's (8, 128) tiling wants.

Work plan (tile classes and schedules: masks.py):
  forward  grid (b, h, q tiles, steps); step j of a q tile visits the j-th entry of its row of
           the tile schedule (FULL tiles first, then PARTIAL), with the online softmax state in
           VMEM scratch. The schedule is scalar-prefetched into SMEM: the K/V index_map reads
           it, so only visited tiles are fetched. `steps` is the most tiles any row visits
           (known statically for a BlockMask; all tiles for traced tables or a TokenRule);
           steps past a row's count repeat its last visited block, which the pipeline does not
           fetch again, and compute nothing. FULL tiles skip the element mask.
  dq       grid (b, h, q tiles, steps), the same walk over the backward tiles.
  dk, dv   grid (b, h, k tiles, steps) over the transposed schedule; the tile is computed
           transposed (S^T = K Q^T, [bk, bq]) so per-query vectors (logsumexp, delta, the
           rule's query tables) broadcast along sublanes from [1, bq] rows.
Per-row vectors that must be columns ([bq, 1]) come lane-replicated as [.., 128] blocks or from
a [1, bq] row (the forward's statistics live in [bq, 128] scratch). Logits are in base 2
(exp2), accumulation in float32; f16 inputs run as f32 (Mosaic's f16 support varies by chip).
Rows that see no key write zeros and a logsumexp of +inf, so their gradients are 0.

Tested only in TPU interpret mode on the CPU (`interpret=True` or pltpu.InterpretParams), which
checks indexing, pipelining and numerics but not Mosaic's compiler (layouts, VMEM budget); the
block sizes are reasonable defaults, not tuned on hardware.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from avgen.kernels import masks as masks_lib

LOG2E = math.log2(math.e)
LANES = 128
SUBLANES = 8
# Finite start for the running max, so a row with every logit masked (-inf) gives
# exp2(-inf - _M_INIT) = 0 rather than exp2(-inf - -inf) = NaN.
_M_INIT = -1e30
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
MAX_HEAD_DIM = 256


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the forward (block_q x block_k) and both backward passes; multiples of 128.

  Each is clipped to the (128-rounded) length it tiles, so short sequences use small tiles.
  """
  block_q: int = 512
  block_k: int = 512
  block_q_bwd: int = 512
  block_k_bwd: int = 512

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not isinstance(value, int) or value <= 0 or value % LANES:
        raise ValueError(f"flash_tpu.BlockSizes: {field.name} must be a positive multiple of "
                         f"{LANES} (TPU lane width), got {value!r}")


def default_block_sizes(head_dim: int) -> BlockSizes:
  # Untuned: sized so each pass's tiles and f32 [bq, bk] temporaries stay a few MiB of VMEM.
  if head_dim <= 128:
    return BlockSizes(512, 512, 512, 512)
  return BlockSizes(256, 512, 256, 256)


def refusal(q, k, mask) -> str | None:
  """Why the TPU kernel cannot take this call (None if it can)."""
  from avgen.kernels.attention import TokenRule  # noqa: PLC0415 - attention imports us lazily
  if q.dtype not in DTYPES or k.dtype != q.dtype:
    return f"dtype {q.dtype}/{k.dtype} (the TPU kernel takes bf16, f16 or f32, all alike)"
  if q.shape[-1] > MAX_HEAD_DIM:
    return f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM}"
  if mask is not None and not isinstance(mask, (masks_lib.BlockMask, TokenRule)):
    return "a dense mask array (the TPU kernel takes a BlockMask or TokenRule rule)"
  return None


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Everything static about one call (hashable, closed over by the kernels)."""
  b: int
  h: int
  lq: int             # padded lengths
  lk: int
  d: int              # padded head dim
  scale: float
  blocks: BlockSizes  # clipped to the lengths
  pairs: tuple | None  # the rule's (m_q, m_k, window) or None
  per_batch: bool     # schedules differ per batch row (kv_lengths given)
  steps_fwd: int      # grid extent of the inner (visit) axis per pass
  steps_dq: int
  steps_dkv: int
  interpret: object   # False or pltpu.InterpretParams


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _interpret_params(interpret):
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  if interpret is True:
    return pltpu.InterpretParams()
  return interpret or False


def flash_attention(q, k, v, *, kv_lengths=None, mask=None, block_sizes: BlockSizes | None = None,
                    interpret=None):
  """Flash attention; see `avgen.kernels.attention` for the arguments.

  mask: None, a `masks.BlockMask` or an `attention.TokenRule` (traced token tables).
  interpret: None (interpret mode on the CPU only), True, False or a pltpu.InterpretParams.
  """
  spec, tables = _prepare(q, k, v, kv_lengths, mask, block_sizes, interpret)
  cast = _compute_dtype(q.dtype)
  out = _attend(spec, _to_kernel(spec, q, spec.lq, cast), _to_kernel(spec, k, spec.lk, cast),
                _to_kernel(spec, v, spec.lk, cast), tables)
  return _from_kernel(out, q.shape[1], q.shape[3]).astype(q.dtype)


def block_forward(q, k, v, *, kv_lengths=None, mask=None, block_sizes: BlockSizes | None = None,
                  interpret=None):
  """The forward kernel alone, for one block of a larger attention (ring attention).

  Returns (out [b, lq, h, d] in q.dtype, lse f32 [b, h, lq]): lse in base 2 (log2 of the sum of
  exp2 of the base-2 scaled logits), +inf for rows that see no key (whose out is 0).
  """
  spec, tables = _prepare(q, k, v, kv_lengths, mask, block_sizes, interpret)
  cast = _compute_dtype(q.dtype)
  out, lse = _forward(spec, _to_kernel(spec, q, spec.lq, cast), _to_kernel(spec, k, spec.lk, cast),
                      _to_kernel(spec, v, spec.lk, cast), tables)
  return _from_kernel(out, q.shape[1], q.shape[3]).astype(q.dtype), lse[:, :, :q.shape[1]]


def block_backward(q, k, v, do, lse, delta, *, kv_lengths=None, mask=None,
                   block_sizes: BlockSizes | None = None, interpret=None):
  """The backward kernels alone, for one block of a larger attention (ring attention).

  lse (base 2, +inf: the row sees no key) and delta = <dO, O> (f32 [b, h, lq]) belong to the
  whole attention, so the returned (dq, dk, dv) (in q.dtype) are this block's exact share.
  """
  spec, tables = _prepare(q, k, v, kv_lengths, mask, block_sizes, interpret)
  b, lq, h, d = q.shape
  if do.shape != q.shape or lse.shape != (b, h, lq) or delta.shape != (b, h, lq):
    raise ValueError(f"flash_tpu.block_backward: want do {q.shape}, lse and delta {(b, h, lq)}; "
                     f"got {do.shape}, {lse.shape}, {delta.shape}")
  cast = _compute_dtype(q.dtype)
  qk = _to_kernel(spec, q, spec.lq, cast)
  kk, vk = _to_kernel(spec, k, spec.lk, cast), _to_kernel(spec, v, spec.lk, cast)
  dok = _to_kernel(spec, do, spec.lq, cast)
  dq, dk, dv = _backward(spec, qk, kk, vk, dok, _rows(spec, lse, jnp.inf),
                         _rows(spec, delta, 0.0), tables)
  lk = k.shape[1]
  return (_from_kernel(dq, lq, d).astype(q.dtype), _from_kernel(dk, lk, d).astype(q.dtype),
          _from_kernel(dv, lk, d).astype(q.dtype))


def _compute_dtype(dtype):
  return jnp.float32 if dtype == jnp.float16 else dtype


def _to_kernel(spec: _Spec, x, length: int, dtype):
  """[b, l, h, d] -> [b, h, length, spec.d], zero-padded."""
  x = jnp.pad(x.astype(dtype), ((0, 0), (0, length - x.shape[1]), (0, 0),
                                (0, spec.d - x.shape[3])))
  return x.transpose(0, 2, 1, 3)


def _from_kernel(x, length: int, d: int):
  return x.transpose(0, 2, 1, 3)[:, :length, :, :d]


def _rows(spec: _Spec, x, fill):
  """f32 [b, h, l] -> [b, h, 1, spec.lq]: per-query rows padded with `fill`."""
  x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, 0), (0, spec.lq - x.shape[2])),
              constant_values=fill)
  return x[:, :, None, :]


def _prepare(q, k, v, kv_lengths, mask, block_sizes, interpret):
  """Checks one call; returns its static _Spec and its tables (schedules, kv_len, tokens)."""
  from avgen.kernels.attention import TokenRule  # noqa: PLC0415 - attention imports us lazily
  if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[0] != k.shape[0] or \
      q.shape[2:] != k.shape[2:]:
    raise ValueError(f"flash_tpu: want q [b,lq,h,d], k=v [b,lk,h,d]; got {q.shape}, {k.shape}, "
                     f"{v.shape}")
  if v.dtype != q.dtype:
    raise ValueError(f"flash_tpu: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, "
                     f"{v.dtype}")
  reason = refusal(q, k, mask)
  if reason is not None:
    raise ValueError(f"flash_tpu: cannot take {reason}")
  b, lq, h, d = q.shape
  lk = k.shape[1]
  block_mask = mask if isinstance(mask, masks_lib.BlockMask) else None
  rule = mask if isinstance(mask, TokenRule) else None
  if mask is not None and mask.shape != (lq, lk):
    raise ValueError(f"flash_tpu: {type(mask).__name__} is for (lq, lk)={mask.shape}, inputs "
                     f"have {(lq, lk)}")
  if kv_lengths is not None:
    kv_lengths = jnp.asarray(kv_lengths)
    if kv_lengths.shape != (b,) or not jnp.issubdtype(kv_lengths.dtype, jnp.integer):
      raise ValueError(f"flash_tpu: kv_lengths must be int [b]={b}, got {kv_lengths.shape} "
                       f"{kv_lengths.dtype}")

  bs = block_sizes or default_block_sizes(d)
  clip = lambda block, n: min(block, _round_up(n, LANES))
  bs = BlockSizes(clip(bs.block_q, lq), clip(bs.block_k, lk), clip(bs.block_q_bwd, lq),
                  clip(bs.block_k_bwd, lk))
  # Both passes must tile the padded lengths evenly.
  lq_p = _round_up(lq, math.lcm(bs.block_q, bs.block_q_bwd))
  lk_p = _round_up(lk, math.lcm(bs.block_k, bs.block_k_bwd))
  d_p = 64 if d <= 64 else _round_up(d, LANES)

  kv_len = jnp.full((b,), lk, jnp.int32)
  if kv_lengths is not None:
    kv_len = jnp.clip(kv_lengths.astype(jnp.int32), 0, lk)

  def classes(block_q, block_k):
    lengths = kv_len if kv_lengths is not None else None
    if rule is not None:
      return rule.call_tile_classes(lq_p, lk_p, block_q, block_k, kv_len=lengths)
    return masks_lib.call_tile_classes(lq, lk, lq_p, lk_p, block_q, block_k, kv_len=lengths,
                                       block_mask=block_mask)

  def static_visits(block_q, block_k):
    """bool [nq, nk], a superset of the tiles any batch row visits (numpy: static)."""
    nq, nk = lq_p // block_q, lk_p // block_k
    if rule is not None:  # traced tables: nothing is known before run time
      return np.ones((nq, nk), bool)
    visit = np.broadcast_to(np.arange(nk) * block_k < lk, (nq, nk))
    if block_mask is not None:
      cls = block_mask.tile_classes(block_q, block_k)
      cls = np.pad(cls, ((0, nq - cls.shape[0]), (0, nk - cls.shape[1])))  # pads are SKIP
      visit = visit & (cls != masks_lib.SKIP)
    return visit

  fwd_visit = static_visits(bs.block_q, bs.block_k)
  bwd_visit = static_visits(bs.block_q_bwd, bs.block_k_bwd)
  steps_fwd = max(1, int(fwd_visit.sum(axis=1).max()))
  steps_dq = max(1, int(bwd_visit.sum(axis=1).max()))
  steps_dkv = max(1, int(bwd_visit.sum(axis=0).max()))

  def schedule(cls, steps):
    # [B, 1, rows, cols] -> flat int32 [B * rows * (2 + steps)]: SMEM is small, so only the
    # columns a row can visit are kept, and a 1-D array avoids SMEM padding of 2-D ones.
    return masks_lib.tile_schedule(cls)[:, 0, :, :2 + steps].reshape(-1)

  fwd_cls = classes(bs.block_q, bs.block_k)
  bwd_cls = classes(bs.block_q_bwd, bs.block_k_bwd)
  tables = {
      "kv_len": kv_len,
      "sched_fwd": schedule(fwd_cls, steps_fwd),
      "sched_dq": schedule(bwd_cls, steps_dq),
      "sched_dkv": schedule(jnp.swapaxes(bwd_cls, -1, -2), steps_dkv),
  }
  pairs = None
  if block_mask is not None:
    qm, qt, km, kt = block_mask.token_arrays(lq_p, lk_p)
    tables.update(q_mod=jnp.asarray(qm), q_time=jnp.asarray(qt), k_mod=jnp.asarray(km),
                  k_time=jnp.asarray(kt))
    pairs = tuple(block_mask.pairs())
  if rule is not None:
    grown = rule.padded(lq_p, lk_p)
    tables.update(q_mod=grown.q_modality, q_time=grown.q_time, k_mod=grown.k_modality,
                  k_time=grown.k_time)
    pairs = tuple(rule.pairs)

  spec = _Spec(b=b, h=h, lq=lq_p, lk=lk_p, d=d_p, scale=1.0 / math.sqrt(d), blocks=bs,
               pairs=pairs, per_batch=fwd_cls.shape[0] > 1, steps_fwd=steps_fwd,
               steps_dq=steps_dq, steps_dkv=steps_dkv,
               interpret=_interpret_params(interpret))
  return spec, tables


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(spec, q, k, v, tables):
  return _forward(spec, q, k, v, tables)[0]


def _attend_fwd(spec, q, k, v, tables):
  out, lse = _forward(spec, q, k, v, tables)
  return out, (q, k, v, out, lse, tables)


def _attend_bwd(spec, res, do):
  q, k, v, out, lse, tables = res
  # delta_i = <dO_i, O_i>: the softmax backward's row term, once in XLA.
  delta = jnp.einsum("bhqd,bhqd->bhq", out.astype(jnp.float32), do.astype(jnp.float32))
  # Padded query rows add nothing: their dO (and so delta) is 0 and their lse finite.
  dq, dk, dv = _backward(spec, q, k, v, do, lse[:, :, None, :], delta[:, :, None, :], tables)
  return dq, dk, dv, jax.tree.map(lambda _: None, tables)


_attend.defvjp(_attend_fwd, _attend_bwd)


# ---------------------------------------------------------------------------------------------
# Shared pieces.

def _visit_index(sched_ref, row_base, j):
  """The tile visited at step j of the schedule row at `row_base`.

  Past the row's visited count it stays at the last visited tile, so the pipeline, which only
  copies a block whose index changed, fetches nothing for those steps.
  """
  n_visit = sched_ref[row_base] + sched_ref[row_base + 1]
  return sched_ref[row_base + 2 + jnp.minimum(j, jnp.maximum(n_visit - 1, 0))]


def _row_base(spec: _Spec, steps: int, rows: int, b, i):
  return ((b if spec.per_batch else 0) * rows + i) * (2 + steps)


def _lane_cols(x, n: int):
  """[n, 128] per-token column table: each token's value repeated along the lanes."""
  return jnp.broadcast_to(x[:, None], (n, LANES))


def _sublane_rows(x, n: int):
  """[8, n] per-token row table (8 copies: the sublane tile)."""
  return jnp.broadcast_to(x[None, :], (SUBLANES, n))


def _tile_lanes(x, width: int):
  """[r, 128] lane-replicated -> [r, width] (width a multiple of 128, or below 128)."""
  if width <= LANES:
    return x[:, :width]
  return jnp.tile(x, (1, width // LANES))


def _rule_inputs(spec: _Spec, tables, resident: str, visited: str, block_resident: int,
                 block_visited: int, visited_block):
  """BlockSpecs and arrays of the mask rule's token tables (modality, time) for one kernel.

  `resident` ("q" or "k") is the side a program keeps (grid axis 2), as lane columns
  [block, 128]; `visited` is the side its schedule walks, as sublane rows [8, block] at the tile
  `visited_block(b, i, j, sched)`.
  """
  length = {"q": spec.lq, "k": spec.lk}
  col = pl.BlockSpec((block_resident, LANES), lambda b, h, i, j, *_: (i, 0))
  row = pl.BlockSpec((SUBLANES, block_visited),
                     lambda b, h, i, j, s, _: (0, visited_block(b, i, j, s)))
  args = [_lane_cols(tables[f"{resident}_mod"], length[resident]),
          _lane_cols(tables[f"{resident}_time"], length[resident]),
          _sublane_rows(tables[f"{visited}_mod"], length[visited]),
          _sublane_rows(tables[f"{visited}_time"], length[visited])]
  return [col, col, row, row], args


def _rule_mask(spec: _Spec, q_mod, q_time, k_mod, k_time):
  """The BlockMask rule on broadcastable per-token tables."""
  dt = jnp.abs(q_time - k_time)
  visible = None
  for a, b, w in spec.pairs:
    term = (q_mod == a) & (k_mod == b)
    if math.isfinite(w):
      term = term & (dt <= jnp.float32(w))
    visible = term if visible is None else visible | term
  return jnp.zeros(dt.shape, bool) if visible is None else visible


def _dot(a, b, contract_a: int, contract_b: int):
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _call(spec: _Spec, kernel, grid, in_specs, out_specs, out_shapes, scratch, args, name):
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=grid, in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=scratch)
  return pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=out_shapes, interpret=spec.interpret, name=name,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")))(*args)


# ---------------------------------------------------------------------------------------------
# Forward.

def _forward(spec: _Spec, q, k, v, tables):
  """q [b, h, lq, d], k, v [b, h, lk, d] -> (out like q, lse f32 [b, h, lq] base 2)."""
  bq, bk, d = spec.blocks.block_q, spec.blocks.block_k, spec.d
  nq, steps = spec.lq // bq, spec.steps_fwd
  ruled = spec.pairs is not None

  def kv_block(b, i, j, sched):
    return _visit_index(sched, _row_base(spec, steps, nq, b, i), j)

  def kernel(sched_ref, kv_len_ref, q_ref, k_ref, v_ref, *refs):
    if ruled:
      q_mod_ref, q_time_ref, k_mod_ref, k_time_ref, *refs = refs
    o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    base = _row_base(spec, steps, nq, b, i)
    n_full, n_part = sched_ref[base], sched_ref[base + 1]

    @pl.when(j == 0)
    def _init():
      m_ref[...] = jnp.full(m_ref.shape, _M_INIT, jnp.float32)
      l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
      acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def step(masked: bool):
      s = _dot(q_ref[...], k_ref[...], 1, 1) * (spec.scale * LOG2E)       # [bq, bk]
      if masked:
        k_start = sched_ref[base + 2 + j] * bk
        k_pos = k_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        visible = k_pos < kv_len_ref[b]
        if ruled:
          visible &= _rule_mask(spec, _tile_lanes(q_mod_ref[...], bk),
                                _tile_lanes(q_time_ref[...], bk), k_mod_ref[:1, :],
                                k_time_ref[:1, :])
        s = jnp.where(visible, s, -jnp.inf)
      m_prev, l_prev = m_ref[...], l_ref[...]                              # [bq, 128]
      m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
      p = jnp.exp2(s - _tile_lanes(m_next, bk))
      alpha = jnp.exp2(m_prev - m_next)
      m_ref[...] = m_next
      l_ref[...] = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
      pv = _dot(p.astype(v_ref.dtype), v_ref[...], 1, 0)                   # [bq, d]
      acc_ref[...] = acc_ref[...] * _tile_lanes(alpha, d) + pv

    pl.when(j < n_full)(lambda: step(False))
    pl.when((j >= n_full) & (j < n_full + n_part))(lambda: step(True))

    @pl.when(j == steps - 1)
    def _finish():
      l, m = l_ref[...], m_ref[...]
      seen = l > 0
      safe = jnp.where(seen, l, 1.0)
      o_ref[...] = (acc_ref[...] / _tile_lanes(safe, d)).astype(o_ref.dtype)
      lse_ref[...] = jnp.where(seen, m + jnp.log(safe) * LOG2E, jnp.inf)

  in_specs = [
      pl.BlockSpec((None, None, bq, d), lambda b, h, i, j, *_: (b, h, i, 0)),
      pl.BlockSpec((None, None, bk, d), lambda b, h, i, j, s, _: (b, h, kv_block(b, i, j, s), 0)),
      pl.BlockSpec((None, None, bk, d), lambda b, h, i, j, s, _: (b, h, kv_block(b, i, j, s), 0)),
  ]
  args = [tables["sched_fwd"], tables["kv_len"], q, k, v]
  if ruled:
    rule_specs, rule_args = _rule_inputs(spec, tables, "q", "k", bq, bk, kv_block)
    in_specs += rule_specs
    args += rule_args
  out_specs = [pl.BlockSpec((None, None, bq, d), lambda b, h, i, j, *_: (b, h, i, 0)),
               pl.BlockSpec((None, None, bq, LANES), lambda b, h, i, j, *_: (b, h, i, 0))]
  # The lse leaves the kernel lane-replicated ([.., 128]): written from the [bq, 128] scratch
  # without a relayout, and sliced to one lane right after.
  out_shapes = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((spec.b, spec.h, spec.lq, LANES), jnp.float32)]
  scratch = [pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
             pltpu.VMEM((bq, d), jnp.float32)]
  out, lse = _call(spec, kernel, (spec.b, spec.h, nq, steps), in_specs, out_specs, out_shapes,
                   scratch, args, "avgen_flash_tpu_fwd")
  return out, lse[..., 0]


# ---------------------------------------------------------------------------------------------
# Backward.

def _backward(spec: _Spec, q, k, v, do, lse, delta, tables):
  """Kernel layout in; lse (base 2, +inf: no key) and delta as f32 [b, h, 1, lq] rows."""
  return (_backward_dq(spec, q, k, v, do, lse, delta, tables),
          *_backward_dkv(spec, q, k, v, do, lse, delta, tables))


def _backward_dq(spec: _Spec, q, k, v, do, lse, delta, tables):
  bq, bk, d = spec.blocks.block_q_bwd, spec.blocks.block_k_bwd, spec.d
  nq, steps = spec.lq // bq, spec.steps_dq
  ruled = spec.pairs is not None

  def kv_block(b, i, j, sched):
    return _visit_index(sched, _row_base(spec, steps, nq, b, i), j)

  def kernel(sched_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
    if ruled:
      q_mod_ref, q_time_ref, k_mod_ref, k_time_ref, *refs = refs
    dq_ref, acc_ref = refs
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    base = _row_base(spec, steps, nq, b, i)
    n_full, n_part = sched_ref[base], sched_ref[base + 1]

    @pl.when(j == 0)
    def _init():
      acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def step(masked: bool):
      kt, vt = k_ref[...], v_ref[...]
      s = _dot(q_ref[...], kt, 1, 1) * (spec.scale * LOG2E)               # [bq, bk]
      if masked:
        k_start = sched_ref[base + 2 + j] * bk
        k_pos = k_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        visible = k_pos < kv_len_ref[b]
        if ruled:
          visible &= _rule_mask(spec, _tile_lanes(q_mod_ref[...], bk),
                                _tile_lanes(q_time_ref[...], bk), k_mod_ref[:1, :],
                                k_time_ref[:1, :])
        s = jnp.where(visible, s, -jnp.inf)
      p = jnp.exp2(s - lse_ref[0][:, None])
      dp = _dot(do_ref[...], vt, 1, 1)
      ds = p * (dp - delta_ref[0][:, None])
      acc_ref[...] += _dot(ds.astype(kt.dtype), kt, 1, 0)

    pl.when(j < n_full)(lambda: step(False))
    pl.when((j >= n_full) & (j < n_full + n_part))(lambda: step(True))

    @pl.when(j == steps - 1)
    def _finish():
      dq_ref[...] = (acc_ref[...] * spec.scale).astype(dq_ref.dtype)

  q_tile = pl.BlockSpec((None, None, bq, d), lambda b, h, i, j, *_: (b, h, i, 0))
  kv_tile = pl.BlockSpec((None, None, bk, d),
                         lambda b, h, i, j, s, _: (b, h, kv_block(b, i, j, s), 0))
  q_row = pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j, *_: (b, h, 0, i))
  in_specs = [q_tile, kv_tile, kv_tile, q_tile, q_row, q_row]
  args = [tables["sched_dq"], tables["kv_len"], q, k, v, do, lse, delta]
  if ruled:
    rule_specs, rule_args = _rule_inputs(spec, tables, "q", "k", bq, bk, kv_block)
    in_specs += rule_specs
    args += rule_args
  (dq,) = _call(spec, kernel, (spec.b, spec.h, nq, steps), in_specs, [q_tile],
                [jax.ShapeDtypeStruct(q.shape, q.dtype)], [pltpu.VMEM((bq, d), jnp.float32)],
                args, "avgen_flash_tpu_dq")
  return dq


def _backward_dkv(spec: _Spec, q, k, v, do, lse, delta, tables):
  bq, bk, d = spec.blocks.block_q_bwd, spec.blocks.block_k_bwd, spec.d
  nk, steps = spec.lk // bk, spec.steps_dkv
  ruled = spec.pairs is not None

  def q_block(b, i, j, sched):
    return _visit_index(sched, _row_base(spec, steps, nk, b, i), j)

  def kernel(sched_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
    if ruled:
      k_mod_ref, k_time_ref, q_mod_ref, q_time_ref, *refs = refs
    dk_ref, dv_ref, dk_acc, dv_acc = refs
    b, ki, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    base = _row_base(spec, steps, nk, b, ki)
    n_full, n_part = sched_ref[base], sched_ref[base + 1]

    @pl.when(j == 0)
    def _init():
      dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
      dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def step(masked: bool):
      qt, dot_ = q_ref[...], do_ref[...]
      # Transposed tile: keys on sublanes, queries on lanes.
      s = _dot(k_ref[...], qt, 1, 1) * (spec.scale * LOG2E)               # [bk, bq]
      if masked:
        k_pos = ki * bk + lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
        visible = k_pos < kv_len_ref[b]
        if ruled:
          visible &= _rule_mask(spec, q_mod_ref[:1, :], q_time_ref[:1, :],
                                _tile_lanes(k_mod_ref[...], bq), _tile_lanes(k_time_ref[...], bq))
        s = jnp.where(visible, s, -jnp.inf)
      p = jnp.exp2(s - lse_ref[...])                                       # [bk, bq]
      dv_acc[...] += _dot(p.astype(dot_.dtype), dot_, 1, 0)                # P^T dO
      dp = _dot(v_ref[...], dot_, 1, 1)                                    # (dO V^T)^T
      ds = p * (dp - delta_ref[...])
      dk_acc[...] += _dot(ds.astype(qt.dtype), qt, 1, 0)                   # dS^T Q

    pl.when(j < n_full)(lambda: step(False))
    pl.when((j >= n_full) & (j < n_full + n_part))(lambda: step(True))

    @pl.when(j == steps - 1)
    def _finish():
      dk_ref[...] = (dk_acc[...] * spec.scale).astype(dk_ref.dtype)
      dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)

  k_tile = pl.BlockSpec((None, None, bk, d), lambda b, h, i, j, *_: (b, h, i, 0))
  q_tile = pl.BlockSpec((None, None, bq, d),
                        lambda b, h, i, j, s, _: (b, h, q_block(b, i, j, s), 0))
  q_row = pl.BlockSpec((None, None, 1, bq),
                       lambda b, h, i, j, s, _: (b, h, 0, q_block(b, i, j, s)))
  in_specs = [q_tile, k_tile, k_tile, q_tile, q_row, q_row]
  args = [tables["sched_dkv"], tables["kv_len"], q, k, v, do, lse, delta]
  if ruled:
    rule_specs, rule_args = _rule_inputs(spec, tables, "k", "q", bk, bq, q_block)
    in_specs += rule_specs
    args += rule_args
  dk, dv = _call(spec, kernel, (spec.b, spec.h, nk, steps), in_specs, [k_tile, k_tile],
                 [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
                 [pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
                 args, "avgen_flash_tpu_dkv")
  return dk, dv
