"""Conditioning inputs for audio_to_video, video_to_audio and edit, fitted to the model's clip.

What is done to an input that does not match the clip (each change is returned as a note and
logged, so nothing happens silently):

  audio file     decoded by ffmpeg at the model's sample rate (resampled if needed); channels
                 averaged to mono.
  audio array    float [S] or [S, C] in [-1, 1] with its `sample_rate` given; resampled
                 (polyphase) if that differs; channels averaged.
  video file     decoded by ffmpeg at the model's fps (frames dropped or repeated by time);
                 another frame size is scaled to cover the model's and centre-cropped.
  video array    uint8 [T, H, W, 3] with its `fps` given; frames picked by time if that
                 differs; another size is scaled to cover and centre-cropped (PIL, box filter).
  longer         cut to the clip: the first num_frames / fps seconds are used.
  shorter        audio is padded with silence; video repeats its last frame.

Refused with a ValueError naming the input: empty inputs, non-finite or non-float audio,
non-uint8 video, arrays without their rate, and a rate given with a file (the file's own rate
is the one that holds; a second one could only disagree with it).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import numpy as np

_log = logging.getLogger(__name__)


def _note(notes: list[str], text: str, *, warn: bool = False) -> None:
  notes.append(text)
  (_log.warning if warn else _log.info)("%s", text)


def _check_rate(name: str, rate: Any) -> float:
  if rate is None:
    raise ValueError(f"{name}: required with an array input (the rate it was sampled at)")
  if isinstance(rate, bool) or not np.isfinite(float(rate)) or float(rate) <= 0:
    raise ValueError(f"{name}: must be a positive number, got {rate!r}")
  return float(rate)


def _no_rate_for_files(name: str, rate: Any, what: str) -> None:
  if rate is not None:
    raise ValueError(f"{name}={rate!r}: only for an array of {what}; a {what} file's rate is "
                     f"read from the file (pass {name}=None)")


def _fit_length(audio: np.ndarray, length: int, notes: list[str], sample_rate: int) -> np.ndarray:
  if len(audio) > length:
    _note(notes, f"audio: {len(audio) / sample_rate:.3f} s is longer than the clip's "
          f"{length / sample_rate:.3f} s; the first {length / sample_rate:.3f} s are used",
          warn=True)
    return np.ascontiguousarray(audio[:length])
  if len(audio) < length:
    _note(notes, f"audio: {len(audio) / sample_rate:.3f} s is shorter than the clip's "
          f"{length / sample_rate:.3f} s; padded with silence", warn=True)
    return np.concatenate([audio, np.zeros(length - len(audio), np.float32)])
  return audio


def load_audio(source: str | os.PathLike | np.ndarray, *, sample_rate: int, num_samples: int,
               source_rate: float | None = None) -> tuple[np.ndarray, list[str]]:
  """The clip's mono float32 waveform [num_samples] from a file or an array, and the notes."""
  from avgen.sample import media  # pylint: disable=g-import-not-at-top
  notes: list[str] = []
  if isinstance(source, (str, os.PathLike)):
    _no_rate_for_files("audio_sample_rate", source_rate, "audio")
    header = media.probe_header(source)
    if header["audio"] is None:
      raise ValueError(f"audio_path {os.fspath(source)!r}: the file has no audio stream")
    rate, channels = header["audio"]["sample_rate"], header["audio"]["channels"]
    if rate and rate != sample_rate:
      _note(notes, f"audio: resampled from {rate} Hz to the model's {sample_rate} Hz")
    if channels and channels > 1:
      _note(notes, f"audio: {channels} channels averaged to mono")
    audio = media.read_audio(source, sample_rate=sample_rate)
    what = f"audio_path {os.fspath(source)!r}"
  else:
    rate = _check_rate("audio_sample_rate", source_rate)
    audio = np.asarray(source)
    what = "audio"
    if audio.ndim not in (1, 2):
      raise ValueError(f"audio: must be [S] or [S, channels], got shape {audio.shape}")
    if not np.issubdtype(audio.dtype, np.floating):
      raise ValueError(f"audio: must be floating point with values in [-1, 1], got {audio.dtype}")
    if audio.ndim == 2:
      _note(notes, f"audio: {audio.shape[1]} channels averaged to mono")
      audio = audio.mean(axis=1)
    audio = audio.astype(np.float32)
    if rate != sample_rate:
      audio = _resample(audio, rate, sample_rate)
      _note(notes, f"audio: resampled from {rate:g} Hz to the model's {sample_rate} Hz")
  if audio.size == 0:
    raise ValueError(f"{what}: holds no audio samples")
  if not np.all(np.isfinite(audio)):
    raise ValueError(f"{what}: contains NaN or infinite samples")
  return _fit_length(audio, num_samples, notes, sample_rate), notes


