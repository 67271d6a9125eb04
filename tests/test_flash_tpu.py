"""The Mosaic TPU flash kernel in TPU interpret mode on the CPU, against XLA attention.

Interpret mode starts every output and scratch buffer as NaN, so an element the kernel never
writes fails the finiteness checks. It simulates the TPU pipeline (a block is copied only when
its index changes) but not Mosaic's compiler: `test_lowers_to_mosaic_for_tpu` checks the
Pallas-to-Mosaic lowering (block shapes, ops), and nothing here checks layouts or VMEM on a chip.
"""

import functools
import importlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from avgen.kernels import attention, flash_tpu, masks
from avgen.kernels.attention import (TokenRule, attention_block_backward, attention_block_forward,
                                     xla_attention)

attention_lib = importlib.import_module("avgen.kernels.attention")  # the package shadows it
TILES = flash_tpu.BlockSizes(128, 128, 128, 128)  # the smallest TPU-legal tiles: many of them
TOL = 2e-5  # float32 end to end


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@functools.partial(jax.jit, static_argnames=("fn",))
def _out_and_grads(q, k, v, ct, kv_lengths, fn):
  def loss(q, k, v):
    out = fn(q, k, v, kv_lengths=kv_lengths)
    return jnp.sum(out.astype(jnp.float32) * ct), out
  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


