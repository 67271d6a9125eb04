"""Training losses: values on known inputs, masking, and what each loss is sensitive to."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avgen.diffusion import losses as _losses


class losses:  # noqa: N801 - the loss functions, jitted: the trainer runs them under jit
  diffusion_loss = jax.jit(_losses.diffusion_loss)
  alignment_loss = jax.jit(_losses.alignment_loss)
  alignment_accuracy = jax.jit(_losses.alignment_accuracy)
  video_perceptual_loss = jax.jit(_losses.video_perceptual_loss)
  audio_perceptual_loss = jax.jit(_losses.audio_perceptual_loss)
  temporal_loss = jax.jit(_losses.temporal_loss)
  align_weight = staticmethod(_losses.align_weight)


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# ---------------------------------------------------------------- diffusion loss


def test_diffusion_loss_values_and_mask():
  target = _normal(0, (4, 3, 5))
  assert float(losses.diffusion_loss(target, target, jnp.ones(4))) == 0.0
  out = target + jnp.array([1.0, 2.0, 3.0, 4.0])[:, None, None]  # per-example MSE 1, 4, 9, 16
  np.testing.assert_allclose(losses.diffusion_loss(out, target), 7.5, rtol=1e-6)
  np.testing.assert_allclose(losses.diffusion_loss(out, target, jnp.array([1.0, 0, 1, 0])), 5.0,
                             rtol=1e-6)
  # Weights are a weighted mean; a masked example is ignored even when it holds NaN.
  np.testing.assert_allclose(losses.diffusion_loss(out, target, jnp.array([3.0, 1, 0, 0])), 1.75,
                             rtol=1e-6)
  poisoned = out.at[3].set(jnp.nan)
  np.testing.assert_allclose(losses.diffusion_loss(poisoned, target, jnp.array([1.0, 1, 1, 0])),
                             14 / 3, rtol=1e-6)


def test_diffusion_loss_all_masked_is_zero_with_finite_grad():
  out, target = _normal(1, (3, 4)), _normal(2, (3, 4))
  loss, grad = jax.value_and_grad(losses.diffusion_loss)(out, target, jnp.zeros(3))
  assert float(loss) == 0.0
  assert np.all(np.asarray(grad) == 0)


def test_diffusion_loss_bad_input():
  with pytest.raises(ValueError, match="shapes differ"):
    losses.diffusion_loss(jnp.ones((2, 3)), jnp.ones((2, 4)), jnp.ones(2))
  with pytest.raises(ValueError, match=r"mask must have shape \[B\]"):
    losses.diffusion_loss(jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.ones(3))


# ---------------------------------------------------------------- alignment


def _clip_features(b=6, w=4, d=32, seed=3):
  """Window features that differ across clips and across windows of one clip."""
  return _normal(seed, (b, w, d))


def test_alignment_loss_known_values():
  b, w = 3, 2
  one_hot = jnp.eye(b * w).reshape(b, w, b * w)
  # Orthogonal features, matched: tiny loss at low temperature.
  assert float(losses.alignment_loss(one_hot, one_hot, 0.01)) < 1e-6
  # Identical features everywhere: every window is as likely, log(BW) in both directions.
  same = jnp.ones((b, w, 8))
  np.testing.assert_allclose(losses.alignment_loss(same, same, 0.1), math.log(b * w), rtol=1e-5)


def test_alignment_loss_prefers_aligned_features():
  video = _clip_features()
  audio = video + 0.3 * _normal(4, video.shape)
  aligned = losses.alignment_loss(video, audio, 0.1)
  other_clips = losses.alignment_loss(video, audio[::-1], 0.1)
  shifted = losses.alignment_loss(video, jnp.roll(audio, 1, axis=1), 0.1)  # same clip, off in time
  assert aligned < 0.5 * other_clips and aligned < 0.5 * shifted
  assert losses.alignment_accuracy(video, audio) == 1.0
  assert losses.alignment_accuracy(video, jnp.roll(audio, 1, axis=1)) == 0.0
  grads = jax.grad(losses.alignment_loss, argnums=(0, 1))(video, audio, 0.1)
  assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in grads)


def test_alignment_loss_symmetric():
  video, audio = _clip_features(seed=5), _clip_features(seed=6)
  np.testing.assert_allclose(losses.alignment_loss(video, audio, 0.2),
                             losses.alignment_loss(audio, video, 0.2), rtol=1e-5)


def test_alignment_loss_mask_drops_examples():
  """A masked example is neither an anchor nor a negative: same as leaving it out."""
  video, audio = _clip_features(seed=7), _clip_features(seed=8)
  mask = jnp.array([1.0, 0, 1, 1, 0, 1])
  keep = np.asarray(mask) > 0
  np.testing.assert_allclose(losses.alignment_loss(video, audio, 0.1, mask),
                             losses.alignment_loss(video[keep], audio[keep], 0.1), rtol=1e-5)
  np.testing.assert_allclose(losses.alignment_accuracy(video, audio, mask),
                             losses.alignment_accuracy(video[keep], audio[keep]), rtol=1e-6)
  loss, grads = jax.value_and_grad(losses.alignment_loss, argnums=(0, 1))(
      video, audio, 0.1, jnp.zeros(6))
  assert float(loss) == 0.0
  assert all(np.all(np.asarray(g) == 0) for g in grads)


def test_alignment_loss_bad_input():
  with pytest.raises(ValueError, match="rank 3"):
    losses.alignment_loss(jnp.ones((2, 4)), jnp.ones((2, 4)), 0.1)
  with pytest.raises(ValueError, match="temperature"):
    _losses.alignment_loss(jnp.ones((2, 1, 4)), jnp.ones((2, 1, 4)), 0.0)


# ---------------------------------------------------------------- video perceptual


def _box3(a: np.ndarray) -> np.ndarray:
  """3x3 mean over axes 2, 3 of [B, T, H, W, C] with edge padding."""
  padded = np.pad(a, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  h, w = a.shape[2:4]
  return sum(padded[:, :, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def _frames(seed=9, shape=(2, 3, 16, 16, 3)):
  """Smooth random video with edges: an upsampled, smoothed random field plus a sharp square."""
  b, t, h, w, c = shape
  coarse = np.random.default_rng(seed).normal(size=(b, t, h // 4, w // 4, c))
  video = _box3(coarse.repeat(4, axis=2).repeat(4, axis=3))
  video[:, :, 4:10, 5:11, :] += 1.0
  return jnp.asarray(video, jnp.float32)


def _blur(video):
  return jnp.asarray(_box3(np.asarray(video)), jnp.float32)


def test_video_perceptual_loss():
  x = _frames()
  assert abs(float(losses.video_perceptual_loss(x, x))) < 1e-6
  # An offset of a whole clip costs nothing; blur of the same MSE, or noise, does.
  blurred = _blur(x)
  rms = float(jnp.sqrt(jnp.mean((blurred - x) ** 2)))
  assert abs(float(losses.video_perceptual_loss(x + rms, x))) < 1e-4
  blur_loss = float(losses.video_perceptual_loss(blurred, x))
  assert blur_loss > 0.05
  noisy_small = x + 0.05 * _normal(10, x.shape)
  noisy_big = x + 0.2 * _normal(10, x.shape)
  small = losses.video_perceptual_loss(noisy_small, x)
  assert 0 < small < losses.video_perceptual_loss(noisy_big, x)
  # Per-example: a masked example (even NaN) is ignored; all masked gives 0.
  pred = blurred.at[1].set(jnp.nan)
  np.testing.assert_allclose(losses.video_perceptual_loss(pred, x, jnp.array([1.0, 0.0])),
                             losses.video_perceptual_loss(blurred[:1], x[:1]), rtol=1e-5)
  assert float(losses.video_perceptual_loss(pred, x, jnp.zeros(2))) == 0.0
  with pytest.raises(ValueError, match=r"rank 5"):
    losses.video_perceptual_loss(x[0], x[0])


# ---------------------------------------------------------------- audio perceptual


def test_audio_perceptual_loss_scales():
  mel = _normal(11, (2, 16, 8))
  assert float(losses.audio_perceptual_loss(mel, mel)) == 0.0
  # A constant offset c is the same L1 at every scale.
  np.testing.assert_allclose(losses.audio_perceptual_loss(mel + 0.3, mel), 0.3, rtol=1e-5)
  # A +-c checkerboard over time and frequency averages out at scales 2 and 4: only scale 1 sees it.
  n, m = np.meshgrid(np.arange(16), np.arange(8), indexing="ij")
  checker = jnp.asarray(0.3 * (-1.0) ** (n + m), jnp.float32)
  np.testing.assert_allclose(losses.audio_perceptual_loss(mel + checker, mel), 0.1, rtol=1e-5)
  # A smooth error is seen at every scale: larger than the checkerboard of equal L1.
  smooth = jnp.asarray(0.3 * np.sign(np.sin(2 * np.pi * n / 16) + 1e-3), jnp.float32)
  assert losses.audio_perceptual_loss(mel + smooth, mel) > 0.25


def test_audio_perceptual_loss_mask_and_shapes():
  mel = _normal(12, (3, 8, 4))
  pred = mel + jnp.array([0.1, 0.2, jnp.nan])[:, None, None]
  np.testing.assert_allclose(losses.audio_perceptual_loss(pred, mel, jnp.array([1.0, 1.0, 0.0])),
                             0.15, rtol=1e-5)
  assert float(losses.audio_perceptual_loss(pred, mel, jnp.zeros(3))) == 0.0
  # Axes shorter than a pooling window still work (window clipped to the axis).
  np.testing.assert_allclose(losses.audio_perceptual_loss(mel[:, :3, :1] + 0.5, mel[:, :3, :1]),
                             0.5, rtol=1e-5)
  with pytest.raises(ValueError, match=r"rank 3"):
    losses.audio_perceptual_loss(mel[..., None], mel[..., None])


# ---------------------------------------------------------------- temporal


def test_temporal_loss():
  x = _frames(shape=(2, 4, 8, 8, 3))
  assert float(losses.temporal_loss(x, x)) == 0.0
  # A static offset shared by all frames leaves the motion unchanged.
  offset = 0.7 * _normal(13, (2, 1, 8, 8, 3))
  assert abs(float(losses.temporal_loss(x + offset, x))) < 1e-6
  # One frame of example 0 jumps by 0.5: two of its 3 differences are off by 0.5.
  jump = x.at[0, 2].add(0.5)
  np.testing.assert_allclose(losses.temporal_loss(jump, x, jnp.array([1.0, 0.0])), 1 / 3, rtol=1e-5)
  np.testing.assert_allclose(losses.temporal_loss(jump, x), 1 / 6, rtol=1e-5)
  assert float(losses.temporal_loss(jump, x, jnp.zeros(2))) == 0.0
  with pytest.raises(ValueError, match="at least 2 frames"):
    losses.temporal_loss(x[:, :1], x[:, :1])


# ---------------------------------------------------------------- weights


def test_align_weight_ramp():
  assert float(losses.align_weight(0, 0.5, 0)) == 0.5
  np.testing.assert_allclose([losses.align_weight(s, 0.5, 100) for s in (0, 25, 100, 1000)],
                             [0.0, 0.125, 0.5, 0.5])
  ramp = jax.jit(lambda step: losses.align_weight(step, 0.1, 10))
  np.testing.assert_allclose(ramp(jnp.int32(5)), 0.05, rtol=1e-6)
  with pytest.raises(ValueError, match="ramp_steps"):
    losses.align_weight(0, 0.1, -1)
