"""Rotary position embeddings on the time axis that video and audio share.

Positions are (time, height, width) per token, time in video-frame units (docs/architecture.md,
"Shared time axis"): a video token of temporal patch index i sits at `i*pt + (pt-1)/2`; an audio
token covering mel frames [k*p, (k+1)*p) sits at `(k*p + p/2) * hop / sample_rate * fps - 0.5`,
so audio centred on frame f's interval has time f. Audio tokens have height = width = 0.

The head dimension is split into sections, one per position axis; each section rotates its
half-dim pairs by `position * theta**(-2j / section)`. Because both modalities rotate their time
section the same way, attention scores see the same relative time across modalities.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def rope_sections(head_dim: int) -> tuple[int, int, int]:
  """(time, height, width) section sizes: time gets half the head dim, the rest splits evenly."""
  if head_dim % 2:
    raise ValueError(f"rope: head_dim must be even, got {head_dim}")
  spatial = 2 * (head_dim // 8)
  return head_dim - 2 * spatial, spatial, spatial


def video_positions(num_frames: int, height: int, width: int, patch: Sequence[int]) -> np.ndarray:
  """Float32 [T/pt * h/ph * w/pw, 3] (time, row, col) of video tokens in patchify order."""
  pt, ph, pw = patch
  for name, size, p in (("num_frames", num_frames, pt), ("height", height, ph), ("width", width, pw)):
    if size % p:
      raise ValueError(f"rope: video {name}={size} is not divisible by its patch size {p}")
  nt, nh, nw = num_frames // pt, height // ph, width // pw
  t, y, x = np.meshgrid(np.arange(nt) * pt + (pt - 1) / 2, np.arange(nh), np.arange(nw), indexing="ij")
  return np.stack([t.ravel(), y.ravel(), x.ravel()], -1).astype(np.float32)


def audio_token_times(num_mel_frames: int, audio_patch: int, hop_length: int, sample_rate: int,
                      fps: float) -> np.ndarray:
  """Float64 [N/p] times (video-frame units) of audio tokens: their centre, shifted by -0.5."""
  if num_mel_frames % audio_patch:
    raise ValueError(
        f"rope: audio mel frames N={num_mel_frames} is not divisible by audio_patch={audio_patch}")
  centres = np.arange(num_mel_frames // audio_patch) * audio_patch + audio_patch / 2
  return centres * hop_length / sample_rate * fps - 0.5


def audio_positions(num_mel_frames: int, audio_patch: int, hop_length: int, sample_rate: int,
                    fps: float) -> np.ndarray:
  """Float32 [N/p, 3] (time, 0, 0) of audio tokens."""
  times = audio_token_times(num_mel_frames, audio_patch, hop_length, sample_rate, fps)
  zeros = np.zeros_like(times)
  return np.stack([times, zeros, zeros], -1).astype(np.float32)


def num_mel_frames(config) -> int:
  """N = round(audio_seconds * sample_rate / hop_length)."""
  return int(round(config.data.audio_seconds * config.data.sample_rate / config.mel.hop_length))


def token_positions(config) -> tuple[np.ndarray, np.ndarray]:
  """(video [Lv, 3], audio [La, 3]) positions of the DiT's joint sequence for `config`."""
  d, m = config.data, config.model
  down = config.latent.video_downsample
  video = video_positions(d.num_frames, d.height // down, d.width // down, m.video_patch)
  audio = audio_positions(num_mel_frames(config), m.audio_patch, config.mel.hop_length,
                          d.sample_rate, d.fps)
  return video, audio


def rope_tables(positions, sections: Sequence[int], theta: float) -> tuple[jax.Array, jax.Array]:
  """cos, sin float32 [L, sum(sections)/2] for positions [L, len(sections)] (floats allowed)."""
  positions = jnp.asarray(positions, jnp.float32)
  if positions.ndim != 2 or positions.shape[-1] != len(sections):
    raise ValueError(f"rope: positions must be [L, {len(sections)}], got {positions.shape}")
  angles = []
  for axis, size in enumerate(sections):
    if size % 2:
      raise ValueError(f"rope: section sizes must be even, got {tuple(sections)}")
    inv_freq = theta ** (-jnp.arange(0, size, 2, dtype=jnp.float32) / max(size, 1))
    angles.append(positions[:, axis:axis + 1] * inv_freq[None, :])
  angles = jnp.concatenate(angles, -1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x [B, L, H, D] by the tables [L, D/2]: pair j is (x[j], x[j + D/2])."""
  half = x.shape[-1] // 2
  if cos.shape != (x.shape[1], half):
    raise ValueError(f"rope: tables {cos.shape} do not fit x {x.shape} (want [L, D/2])")
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., :half], xf[..., half:]
  cos, sin = cos[None, :, None, :], sin[None, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)
  return out.astype(x.dtype)
