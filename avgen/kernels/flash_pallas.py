"""Portable Pallas flash attention (forward + backward) with block-sparse masks.

One `pl.pallas_call` per pass, written with grid + BlockSpecs only, so the same code runs on the
CPU (`interpret=True`, the tests) and lowers through Triton on NVIDIA GPUs. Layout [b, l, h, d].

Work plan (see masks.py for the tile classes and schedules):
  forward  grid (b, h, q tiles); each program walks its row of the tile schedule: FULL kv tiles
           without mask arithmetic, then PARTIAL tiles with the per-element rule; SKIP tiles
           are never loaded. Online softmax in base 2 with f32 accumulators; writes the output
           and the row logsumexp (base 2) that the backward needs.
  dq       grid (b, h, q tiles), same schedule as the forward.
  dk, dv   grid (b, h, kv tiles), the transposed schedule.
Rows that see no key write zeros (forward) and a logsumexp of +inf, which makes every
probability of the row 0 in the backward, so their gradients are 0 rather than NaN.
Lengths that are not multiples of the tiles are padded here; padded keys are invisible through
the key-length check that every PARTIAL tile applies. `block_forward` / `block_backward` run the
passes alone for one block of a larger attention (ring attention merges the blocks' outputs by
their logsumexp and gives every block the merged logsumexp in the backward).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from avgen.kernels import masks as masks_lib

LOG2E = math.log2(math.e)
# Finite start for the running max: a tile whose row is fully masked then gives exp2(-inf) = 0
# instead of exp2(-inf - -inf) = NaN.
_M_INIT = -1e30


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  block_q: int = 128
  block_k: int = 64
  block_q_bwd: int = 64
  block_k_bwd: int = 64
  num_warps: int = 4
  num_warps_bwd: int = 4
  num_stages: int = 2


def default_block_sizes(head_dim: int, platform: str) -> BlockSizes:
  if platform == "cpu":
    # Interpret mode: fewer, larger programs are faster; the numbers don't matter for the GPU.
    return BlockSizes(128, 128, 128, 128)
  if head_dim <= 64:
    return BlockSizes(128, 64, 64, 64, num_warps=4, num_warps_bwd=4, num_stages=3)
  if head_dim <= 128:
    return BlockSizes(128, 64, 64, 64, num_warps=8, num_warps_bwd=8, num_stages=2)
  return BlockSizes(64, 32, 32, 32, num_warps=8, num_warps_bwd=8, num_stages=2)


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Everything static about one call (hashable, closed over by the kernels)."""
  b: int
  h: int
  lq: int          # padded lengths
  lk: int
  d: int           # padded head dim
  scale: float
  blocks: BlockSizes
  pairs: tuple | None         # BlockMask rule (m_q, m_k, window) or None
  dense_shape: tuple | None   # (B, H, Lq) of a dense mask (Lq = 1 or lq) or None
  sched_b: int                # batch extent of the schedules (1 or b)
  sched_h: int                # head extent of the schedules (1 or h)
  interpret: bool
  poison: bool


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def flash_attention(q, k, v, *, kv_lengths=None, mask=None, block_sizes: BlockSizes | None = None,
                    interpret: bool | None = None, poison: bool = False):
  """Flash attention; see `avgen.kernels.attention` for the arguments.

  mask: None, a `masks.BlockMask`, an `attention.TokenRule` (traced token tables), or a dense
    bool array [b|1, h|1, lq|1, lk].
  poison: test hook; output buffers start as NaN so unwritten elements show.
  """
  spec, tables, pad = _prepare(q, k, v, kv_lengths, mask, block_sizes, interpret, poison)
  lq, d = q.shape[1], q.shape[3]
  out = _attend(spec, pad(q, spec.lq), pad(k, spec.lk), pad(v, spec.lk), tables)
  return out[:, :lq, :, :d]


