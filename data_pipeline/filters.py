"""Quality measures of a normalized clip, and the rules that accept or reject it.

Every measure runs on what the model will see (frames at the target size and rate, audio at the
target rate), so a threshold means the same thing for every source.

- blur: variance of the Laplacian (OpenCV's `Laplacian` with ksize=1: the 4-neighbour kernel) of
  the luma (BT.601 weights, uint8) of each frame, over the pixels whose neighbours all exist; the
  clip's score is the median over frames.
  Flat content (sky, a dark room) scores low even when in focus.
- scene cuts: PySceneDetect's ContentDetector (mean change of hue, saturation and lightness
  between consecutive frames) over the whole input, frame by frame, with its flash filter off;
  the score is the number of cuts inside the clip (between two of its frames). A cut between two
  clips belongs to neither.
- SNR (`snr_db`), see `snr_db`.
- silence ratio: share of 20 ms frames whose RMS is below `silence_db` dBFS.
- clipping ratio: share of samples, over all source channels (before the mono mix, where one
  clipped channel would be halved), whose magnitude reaches `clipping_level`.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

import numpy as np

from data_pipeline.preprocess_config import PreprocessConfig

# The SNR reported for a clip with no signal at all (digital silence) and its cap for a clip with
# no noise at all; JSON has no infinities.
SNR_FLOOR_DB = -30.0
SNR_CEIL_DB = 100.0
_STFT_SIZE = 512  # 32 ms at 16 kHz
_STFT_HOP = 256
_NOISE_QUANTILE = 0.1
_NEIGHBOUR_BINS = 8  # half-width of the frequency window of the broadband floor estimate
_SILENCE_FRAME_SECONDS = 0.02


def blur_score(video: np.ndarray) -> float:
  """Median over frames of the variance of the Laplacian of luma; video uint8 [T, H, W, 3]."""
  import cv2  # pylint: disable=g-import-not-at-top  (OpenCV comes with scenedetect)
  scores = []
  for frame in video:
    luma = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)  # BT.601 weights, rounded to uint8
    lap = cv2.Laplacian(luma, cv2.CV_32F, ksize=1)[1:-1, 1:-1]  # border rows need padding
    scores.append(float(lap.var()) if lap.size else 0.0)
  return float(np.median(scores))


class SceneCutCounter:
  """Feeds an input's frames, in order, to one scenedetect ContentDetector.

  Frames larger than 256 px are shrunk (area average) to fit 256 px first, as scenedetect does by
  default for a video it opens itself: the score is a mean over pixels, so this costs little
  accuracy and saves most of the detector's time.
  """

  _MAX_SIDE = 256

  def __init__(self, threshold: float, fps: float):
    # pylint: disable=g-import-not-at-top  (only ingestion needs scenedetect and OpenCV)
    import cv2
    from scenedetect import FrameTimecode
    from scenedetect.detectors import ContentDetector
    self._cv2 = cv2
    self._timecode = FrameTimecode
    # min_scene_len=0 turns the flash filter off, so every cut is reported at once, at the frame
    # it happens, instead of some frames later (which would land it in the wrong clip).
    self._detector = ContentDetector(threshold=threshold, min_scene_len=0)
    self._fps = float(fps)
    self._next = 0

  def feed(self, video: np.ndarray) -> list[int]:
    """Frame numbers (counted over the whole input) that start a new scene, among `video`'s."""
    cv2 = self._cv2
    height, width = video.shape[1:3]
    scale = self._MAX_SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    cuts = []
    for frame in video:
      bgr = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)  # OpenCV's channel order
      if scale < 1:
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
      found = self._detector.process_frame(self._timecode(self._next, fps=self._fps), bgr)
      cuts += [int(tc.frame_num) for tc in found]
      self._next += 1
    return cuts


