"""Hopper flash attention in Pallas Mosaic GPU (wgmma, TMA, warp specialization), block-sparse.

Each CTA runs three warpgroups: two compute warpgroups that own `block_q` query rows each (or
`dkv_block_k` key rows each in the dK/dV kernel) and one memory warpgroup that streams the
other operand through a ring of `stages` shared-memory slots with TMA. The memory warpgroup
walks the CTA's row of the tile schedule (masks.tile_schedule) from global memory, so SKIP
tiles are never fetched; the compute warpgroups walk the same row, first the FULL tiles without
any mask arithmetic, then the PARTIAL ones with the per-element rule (key length and the
BlockMask's modality/time rule). Slot i's data arrives on barrier i (TMA transaction count);
both compute warpgroups arrive on consumed[i] when done with it, which frees it for refill.

Supported here: bf16/fp16, head_dim a multiple of 64 up to 256, key padding and BlockMask rules.
Dense-array masks go to the portable kernel (flash_pallas). Residuals and conventions match
flash_pallas: base-2 logsumexp, +inf for rows that see no key; `block_forward` /
`block_backward` run the passes alone for ring attention, as flash_pallas's do.
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
from jax.experimental.pallas import mosaic_gpu as plgpu

from avgen.kernels import masks as masks_lib

LOG2E = math.log2(math.e)
_INV_LN2 = 1.0 / math.log(2.0)
_M_INIT = -1e30
_NUM_COMPUTE = 2


@dataclasses.dataclass(frozen=True)
class Config:
  block_q: int = 64        # forward: query rows per compute warpgroup (CTA: 2x)
  block_k: int = 128       # forward: streamed key rows per step
  stages: int = 2
  dq_block_q: int = 64     # dQ: query rows per compute warpgroup
  dq_block_k: int = 64     # dQ: streamed key rows per step
  dkv_block_q: int = 64    # dK/dV: streamed query rows per step
  dkv_block_k: int = 64    # dK/dV: key rows per compute warpgroup
  stages_bwd: int = 2
  compute_registers: int = 232
  memory_registers: int = 40


def default_config(head_dim: int) -> Config:
  if head_dim <= 64:
    return Config(block_k=128, stages=3)
  if head_dim <= 128:
    return Config(block_k=128, stages=2)
  # 256: wgmma needs streamed tiles of >= 64 rows (its K dimension), so only one backward stage
  # fits next to the resident tiles: correct, but the backward loads are not overlapped.
  return Config(block_k=64, stages=2, stages_bwd=1)


def refusal(q, k, mask) -> str | None:
  """Why this kernel cannot take the call (None if it can)."""
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"dtype {q.dtype} (Mosaic GPU kernel takes bf16/fp16)"
  if q.shape[-1] % 64 or q.shape[-1] > 256:
    return f"head_dim {q.shape[-1]} (Mosaic GPU kernel takes multiples of 64 up to 256)"
  from avgen.kernels.attention import TokenRule  # noqa: PLC0415 - attention imports us lazily
  if mask is not None and not isinstance(mask, (masks_lib.BlockMask, TokenRule)):
    return "a dense mask array (Mosaic GPU kernel takes BlockMask / TokenRule rules)"
  return None


@dataclasses.dataclass(frozen=True)
class _Spec:
  b: int
  h: int
  lq: int
  lk: int
  d: int
  scale: float
  cfg: Config
  pairs: tuple | None
  window_only: float | None   # the rule is "|t_q - t_k| <= window_only" for every pair
  sched_b: int
  sched_h: int


def _round_up(n, m):
  return -(-n // m) * m


def flash_attention(q, k, v, *, kv_lengths=None, mask=None, config: Config | None = None):
  """Hopper flash attention; arguments as `avgen.kernels.attention`."""
  spec, tables, pad = _prepare(q, k, v, kv_lengths, mask, config)
  out = _attend(spec, pad(q, spec.lq), pad(k, spec.lk), pad(v, spec.lk), tables)
  return out[:, :q.shape[1]]


def block_forward(q, k, v, *, kv_lengths=None, mask=None, config: Config | None = None):
  """The forward kernel alone, for one block of a larger attention (ring attention): returns
  (out [b, lq, h, d], lse f32 [b, h, lq] in base 2, +inf for rows that see no key)."""
  spec, tables, pad = _prepare(q, k, v, kv_lengths, mask, config)
  out, lse = _forward(spec, pad(q, spec.lq), pad(k, spec.lk), pad(v, spec.lk), tables)
  return out[:, :q.shape[1]], lse[:, :, :q.shape[1]]


def block_backward(q, k, v, do, lse, delta, *, kv_lengths=None, mask=None,
                   config: Config | None = None):
  """The backward kernels alone, with the whole attention's lse (base 2, +inf: no key) and
  delta = <dO, O> (f32 [b, h, lq]): returns this block's exact (dq, dk, dv)."""
  spec, tables, pad = _prepare(q, k, v, kv_lengths, mask, config)
  lq, lk = q.shape[1], k.shape[1]
  rows = lambda x, fill: jnp.pad(x.astype(jnp.float32), ((0, 0), (0, 0), (0, spec.lq - lq)),
                                 constant_values=fill)
  dq, dk, dv = _grads(spec, pad(q, spec.lq), pad(k, spec.lk), pad(v, spec.lk), pad(do, spec.lq),
                      rows(lse, jnp.inf), rows(delta, 0.0), tables)
  return dq[:, :lq], dk[:, :lk], dv[:, :lk]


