"""Pictures of clips for logs and sample sheets: frame strips, spectrograms, GIFs, PNGs.

Everything returns uint8 RGB numpy images [H, W, 3] (rows top to bottom), which TensorBoard
writers, `save_png` and `stack_rows` take as they are.
"""

from __future__ import annotations

import io
import os
from typing import Any, Sequence

import numpy as np

# Viridis-like colour map: dark blue -> teal -> green -> yellow, luminance rising throughout, so
# louder reads as brighter in colour and in greyscale. Anchors are evenly spaced and linearly
# interpolated.
_COLORMAP_ANCHORS = np.array([
    (68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142),
    (31, 158, 137), (53, 183, 121), (110, 206, 88), (181, 222, 43), (253, 231, 37),
], np.float64)


def colormap(values: Any) -> np.ndarray:
  """Maps values in [0, 1] (clipped) to uint8 RGB, shape values.shape + (3,)."""
  values = np.clip(np.nan_to_num(np.asarray(values, np.float64), nan=0.0), 0.0, 1.0)
  position = values * (len(_COLORMAP_ANCHORS) - 1)
  low = np.minimum(np.floor(position).astype(np.int64), len(_COLORMAP_ANCHORS) - 2)
  frac = (position - low)[..., None]
  rgb = _COLORMAP_ANCHORS[low] * (1 - frac) + _COLORMAP_ANCHORS[low + 1] * frac
  return np.round(rgb).astype(np.uint8)


def _check_video(video: Any, name: str = "video") -> np.ndarray:
  video = np.asarray(video)
  if video.dtype != np.uint8:
    raise ValueError(f"{name}: dtype must be uint8 (values 0..255), got {video.dtype}")
  if video.ndim != 4 or video.shape[-1] != 3 or min(video.shape[:3]) < 1:
    raise ValueError(f"{name}: must have shape [T, H, W, 3] with T, H, W >= 1, "
                     f"got {video.shape}")
  return video


def _check_image(image: Any, name: str = "image") -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"{name}: dtype must be uint8, got {image.dtype}")
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"{name}: must have shape [H, W, 3], got {image.shape}")
  return image


def _check_scale(name: str, scale: Any) -> int:
  if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
    raise ValueError(f"{name}: must be an integer >= 1, got {scale!r}")
  return int(scale)


def upscale(image: np.ndarray, scale: int) -> np.ndarray:
  """Nearest-neighbour upscale of the two axes before the last ([..., H, W, C])."""
  scale = _check_scale("scale", scale)
  if scale == 1:
    return image
  return np.repeat(np.repeat(image, scale, axis=-3), scale, axis=-2)


