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
from avgen.kernels import flash_pallas
from avgen.kernels.attention import xla_attention

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
