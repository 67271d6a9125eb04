"""Training losses. Each returns a float32 scalar.

`mask` is a per-example weight [B] (None = all ones). A masked-out example contributes nothing,
even if its values are NaN, and a batch whose mask is all zero gives 0 rather than 0 / 0. The
trainer combines the terms: L = w_diff*L_diff + w_align*L_align + w_perc*L_perc + w_temp*L_temp.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AUDIO_SCALES = (1, 2, 4)


def _batch_mask(mask, batch: int, name: str) -> jax.Array:
  if mask is None:
    return jnp.ones((batch,), jnp.float32)
  mask = jnp.asarray(mask, jnp.float32)
  if mask.shape != (batch,):
    raise ValueError(f"{name}: mask must have shape [B] = ({batch},), got {mask.shape}")
  return mask


def _check_same(name: str, a, b, rank: int | None = None, what: str = "") -> None:
  if a.shape != b.shape:
    raise ValueError(f"{name}: shapes differ: {a.shape} vs {b.shape}")
  if rank is not None and a.ndim != rank:
    raise ValueError(f"{name}: inputs must have rank {rank} {what}, got shape {a.shape}")


def masked_mean(per_example: jax.Array, mask: jax.Array | None) -> jax.Array:
  """sum(mask * x) / sum(mask) over the batch; masked entries are dropped, all-masked -> 0."""
  per_example = per_example.astype(jnp.float32)
  mask = _batch_mask(mask, per_example.shape[0], "masked_mean")
  keep = mask > 0
  total = jnp.sum(jnp.where(keep, mask * per_example, 0.0))
  weight = jnp.sum(jnp.where(keep, mask, 0.0))
  return total / jnp.where(weight > 0, weight, 1.0)


def _per_example_mean(x: jax.Array) -> jax.Array:
  return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def diffusion_loss(out: jax.Array, target: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean squared error per example, then the masked mean over the batch."""
  _check_same("diffusion_loss", out, target)
  err = jnp.square(out.astype(jnp.float32) - target.astype(jnp.float32))
  return masked_mean(_per_example_mean(err), mask)


def _normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + 1e-12)


def _alignment_logits(align_video, align_audio, temperature, mask):
  """Cosine-similarity logits between all video and audio windows of the batch, [BW, BW]."""
  _check_same("alignment_loss", align_video, align_audio, 3, "[B, W, D]")
  if not isinstance(temperature, jax.Array) and not temperature > 0:
    raise ValueError(f"alignment_loss: temperature must be > 0, got {temperature}")
  b, w, d = align_video.shape
  v = _normalize(align_video).reshape(b * w, d)
  a = _normalize(align_audio).reshape(b * w, d)
  logits = v @ a.T / temperature
  valid = jnp.repeat(_batch_mask(mask, b, "alignment_loss") > 0, w)
  return logits, valid


def alignment_loss(align_video: jax.Array, align_audio: jax.Array, temperature: float,
                   mask: jax.Array | None = None) -> jax.Array:
  """Symmetric InfoNCE between time-window features [B, W, D] of video and audio.

  Features are L2-normalised. The positive of video window (b, w) is audio window (b, w); every
  other audio window in the batch is a negative: other clips, and time-shifted windows of the
  same clip, so the model must match timing, not only content. Likewise audio -> video. Masked
  examples are neither anchors nor negatives.
  """
  logits, valid = _alignment_logits(align_video, align_audio, temperature, mask)
  # A large finite value rather than -inf keeps fully masked rows free of NaN.
  big = jnp.float32(1e9)
  diag = jnp.diagonal(logits)
  v2a = jax.nn.logsumexp(jnp.where(valid[None, :], logits, -big), axis=1) - diag
  a2v = jax.nn.logsumexp(jnp.where(valid[:, None], logits, -big), axis=0) - diag
  per_window = 0.5 * (v2a + a2v)
  count = jnp.sum(valid)
  return jnp.sum(jnp.where(valid, per_window, 0.0)) / jnp.maximum(count, 1)


def alignment_accuracy(align_video: jax.Array, align_audio: jax.Array,
                       mask: jax.Array | None = None) -> jax.Array:
  """Top-1 retrieval accuracy of the matching window, averaged over both directions (logging)."""
  logits, valid = _alignment_logits(align_video, align_audio, 1.0, mask)
  idx = jnp.arange(logits.shape[0])
  low = jnp.finfo(jnp.float32).min
  v2a = jnp.argmax(jnp.where(valid[None, :], logits, low), axis=1) == idx
  a2v = jnp.argmax(jnp.where(valid[:, None], logits, low), axis=0) == idx
  hits = jnp.where(valid, 0.5 * (v2a.astype(jnp.float32) + a2v.astype(jnp.float32)), 0.0)
  return jnp.sum(hits) / jnp.maximum(jnp.sum(valid), 1)


def _box_mean(x: jax.Array, window: tuple[int, int]) -> jax.Array:
  """Mean over a sliding window on axes 1, 2 of [N, H, W, C] (valid positions only)."""
  dims = (1,) + window + (1,)
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, (1, 1, 1, 1), "VALID")
  return total / (window[0] * window[1])