# Padding tokens of a TokenRule get times this far apart, so that a rule tested by time alone
# (_Spec.window_only) still hides them.
_FAR = 1e30


def _prepare(q, k, v, kv_lengths, mask, config):
  """Checks one call; returns its static _Spec, the mask and schedule tables, and pad(x, n)."""
  from avgen.kernels.attention import TokenRule  # noqa: PLC0415 - attention imports us lazily
  why = refusal(q, k, mask)
  if why is not None:
    raise ValueError(f"attention: Mosaic GPU kernel cannot run this call: {why}")
  b, lq, h, d = q.shape
  lk = k.shape[1]
  cfg = config or default_config(d)
  c = _NUM_COMPUTE
  lq_p = _round_up(lq, math.lcm(c * cfg.block_q, c * cfg.dq_block_q, cfg.dkv_block_q))
  lk_p = _round_up(lk, math.lcm(cfg.block_k, cfg.dq_block_k, c * cfg.dkv_block_k))
  rule = mask if isinstance(mask, TokenRule) else None
  block_mask = mask if rule is None else None
  if mask is not None and mask.shape != (lq, lk):
    raise ValueError(f"attention: {type(mask).__name__} is for (lq, lk)={mask.shape}, inputs "
                     f"have {(lq, lk)}")
  kv_len = jnp.full((b,), lk, jnp.int32)
  if kv_lengths is not None:
    kv_lengths = jnp.asarray(kv_lengths)
    if kv_lengths.shape != (b,) or not jnp.issubdtype(kv_lengths.dtype, jnp.integer):
      raise ValueError(f"attention: kv_lengths must be int [b]={b}, got {kv_lengths.shape} "
                       f"{kv_lengths.dtype}")
    kv_len = jnp.clip(kv_lengths.astype(jnp.int32), 0, lk)

  def sched(block_q, block_k, transpose=False):
    lengths = kv_len if kv_lengths is not None else None
    if rule is not None:
      cls = rule.call_tile_classes(lq_p, lk_p, block_q, block_k, kv_len=lengths)
    else:
      cls = masks_lib.call_tile_classes(lq, lk, lq_p, lk_p, block_q, block_k, kv_len=lengths,
                                        block_mask=block_mask)
    return masks_lib.tile_schedule(jnp.swapaxes(cls, -1, -2) if transpose else cls)

  tables = {
      "kv_len": kv_len,
      "sched_fwd": sched(c * cfg.block_q, cfg.block_k),
      "sched_dq": sched(c * cfg.dq_block_q, cfg.dq_block_k),
      "sched_dkv": sched(cfg.dkv_block_q, c * cfg.dkv_block_k, transpose=True),
  }
  pairs, window_only = None, None
  if block_mask is not None:
    qm, qt, km, kt = block_mask.token_arrays(lq_p, lk_p)
    tables["q_info"] = jnp.stack([jnp.asarray(qt), jnp.asarray(qm, jnp.float32)])  # [2, lq_p]
    tables["k_info"] = jnp.stack([jnp.asarray(kt), jnp.asarray(km, jnp.float32)])  # [2, lk_p]
    pairs = tuple(block_mask.pairs())
    if block_mask.allowed.all():
      windows = np.unique(block_mask.window)
      if windows.size == 1 and np.isfinite(windows[0]):
        window_only = float(windows[0])
  if rule is not None:
    grown = rule.padded(lq_p, lk_p)
    m = rule.num_modalities
    foreign = lambda mod: (mod < 0) | (mod >= m)
    qt = jnp.where(foreign(grown.q_modality), -_FAR, grown.q_time)
    kt = jnp.where(foreign(grown.k_modality), _FAR, grown.k_time)
    tables["q_info"] = jnp.stack([qt, grown.q_modality.astype(jnp.float32)])
    tables["k_info"] = jnp.stack([kt, grown.k_modality.astype(jnp.float32)])
    pairs, window_only = tuple(rule.pairs), rule.window_only()
  spec = _Spec(b=b, h=h, lq=lq_p, lk=lk_p, d=d, scale=1.0 / math.sqrt(d), cfg=cfg,
               pairs=pairs, window_only=window_only,
               sched_b=tables["sched_fwd"].shape[0], sched_h=tables["sched_fwd"].shape[1])

  def pad(x, length):
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))

  return spec, tables, pad


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(spec, q, k, v, tables):
  return _forward(spec, q, k, v, tables)[0]