def block_forward(q, k, v, *, kv_lengths=None, mask=None, block_sizes: BlockSizes | None = None,
                  interpret: bool | None = None, poison: bool = False):
  """The forward kernel alone, for one block of a larger attention (ring attention).

  Returns (out [b, lq, h, d] in q.dtype, lse f32 [b, h, lq]): lse in base 2 (log2 of the sum of
  exp2 of the base-2 scaled logits), +inf for rows that see no key (whose out is 0).
  """
  spec, tables, pad = _prepare(q, k, v, kv_lengths, mask, block_sizes, interpret, poison)
  lq, d = q.shape[1], q.shape[3]
  out, lse = _forward(spec, pad(q, spec.lq), pad(k, spec.lk), pad(v, spec.lk), tables)
  return out[:, :lq, :, :d], lse[:, :, :lq]


def block_backward(q, k, v, do, lse, delta, *, kv_lengths=None, mask=None,
                   block_sizes: BlockSizes | None = None, interpret: bool | None = None,
                   poison: bool = False):
  """The backward kernels alone, for one block of a larger attention (ring attention).

  lse (base 2, +inf: the row sees no key) and delta = <dO, O> (f32 [b, h, lq]) belong to the
  whole attention, so the returned (dq, dk, dv) (in q.dtype) are this block's exact share.
  """
  spec, tables, pad = _prepare(q, k, v, kv_lengths, mask, block_sizes, interpret, poison)
  lq, lk, d = q.shape[1], k.shape[1], q.shape[3]
  # Padded query rows see nothing (lse +inf), so they add nothing to dk, dv.
  rows = lambda x, fill: jnp.pad(x.astype(jnp.float32), ((0, 0), (0, 0), (0, spec.lq - lq)),
                                 constant_values=fill)
  qp, kp, vp, dop = pad(q, spec.lq), pad(k, spec.lk), pad(v, spec.lk), pad(do, spec.lq)
  lse, delta = rows(lse, jnp.inf), rows(delta, 0.0)
  dq = _backward_dq(spec, qp, kp, vp, dop, lse, delta, tables)
  dk, dv = _backward_dkv(spec, qp, kp, vp, dop, lse, delta, tables)
  return dq[:, :lq, :, :d], dk[:, :lk, :, :d], dv[:, :lk, :, :d]


def _prepare(q, k, v, kv_lengths, mask, block_sizes, interpret, poison):
  """Checks one call; returns its static _Spec, the mask tables, and pad(x, length)."""
  from avgen.kernels.attention import TokenRule  # noqa: PLC0415 - attention imports us lazily
  b, lq, h, d = q.shape
  lk = k.shape[1]
  platform = jax.default_backend()
  interpret = platform == "cpu" if interpret is None else interpret
  bs = block_sizes or default_block_sizes(d, platform)
  # Both passes must tile the padded lengths evenly.
  tq = math.lcm(bs.block_q, bs.block_q_bwd)
  tk = math.lcm(bs.block_k, bs.block_k_bwd)
  lq_p, lk_p = _round_up(lq, tq), _round_up(lk, tk)
  d_p = max(16, _next_pow2(d))

  block_mask = mask if isinstance(mask, masks_lib.BlockMask) else None
  rule = mask if isinstance(mask, TokenRule) else None
  dense = None if mask is None or block_mask is not None or rule is not None else \
      jnp.asarray(mask)
  if block_mask is not None and block_mask.shape != (lq, lk):
    raise ValueError(f"attention: BlockMask is for (lq, lk)={block_mask.shape}, inputs have "
                     f"{(lq, lk)}")
  if rule is not None and rule.shape != (lq, lk):
    raise ValueError(f"attention: TokenRule is for (lq, lk)={rule.shape}, inputs have "
                     f"{(lq, lk)}")
  if dense is not None:
    if dense.ndim != 4 or dense.shape[0] not in (1, b) or dense.shape[1] not in (1, h) or \
        dense.shape[2] not in (1, lq) or dense.shape[3] != lk:
      raise ValueError(f"attention: mask must be bool [b|1, h|1, lq|1, lk]={(b, h, lq, lk)}, "
                       f"got {dense.shape}")
    dense = dense.astype(bool)
    if dense.shape[2] == lq:
      dense = jnp.pad(dense, ((0, 0), (0, 0), (0, lq_p - lq), (0, lk_p - lk)))
    else:
      dense = jnp.pad(dense, ((0, 0), (0, 0), (0, 0), (0, lk_p - lk)))
  if kv_lengths is not None:
    kv_lengths = jnp.asarray(kv_lengths)
    if kv_lengths.shape != (b,) or not jnp.issubdtype(kv_lengths.dtype, jnp.integer):
      raise ValueError(f"attention: kv_lengths must be int [b]={b}, got {kv_lengths.shape} "
                       f"{kv_lengths.dtype}")

  # Effective key length per batch row: padding keys never count.
  kv_len = jnp.full((b,), lk, jnp.int32)
  if kv_lengths is not None:
    kv_len = jnp.clip(kv_lengths.astype(jnp.int32), 0, lk)

  def classes(block_q, block_k):
    lengths = kv_len if kv_lengths is not None else None
    if rule is not None:
      return rule.call_tile_classes(lq_p, lk_p, block_q, block_k, kv_len=lengths)
    return masks_lib.call_tile_classes(
        lq, lk, lq_p, lk_p, block_q, block_k,
        kv_len=lengths, block_mask=block_mask, dense=dense)

  fwd_cls = classes(bs.block_q, bs.block_k)
  bwd_cls = classes(bs.block_q_bwd, bs.block_k_bwd)
  tables = {
      "kv_len": kv_len,
      "sched_fwd": masks_lib.tile_schedule(fwd_cls),
      "sched_dq": masks_lib.tile_schedule(bwd_cls),
      "sched_dkv": masks_lib.tile_schedule(jnp.swapaxes(bwd_cls, -1, -2)),
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
  if dense is not None:
    tables["dense"] = dense.astype(jnp.int8)

  spec = _Spec(
      b=b, h=h, lq=lq_p, lk=lk_p, d=d_p, scale=1.0 / math.sqrt(d), blocks=bs, pairs=pairs,
      dense_shape=tuple(dense.shape[:3]) if dense is not None else None,
      sched_b=fwd_cls.shape[0], sched_h=fwd_cls.shape[1], interpret=interpret, poison=poison)

  def pad(x, length):
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, d_p - d)))

  return spec, tables, pad


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(spec, q, k, v, tables):
  return _forward(spec, q, k, v, tables)[0]


