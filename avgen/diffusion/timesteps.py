"""Per-modality training times and loss masks.

Each example gets its own video time and audio time. On top of that:
  - with probability `share_t_prob` the two times are equal;
  - with probability `audio_to_video_prob` the audio is given clean (t_audio = 0) and its loss
    is masked: the model learns to make video from audio;
  - with probability `video_to_audio_prob` the video is given clean instead (video -> audio).
    These two events exclude each other, so their probabilities must sum to at most 1.
A modality not in `modalities` is pure noise (t = 1) and masked in every example. With
`joint=False` (stage 1) every example trains exactly one modality, chosen uniformly among
`modalities`; the other is pure noise and masked, and the sharing / conditioning probabilities
do not apply.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

MODALITIES = ("video", "audio")


def _check_prob(name: str, p) -> float:
  p = float(p)
  if not 0.0 <= p <= 1.0:
    raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
  return p


def sample_train_times(rng: jax.Array, objective, batch_size: int, *, share_t_prob: float,
                       audio_to_video_prob: float, video_to_audio_prob: float,
                       modalities: Sequence[str] = MODALITIES, joint: bool = True):
  """Draws training times and loss masks for one batch.

  Args:
    rng: PRNG key.
    objective: an objective from `build_objective` (its `sample_t` draws the noisy times).
    batch_size: B.
    share_t_prob, audio_to_video_prob, video_to_audio_prob: see the module docstring.
    modalities: the modalities trained, a non-empty subset of ("video", "audio").
    joint: False trains one modality per example (stage 1).

  Returns:
    (t_video, t_audio, video_loss_mask, audio_loss_mask), each float32 [B]; a mask is 1 where
    the example's modality contributes to the loss, else 0.
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
  if isinstance(modalities, str):
    raise ValueError(f"modalities must be a sequence of names, got the string {modalities!r}")
  modalities = tuple(modalities)
  unknown = [m for m in modalities if m not in MODALITIES]
  if unknown or not modalities:
    raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {modalities}")
  share_t_prob = _check_prob("share_t_prob", share_t_prob)
  a2v = _check_prob("audio_to_video_prob", audio_to_video_prob)
  v2a = _check_prob("video_to_audio_prob", video_to_audio_prob)
  if a2v + v2a > 1.0:
    raise ValueError(f"audio_to_video_prob + video_to_audio_prob must be <= 1 (they exclude each "
                     f"other), got {a2v} + {v2a}")

  shape = (batch_size,)
  k_video, k_audio, k_share, k_cond, k_pick = jax.random.split(rng, 5)
  t_video = objective.sample_t(k_video, shape).astype(jnp.float32)
  t_audio = objective.sample_t(k_audio, shape).astype(jnp.float32)
  ones = jnp.ones(shape, jnp.float32)
  has_video = "video" in modalities
  has_audio = "audio" in modalities

  if not joint:
    if has_video and has_audio:
      train_video = jax.random.bernoulli(k_pick, 0.5, shape)
    else:
      train_video = jnp.full(shape, has_video)
    video_mask = train_video.astype(jnp.float32)
    audio_mask = 1.0 - video_mask
    t_video = jnp.where(train_video, t_video, 1.0)
    t_audio = jnp.where(train_video, 1.0, t_audio)
    return t_video, t_audio, video_mask, audio_mask

  if not (has_video and has_audio):
    # One modality alone: the other is pure noise and carries no loss.
    if has_video:
      return t_video, ones, ones, jnp.zeros(shape, jnp.float32)
    return ones, t_audio, jnp.zeros(shape, jnp.float32), ones

  share = jax.random.uniform(k_share, shape) < share_t_prob
  t_audio = jnp.where(share, t_video, t_audio)
  u = jax.random.uniform(k_cond, shape)
  audio_clean = u < a2v
  video_clean = (u >= a2v) & (u < a2v + v2a)
  t_audio = jnp.where(audio_clean, 0.0, t_audio)
  t_video = jnp.where(video_clean, 0.0, t_video)
  audio_mask = jnp.where(audio_clean, 0.0, ones)
  video_mask = jnp.where(video_clean, 0.0, ones)
  return t_video, t_audio, video_mask, audio_mask