def _attend_fwd(spec, q, k, v, tables):
  out, lse = _forward(spec, q, k, v, tables)
  return out, (q, k, v, out, lse, tables)


def _attend_bwd(spec, res, do):
  q, k, v, out, lse, tables = res
  delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), do.astype(jnp.float32))
  dq, dk, dv = _grads(spec, q, k, v, do, lse, delta, tables)
  return dq, dk, dv, jax.tree.map(lambda _: None, tables)


def _grads(spec, q, k, v, do, lse, delta, tables):
  # One [b, h, rows, lq] table per query row: lse, delta (and time, modality for the rule), so
  # each streamed query tile needs one extra TMA, not four.
  rows = [lse, delta]
  if spec.pairs is not None:
    info = jnp.broadcast_to(tables["q_info"][None, None], (spec.b, spec.h, 2, spec.lq))
    rows += [info[:, :, 0], info[:, :, 1]]
  q_rows = jnp.stack(rows, axis=2)
  dq = _backward_dq(spec, q, k, v, do, q_rows, tables)
  dk, dv = _backward_dkv(spec, q, k, v, do, q_rows, tables)
  return dq, dk, dv


_attend.defvjp(_attend_fwd, _attend_bwd)


# ---------------------------------------------------------------------------------------------
# Pieces shared by the kernels.

def _operand_smem(shape, dtype):
  # 128-byte swizzle with (8, 64) tiles: the layout wgmma reads without bank conflicts.
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)),
                                              plgpu.SwizzleTransform(128)))


def _rule(spec, q_info, k_info):
  """bool tile: the BlockMask rule per element. q_info(r) / k_info(r) load row r (0: time,
  1: modality) of the query / key token tables, broadcast to the tile; only what the rule
  needs is loaded."""
  dt = jnp.abs(q_info(0) - k_info(0))
  if spec.window_only is not None:
    # Every modality pair with one window: the time test alone (padding keys are excluded by
    # the key-length test, padding queries are sliced off).
    return dt <= jnp.float32(spec.window_only)
  q_mod, k_mod = q_info(1), k_info(1)
  visible = None
  for a, b, w in spec.pairs:
    term = (q_mod == jnp.float32(a)) & (k_mod == jnp.float32(b))
    if math.isfinite(w):
      term = term & (dt <= jnp.float32(w))
    visible = term if visible is None else visible | term
  return visible