def _attend_fwd(spec, q, k, v, tables):
  out, lse = _forward(spec, q, k, v, tables)
  return out, (q, k, v, out, lse, tables)


def _attend_bwd(spec, res, do):
  q, k, v, out, lse, tables = res
  # delta_i = sum_d dO_i * O_i: the row term of the softmax backward, once in XLA.
  delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), do.astype(jnp.float32))
  dq = _backward_dq(spec, q, k, v, do, lse, delta, tables)
  dk, dv = _backward_dkv(spec, q, k, v, do, lse, delta, tables)
  return dq, dk, dv, jax.tree.map(lambda _: None, tables)


_attend.defvjp(_attend_fwd, _attend_bwd)


# ---------------------------------------------------------------------------------------------
# Shared pieces of the kernels.

def _mask_inputs(spec: _Spec, tables, bq: int, bk: int, per: str):
  """Arrays and BlockSpecs of the mask tables for a pass.

  per="q": programs own one q tile (the rule's q arrays come as that tile, k arrays whole);
  per="k": programs own one k tile (q arrays whole, k arrays as that tile).
  """
  arrays, specs = [], []
  if spec.pairs is not None:
    for name in ("q_mod", "q_time"):
      arrays.append(tables[name])
      specs.append(pl.BlockSpec((bq,), lambda b, h, i: (i,)) if per == "q"
                   else pl.BlockSpec((spec.lq,), lambda b, h, i: (0,)))
    for name in ("k_mod", "k_time"):
      arrays.append(tables[name])
      specs.append(pl.BlockSpec((spec.lk,), lambda b, h, i: (0,)) if per == "q"
                   else pl.BlockSpec((bk,), lambda b, h, i: (i,)))
  if spec.dense_shape is not None:
    mb, mh, mq = spec.dense_shape
    arrays.append(tables["dense"])
    pick_b = (lambda b: b) if mb > 1 else (lambda b: 0)
    pick_h = (lambda h: h) if mh > 1 else (lambda h: 0)
    if per == "q":
      rows = bq if mq > 1 else 1
      specs.append(pl.BlockSpec((None, None, rows, spec.lk),
                                lambda b, h, i: (pick_b(b), pick_h(h), i if mq > 1 else 0, 0)))
    else:
      specs.append(pl.BlockSpec((None, None, mq, bk),
                                lambda b, h, i: (pick_b(b), pick_h(h), 0, i)))
  return arrays, specs


