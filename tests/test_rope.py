"""Rotary embeddings on the shared video/audio time axis."""

import jax.numpy as jnp
import numpy as np
import pytest

from avgen.models import rope


def _scores(q, k, positions, sections, theta=10000.0):
  cos, sin = rope.rope_tables(positions, sections, theta)
  qr, kr = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
  return jnp.einsum("bqhd,bkhd->bhqk", qr, kr)


def test_scores_depend_only_on_position_difference():
  rng = np.random.default_rng(0)
  sections = rope.rope_sections(32)
  q = jnp.asarray(rng.normal(size=(1, 10, 2, 32)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 10, 2, 32)), jnp.float32)
  positions = rng.uniform(0, 8, size=(10, 3)).astype(np.float32)  # fractional, like audio times
  base = _scores(q, k, positions, sections)
  shifted = _scores(q, k, positions + np.array([3.25, -2.0, 5.5], np.float32), sections)
  np.testing.assert_allclose(shifted, base, rtol=1e-4, atol=1e-4)
  # Not a constant: moving one token in time changes its scores.
  moved = positions.copy()
  moved[0, 0] += 1.0
  assert np.max(np.abs(_scores(q, k, moved, sections) - base)) > 1e-2


def test_rotation_preserves_norm_and_zero_position_is_identity():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 5, 3, 16)), jnp.float32)
  positions = rng.uniform(-4, 4, size=(5, 3))
  cos, sin = rope.rope_tables(positions, rope.rope_sections(16), 10000.0)
  y = rope.apply_rope(x, cos, sin)
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  cos0, sin0 = rope.rope_tables(np.zeros((5, 3)), rope.rope_sections(16), 10000.0)
  np.testing.assert_array_equal(rope.apply_rope(x, cos0, sin0), x)


@pytest.mark.parametrize("head_dim", [8, 32, 64, 128])
def test_sections_are_even_and_cover_head_dim(head_dim):
  sections = rope.rope_sections(head_dim)
  assert sum(sections) == head_dim and all(s % 2 == 0 for s in sections)
  assert sections[0] >= sections[1] == sections[2]


def test_audio_token_at_frame_time_gets_the_frame_rotation():
  # 16 kHz, hop 250, 8 fps: 8 mel frames per video frame; audio_patch 8 -> one token per frame.
  audio = rope.audio_positions(64, 8, 250, 16000, 8)
  video = rope.video_positions(8, 4, 4, (1, 1, 1))
  np.testing.assert_allclose(audio[:, 0], np.arange(8), atol=1e-6)
  assert np.all(audio[:, 1:] == 0)
  sections = rope.rope_sections(32)
  cos_a, sin_a = rope.rope_tables(audio, sections, 10000.0)
  cos_v, sin_v = rope.rope_tables(video, sections, 10000.0)
  half_t = sections[0] // 2
  frame_of_video_token = video[:, 0].astype(int)
  for f in range(8):
    token = int(np.nonzero(frame_of_video_token == f)[0][0])
    np.testing.assert_allclose(cos_a[f, :half_t], cos_v[token, :half_t], atol=1e-6)
    np.testing.assert_allclose(sin_a[f, :half_t], sin_v[token, :half_t], atol=1e-6)
  # Audio's height/width sections do not rotate.
  np.testing.assert_array_equal(cos_a[:, half_t:], 1.0)
  np.testing.assert_array_equal(sin_a[:, half_t:], 0.0)


def test_audio_tokens_within_a_frame_are_centred_on_it():
  # Demo timing: 2 audio tokens per frame at f - 0.25 and f + 0.25.
  times = rope.audio_token_times(64, 4, 250, 16000, 8)
  np.testing.assert_allclose(times.reshape(8, 2).mean(-1), np.arange(8), atol=1e-9)


def test_video_positions_follow_patchify_order_and_temporal_patch_centre():
  positions = rope.video_positions(4, 8, 12, (2, 4, 4))
  assert positions.shape == (2 * 2 * 3, 3)
  # Temporal patch i covers frames 2i, 2i+1: its time is their mean.
  np.testing.assert_allclose(np.unique(positions[:, 0]), [0.5, 2.5])
  # Row-major (t, row, col): the last axis varies fastest.
  np.testing.assert_array_equal(positions[:4], [[0.5, 0, 0], [0.5, 0, 1], [0.5, 0, 2], [0.5, 1, 0]])


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="num_frames"):
    rope.video_positions(5, 8, 8, (2, 1, 1))
  with pytest.raises(ValueError, match="audio_patch"):
    rope.audio_positions(63, 4, 250, 16000, 8)
  with pytest.raises(ValueError, match="even"):
    rope.rope_sections(30 + 1)
  with pytest.raises(ValueError, match=r"\[L, D/2\]"):
    cos, sin = rope.rope_tables(np.zeros((4, 3)), (8, 4, 4), 1e4)
    rope.apply_rope(jnp.zeros((1, 5, 1, 16)), cos, sin)