def _bcast(vec, shape, dim):
  return lax.broadcast_in_dim(vec, shape, [dim])


def _rem(j, n):
  return lax.rem(j, jnp.asarray(n, j.dtype))


def _kernel_call(body, out_type, scratch, grid, grid_names):
  # grid[0] is blockIdx.x, the fastest-changing: tiles of one head run side by side and share
  # that head's streamed operand in L2.
  return plgpu.kernel(
      body, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=grid_names,
      num_threads=_NUM_COMPUTE + 1, thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True))


def _sched_index(spec, sched_ref, tile):
  b = lax.axis_index("batch") if spec.sched_b > 1 else 0
  h = lax.axis_index("heads") if spec.sched_h > 1 else 0
  return lambda j: sched_ref[b, h, tile, j]


def _stream(spec, n, stages, consumed, issue):
  """Memory warpgroup: fill the ring, then refill slot j % stages once it is consumed."""
  for s in range(stages):
    @pl.when(s < n)
    def _():
      issue(jnp.int32(s), s)

  def refill(j, carry):
    slot = _rem(j, stages)
    plgpu.barrier_wait(consumed.at[slot])
    issue(j, slot)
    return carry

  lax.fori_loop(jnp.int32(stages), jnp.maximum(n, stages), refill, None)


# ---------------------------------------------------------------------------------------------
# Forward.