def _visible(spec: _Spec, mask_refs, kv_len, k_start, bq, bk, q_local, k_local):
  """bool [bq, bk]: the per-element rule of a PARTIAL tile.

  q_local / k_local: start offsets of this tile inside the mask refs' blocks (the refs cover a
  q tile or the whole q length, and the whole k length or one k tile, depending on the pass).
  """
  k_pos = k_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
  visible = k_pos < kv_len
  refs = list(mask_refs)
  if spec.pairs is not None:
    q_mod_ref, q_time_ref, k_mod_ref, k_time_ref = refs[:4]
    refs = refs[4:]
    q_mod = q_mod_ref[pl.ds(q_local, bq)][:, None]
    q_time = q_time_ref[pl.ds(q_local, bq)][:, None]
    k_mod = k_mod_ref[pl.ds(k_local, bk)][None, :]
    k_time = k_time_ref[pl.ds(k_local, bk)][None, :]
    dt = jnp.abs(q_time - k_time)
    rule = None
    for a, b_, w in spec.pairs:
      term = (q_mod == a) & (k_mod == b_)
      if math.isfinite(w):
        term = term & (dt <= jnp.float32(w))
      rule = term if rule is None else rule | term
    visible = visible & rule if rule is not None else jnp.zeros_like(visible)
  if spec.dense_shape is not None:
    (dense_ref,) = refs
    rows = dense_ref.shape[0]
    if rows == 1:
      tile = dense_ref[pl.ds(0, 1), pl.ds(k_local, bk)]
    else:
      tile = dense_ref[pl.ds(q_local, bq), pl.ds(k_local, bk)]
    visible = visible & (tile != 0)
  return visible


def _dot(a, b, contract_a: int, contract_b: int):
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _sched_spec(spec: _Spec, sched):
  pick_b = (lambda b: b) if spec.sched_b > 1 else (lambda b: 0)
  pick_h = (lambda h: h) if spec.sched_h > 1 else (lambda h: 0)
  return pl.BlockSpec((None, None, None, sched.shape[-1]),
                      lambda b, h, i: (pick_b(b), pick_h(h), i, 0))


def _compiler_params(spec: _Spec, num_warps: int):
  if spec.interpret:
    return None
  from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415 - GPU only
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=spec.blocks.num_stages)


def _poisoned(shapes_dtypes):
  return [jnp.full(s, jnp.nan, dt) for s, dt in shapes_dtypes]


# ---------------------------------------------------------------------------------------------
# Forward.