def _contrast_structure(x: jax.Array, y: jax.Array, c2: float) -> jax.Array:
  """The contrast-structure factor of SSIM for frames [N, H, W, C], 3x3 box window.

  SSIM's luminance factor is left out: it is ill-conditioned for zero-centred data (pixels in
  [-1, 1], VAE latents) and the diffusion MSE already pins the mean.
  """
  window = (min(3, x.shape[1]), min(3, x.shape[2]))
  mx, my = _box_mean(x, window), _box_mean(y, window)
  vx = _box_mean(x * x, window) - mx * mx
  vy = _box_mean(y * y, window) - my * my
  cxy = _box_mean(x * y, window) - mx * my
  return (2 * cxy + c2) / (vx + vy + c2)


def video_perceptual_loss(x0_hat: jax.Array, x0: jax.Array, mask: jax.Array | None = None, *,
                          data_range: float = 2.0) -> jax.Array:
  """Structure loss on predicted clean video [B, T, H, W, C], frame by frame.

  The sum of two per-example terms: the L1 distance between spatial finite-difference gradients
  (horizontal and vertical) of prediction and target, which rewards sharp, correctly placed
  edges that a pixel-wise MSE blurs; and 1 - CS, with CS the contrast-structure factor of SSIM
  (3x3 box window, C2 = (0.03 * data_range)^2; data_range 2 for [-1, 1]), which compares local
  contrast and correlation. Both terms ignore an offset shared by a whole frame; the diffusion
  loss takes care of that.
  """
  _check_same("video_perceptual_loss", x0_hat, x0, 5, "[B, T, H, W, C]")
  b, t, h, w, c = x0.shape
  x = x0_hat.astype(jnp.float32).reshape(b * t, h, w, c)
  y = x0.astype(jnp.float32).reshape(b * t, h, w, c)
  grad = jnp.zeros((b,), jnp.float32)
  if h > 1:
    grad = grad + jnp.mean(jnp.abs(jnp.diff(x, axis=1) - jnp.diff(y, axis=1)).reshape(b, -1), 1)
  if w > 1:
    grad = grad + jnp.mean(jnp.abs(jnp.diff(x, axis=2) - jnp.diff(y, axis=2)).reshape(b, -1), 1)
  cs = _contrast_structure(x, y, (0.03 * data_range) ** 2)
  return masked_mean(grad + 1.0 - jnp.mean(cs.reshape(b, -1), axis=1), mask)


def audio_perceptual_loss(x0_hat: jax.Array, x0: jax.Array,
                          mask: jax.Array | None = None) -> jax.Array:
  """Multi-resolution spectral L1 on normalised log-mel [B, N, M].

  Both mels are average-pooled over time and frequency with windows 1, 2 and 4 (stride = window)
  and compared by L1 at each scale; the mean over scales weights coarse spectral envelope and
  fine detail alike. Scales larger than an axis are clipped to its length.
  """
  _check_same("audio_perceptual_loss", x0_hat, x0, 3, "[B, N, n_mels]")
  x = x0_hat.astype(jnp.float32)[..., None]
  y = x0.astype(jnp.float32)[..., None]
  per_example = 0.0
  for scale in AUDIO_SCALES:
    window = (min(scale, x.shape[1]), min(scale, x.shape[2]))
    dims = (1,) + window + (1,)
    pool = lambda z: jax.lax.reduce_window(z, 0.0, jax.lax.add, dims, dims, "VALID")
    diff = jnp.abs(pool(x) - pool(y)) / (window[0] * window[1])
    per_example = per_example + _per_example_mean(diff)
  return masked_mean(per_example / len(AUDIO_SCALES), mask)


def temporal_loss(x0_hat: jax.Array, x0: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """L1 between frame differences of predicted and target video [B, T, H, W, C] (T >= 2).

  Compares motion rather than appearance: an offset shared by all frames costs nothing, a
  frame that jumps does.
  """
  _check_same("temporal_loss", x0_hat, x0, 5, "[B, T, H, W, C]")
  if x0.shape[1] < 2:
    raise ValueError(f"temporal_loss: video needs at least 2 frames, got shape {x0.shape}")
  dx = jnp.diff(x0_hat.astype(jnp.float32), axis=1)
  dy = jnp.diff(x0.astype(jnp.float32), axis=1)
  return masked_mean(_per_example_mean(jnp.abs(dx - dy)), mask)


def align_weight(step, base_weight: float, ramp_steps: int) -> jax.Array:
  """Alignment loss weight: rises linearly from 0 at step 0 to `base_weight` at `ramp_steps`."""
  if ramp_steps < 0:
    raise ValueError(f"align_weight: ramp_steps must be >= 0, got {ramp_steps}")
  if ramp_steps == 0:
    return jnp.asarray(base_weight, jnp.float32)
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / ramp_steps, 0.0, 1.0)
  return base_weight * frac