def _forward(spec: _Spec, q, k, v, tables):
  cfg, d, dtype = spec.cfg, spec.d, q.dtype
  bq, bk, stages = cfg.block_q, cfg.block_k, cfg.stages
  rule = spec.pairs is not None
  n_tiles = spec.lq // (_NUM_COMPUTE * bq)
  scale2 = spec.scale * LOG2E

  def body(sched_ref, kv_len_ref, q_info_ref, k_info_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
           smem, bars):
    q_smem, k_smem, v_smem, lse_smem, qi_smem, ki_smem = smem
    q_bar, qi_bar, k_bar, v_bar, ki_bar, consumed = bars
    bi, hi, ti = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_tiles")
    wg = lax.axis_index("wg")
    entry = _sched_index(spec, sched_ref, ti)
    n_full, n_part = entry(0), entry(1)
    n = n_full + n_part

    @pl.when(wg < _NUM_COMPUTE)
    def _compute():
      plgpu.set_max_registers(cfg.compute_registers, action="increase")
      row0 = ti * (_NUM_COMPUTE * bq) + wg * bq
      qs = q_smem.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(row0, bq), hi], qs, q_bar.at[wg])
      if rule:
        plgpu.copy_gmem_to_smem(q_info_ref.at[:, pl.ds(row0, bq)], qi_smem.at[wg], qi_bar.at[wg])
        plgpu.barrier_wait(qi_bar.at[wg])
      plgpu.barrier_wait(q_bar.at[wg])
      kv_len = kv_len_ref[bi]

      def step(j, carry, masked):
        acc, m, l = carry
        slot = _rem(j, stages)
        plgpu.barrier_wait(k_bar.at[slot])
        if rule:
          plgpu.barrier_wait(ki_bar.at[slot])

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, qs, k_smem.at[slot].transpose((1, 0)))
          return acc_ref[...]

        # Unscaled logits; the scale is folded into the exp2 argument below, where it fuses
        # into one FFMA per element (the row max commutes with a positive scale).
        s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
        if masked:
          k_start = entry(2 + j) * bk
          cols = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=plgpu.Layout.WGMMA)
          visible = (cols + k_start) < kv_len
          if rule:
            row_l = plgpu.Layout.WGMMA.reduce(1)
            col_l = plgpu.Layout.WGMMA.reduce(0)
            visible = visible & _rule(
                spec, lambda r: _bcast(plgpu.load(qi_smem.at[wg, r], (), layout=row_l),
                                       (bq, bk), 0),
                lambda r: _bcast(plgpu.load(ki_smem.at[slot, r], (), layout=col_l), (bq, bk), 1))
          s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1) * scale2)
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s * scale2 - _bcast(m_new, (bq, bk), 0))
        l = l * alpha + p.sum(axis=1)
        acc = acc * _bcast(alpha, (bq, d), 0)
        p16 = p.astype(dtype)
        plgpu.barrier_wait(v_bar.at[slot])

        def pv(acc_ref):
          plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(consumed.at[slot])
        return acc, m_new, l

      row_layout = plgpu.Layout.WGMMA.reduce(1)
      carry = (plgpu.layout_cast(jnp.zeros((bq, d), jnp.float32), plgpu.Layout.WGMMA),
               plgpu.layout_cast(jnp.full((bq,), _M_INIT, jnp.float32), row_layout),
               plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), row_layout))
      carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
      acc, m, l = lax.fori_loop(n_full, n, functools.partial(step, masked=True), carry)
      seen = l > 0.0
      l_safe = jnp.where(seen, l, 1.0)
      qs[...] = (acc / _bcast(l_safe, (bq, d), 0)).astype(dtype)
      lse_smem.at[wg][...] = jnp.where(seen, m + jnp.log(l_safe) * _INV_LN2, jnp.inf)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qs, o_ref.at[bi, pl.ds(row0, bq), hi])
      plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[bi, hi, pl.ds(row0, bq)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _NUM_COMPUTE)
    def _memory():
      plgpu.set_max_registers(cfg.memory_registers, action="decrease")

      def issue(j, slot):
        start = entry(2 + j) * bk
        plgpu.copy_gmem_to_smem(k_ref.at[bi, pl.ds(start, bk), hi], k_smem.at[slot],
                                k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[bi, pl.ds(start, bk), hi], v_smem.at[slot],
                                v_bar.at[slot])
        if rule:
          plgpu.copy_gmem_to_smem(k_info_ref.at[:, pl.ds(start, bk)], ki_smem.at[slot],
                                  ki_bar.at[slot])

      _stream(spec, n, stages, consumed, issue)

  info_q = tables.get("q_info", jnp.zeros((2, spec.lq), jnp.float32))
  info_k = tables.get("k_info", jnp.zeros((2, spec.lk), jnp.float32))
  smem = (
      _operand_smem((_NUM_COMPUTE, bq, d), dtype),
      _operand_smem((stages, bk, d), dtype),
      _operand_smem((stages, bk, d), dtype),
      plgpu.SMEM((_NUM_COMPUTE, bq), jnp.float32),
      plgpu.SMEM((_NUM_COMPUTE, 2, bq), jnp.float32),
      plgpu.SMEM((stages, 2, bk), jnp.float32),
  )
  bars = (
      plgpu.Barrier(num_barriers=_NUM_COMPUTE),
      plgpu.Barrier(num_barriers=_NUM_COMPUTE),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_arrivals=_NUM_COMPUTE, num_barriers=stages),
  )
  out_type = (jax.ShapeDtypeStruct(q.shape, dtype),
              jax.ShapeDtypeStruct((spec.b, spec.h, spec.lq), jnp.float32))
  call = _kernel_call(body, out_type, (smem, bars), (n_tiles, spec.h, spec.b),
                      ("q_tiles", "heads", "batch"))
  return call(tables["sched_fwd"], tables["kv_len"], info_q, info_k, q, k, v)


# ---------------------------------------------------------------------------------------------
# Backward: dQ (rows per warpgroup, K/V streamed) and dK/dV (keys per warpgroup, Q/dO streamed).