def _forward(spec: _Spec, q, k, v, tables):
  bq, bk = spec.blocks.block_q, spec.blocks.block_k
  nq = spec.lq // bq
  mask_arrays, mask_specs = _mask_inputs(spec, tables, bq, bk, "q")
  n_mask = len(mask_arrays)

  def kernel(sched_ref, kv_len_ref, *refs):
    mask_refs = refs[:n_mask]
    q_ref, k_ref, v_ref = refs[n_mask:n_mask + 3]
    o_ref, lse_ref = refs[-2:]
    b = pl.program_id(0)
    kv_len = kv_len_ref[b]
    n_full, n_part = sched_ref[0], sched_ref[1]
    qv = q_ref[...]
    scale2 = spec.scale * LOG2E

    def step(j, carry, masked):
      acc, m, l = carry
      k_start = pl.multiple_of(sched_ref[2 + j] * bk, bk)
      kt = k_ref[pl.ds(k_start, bk), :]
      s = _dot(qv, kt, 1, 1) * scale2
      if masked:
        vis = _visible(spec, mask_refs, kv_len, k_start, bq, bk, 0, k_start)
        s = jnp.where(vis, s, -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      alpha = jnp.exp2(m - m_new)
      p = jnp.exp2(s - m_new[:, None])
      l = l * alpha + jnp.sum(p, axis=1)
      vt = v_ref[pl.ds(k_start, bk), :]
      acc = acc * alpha[:, None] + _dot(p.astype(vt.dtype), vt, 1, 0)
      return acc, m_new, l

    carry = (jnp.zeros((bq, spec.d), jnp.float32), jnp.full((bq,), _M_INIT, jnp.float32),
             jnp.zeros((bq,), jnp.float32))
    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    acc, m, l = lax.fori_loop(n_full, n_full + n_part, functools.partial(step, masked=True), carry)
    seen = l > 0
    o_ref[...] = (acc / jnp.where(seen, l, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log2(jnp.where(seen, l, 1.0)), jnp.inf)

  in_specs = [
      _sched_spec(spec, tables["sched_fwd"]),
      pl.BlockSpec((spec.b,), lambda b, h, i: (0,)),
      *mask_specs,
      pl.BlockSpec((None, bq, None, spec.d), lambda b, h, i: (b, i, h, 0)),
      pl.BlockSpec((None, spec.lk, None, spec.d), lambda b, h, i: (b, 0, h, 0)),
      pl.BlockSpec((None, spec.lk, None, spec.d), lambda b, h, i: (b, 0, h, 0)),
  ]
  out_shapes = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                jax.ShapeDtypeStruct((spec.b, spec.h, spec.lq), jnp.float32)]
  out_specs = [pl.BlockSpec((None, bq, None, spec.d), lambda b, h, i: (b, i, h, 0)),
               pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))]
  args = [tables["sched_fwd"], tables["kv_len"], *mask_arrays, q, k, v]
  return _call(spec, kernel, (spec.b, spec.h, nq), in_specs, out_specs, out_shapes, args,
               spec.blocks.num_warps, "avgen_flash_fwd")


def _call(spec, kernel, grid, in_specs, out_specs, out_shapes, args, num_warps, name):
  aliases = {}
  if spec.poison:
    poison = _poisoned([(s.shape, s.dtype) for s in out_shapes])
    n_in = len(args)
    args = [*args, *poison]
    in_specs = [*in_specs, *out_specs]
    aliases = {n_in + i: i for i in range(len(out_shapes))}
    inner = kernel

    def kernel(*refs):  # noqa: F811 - drop the aliased inputs
      inner(*refs[:n_in], *refs[n_in + len(out_shapes):])

  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shapes,
      input_output_aliases=aliases, interpret=spec.interpret, name=name,
      compiler_params=_compiler_params(spec, num_warps))(*args)


# ---------------------------------------------------------------------------------------------
# Backward.

def _backward_dq(spec: _Spec, q, k, v, do, lse, delta, tables):
  bq, bk = spec.blocks.block_q_bwd, spec.blocks.block_k_bwd
  nq = spec.lq // bq
  mask_arrays, mask_specs = _mask_inputs(spec, tables, bq, bk, "q")
  n_mask = len(mask_arrays)

  def kernel(sched_ref, kv_len_ref, *refs):
    mask_refs = refs[:n_mask]
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[n_mask:n_mask + 6]
    dq_ref = refs[-1]
    b = pl.program_id(0)
    kv_len = kv_len_ref[b]
    n_full, n_part = sched_ref[0], sched_ref[1]
    qv, dov = q_ref[...], do_ref[...]
    lse_v, delta_v = lse_ref[...], delta_ref[...]
    scale2 = spec.scale * LOG2E

    def step(j, dq, masked):
      k_start = pl.multiple_of(sched_ref[2 + j] * bk, bk)
      kt = k_ref[pl.ds(k_start, bk), :]
      vt = v_ref[pl.ds(k_start, bk), :]
      s = _dot(qv, kt, 1, 1) * scale2
      if masked:
        vis = _visible(spec, mask_refs, kv_len, k_start, bq, bk, 0, k_start)
        s = jnp.where(vis, s, -jnp.inf)
      p = jnp.exp2(s - lse_v[:, None])
      dp = _dot(dov, vt, 1, 1)
      ds = p * (dp - delta_v[:, None])
      return dq + _dot(ds.astype(kt.dtype), kt, 1, 0)

    dq = jnp.zeros((bq, spec.d), jnp.float32)
    dq = lax.fori_loop(0, n_full, functools.partial(step, masked=False), dq)
    dq = lax.fori_loop(n_full, n_full + n_part, functools.partial(step, masked=True), dq)
    dq_ref[...] = (dq * spec.scale).astype(dq_ref.dtype)

  row = pl.BlockSpec((None, bq, None, spec.d), lambda b, h, i: (b, i, h, 0))
  full_k = pl.BlockSpec((None, spec.lk, None, spec.d), lambda b, h, i: (b, 0, h, 0))
  vec = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
  in_specs = [_sched_spec(spec, tables["sched_dq"]), pl.BlockSpec((spec.b,), lambda b, h, i: (0,)),
              *mask_specs, row, full_k, full_k, row, vec, vec]
  args = [tables["sched_dq"], tables["kv_len"], *mask_arrays, q, k, v, do, lse, delta]
  (dq,) = _call(spec, kernel, (spec.b, spec.h, nq), in_specs, [row],
                [jax.ShapeDtypeStruct(q.shape, q.dtype)], args, spec.blocks.num_warps_bwd,
                "avgen_flash_dq")
  return dq


