"""The portable Pallas flash kernel (interpret mode on the CPU) against XLA attention in float32.

Every case checks the output and all three gradients on fresh random inputs, with NaN-poisoned
output buffers (an unwritten element stays NaN and fails the check). The Mosaic GPU kernel needs
a Hopper GPU; benchmarks/attention.py checks it there against the same reference.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avgen.kernels import IMPLS, attention, masks
from avgen.kernels import flash_mosaic_gpu, flash_pallas
from avgen.kernels.attention import (TokenRule, attention_block_backward, attention_block_forward,
                                     xla_attention)

SMALL = flash_pallas.BlockSizes(64, 64, 64, 64)
BIG = flash_pallas.BlockSizes(128, 128, 128, 128)
TOL = 2e-5  # float32 end to end; measured ~5e-7


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@functools.partial(jax.jit, static_argnames=("fn",))
def _out_and_grads(q, k, v, ct, kv_lengths, mask, fn):
  def loss(q, k, v):
    out = fn(q, k, v, kv_lengths=kv_lengths, mask=mask)
    return jnp.sum(out * ct), out
  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


def _check(seed, b, lq, lk, h, d, *, kv_lengths=None, mask=None, blocks=SMALL):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, lq, h, d), jnp.float32)
  k = jax.random.normal(keys[1], (b, lk, h, d), jnp.float32)
  v = jax.random.normal(keys[2], (b, lk, h, d), jnp.float32)
  ct = jax.random.normal(keys[3], (b, lq, h, d), jnp.float32)
  lengths = None if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
  dense = jnp.asarray(mask.dense()) if isinstance(mask, masks.BlockMask) else mask
  ours = functools.partial(flash_pallas.flash_attention, block_sizes=blocks, interpret=True,
                           poison=True)
  fn, arg_mask = ours, mask
  if isinstance(mask, masks.BlockMask):
    # BlockMasks are static Python objects: closed over, not passed as jit arguments.
    mask_rule, arg_mask = mask, None

    def fn(q, k, v, kv_lengths, mask):
      del mask
      return ours(q, k, v, kv_lengths=kv_lengths, mask=mask_rule)
  out, grads = _out_and_grads(q, k, v, ct, lengths, arg_mask, fn)
  ref_out, ref_grads = _out_and_grads(q, k, v, ct, lengths, dense, xla_attention)
  for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
    assert np.all(np.isfinite(np.asarray(got))), f"{name}: NaN/inf (unwritten or 0/0)"
    assert _rel(got, want) < TOL, f"{name}: rel err {_rel(got, want):.2e}"
  return out, grads


def _joint_layout(frames=6, per_frame=40, audio=90):
  video = masks.video_token_times(frames, 2, per_frame)
  audio_t = masks.audio_token_times(audio, 4, 160, 16000, 25.0) * (2 * frames / audio)
  return masks.joint_layout(video, audio_t.astype(np.float32))


def test_ragged_lengths_with_key_padding_d64():
  _check(0, 2, 1000, 1000, 1, 64, kv_lengths=[1000, 517], blocks=BIG)


def test_long_query_short_keys_d128():
  # 4097 queries: one more than a tile multiple; cross-attention-like lq != lk.
  _check(1, 1, 4097, 200, 1, 128, blocks=BIG)


def test_short_query_long_keys_with_padding_d64():
  _check(2, 2, 70, 4097, 1, 64, kv_lengths=[4097, 2049], blocks=BIG)


def test_head_dim_256():
  _check(3, 1, 100, 90, 1, 256)


def test_block_mask_window_and_modality_blocks_d128():
  layout = _joint_layout()
  mask = masks.self_attention_window(layout, 2.0) & masks.modality_mask(
      layout, layout, [[True, True], [False, True]])
  assert 0 < mask.visible_tile_fraction(64, 64) < 1  # some tiles skipped, some visited
  _check(5, 2, len(layout), len(layout), 2, 128, kv_lengths=[len(layout), 300], mask=mask)


def test_block_mask_cross_layouts_and_empty_rows():
  q = _joint_layout(frames=4, per_frame=30, audio=50)
  k = _joint_layout(frames=6, per_frame=20, audio=70)
  # audio queries see nothing: their rows must come out as zeros with zero gradients
  mask = masks.BlockMask(q, k, [[True, True], [False, False]], [[1.0, 3.0], [1.0, 1.0]])
  out, (dq, _, _) = _check(6, 1, len(q), len(k), 2, 64, mask=mask)
  audio_rows = q.modality == masks.AUDIO
  assert np.all(np.asarray(out)[0, audio_rows] == 0)
  assert np.all(np.asarray(dq)[0, audio_rows] == 0)


def test_dense_mask_arrays_broadcast_over_batch_and_heads():
  rng = np.random.default_rng(7)
  per_row = rng.random((2, 1, 130, 200)) > 0.4
  per_row[0, 0, 10:20] = False           # fully masked rows
  per_row[1, 0, :, 64:192] = False       # fully masked tiles
  _check(7, 2, 130, 200, 1, 64, mask=jnp.asarray(per_row))
  per_head_keys = rng.random((1, 2, 1, 200)) > 0.5
  # head_dim 40 is padded to 64 inside; the scale stays 1/sqrt(40)
  _check(8, 1, 130, 200, 2, 40, mask=jnp.asarray(per_head_keys))


def test_all_keys_padded_gives_zeros_not_nan():
  out, grads = _check(9, 2, 100, 150, 2, 64, kv_lengths=[0, 150])
  assert np.all(np.asarray(out)[0] == 0)
  assert all(np.all(np.asarray(g)[0] == 0) for g in grads)


def test_skipped_tiles_are_never_read():
  # Keys in tiles past every row's key length are SKIP tiles: NaN there must not reach the
  # output (a kernel that loaded them would mix NaN into its sums).
  keys = jax.random.split(jax.random.key(10), 3)
  q = jax.random.normal(keys[0], (1, 100, 1, 64))
  k = jax.random.normal(keys[1], (1, 512, 1, 64))
  v = jax.random.normal(keys[2], (1, 512, 1, 64))
  lengths = jnp.array([150])                  # tiles of 64: 0..1 full, 2 partial, 3..7 skipped
  k_bad = k.at[:, 192:].set(jnp.nan)
  v_bad = v.at[:, 192:].set(jnp.nan)
  run = jax.jit(functools.partial(flash_pallas.flash_attention, block_sizes=SMALL,
                                  interpret=True))
  out = run(q, k_bad, v_bad, kv_lengths=lengths)
  np.testing.assert_allclose(out, xla_attention(q, k, v, kv_lengths=lengths), rtol=1e-5,
                             atol=1e-6)


def test_entry_point_runs_pallas_on_cpu_and_checks_block_masks():
  assert "pallas" in IMPLS
  layout = _joint_layout(frames=2, per_frame=20, audio=30)
  mask = masks.self_attention_window(layout, 1.0)
  n = len(layout)
  q = jax.random.normal(jax.random.key(11), (1, n, 2, 64))
  got = jax.jit(lambda q: attention(q, q, q, mask=mask, impl="pallas"))(q)
  want = attention(q, q, q, mask=jnp.asarray(mask.dense()), impl="xla")
  assert _rel(got, want) < TOL
  np.testing.assert_array_equal(np.asarray(attention(q, q, q, mask=mask, impl="xla")),
                                np.asarray(want))
  with pytest.raises(ValueError, match="BlockMask covers"):
    attention(q[:, :-1], q, q, mask=mask, impl="pallas")


def test_bad_kernel_inputs_are_named():
  q = jnp.zeros((2, 8, 1, 16))
  with pytest.raises(ValueError, match="kv_lengths must be int"):
    flash_pallas.flash_attention(q, q, q, kv_lengths=jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match=r"mask must be bool \[b\|1, h\|1, lq\|1, lk\]"):
    flash_pallas.flash_attention(q, q, q, mask=jnp.ones((2, 1, 8, 7), bool))


def _window_and_modality(layout, window):
  return masks.self_attention_window(layout, window) & masks.modality_mask(
      layout, layout, [[True, True], [False, True]])


def test_token_rule_tile_classes_never_skip_a_visible_pair():
  # TokenRule is a BlockMask with (possibly traced) token tables, as ring blocks carry them; its
  # tile classes come from per-tile time ranges. A SKIP tile with a visible pair would drop
  # keys; a FULL tile with a hidden pair would let the kernel attend to it.
  mask = _window_and_modality(_joint_layout(), 2.0)
  rule = TokenRule.from_block_mask(mask)
  classes = jax.jit(lambda rule: rule.tile_classes(32, 16))  # traced, as in the kernels
  np.testing.assert_array_equal(classes(rule), mask.tile_classes(32, 16))
  # One ring block pair: a slice of the queries against the last keys and 40 padding keys.
  n = len(mask.q)
  qm, qt, km, kt = mask.token_arrays(n, n + 40)
  block = TokenRule(qm[100:230], qt[100:230], km[250:], kt[250:], tuple(mask.pairs()), 2)
  cls = np.asarray(classes(block))
  visible = mask.dense()[0, 0][100:230, 250:]
  visible = np.pad(visible, ((0, 0), (0, 40)))
  visible = np.pad(visible, ((0, -visible.shape[0] % 32), (0, -visible.shape[1] % 16)))
  tiles = visible.reshape(cls.shape[0], 32, cls.shape[1], 16)
  some, every = tiles.any(axis=(1, 3)), tiles.all(axis=(1, 3))
  np.testing.assert_array_equal(cls == masks.SKIP, ~some)  # sound, and here as tight as exact
  assert np.all(every[cls == masks.FULL]) and np.any(cls == masks.FULL)


def test_kernel_takes_token_rule_with_traced_tables():
  # Passed through jit as a pytree, so the tile schedule is computed from traced tables.
  mask = _window_and_modality(_joint_layout(frames=4, per_frame=24, audio=40), 1.0)
  rule = TokenRule.from_block_mask(mask)
  assert np.any(np.asarray(rule.tile_classes(64, 64)) == masks.SKIP)
  n = mask.shape[0]
  _check(12, 1, n, n, 1, 32, kv_lengths=[100], mask=rule)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_block_api_merges_and_differentiates_like_whole_attention(impl):
  # Two ragged key blocks (40 and 30 keys) with window + modality rule and key padding; batch
  # row 1 sees no key at all. Forward: the blocks' (out, lse) merge into the whole attention,
  # lse in natural log. Backward with the merged out and lse: dq sums over the blocks, each
  # block's dk, dv are the whole attention's.
  mask = _window_and_modality(_joint_layout(frames=2, per_frame=20, audio=30), 1.0)
  n, b, h, d = mask.shape[0], 2, 2, 32
  keys = jax.random.split(jax.random.key(13), 4)
  q, k, v, ct = (jax.random.normal(key, (b, n, h, d), jnp.float32) for key in keys)
  lengths = jnp.array([60, 0])
  qm, qt, km, kt = (jnp.asarray(t) for t in mask.token_arrays(n, n))
  spans = ((0, 40), (40, n))

  @jax.jit
  def blockwise(q, k, v, ct):
    args = [dict(kv_lengths=jnp.clip(lengths - lo, 0, hi - lo), impl=impl,
                 mask=TokenRule(qm, qt, km[lo:hi], kt[lo:hi], tuple(mask.pairs()), 2))
            for lo, hi in spans]
    parts = [attention_block_forward(q, k[:, lo:hi], v[:, lo:hi], **kw)
             for (lo, hi), kw in zip(spans, args)]
    lse = jnp.logaddexp(parts[0][1], parts[1][1])
    safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    out = sum(o * jnp.exp(l - safe).transpose(0, 2, 1)[..., None] for o, l in parts)
    grads = [attention_block_backward(q, k[:, lo:hi], v[:, lo:hi], out, lse, ct, **kw)
             for (lo, hi), kw in zip(spans, args)]
    dq = grads[0][0] + grads[1][0]
    dk = jnp.concatenate([g[1] for g in grads], axis=1)
    dv = jnp.concatenate([g[2] for g in grads], axis=1)
    return out, lse, parts, (dq, dk, dv)

  @jax.jit
  def reference(q, k, v, ct):
    dense = jnp.asarray(mask.dense()) & (jnp.arange(n) < lengths[:, None])[:, None, None, :]
    out, pullback = jax.vjp(lambda q, k, v: xla_attention(q, k, v, mask=dense), q, k, v)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    return out, jax.nn.logsumexp(jnp.where(dense, logits, -jnp.inf), axis=-1), pullback(ct)

  out, lse, parts, grads = blockwise(q, k, v, ct)
  ref_out, ref_lse, ref_grads = reference(q, k, v, ct)
  assert _rel(out, ref_out) < TOL
  np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
  assert not np.any(np.isfinite(lse[1])) and np.any(np.isfinite(lse[0]))
  np.testing.assert_allclose(np.where(np.isfinite(lse), lse, 0),
                             np.where(np.isfinite(ref_lse), ref_lse, 0), atol=1e-5)
  for block_out, block_lse in parts:  # a row that sees no key in a block: zeros, lse -inf
    assert block_lse.dtype == jnp.float32 and not np.any(np.isnan(block_lse))
    empty = ~np.isfinite(np.asarray(block_lse)).transpose(0, 2, 1)
    assert np.all(np.asarray(block_out)[empty] == 0) and np.any(empty[0])
  for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
    assert np.all(np.isfinite(np.asarray(got))), name
    assert _rel(got, want) < TOL, f"{name}: rel err {_rel(got, want):.2e}"
    np.testing.assert_array_equal(np.asarray(got)[1], 0.0)


def test_mosaic_kernel_plumbing_takes_token_rules_like_block_masks():
  # The Hopper kernel cannot run here; its call set-up can. A TokenRule must give it the same
  # schedules, token tables (real tokens) and rule as the BlockMask it came from.
  mask = masks.self_attention_window(_joint_layout(frames=2, per_frame=20, audio=30), 1.0)
  n = mask.shape[0]
  q = jnp.zeros((2, n, 2, 64), jnp.bfloat16)
  lengths = jnp.array([n, 50])
  rule = TokenRule.from_block_mask(mask)
  assert flash_mosaic_gpu.refusal(q, q, rule) is None

  def prepare(rule_or_mask):
    specs = []

    def tables(lengths):
      spec, tables, _ = flash_mosaic_gpu._prepare(q, q, q, lengths, rule_or_mask, None)
      specs.append(spec)
      return tables

    return specs, jax.jit(tables)(lengths)

  (spec_a,), tables_a = prepare(mask)
  (spec_b,), tables_b = prepare(rule)
  assert spec_a == spec_b and spec_b.window_only == 1.0
  for name in ("kv_len", "sched_fwd", "sched_dq", "sched_dkv"):
    np.testing.assert_array_equal(tables_a[name], tables_b[name], err_msg=name)
  for name in ("q_info", "k_info"):
    np.testing.assert_array_equal(tables_a[name][:, :n], tables_b[name][:, :n], err_msg=name)
    # Padding tokens sit far from every real time, so the time-only rule hides them too.
    assert np.all(np.abs(np.asarray(tables_b[name][0, n:])) >= 1e30), name


def test_block_api_rejects_bad_inputs():
  q = jnp.zeros((1, 8, 1, 16))
  with pytest.raises(ValueError, match="unknown impl 'cudnn'"):
    attention_block_forward(q, q, q, impl="cudnn")
  with pytest.raises(ValueError, match=r"want out and d_out \(1, 8, 1, 16\) and lse \(1, 1, 8\)"):
    attention_block_backward(q, q, q, q, jnp.zeros((1, 8)), q, impl="xla")
  rule = TokenRule.from_block_mask(masks.self_attention_window(_joint_layout(1, 4, 3), 1.0))
  with pytest.raises(ValueError, match=r"TokenRule covers \(lq, lk\)=\(7, 7\)"):
    attention_block_forward(q, q, q, mask=rule, impl="xla")
