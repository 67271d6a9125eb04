"""Block masks: the rule, its dense form, per-tile classes and schedules."""

import jax.numpy as jnp
import numpy as np
import pytest

from avgen.kernels import masks
from avgen.kernels.masks import FULL, PARTIAL, SKIP


def _layout(rng, frames=5, per_frame=7, audio=23):
  video = masks.video_token_times(frames, 2, per_frame)
  audio_t = np.sort(rng.uniform(-0.5, 2 * frames - 0.5, audio)).astype(np.float32)
  return masks.joint_layout(video, audio_t)


def _classes_from_dense(visible, lq, lk, bq, bk):
  """Reference classes: any/all over the real queries of a tile; padding keys are invisible."""
  nq, nk = -(-lq // bq), -(-lk // bk)
  padded = np.zeros((nq * bq, nk * bk), bool)
  padded[:lq, :lk] = visible
  out = np.zeros((nq, nk), np.int8)
  for i in range(nq):
    rows = padded[i * bq:min((i + 1) * bq, lq)]
    for j in range(nk):
      tile = rows[:, j * bk:(j + 1) * bk]
      out[i, j] = FULL if tile.all() else PARTIAL if tile.any() else SKIP
  return out


def test_token_times_follow_the_shared_time_axis():
  # pt=2: temporal patch i sits at the middle of frames 2i, 2i+1.
  np.testing.assert_array_equal(masks.video_token_times(3, 2, 2), [0.5, 0.5, 2.5, 2.5, 4.5, 4.5])
  # 25 fps, hop 160 at 16 kHz: 4 mel frames per video frame, so with audio_patch=4 token k is
  # centred on frame k's interval and gets time k, like the frame.
  np.testing.assert_allclose(masks.audio_token_times(6, 4, 160, 16000, 25.0), np.arange(6),
                             atol=1e-6)


def test_dense_is_the_rule_pair_by_pair():
  rng = np.random.default_rng(0)
  layout = _layout(rng)
  allowed = np.array([[True, False], [True, True]])
  window = np.array([[1.5, 3.0], [np.inf, 0.5]], np.float32)
  mask = masks.BlockMask(layout, layout, allowed, window)
  dense = mask.dense()[0, 0]
  for i in range(len(layout)):
    for j in range(len(layout)):
      a, b = layout.modality[i], layout.modality[j]
      want = allowed[a, b] and abs(layout.time[i] - layout.time[j]) <= window[a, b]
      assert dense[i, j] == want, (i, j)


def test_intersection_is_the_and_of_dense_masks():
  rng = np.random.default_rng(1)
  layout = _layout(rng)
  a = masks.self_attention_window(layout, 2.0)
  b = masks.modality_mask(layout, layout, [[True, True], [False, True]])
  np.testing.assert_array_equal((a & b).dense(), a.dense() & b.dense())


@pytest.mark.parametrize("bq, bk", [(8, 8), (16, 4), (5, 12), (64, 64)])
def test_tile_classes_agree_with_the_dense_mask(bq, bk):
  rng = np.random.default_rng(bq * 31 + bk)
  for trial in range(4):
    q = _layout(rng, frames=4 + trial, per_frame=6, audio=17 + trial)
    k = _layout(rng, frames=3 + trial, per_frame=5, audio=11)
    allowed = rng.random((2, 2)) > 0.25
    window = np.where(rng.random((2, 2)) > 0.3, rng.uniform(0, 4, (2, 2)), np.inf)
    mask = masks.BlockMask(q, k, allowed, window.astype(np.float32))
    want = _classes_from_dense(mask.dense()[0, 0], len(q), len(k), bq, bk)
    np.testing.assert_array_equal(mask.tile_classes(bq, bk), want)


def test_key_padding_classes():
  cls = np.asarray(masks.key_padding_classes(jnp.array([0, 5, 64, 100, 300]), 100, 32))
  np.testing.assert_array_equal(cls, [
      [SKIP, SKIP, SKIP, SKIP],
      [PARTIAL, SKIP, SKIP, SKIP],
      [FULL, FULL, SKIP, SKIP],
      [FULL, FULL, FULL, PARTIAL],   # the last tile holds keys 96..127, only 96..99 are real
      [FULL, FULL, FULL, PARTIAL]])  # lengths past lk are clipped to lk


def test_dense_mask_classes():
  m = np.zeros((1, 2, 4, 4), bool)
  m[0, 0, :2, :2] = True           # head 0: tile (0, 0) full
  m[0, 1, 0, 3] = True             # head 1: tile (0, 1) partial
  cls = np.asarray(masks.dense_mask_classes(jnp.asarray(m), 2, 2))
  np.testing.assert_array_equal(cls[0, 0], [[FULL, SKIP], [SKIP, SKIP]])
  np.testing.assert_array_equal(cls[0, 1], [[SKIP, PARTIAL], [SKIP, SKIP]])


def test_tile_schedule_lists_full_then_partial_tiles():
  cls = jnp.array([[PARTIAL, FULL, SKIP, FULL, PARTIAL], [SKIP] * 5], jnp.int8)
  sched = np.asarray(masks.tile_schedule(cls))
  assert sched.shape == (2, 7)
  np.testing.assert_array_equal(sched[0, :2], [2, 2])
  np.testing.assert_array_equal(sched[0, 2:6], [1, 3, 0, 4])
  np.testing.assert_array_equal(sched[1, :2], [0, 0])


def test_window_for_fraction_hits_the_nearest_share():
  layout = masks.joint_layout(masks.video_token_times(32, 1, 64), np.zeros(0, np.float32))
  w = masks.window_for_fraction(layout, 0.25, 64, 64)
  frac = masks.self_attention_window(layout, w).visible_tile_fraction(64, 64)
  # one tile per frame: +-w frames keep (2w+1)/32 of a row, minus the edges
  assert abs(frac - 0.25) < 0.04


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match="1-D of one length"):
    masks.TokenLayout(np.zeros(3), np.zeros(4))
  with pytest.raises(ValueError, match="modality ids must be >= 0"):
    masks.TokenLayout(np.array([0, -1]), np.zeros(2))
  layout = masks.TokenLayout(np.array([0, 2]), np.zeros(2))
  with pytest.raises(ValueError, match="modality ids up to 2"):
    masks.modality_mask(layout, layout, np.ones((2, 2)))
  with pytest.raises(ValueError, match="window entries must be >= 0"):
    masks.BlockMask(layout, layout, np.ones((3, 3)), -np.ones((3, 3)))
  other = masks.TokenLayout(np.array([0, 0]), np.ones(2))
  with pytest.raises(ValueError, match="same token layouts"):
    masks.self_attention_window(layout, 1.0) & masks.self_attention_window(other, 1.0)