def _backward_dkv(spec: _Spec, q, k, v, do, lse, delta, tables):
  bq, bk = spec.blocks.block_q_bwd, spec.blocks.block_k_bwd
  nk = spec.lk // bk
  mask_arrays, mask_specs = _mask_inputs(spec, tables, bq, bk, "k")
  n_mask = len(mask_arrays)

  def kernel(sched_ref, kv_len_ref, *refs):
    mask_refs = refs[:n_mask]
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[n_mask:n_mask + 6]
    dk_ref, dv_ref = refs[-2:]
    b, ki = pl.program_id(0), pl.program_id(2)
    kv_len = kv_len_ref[b]
    n_full, n_part = sched_ref[0], sched_ref[1]
    kt, vt = k_ref[...], v_ref[...]
    k_start = ki * bk
    scale2 = spec.scale * LOG2E

    def step(j, carry, masked):
      dk, dv = carry
      q_start = pl.multiple_of(sched_ref[2 + j] * bq, bq)
      qv = q_ref[pl.ds(q_start, bq), :]
      dov = do_ref[pl.ds(q_start, bq), :]
      lse_v = lse_ref[pl.ds(q_start, bq)]
      delta_v = delta_ref[pl.ds(q_start, bq)]
      s = _dot(qv, kt, 1, 1) * scale2
      if masked:
        vis = _visible(spec, mask_refs, kv_len, k_start, bq, bk, q_start, 0)
        s = jnp.where(vis, s, -jnp.inf)
      p = jnp.exp2(s - lse_v[:, None])                      # [bq, bk]
      dv = dv + _dot(p.astype(dov.dtype), dov, 0, 0)        # p^T dO
      dp = _dot(dov, vt, 1, 1)
      ds = p * (dp - delta_v[:, None])
      dk = dk + _dot(ds.astype(qv.dtype), qv, 0, 0)         # dS^T Q
      return dk, dv

    zeros = jnp.zeros((bk, spec.d), jnp.float32)
    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), (zeros, zeros))
    dk, dv = lax.fori_loop(n_full, n_full + n_part, functools.partial(step, masked=True), carry)
    dk_ref[...] = (dk * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)

  tile = pl.BlockSpec((None, bk, None, spec.d), lambda b, h, i: (b, i, h, 0))
  full_q = pl.BlockSpec((None, spec.lq, None, spec.d), lambda b, h, i: (b, 0, h, 0))
  vec = pl.BlockSpec((None, None, spec.lq), lambda b, h, i: (b, h, 0))
  in_specs = [_sched_spec(spec, tables["sched_dkv"]),
              pl.BlockSpec((spec.b,), lambda b, h, i: (0,)),
              *mask_specs, full_q, tile, tile, full_q, vec, vec]
  args = [tables["sched_dkv"], tables["kv_len"], *mask_arrays, q, k, v, do, lse, delta]
  dk, dv = _call(spec, kernel, (spec.b, spec.h, nk), in_specs, [tile, tile],
                 [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
                 args, spec.blocks.num_warps_bwd, "avgen_flash_dkv")
  return dk, dv