def _inputs(seed, b, lq, lk, h, d, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, lq, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(keys[1], (b, lk, h, d), jnp.float32).astype(dtype)
  v = jax.random.normal(keys[2], (b, lk, h, d), jnp.float32).astype(dtype)
  ct = jax.random.normal(keys[3], (b, lq, h, d), jnp.float32)
  return q, k, v, ct


def _ours(mask=None, blocks=TILES):
  # BlockMasks are static Python objects: closed over, not passed as jit arguments.
  def fn(q, k, v, kv_lengths):
    return flash_tpu.flash_attention(q, k, v, kv_lengths=kv_lengths, mask=mask,
                                     block_sizes=blocks, interpret=True)
  return fn


def _reference(mask=None):
  dense = None if mask is None else jnp.asarray(mask.dense())
  return lambda q, k, v, kv_lengths: xla_attention(q, k, v, kv_lengths=kv_lengths, mask=dense)


def _check(seed, b, lq, lk, h, d, *, kv_lengths=None, mask=None, dtype=jnp.float32, tol=TOL,
           blocks=TILES):
  q, k, v, ct = _inputs(seed, b, lq, lk, h, d, dtype)
  lengths = None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
  out, grads = _out_and_grads(q, k, v, ct, lengths, _ours(mask, blocks))
  # The reference runs in float32 on the same (rounded) inputs.
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  ref_out, ref_grads = _out_and_grads(*f32, ct, lengths, _reference(mask))
  assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
  for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
    assert np.all(np.isfinite(np.asarray(got, np.float32))), f"{name}: NaN/inf (unwritten?)"
    assert _rel(got, want) < tol, f"{name}: rel err {_rel(got, want):.2e}"
  return out, grads


def _joint_layout(frames, per_frame, audio):
  video = masks.video_token_times(frames, 2, per_frame)
  audio_t = masks.audio_token_times(audio, 4, 160, 16000, 25.0) * (2 * frames / audio)
  return masks.joint_layout(video, audio_t.astype(np.float32))


def _window_mask():
  # 672 tokens = 5.25 tiles of 128: a ragged last tile. The window leaves each q tile some
  # SKIP tiles on both sides, FULL ones near the diagonal and PARTIAL ones in between.
  layout = _joint_layout(frames=8, per_frame=64, audio=160)
  mask = masks.self_attention_window(layout, 2.0) & masks.modality_mask(
      layout, layout, [[True, True], [False, True]])
  classes = mask.tile_classes(128, 128)
  assert {masks.SKIP, masks.PARTIAL, masks.FULL} <= set(classes.ravel().tolist())
  return mask


def test_ragged_lengths_key_padding_and_an_empty_row_d64():
  # q 300 != kv 200, neither a multiple of 128; batch row 1 sees no key at all. Default tiles,
  # clipped to the lengths: one 384 x 256 tile.
  out, grads = _check(0, 2, 300, 200, 2, 64, kv_lengths=[131, 0], blocks=None)
  assert np.all(np.asarray(out)[1] == 0)
  assert all(np.all(np.asarray(g)[1] == 0) for g in grads)


@pytest.mark.parametrize("d", [128, 80])
def test_short_queries_long_keys_with_unequal_tiles(d):
  # Forward tiles 128 x 256, backward 256 x 128: lengths pad to both (256 and 512). Head dim 80
  # is padded to 128 inside, with the scale of 80.
  _check(1, 1, 130, 390, 2, d, blocks=flash_tpu.BlockSizes(128, 256, 256, 128))


def test_block_mask_window_with_key_padding():
  mask = _window_mask()
  n = mask.shape[0]
  _check(2, 2, n, n, 1, 64, kv_lengths=[n, 400], mask=mask)


@pytest.mark.parametrize("dtype, d, tol", [(jnp.bfloat16, 128, 1e-2), (jnp.float16, 256, 1e-3)])
def test_half_precision_inputs_against_float32_reference(dtype, d, tol):
  # bf16 runs its matmuls in bf16 (probabilities rounded to bf16 for P V); f16 runs as f32.
  # Measured: 3e-3 (bf16) and 3e-4 (f16), mostly the rounding of the results themselves.
  _check(3, 1, 200, 260, 1, d, kv_lengths=[201], dtype=dtype, tol=tol)


def test_skipped_tiles_are_never_read():
  # Poison what a tile row skips with NaN: K and V for one q tile's forward and dq, Q and dO
  # for one k tile's dk and dv. Reading any of it would turn that tile's results into NaN.
  mask = _window_mask()
  n = mask.shape[0]
  classes = np.asarray(mask.tile_classes(128, 128))
  tile = 2
  k_skip = np.repeat(classes[tile] == masks.SKIP, 128)[:n]   # keys q tile 2 never visits
  q_skip = np.repeat(classes[:, tile] == masks.SKIP, 128)[:n]  # queries k tile 2 never visits
  assert k_skip.any() and q_skip.any()
  q, k, v, ct = _inputs(4, 1, n, n, 1, 64)
  ours, ref = _ours(mask), _reference(mask)
  want_out, want_grads = _out_and_grads(q, k, v, ct, None, ref)
  rows = slice(tile * 128, (tile + 1) * 128)

  nan_k = jnp.asarray(k_skip)[None, :, None, None]
  out, (dq, _, _) = _out_and_grads(q, jnp.where(nan_k, jnp.nan, k), jnp.where(nan_k, jnp.nan, v),
                                   ct, None, ours)
  for name, got, want in (("out", out, want_out), ("dq", dq, want_grads[0])):
    got, want = np.asarray(got)[:, rows], np.asarray(want)[:, rows]
    assert np.all(np.isfinite(got)) and _rel(got, want) < TOL, name

  nan_q = jnp.asarray(q_skip)[None, :, None, None]
  _, (_, dk, dv) = _out_and_grads(jnp.where(nan_q, jnp.nan, q), k, v,
                                  jnp.where(nan_q, jnp.nan, ct), None, ours)
  for name, got, want in (("dk", dk, want_grads[1]), ("dv", dv, want_grads[2])):
    got, want = np.asarray(got)[:, rows], np.asarray(want)[:, rows]
    assert np.all(np.isfinite(got)) and _rel(got, want) < TOL, name


def test_grid_visits_only_scheduled_tiles_and_repeats_the_last():
  # The K/V index_map's block sequence per q tile: each visited tile once, then the last one
  # repeated (the pipeline copies a block only when its index changes: no DMA for those
  # steps). The grid's visit axis is the most tiles a row visits, not all of them.
  mask = _window_mask()
  n = mask.shape[0]
  lengths = jnp.array([n, 300])
  q = jnp.zeros((2, n, 1, 64))
  spec, tables = flash_tpu._prepare(q, q, q, lengths, mask, TILES, True)
  visits = mask.tile_classes(128, 128) != masks.SKIP  # what the rule alone leaves
  assert spec.steps_fwd == visits.sum(axis=1).max() < spec.lk // 128
  assert spec.steps_dkv == visits.sum(axis=0).max()
  classes = np.asarray(masks.call_tile_classes(n, n, spec.lq, spec.lk, 128, 128,
                                               kv_len=lengths, block_mask=mask))[:, 0]
  for sched, steps, cls in ((tables["sched_fwd"], spec.steps_fwd, classes),
                            (tables["sched_dkv"], spec.steps_dkv, classes.swapaxes(1, 2))):
    for b in range(2):
      for i in range(cls.shape[1]):
        base = flash_tpu._row_base(spec, steps, cls.shape[1], b, i)
        seq = [int(flash_tpu._visit_index(sched, base, j)) for j in range(steps)]
        fetched = [x for j, x in enumerate(seq) if j == 0 or x != seq[j - 1]]
        visited = np.flatnonzero(cls[b, i] != masks.SKIP)
        if visited.size:
          assert sorted(fetched) == visited.tolist(), (b, i, seq)
          assert cls[b, i, fetched[0]] == masks.FULL or not np.any(cls[b, i] == masks.FULL)
        else:
          assert len(fetched) == 1  # one block is fetched, nothing computed


@pytest.fixture
def on_tpu(monkeypatch):
  """attention.py's routing as on a TPU host; the kernels run in TPU interpret mode."""
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  calls = []

  def spy(name, real):
    def run(*args, **kwargs):
      calls.append((name, kwargs.get("mask")))
      return real(*args, **kwargs)
    return run

  for name in ("flash_attention", "block_forward", "block_backward"):
    monkeypatch.setattr(flash_tpu, name, spy(name, getattr(flash_tpu, name)))
  with pltpu.force_tpu_interpret_mode():
    yield calls


def test_entry_point_routes_to_the_tpu_kernel(on_tpu, caplog):
  layout = _joint_layout(frames=2, per_frame=40, audio=40)
  mask = masks.self_attention_window(layout, 1.0)
  n = len(layout)
  q, k, v, _ = _inputs(5, 1, n, n, 2, 64)
  dense = jnp.asarray(mask.dense())
  want = xla_attention(q, k, v, mask=dense)
  for impl in ("auto", "pallas"):
    got = jax.jit(lambda q, k, v: attention(q, k, v, mask=mask, impl=impl))(q, k, v)
    assert _rel(got, want) < TOL, impl
  assert on_tpu == [("flash_attention", mask)] * 2
  # A dense mask array: auto falls back to xla (and says why), pallas refuses by name.
  attention_lib._log_once.cache_clear()
  with caplog.at_level(logging.WARNING, logger=attention_lib.__name__):
    got = attention(q, k, v, mask=dense, impl="auto")
  assert len(on_tpu) == 2 and _rel(got, want) < TOL
  assert "falls back to xla on TPU: a dense mask array" in caplog.text
  with pytest.raises(ValueError, match="impl='pallas' on TPU cannot take a dense mask"):
    attention(q, k, v, mask=dense, impl="pallas")


def test_block_api_on_tpu_merges_and_differentiates_like_whole_attention(on_tpu):
  # Ring attention's use: two ragged key blocks with TokenRule tables and key padding (batch
  # row 1 sees nothing); merged by logsumexp, then each block's backward from the merged
  # out and lse. auto picks the TPU kernel.
  layout = _joint_layout(frames=2, per_frame=40, audio=60)
  mask = masks.self_attention_window(layout, 1.0) & masks.modality_mask(
      layout, layout, [[True, True], [False, True]])
  n, b, h, d = mask.shape[0], 2, 1, 64
  q, k, v, ct = _inputs(6, b, n, n, h, d)
  lengths = jnp.array([140, 0])
  qm, qt, km, kt = (jnp.asarray(t) for t in mask.token_arrays(n, n))
  spans = ((0, 90), (90, n))

  @jax.jit
  def blockwise(q, k, v, ct):
    kws = [dict(kv_lengths=jnp.clip(lengths - lo, 0, hi - lo), impl="auto",
                mask=TokenRule(qm, qt, km[lo:hi], kt[lo:hi], tuple(mask.pairs()), 2))
           for lo, hi in spans]
    parts = [attention_block_forward(q, k[:, lo:hi], v[:, lo:hi], **kw)
             for (lo, hi), kw in zip(spans, kws)]
    lse = jnp.logaddexp(parts[0][1], parts[1][1])
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    out = sum(o * jnp.exp(l - safe).transpose(0, 2, 1)[..., None] for o, l in parts)
    grads = [attention_block_backward(q, k[:, lo:hi], v[:, lo:hi], out, lse, ct, **kw)
             for (lo, hi), kw in zip(spans, kws)]
    dq = grads[0][0] + grads[1][0]
    dk = jnp.concatenate([g[1] for g in grads], axis=1)
    dv = jnp.concatenate([g[2] for g in grads], axis=1)
    return out, lse, (dq, dk, dv)

  dense = jnp.asarray(mask.dense()) & (jnp.arange(n) < lengths[:, None])[:, None, None, :]
  ref_out, pullback = jax.vjp(lambda q, k, v: xla_attention(q, k, v, mask=dense), q, k, v)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
  ref_lse = jax.nn.logsumexp(jnp.where(dense, logits, -jnp.inf), axis=-1)
  out, lse, grads = blockwise(q, k, v, ct)
  assert _rel(out, ref_out) < TOL
  np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
  assert not np.any(np.isfinite(lse[1])) and np.all(np.isfinite(lse[0]))
  np.testing.assert_allclose(np.where(np.isfinite(lse), lse, 0),
                             np.where(np.isfinite(ref_lse), ref_lse, 0), atol=1e-5)
  for name, got, want in zip(("dq", "dk", "dv"), grads, pullback(ct)):
    assert _rel(got, want) < TOL, f"{name}: rel err {_rel(got, want):.2e}"
    np.testing.assert_array_equal(np.asarray(got)[1], 0.0)
  assert sorted({name for name, _ in on_tpu}) == ["block_backward", "block_forward"]


def test_lowers_to_mosaic_for_tpu():
  # Cross-platform export runs the Pallas-to-Mosaic lowering (block shape rules, every op in
  # the kernels) without a TPU; Mosaic's own compiler (layouts, VMEM) is not run.
  mask = _window_mask()
  n = mask.shape[0]

  def loss(q, k, v, lengths):
    out = flash_tpu.flash_attention(q, k, v, kv_lengths=lengths, mask=mask, interpret=False)
    return out.astype(jnp.float32).sum()

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  for dtype, d in ((jnp.bfloat16, 64), (jnp.float32, 256)):
    x = jax.ShapeDtypeStruct((2, n, 2, d), dtype)
    exported = jax.export.export(grad, platforms=["tpu"])(
        x, x, x, jax.ShapeDtypeStruct((2,), jnp.int32))
    assert exported.mlir_module().count("tpu_custom_call") == 3  # forward, dq, dkv


def test_bad_inputs_are_named():
  q = jnp.zeros((2, 8, 1, 64))
  with pytest.raises(ValueError, match="block_k must be a positive multiple of 128"):
    flash_tpu.BlockSizes(128, 64)
  with pytest.raises(ValueError, match="kv_lengths must be int"):
    flash_tpu.flash_attention(q, q, q, kv_lengths=jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="dense mask array"):
    flash_tpu.flash_attention(q, q, q, mask=jnp.ones((1, 1, 8, 8), bool))
  with pytest.raises(ValueError, match="dtype int32"):
    flash_tpu.flash_attention(*[q.astype(jnp.int32)] * 3)
  with pytest.raises(ValueError, match="head_dim 320"):
    flash_tpu.flash_attention(*[jnp.zeros((1, 8, 1, 320))] * 3)
  rule = masks.self_attention_window(_joint_layout(1, 4, 3), 1.0)
  with pytest.raises(ValueError, match=r"BlockMask is for \(lq, lk\)=\(7, 7\)"):
    flash_tpu.flash_attention(q, q, q, mask=rule)
