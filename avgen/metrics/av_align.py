"""AV-Align (Yariv et al., TempoTokens): IoU of audio onsets and optical-flow peaks.

This is the TempoTokens recipe (`av_align.py` in that repository), step for step; other papers
publish a variant with scipy `find_peaks` on the flow and torchaudio loading, which gives
different numbers. Per clip:

1. Audio: resample to 22050 Hz (what `librosa.load` does by default, with librosa's default
   resampler), `librosa.onset.onset_strength` and `librosa.onset.onset_detect` with default
   settings; onset frames -> seconds.
2. Video: grey frames (ITU-R 601 luma, as OpenCV's BGR2GRAY on the BGR frames it decodes);
   the mean Farneback optical-flow magnitude per frame pair, parameters (0.5, 3, 15, 3, 5, 1.2, 0);
   the trajectory is [flow(0, 1), flow(0, 1), flow(1, 2), ..., flow(T-2, T-1)] (the first pair
   counted twice, so entry i is the motion into frame i); a video peak is a strict local maximum
   at entry i (1 <= i <= T-2), at time i / fps.
3. An audio peak a is matched when some video peak v has v - 1/fps < a < v + 1/fps (strict);
   I counts matched audio peaks (several audio peaks may match one video peak, so the recipe's
   score can exceed 1), and the clip's score is I / (|A| + |V| - I).

The dataset score is the mean over clips. A clip with no audio and no video peak has no
defined score (the recipe divides by zero); such clips are listed and left out of the mean.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

RECIPE = "TempoTokens av_align.py: librosa onsets @22050 Hz, Farneback (0.5,3,15,3,5,1.2,0) peaks"
LIBROSA_LOAD_RATE = 22050
# pyr_scale, levels, winsize, iterations, poly_n, poly_sigma, flags
FARNEBACK_PARAMS = (0.5, 3, 15, 3, 5, 1.2, 0)


def audio_peaks(audio: Any, sample_rate: int) -> np.ndarray:
  """Onset times in seconds, as the recipe's `detect_audio_peaks`."""
  import librosa  # pylint: disable=g-import-not-at-top

  audio = np.asarray(audio, np.float32)
  if audio.ndim != 1:
    raise ValueError(f"audio: must be mono [S], got shape {audio.shape}")
  if sample_rate != LIBROSA_LOAD_RATE:
    audio = librosa.resample(audio, orig_sr=sample_rate, target_sr=LIBROSA_LOAD_RATE)
  envelope = librosa.onset.onset_strength(y=audio, sr=LIBROSA_LOAD_RATE)
  frames = librosa.onset.onset_detect(onset_envelope=envelope, sr=LIBROSA_LOAD_RATE)
  return np.asarray(librosa.frames_to_time(frames, sr=LIBROSA_LOAD_RATE), np.float64)


def flow_trajectory(video: Any) -> np.ndarray:
  """Mean Farneback flow magnitude into each frame, [T] (entry 0 repeats entry 1)."""
  import cv2  # pylint: disable=g-import-not-at-top

  video = np.asarray(video)
  if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
    raise ValueError(f"video: must be uint8 RGB [T, H, W, 3], got {video.dtype} {video.shape}")
  if video.shape[0] < 2:
    raise ValueError(f"video: optical flow needs at least 2 frames, got {video.shape[0]}")
  grey = [cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in video]

  def mean_flow(prev, curr):
    flow = cv2.calcOpticalFlowFarneback(prev, curr, None, *FARNEBACK_PARAMS)
    return cv2.mean(cv2.magnitude(flow[..., 0], flow[..., 1]))[0]

  first = mean_flow(grey[0], grey[1])
  return np.array([first] + [first if i == 1 else mean_flow(grey[i - 1], grey[i])
                             for i in range(1, len(grey))])


def video_peaks(trajectory: Any, fps: float) -> np.ndarray:
  """Times i / fps of strict local maxima of the trajectory (interior entries only)."""
  x = np.asarray(trajectory, np.float64)
  i = np.arange(1, len(x) - 1)
  return i[(x[i - 1] < x[i]) & (x[i] > x[i + 1])] / float(fps)


def intersection_over_union(audio_times: Sequence[float], video_times: Sequence[float],
                            fps: float) -> float | None:
  """The recipe's I / (|A| + |V| - I); None when there are no peaks at all."""
  window = 1.0 / float(fps)
  matched = sum(1 for a in audio_times if any(v - window < a < v + window for v in video_times))
  denominator = len(audio_times) + len(video_times) - matched
  return None if denominator == 0 else matched / denominator


def av_align_clip(video: Any, fps: float, audio: Any, sample_rate: int) -> dict[str, Any]:
  """AV-Align of one clip: {score (None if undefined), audio_peaks, video_peaks, flow}."""
  if not np.isfinite(fps) or fps <= 0:
    raise ValueError(f"fps: must be a positive number, got {fps}")
  flow = flow_trajectory(video)
  a, v = audio_peaks(audio, sample_rate), video_peaks(flow, fps)
  return {"score": intersection_over_union(a, v, fps), "audio_peaks": a.tolist(),
          "video_peaks": v.tolist(), "flow": flow.tolist()}


def summarize(per_clip: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, Any]:
  """Dataset score from per-clip results: the mean over clips whose score is defined."""
  scores = [r["score"] for r in per_clip]
  defined = [s for s in scores if s is not None]
  return {
      "score": float(np.mean(defined)) if defined else None,
      "per_clip": dict(zip(names, scores)),
      "num_clips": len(scores),
      "undefined_clips": [n for n, s in zip(names, scores) if s is None],
      "variant": RECIPE,
  }