def _resample(audio: np.ndarray, rate: float, target: int) -> np.ndarray:
  import scipy.signal  # pylint: disable=g-import-not-at-top
  from fractions import Fraction  # pylint: disable=g-import-not-at-top
  ratio = Fraction(target) / Fraction(rate).limit_denominator(1000)
  out = scipy.signal.resample_poly(audio.astype(np.float64), ratio.numerator, ratio.denominator)
  return out.astype(np.float32)


def _cover_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
  """Scales each frame to cover (height, width) keeping its aspect, then centre-crops."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  _, h, w, _ = frames.shape
  scale = max(height / h, width / w)
  sh, sw = max(height, math.ceil(h * scale - 1e-6)), max(width, math.ceil(w * scale - 1e-6))
  top, left = (sh - height) // 2, (sw - width) // 2
  out = np.empty((len(frames), height, width, 3), np.uint8)
  for i, frame in enumerate(frames):
    image = Image.fromarray(frame).resize((sw, sh), Image.Resampling.BOX)
    out[i] = np.asarray(image)[top:top + height, left:left + width]
  return out


def _fit_frames(frames: np.ndarray, count: int, fps: float, notes: list[str]) -> np.ndarray:
  if len(frames) > count:
    _note(notes, f"video: {len(frames)} frames at {fps:g} fps are more than the clip's {count}; "
          f"the first {count} are used", warn=True)
    return np.ascontiguousarray(frames[:count])
  if len(frames) < count:
    _note(notes, f"video: {len(frames)} frames at {fps:g} fps are fewer than the clip's {count}; "
          "the last frame is repeated", warn=True)
    return frames[np.minimum(np.arange(count), len(frames) - 1)]
  return frames


def load_video(source: str | os.PathLike | np.ndarray, *, fps: float, height: int, width: int,
               num_frames: int, source_fps: float | None = None) -> tuple[np.ndarray, list[str]]:
  """The clip's uint8 frames [num_frames, height, width, 3] from a file or an array, and notes."""
  from avgen.sample import media  # pylint: disable=g-import-not-at-top
  notes: list[str] = []
  if isinstance(source, (str, os.PathLike)):
    _no_rate_for_files("video_fps", source_fps, "video")
    header = media.probe_header(source)
    if header["video"] is None:
      raise ValueError(f"video_path {os.fspath(source)!r}: the file has no video stream")
    v = header["video"]
    if v["fps"] and abs(v["fps"] - fps) > 1e-3:
      _note(notes, f"video: resampled from {v['fps']:g} fps to the model's {fps:g} fps")
    # Decoded once at the model's fps; the size filter runs only when the size differs, so a
    # file that already fits comes back exactly as decoded.
    frames, _ = media.read_video(source, fps=fps)
    if frames.shape[1:3] != (height, width):
      _note(notes, f"video: {frames.shape[2]}x{frames.shape[1]} frames scaled to cover "
            f"{width}x{height} and centre-cropped")
      frames, _ = media.read_video(source, fps=fps, size=(height, width), crop=True)
    what = f"video_path {os.fspath(source)!r}"
  else:
    rate = _check_rate("video_fps", source_fps)
    frames = np.asarray(source)
    what = "video"
    if frames.dtype != np.uint8:
      raise ValueError(f"video: dtype must be uint8 (values 0..255), got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
      raise ValueError(f"video: must have shape [T, H, W, 3], got {frames.shape}")
    if abs(rate - fps) > 1e-6 and len(frames):
      # Output frame k stands for [k / fps, (k + 1) / fps); it takes the source frame showing
      # at that interval's middle.
      count = max(1, int(math.floor(len(frames) / rate * fps + 1e-9)))
      index = np.floor((np.arange(count) + 0.5) / fps * rate).astype(np.int64)
      frames = frames[np.minimum(index, len(frames) - 1)]
      _note(notes, f"video: resampled from {rate:g} fps to the model's {fps:g} fps")
    if len(frames) and frames.shape[1:3] != (height, width):
      _note(notes, f"video: {frames.shape[2]}x{frames.shape[1]} frames scaled to cover "
            f"{width}x{height} and centre-cropped")
      frames = _cover_crop(frames, height, width)
  if len(frames) == 0 or min(frames.shape[1:3]) == 0:
    raise ValueError(f"{what}: holds no frames")
  return _fit_frames(frames, num_frames, fps, notes), notes