def frame_rms_db(audio: np.ndarray, sample_rate: int,
                 frame_seconds: float = _SILENCE_FRAME_SECONDS) -> np.ndarray:
  """RMS level in dBFS of consecutive non-overlapping frames of mono audio [S]."""
  size = max(1, int(round(frame_seconds * sample_rate)))
  frames = audio[:len(audio) // size * size].astype(np.float64).reshape(-1, size)
  return 10.0 * np.log10(np.mean(frames**2, axis=1) + 1e-20)


def silence_ratio(audio: np.ndarray, sample_rate: int, silence_db: float) -> float:
  levels = frame_rms_db(audio, sample_rate)
  return float(np.mean(levels < silence_db)) if len(levels) else 1.0


def clipping_ratio(channels: np.ndarray, level: float) -> float:
  """Share of samples of [S, C] audio (all channels) with |x| >= level."""
  return float(np.mean(np.abs(channels) >= level)) if channels.size else 0.0


def snr_db(audio: np.ndarray) -> float:
  """Estimated signal-to-noise ratio (dB) of mono audio [S], from its spectrogram alone.

  Noise is taken to be the stationary part. Its power spectrum N[f] is the smaller of two
  estimates per frequency bin f (Hann STFT, 512-sample frames, hop 256):
    - the 10% quantile over time of the bin's power, divided by -ln(0.9): the periodogram of
      Gaussian noise is exponentially distributed, so this is unbiased for noise, and it sits
      below speech or sound events that come and go (minimum statistics);
    - the median over time of the median power in the 17 bins around f, divided by ln 2: the
      broadband floor under a steady tone, which the first estimate would take for noise.
  Signal power is what the mean spectrum holds above the floor, sum_f max(mean_t P - N, 0), and
  SNR = 10 log10(signal / sum_f N). Stationary noise of any colour scores low; so does a sound
  that never changes and fills the whole spectrum like noise. Digital silence scores
  SNR_FLOOR_DB; clean audio over a zero floor SNR_CEIL_DB.
  """
  x = np.asarray(audio, np.float64)
  if len(x) < _STFT_SIZE:
    x = np.pad(x, (0, _STFT_SIZE - len(x)))
  num = 1 + (len(x) - _STFT_SIZE) // _STFT_HOP
  idx = np.arange(_STFT_SIZE)[None, :] + _STFT_HOP * np.arange(num)[:, None]
  spec = np.fft.rfft(x[idx] * np.hanning(_STFT_SIZE), axis=1)[:, 1:]  # DC left out
  power = spec.real**2 + spec.imag**2  # [frames, bins]
  quantile_floor = np.quantile(power, _NOISE_QUANTILE, axis=0) / -math.log1p(-_NOISE_QUANTILE)
  k = _NEIGHBOUR_BINS
  padded = np.pad(power, ((0, 0), (k, k)), mode="reflect")
  windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * k + 1, axis=1)
  broadband_floor = np.median(np.median(windows, axis=2), axis=0) / math.log(2.0)
  noise = np.minimum(quantile_floor, broadband_floor)
  signal = np.maximum(power.mean(axis=0) - noise, 0.0).sum()
  noise_total = noise.sum()
  if signal <= 0:
    return SNR_FLOOR_DB
  if noise_total <= 0:
    return SNR_CEIL_DB
  return float(np.clip(10.0 * math.log10(signal / noise_total), SNR_FLOOR_DB, SNR_CEIL_DB))


def clip_scores(video: np.ndarray, channels: np.ndarray, sample_rate: int, scene_cuts: int,
                config: PreprocessConfig) -> dict[str, float]:
  """All clip scores: video uint8 [T, H, W, 3], audio [S, C] at the target rate."""
  mono = channels.mean(axis=1, dtype=np.float32)
  return {
      "blur": round(blur_score(video), 3),
      "scene_cuts": int(scene_cuts),
      "snr_db": round(snr_db(mono), 3),
      "silence_ratio": round(silence_ratio(mono, sample_rate, config.silence_db), 4),
      "clipping_ratio": round(clipping_ratio(channels, config.clipping_level), 6),
  }


# rule -> (score key, comparison the score must pass, config field holding the threshold)
CLIP_RULES: dict[str, tuple[Callable[[Any, Any], bool], str, str]] = {
    "blur": (operator.ge, ">=", "min_blur"),
    "scene_cuts": (operator.le, "<=", "max_scene_cuts"),
    "snr_db": (operator.gt, ">", "min_snr_db"),
    "silence_ratio": (operator.lt, "<", "max_silence_ratio"),
    "clipping_ratio": (operator.le, "<=", "max_clipping_ratio"),
}


def failed_rules(scores: dict[str, float], config: PreprocessConfig) -> list[str]:
  """The clip rules that `scores` break, in CLIP_RULES order."""
  return [rule for rule, (passes, _, field) in CLIP_RULES.items()
          if not passes(scores[rule], getattr(config, field))]


def describe_rule(rule: str, config: PreprocessConfig) -> tuple[str, float]:
  """('>=', threshold) for a clip rule: what a score must satisfy to pass."""
  _, symbol, field = CLIP_RULES[rule]
  return symbol, getattr(config, field)