def _backward_dq(spec: _Spec, q, k, v, do, q_rows, tables):
  cfg, d, dtype = spec.cfg, spec.d, q.dtype
  bq, bk, stages = cfg.dq_block_q, cfg.dq_block_k, cfg.stages_bwd
  rule = spec.pairs is not None
  n_rows = q_rows.shape[2]
  n_tiles = spec.lq // (_NUM_COMPUTE * bq)
  scale2 = spec.scale * LOG2E

  def body(sched_ref, kv_len_ref, k_info_ref, q_ref, k_ref, v_ref, do_ref, rows_ref, dq_ref,
           smem, bars):
    q_smem, do_smem, rows_smem, k_smem, v_smem, ki_smem = smem
    q_bar, k_bar, v_bar, ki_bar, consumed = bars
    bi, hi, ti = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("q_tiles")
    wg = lax.axis_index("wg")
    entry = _sched_index(spec, sched_ref, ti)
    n_full, n_part = entry(0), entry(1)
    n = n_full + n_part

    @pl.when(wg < _NUM_COMPUTE)
    def _compute():
      plgpu.set_max_registers(cfg.compute_registers, action="increase")
      row0 = ti * (_NUM_COMPUTE * bq) + wg * bq
      qs, dos = q_smem.at[wg], do_smem.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(row0, bq), hi], qs, q_bar.at[wg])
      plgpu.copy_gmem_to_smem(do_ref.at[bi, pl.ds(row0, bq), hi], dos, q_bar.at[wg])
      plgpu.copy_gmem_to_smem(rows_ref.at[bi, hi, :, pl.ds(row0, bq)], rows_smem.at[wg],
                              q_bar.at[wg])
      plgpu.barrier_wait(q_bar.at[wg])
      row_l = plgpu.Layout.WGMMA.reduce(1)
      lse = plgpu.load(rows_smem.at[wg, 0], (), layout=row_l)
      delta = plgpu.load(rows_smem.at[wg, 1], (), layout=row_l)
      kv_len = kv_len_ref[bi]

      def step(j, dq, masked):
        slot = _rem(j, stages)
        plgpu.barrier_wait(k_bar.at[slot])
        if rule:
          plgpu.barrier_wait(ki_bar.at[slot])

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, qs, k_smem.at[slot].transpose((1, 0)))
          return acc_ref[...]

        s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
        if masked:
          k_start = entry(2 + j) * bk
          cols = plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1, layout=plgpu.Layout.WGMMA)
          visible = (cols + k_start) < kv_len
          if rule:
            col_l = plgpu.Layout.WGMMA.reduce(0)
            visible = visible & _rule(
                spec, lambda r: _bcast(plgpu.load(rows_smem.at[wg, 2 + r], (), layout=row_l),
                                       (bq, bk), 0),
                lambda r: _bcast(plgpu.load(ki_smem.at[slot, r], (), layout=col_l), (bq, bk), 1))
          s = jnp.where(visible, s, -jnp.inf)
        p = jnp.exp2(s * scale2 - _bcast(lse, (bq, bk), 0))
        plgpu.barrier_wait(v_bar.at[slot])

        def dov(acc_ref):
          plgpu.wgmma(acc_ref, dos, v_smem.at[slot].transpose((1, 0)))
          return acc_ref[...]

        dp = pl.run_scoped(dov, plgpu.ACC((bq, bk), jnp.float32))
        ds = (p * (dp - _bcast(delta, (bq, bk), 0))).astype(dtype)

        def dsk(acc_ref):
          plgpu.wgmma(acc_ref, ds, k_smem.at[slot])

        dq = pl.run_state(dsk)(plgpu.ACC.init(dq))
        plgpu.barrier_arrive(consumed.at[slot])
        return dq

      dq = plgpu.layout_cast(jnp.zeros((bq, d), jnp.float32), plgpu.Layout.WGMMA)
      dq = lax.fori_loop(0, n_full, functools.partial(step, masked=False), dq)
      dq = lax.fori_loop(n_full, n, functools.partial(step, masked=True), dq)
      qs[...] = (dq * spec.scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qs, dq_ref.at[bi, pl.ds(row0, bq), hi])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _NUM_COMPUTE)
    def _memory():
      plgpu.set_max_registers(cfg.memory_registers, action="decrease")

      def issue(j, slot):
        start = entry(2 + j) * bk
        plgpu.copy_gmem_to_smem(k_ref.at[bi, pl.ds(start, bk), hi], k_smem.at[slot],
                                k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[bi, pl.ds(start, bk), hi], v_smem.at[slot],
                                v_bar.at[slot])
        if rule:
          plgpu.copy_gmem_to_smem(k_info_ref.at[:, pl.ds(start, bk)], ki_smem.at[slot],
                                  ki_bar.at[slot])

      _stream(spec, n, stages, consumed, issue)

  info_k = tables.get("k_info", jnp.zeros((2, spec.lk), jnp.float32))
  smem = (
      _operand_smem((_NUM_COMPUTE, bq, d), dtype),
      _operand_smem((_NUM_COMPUTE, bq, d), dtype),
      plgpu.SMEM((_NUM_COMPUTE, n_rows, bq), jnp.float32),
      _operand_smem((stages, bk, d), dtype),
      _operand_smem((stages, bk, d), dtype),
      plgpu.SMEM((stages, 2, bk), jnp.float32),
  )
  bars = (
      plgpu.Barrier(num_arrivals=3, num_barriers=_NUM_COMPUTE),  # q, dO, row table: 3 copies
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_arrivals=_NUM_COMPUTE, num_barriers=stages),
  )
  call = _kernel_call(body, jax.ShapeDtypeStruct(q.shape, dtype), (smem, bars),
                      (n_tiles, spec.h, spec.b), ("q_tiles", "heads", "batch"))
  return call(tables["sched_dq"], tables["kv_len"], info_k, q, k, v, do, q_rows)


