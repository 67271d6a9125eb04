"""Temporal consistency: how much consecutive frames differ (lower is smoother).

With LPIPS weights: the mean LPIPS (AlexNet, v0.1) between frames t and t+1, per clip, then
the mean over clips; the spec's target is LPIPS < 0.15. Without them, a pixel-space fallback:
the mean absolute difference of consecutive frames in [0, 1] RGB. The two are on different
scales and are reported under different names, never one for the other.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

LPIPS_NAME = "lpips_consecutive_frames"
PIXEL_NAME = "pixel_l1_consecutive_frames"


def _check_video(video: Any, i: int) -> np.ndarray:
  video = np.asarray(video)
  if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
    raise ValueError(f"videos[{i}]: must be uint8 [T, H, W, 3], got {video.dtype} {video.shape}")
  if video.shape[0] < 2:
    raise ValueError(f"videos[{i}]: temporal consistency needs at least 2 frames, "
                     f"got {video.shape[0]}")
  return video


def _summary(method: str, per_clip: list[float], definition: str, **extra) -> dict[str, Any]:
  return {"method": method, "score": float(np.mean(per_clip)), "per_clip": per_clip,
          "definition": definition, **extra}


def pixel_consistency(videos: Sequence[Any]) -> dict[str, Any]:
  """Fallback without LPIPS weights: mean |frame_{t+1} - frame_t| in [0, 1] RGB."""
  per_clip = []
  for i, video in enumerate(videos):
    v = _check_video(video, i).astype(np.float32) / 255.0
    per_clip.append(float(np.abs(v[1:] - v[:-1]).mean()))
  return _summary(PIXEL_NAME, per_clip,
                  "pixel-space fallback (LPIPS weights not available): mean over clips of the mean "
                  "absolute difference between consecutive frames, RGB in [0, 1]",
                  fallback=True)


_DISTANCE = []


def _jitted_distance():
  """One jitted LPIPS call for the process (jax is imported only when LPIPS is used)."""
  if not _DISTANCE:
    from flax import nnx  # pylint: disable=g-import-not-at-top
    _DISTANCE.append(nnx.jit(lambda model, a, b: model(a, b)))
  return _DISTANCE[0]


def lpips_consistency(videos: Sequence[Any], model, batch_size: int = 64) -> dict[str, Any]:
  """Mean LPIPS between consecutive frames, with an `avgen.metrics.nets.lpips.LPIPS` model."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  distance = _jitted_distance()
  per_clip = []
  for i, video in enumerate(videos):
    v = _check_video(video, i).astype(np.float32) / 127.5 - 1.0
    pairs = len(v) - 1
    values = [np.asarray(distance(model, jnp.asarray(v[s:min(s + batch_size, pairs)]),
                                  jnp.asarray(v[s + 1:min(s + batch_size, pairs) + 1])))
              for s in range(0, pairs, batch_size)]
    per_clip.append(float(np.concatenate(values).mean()))
  return _summary(LPIPS_NAME, per_clip,
                  "mean over clips of the mean LPIPS (AlexNet trunk, lin v0.1) between frames t "
                  "and t+1, frames scaled to [-1, 1] at their stored size", fallback=False)