def frame_strip(video: Any, scale: int = 4, gap: int = 2,
                gap_color: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
  """All frames side by side, left to right in time: uint8 [H*scale, T*W*scale + (T-1)*gap, 3]."""
  video = upscale(_check_video(video), scale)
  if gap < 0:
    raise ValueError(f"gap: must be >= 0 pixels, got {gap}")
  t, h, w, _ = video.shape
  strip = np.empty((h, t * w + (t - 1) * gap, 3), np.uint8)
  strip[:] = np.asarray(gap_color, np.uint8)
  for i, frame in enumerate(video):
    x = i * (w + gap)
    strip[:, x:x + w] = frame
  return strip


def spectrogram_image(mel: Any, *, height_scale: int = 2, width_scale: int = 2,
                      vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
  """A (log-)mel spectrogram [N frames, n_mels] as an RGB image [n_mels*hs, N*ws, 3].

  Time runs left to right and low frequencies are at the bottom. Values are mapped linearly
  from [vmin, vmax] (default: the array's own range) onto the colour map, so pass log-scaled
  values (dB or the normalized log-mel latent).
  """
  mel = np.asarray(mel, np.float64)
  if mel.ndim != 2 or min(mel.shape) < 1:
    raise ValueError(f"mel: must have shape [N frames, n_mels] with N, n_mels >= 1, "
                     f"got {mel.shape}")
  finite = mel[np.isfinite(mel)]
  lo = vmin if vmin is not None else (finite.min() if finite.size else 0.0)
  hi = vmax if vmax is not None else (finite.max() if finite.size else 1.0)
  if hi < lo:
    raise ValueError(f"vmin/vmax: need vmin <= vmax, got {lo} > {hi}")
  unit = (mel - lo) / (hi - lo) if hi > lo else np.zeros_like(mel)
  image = colormap(unit.T[::-1])  # [n_mels, N, 3]; row 0 = highest mel bin
  image = np.repeat(image, _check_scale("height_scale", height_scale), axis=0)
  return np.repeat(image, _check_scale("width_scale", width_scale), axis=1)


def waveform_spectrogram(audio: Any, sample_rate: int, *, n_mels: int = 64, n_fft: int = 1024,
                         hop_length: int | None = None, fmax: float | None = None,
                         top_db: float = 80.0, height_scale: int = 2,
                         width_scale: int = 2) -> np.ndarray:
  """Mel spectrogram picture of a mono waveform [S]: dB relative to its loudest bin.

  hop_length defaults to sample_rate / 64 (64 columns per second); fmax to Nyquist.
  """
  import librosa  # pylint: disable=g-import-not-at-top  (slow import, only needed here)
  audio = np.asarray(audio, np.float32)
  if audio.ndim != 1 or audio.size < 1:
    raise ValueError(f"audio: must be mono with rank 1 [S] and S >= 1, got shape {audio.shape}")
  if not np.all(np.isfinite(audio)):
    raise ValueError("audio: contains NaN or infinite samples")
  if isinstance(sample_rate, bool) or int(sample_rate) != sample_rate or sample_rate <= 0:
    raise ValueError(f"sample_rate: must be a positive integer (Hz), got {sample_rate!r}")
  hop = hop_length or max(1, int(sample_rate) // 64)
  power = librosa.feature.melspectrogram(
      y=audio, sr=int(sample_rate), n_fft=n_fft, hop_length=hop, n_mels=n_mels,
      fmax=fmax or sample_rate / 2, power=2.0)  # [n_mels, N]
  db = librosa.power_to_db(power, ref=max(float(power.max()), 1e-20), top_db=top_db)
  return spectrogram_image(db.T, height_scale=height_scale, width_scale=width_scale,
                           vmin=-top_db, vmax=0.0)


def stack_rows(images: Sequence[Any], gap: int = 4,
               background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
  """Images one above the other (a sample sheet), each left-aligned and padded to the widest."""
  if not images:
    raise ValueError("images: need at least one image to stack")
  images = [_check_image(im, f"images[{i}]") for i, im in enumerate(images)]
  if gap < 0:
    raise ValueError(f"gap: must be >= 0 pixels, got {gap}")
  width = max(im.shape[1] for im in images)
  height = sum(im.shape[0] for im in images) + gap * (len(images) - 1)
  sheet = np.empty((height, width, 3), np.uint8)
  sheet[:] = np.asarray(background, np.uint8)
  y = 0
  for im in images:
    sheet[y:y + im.shape[0], :im.shape[1]] = im
    y += im.shape[0] + gap
  return sheet


def save_png(path: str | os.PathLike, image: Any) -> None:
  """Writes a uint8 image [H, W], [H, W, 3] or [H, W, 4] as PNG."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"image: dtype must be uint8, got {image.dtype}")
  if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
    raise ValueError(f"image: must have shape [H, W], [H, W, 3] or [H, W, 4], got {image.shape}")
  Image.fromarray(np.ascontiguousarray(image)).save(os.fspath(path), format="PNG")


def gif_bytes(video: Any, fps: float, scale: int = 1) -> bytes:
  """An endlessly looping animated GIF of the clip (for TensorBoard image summaries).

  GIF frame delays are whole hundredths of a second (and at least 0.02 s, below which browsers
  slow the clip down), so the rate is approximate. Pillow merges consecutive identical frames
  into one longer frame, so a still clip has fewer GIF frames than T but the same duration.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  video = upscale(_check_video(video), scale)
  if isinstance(fps, bool) or not np.isfinite(fps) or fps <= 0:
    raise ValueError(f"fps: must be a positive finite number, got {fps!r}")
  frames = [Image.fromarray(np.ascontiguousarray(f)) for f in video]
  buffer = io.BytesIO()
  frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:],
                 duration=max(20, int(round(1000 / fps))), loop=0)
  return buffer.getvalue()