def _backward_dkv(spec: _Spec, q, k, v, do, q_rows, tables):
  cfg, d, dtype = spec.cfg, spec.d, q.dtype
  bq, bk, stages = cfg.dkv_block_q, cfg.dkv_block_k, cfg.stages_bwd
  rule = spec.pairs is not None
  n_rows = q_rows.shape[2]
  n_tiles = spec.lk // (_NUM_COMPUTE * bk)
  scale2 = spec.scale * LOG2E

  def body(sched_ref, kv_len_ref, k_info_ref, q_ref, k_ref, v_ref, do_ref, rows_ref,
           dk_ref, dv_ref, smem, bars):
    k_smem, v_smem, ki_smem, q_smem, do_smem, rows_smem = smem
    k_bar, q_bar, do_bar, consumed = bars
    bi, hi, ti = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("k_tiles")
    wg = lax.axis_index("wg")
    entry = _sched_index(spec, sched_ref, ti)
    n_full, n_part = entry(0), entry(1)
    n = n_full + n_part

    @pl.when(wg < _NUM_COMPUTE)
    def _compute():
      plgpu.set_max_registers(cfg.compute_registers, action="increase")
      key0 = ti * (_NUM_COMPUTE * bk) + wg * bk
      ks, vs = k_smem.at[wg], v_smem.at[wg]
      plgpu.copy_gmem_to_smem(k_ref.at[bi, pl.ds(key0, bk), hi], ks, k_bar.at[wg])
      plgpu.copy_gmem_to_smem(v_ref.at[bi, pl.ds(key0, bk), hi], vs, k_bar.at[wg])
      plgpu.copy_gmem_to_smem(k_info_ref.at[:, pl.ds(key0, bk)], ki_smem.at[wg], k_bar.at[wg])
      plgpu.barrier_wait(k_bar.at[wg])
      kv_len = kv_len_ref[bi]
      row_l = plgpu.Layout.WGMMA.reduce(1)   # per key (rows of the transposed tiles)
      col_l = plgpu.Layout.WGMMA.reduce(0)   # per query

      def step(j, carry, masked):
        dk, dv = carry
        slot = _rem(j, stages)
        plgpu.barrier_wait(q_bar.at[slot])

        def kq(acc_ref):
          plgpu.wgmma(acc_ref, ks, q_smem.at[slot].transpose((1, 0)))
          return acc_ref[...]

        s_t = pl.run_scoped(kq, plgpu.ACC((bk, bq), jnp.float32))   # [keys, queries]
        if masked:
          rows = plgpu.broadcasted_iota(jnp.int32, (bk, bq), 0, layout=plgpu.Layout.WGMMA)
          visible = (rows + key0) < kv_len
          if rule:
            visible = visible & _rule(
                spec, lambda r: _bcast(plgpu.load(rows_smem.at[slot, 2 + r], (), layout=col_l),
                                       (bk, bq), 1),
                lambda r: _bcast(plgpu.load(ki_smem.at[wg, r], (), layout=row_l), (bk, bq), 0))
          s_t = jnp.where(visible, s_t, -jnp.inf)
        lse = _bcast(plgpu.load(rows_smem.at[slot, 0], (), layout=col_l), (bk, bq), 1)
        p_t = jnp.exp2(s_t * scale2 - lse)
        plgpu.barrier_wait(do_bar.at[slot])

        def dv_dp(refs):
          dv_ref_, dp_ref_ = refs
          plgpu.wgmma(dv_ref_, p_t.astype(dtype), do_smem.at[slot])
          plgpu.wgmma(dp_ref_, vs, do_smem.at[slot].transpose((1, 0)))

        zeros = plgpu.layout_cast(jnp.zeros((bk, bq), jnp.float32), plgpu.Layout.WGMMA)
        dv, dp_t = pl.run_state(dv_dp)((plgpu.ACC.init(dv), plgpu.ACC.init(zeros)))
        delta = _bcast(plgpu.load(rows_smem.at[slot, 1], (), layout=col_l), (bk, bq), 1)
        ds_t = (p_t * (dp_t - delta)).astype(dtype)

        def dsq(acc_ref):
          plgpu.wgmma(acc_ref, ds_t, q_smem.at[slot])

        dk = pl.run_state(dsq)(plgpu.ACC.init(dk))
        plgpu.barrier_arrive(consumed.at[slot])
        return dk, dv

      zeros = plgpu.layout_cast(jnp.zeros((bk, d), jnp.float32), plgpu.Layout.WGMMA)
      carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), (zeros, zeros))
      dk, dv = lax.fori_loop(n_full, n, functools.partial(step, masked=True), carry)
      ks[...] = (dk * spec.scale).astype(dtype)
      vs[...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(ks, dk_ref.at[bi, pl.ds(key0, bk), hi])
      plgpu.copy_smem_to_gmem(vs, dv_ref.at[bi, pl.ds(key0, bk), hi])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _NUM_COMPUTE)
    def _memory():
      plgpu.set_max_registers(cfg.memory_registers, action="decrease")

      def issue(j, slot):
        start = entry(2 + j) * bq
        plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(start, bq), hi], q_smem.at[slot],
                                q_bar.at[slot])
        plgpu.copy_gmem_to_smem(rows_ref.at[bi, hi, :, pl.ds(start, bq)], rows_smem.at[slot],
                                q_bar.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[bi, pl.ds(start, bq), hi], do_smem.at[slot],
                                do_bar.at[slot])

      _stream(spec, n, stages, consumed, issue)

  info_k = tables.get("k_info", jnp.zeros((2, spec.lk), jnp.float32))
  smem = (
      _operand_smem((_NUM_COMPUTE, bk, d), dtype),
      _operand_smem((_NUM_COMPUTE, bk, d), dtype),
      plgpu.SMEM((_NUM_COMPUTE, 2, bk), jnp.float32),
      _operand_smem((stages, bq, d), dtype),
      _operand_smem((stages, bq, d), dtype),
      plgpu.SMEM((stages, n_rows, bq), jnp.float32),
  )
  bars = (
      plgpu.Barrier(num_arrivals=3, num_barriers=_NUM_COMPUTE),  # k, v, key table: 3 copies
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),        # q, row table: 2 copies
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_arrivals=_NUM_COMPUTE, num_barriers=stages),
  )
  out_type = (jax.ShapeDtypeStruct(k.shape, dtype), jax.ShapeDtypeStruct(v.shape, dtype))
  call = _kernel_call(body, out_type, (smem, bars), (n_tiles, spec.h, spec.b),
                      ("k_tiles", "heads", "batch"))
  return call(tables["sched_dkv"], tables["kv_len"], info_k, q, k, v, do, q_rows)
