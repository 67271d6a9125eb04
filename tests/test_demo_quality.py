"""benchmarks/demo_quality.py's temporal score: bouncing shapes are coherent, flicker is not."""

import numpy as np

from benchmarks import demo_quality
from data_pipeline import synthetic


def _square(video, frame, row, col, size=6, color=(255, 40, 40)):
  video[frame, row:row + size, col:col + size] = color


def test_synthetic_clips_are_coherent_and_move_at_their_speed():
  coherent, steps = [], []
  for i in range(16):
    clip = synthetic.make_clip(np.random.default_rng([0, i]), num_frames=8, height=32, width=32,
                               fps=8.0, sample_rate=16000, max_objects=1)
    c, s = demo_quality.temporal_scores(clip["video"])
    coherent += c
    steps += s
    # One object never leaves the frame, so every frame shows exactly one region.
    assert all(demo_quality.bright_regions(f) == 1 for f in clip["video"])
  assert np.mean(coherent) == 1.0
  speed = max(synthetic.SPEED_RANGE) * 32 / 8.0  # px per frame
  # A rasterized shape's centroid is off its true centre by a fraction of a pixel.
  assert 0 < np.mean(steps) <= max(steps) <= speed + 1.0 < demo_quality.MAX_STEP_PX


def test_flicker_jumps_and_splits_are_not_coherent():
  video = np.zeros((4, 32, 32, 3), np.uint8)
  _square(video, 0, 2, 2)
  _square(video, 1, 20, 20)  # jumped 18 px
  _square(video, 3, 20, 23)  # frame 2 is empty
  coherent, _ = demo_quality.temporal_scores(video)
  assert coherent == [False, False, False]

  split = np.zeros((2, 32, 32, 3), np.uint8)
  _square(split, 0, 10, 10)
  _square(split, 1, 10, 8, size=3)
  _square(split, 1, 10, 14, size=3)
  assert demo_quality.temporal_scores(split)[0] == [False]


def test_a_slowly_moving_square_is_coherent_with_its_step():
  video = np.zeros((3, 32, 32, 3), np.uint8)
  for f in range(3):
    _square(video, f, 5 + 3 * f, 5)
  coherent, steps = demo_quality.temporal_scores(video)
  assert coherent == [True, True]
  np.testing.assert_allclose(steps, 3.0)
