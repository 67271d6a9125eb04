"""Exact audio-visual sync score for the synthetic bouncing-shapes task.

On the synthetic data (`data_pipeline.synthetic`) every wall impact starts a tone at the exact
impact time, so sync can be measured event by event instead of through a learned model:

- Visual impacts: each object is segmented by its palette colour; its centroid path along x and
  y is folded at the walls. At a reversal the three centroids around the extremum sample i fit a
  tent (constant speed, mirrored at the wall) exactly: with p = c_i - c_{i-1} and
  q = c_i - c_{i+1} (signs flipped for a minimum), the speed is max(p, q) and the impact lies
  a = (p - q) / (2 max(p, q)) frames from frame i's centre, so times come at sub-frame precision.
- Audio onsets: energy in 4 ms windows (1 ms hop) that jumps by 6 dB over 4 ms above a floor
  (30 dB under the loudest window); the onset is the end of the first window of the rise.
- Events closer than `merge_seconds` on one side are one event (a corner hit reverses x and y
  at once and sounds once); an unmatched event within 2 * `merge_seconds` of a matched event on
  its own side is a second detection of that event and is not counted (two impacts 30-40 ms
  apart may merge on one side and not on the other).
- Matching: one-to-one, the most pairs first and then the smallest total offset
  (`scipy.optimize.linear_sum_assignment`), for a tolerance in frames on continuous times.

Only what the video can show is scored: a reversal is visible when the frames on both sides of
the extremum exist, so events in the first and last frame are out, and so are the 3 frames
around any frame where an object is partly hidden (fewer than 90% of its usual pixels: another
shape covers it) or missing. Unmatched events within `slack_frames` of an unscored stretch are
not counted, since the two detectors may place one event on either side of its border.

Reported per clip set (sums of true positives, false positives, false negatives over clips):
- `score`: F1 with tolerance 0.5 frame: the sound starts within half a frame of the impact.
- `within_1_frame`: precision, recall, F1 with tolerance 1.5 frames (the sound starts in the
  impact's frame or a neighbouring one).
- `mean_abs_offset_frames`, `mean_offset_frames` (audio minus video; > 0: audio late) over
  pairs matched within `offset_window_frames`.
Precision counts visual impacts with a sound; recall counts sounds with an impact.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

SCORE_TOLERANCE = 0.5  # frames
WITHIN_ONE_FRAME_TOLERANCE = 1.5  # frames
OFFSET_WINDOW = 4.5  # frames
MERGE_SECONDS = 0.03
SLACK_FRAMES = 0.25
_ONSET_WINDOW_SECONDS = 0.004
_ONSET_HOP_SECONDS = 0.001
_ONSET_RISE = 4.0  # energy ratio (6 dB) between a window and the one 4 ms before it
_ONSET_FLOOR_DB = -30.0  # below the clip's loudest window
_ONSET_ABS_FLOOR = 1e-6  # mean-square energy: amplitude 1e-3
_COLOR_TOLERANCE = 80.0  # RGB distance to a palette colour
_VISIBLE_FRACTION = 0.9  # of an object's median pixel count
_MIN_SPEED = 0.01  # frame sizes per frame: slower reversals are segmentation noise


def default_palette() -> dict[str, tuple[int, int, int]]:
  from data_pipeline import synthetic  # pylint: disable=g-import-not-at-top
  return {name: rgb for name, (rgb, _) in synthetic.COLORS.items()}


# ---------------------------------------------------------------------------------------------
# Detectors


def audio_onsets(audio: Any, sample_rate: int, *,
                 merge_seconds: float = MERGE_SECONDS) -> np.ndarray:
  """Onset times (seconds) of tones in a mono waveform."""
  audio = np.asarray(audio, np.float64)
  if audio.ndim != 1:
    raise ValueError(f"audio: must be mono [S], got shape {audio.shape}")
  window = max(1, int(round(_ONSET_WINDOW_SECONDS * sample_rate)))
  hop = max(1, int(round(_ONSET_HOP_SECONDS * sample_rate)))
  if len(audio) < window:
    return np.zeros(0)
  starts = np.arange(0, len(audio) - window + 1, hop)
  cumsum = np.concatenate([[0.0], np.cumsum(audio**2)])
  energy = (cumsum[starts + window] - cumsum[starts]) / window
  floor = max(_ONSET_ABS_FLOOR, energy.max() * 10 ** (_ONSET_FLOOR_DB / 10))
  lag = max(1, window // hop)  # compare with the window that ends where this one starts
  before = np.concatenate([np.zeros(lag), energy[:-lag]])
  rising = (energy > floor) & (energy > _ONSET_RISE * np.maximum(before, floor / _ONSET_RISE))
  # The first window of a rise holds only the first samples of the new sound: its end is the
  # onset, late by about a millisecond.
  first = np.flatnonzero(rising & ~np.concatenate([[False], rising[:-1]]))
  onsets = (starts[first] + window) / sample_rate
  return merge_events(np.array(onsets), merge_seconds)


def object_tracks(video: Any, palette: Mapping[str, Sequence[int]] | None = None
                  ) -> dict[str, dict[str, np.ndarray]]:
  """Per palette colour present: centroids [T, 2] (x, y; NaN where absent) and pixel counts [T]."""
  video = np.asarray(video)
  if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
    raise ValueError(f"video: must be uint8 RGB [T, H, W, 3], got {video.dtype} {video.shape}")
  palette = default_palette() if palette is None else palette
  names = list(palette)
  pixels = video.astype(np.int32)
  best = np.full(video.shape[:3], _COLOR_TOLERANCE**2, np.float64)  # squared RGB distance
  label = np.full(video.shape[:3], -1, np.int32)
  for k, name in enumerate(names):
    dist2 = sum((pixels[..., c] - int(palette[name][c]))**2 for c in range(3))
    closer = dist2 < best
    best = np.where(closer, dist2, best)
    label[closer] = k
  ys, xs = np.mgrid[0:video.shape[1], 0:video.shape[2]] + 0.5
  tracks = {}
  for k, name in enumerate(names):
    mask = label == k  # [T, H, W]
    counts = mask.sum(axis=(1, 2))
    if not counts.any():
      continue
    with np.errstate(invalid="ignore", divide="ignore"):
      cx = (mask * xs).sum(axis=(1, 2)) / counts
      cy = (mask * ys).sum(axis=(1, 2)) / counts
    tracks[name] = {"centroid": np.stack([cx, cy], -1), "pixels": counts}
  return tracks


def visual_impacts(video: Any, fps: float, palette: Mapping[str, Sequence[int]] | None = None,
                   *, merge_seconds: float = MERGE_SECONDS) -> tuple[np.ndarray, np.ndarray]:
  """(impact times in seconds, per-frame bool [T]: frame fully observable)."""
  video = np.asarray(video)
  tracks = object_tracks(video, palette)
  num_frames = video.shape[0]
  min_speed = _MIN_SPEED * min(video.shape[1:3])
  visible = np.ones(num_frames, bool)
  times = []
  for track in tracks.values():
    pixels = track["pixels"]
    reliable = pixels >= _VISIBLE_FRACTION * np.median(pixels[pixels > 0])
    visible &= reliable
    for axis in range(2):
      c = track["centroid"][:, axis]
      for i in range(1, num_frames - 1):
        if not reliable[i - 1:i + 2].all():
          continue
        for sign in (1.0, -1.0):  # maximum, then minimum
          p, q = sign * (c[i] - c[i - 1]), sign * (c[i] - c[i + 1])
          if p > 0 and q >= 0 and max(p, q) >= min_speed:
            times.append((i + 0.5 + (p - q) / (2 * max(p, q))) / fps)
  return merge_events(np.array(times), merge_seconds), visible


def merge_events(times: np.ndarray, merge_seconds: float) -> np.ndarray:
  """Sorted times with runs closer than `merge_seconds` replaced by their mean."""
  times = np.sort(np.asarray(times, np.float64))
  if len(times) == 0:
    return times
  groups = np.split(times, np.flatnonzero(np.diff(times) >= merge_seconds) + 1)
  return np.array([g.mean() for g in groups])


# ---------------------------------------------------------------------------------------------
# Matching and scoring


def scored_intervals(visible: np.ndarray, fps: float) -> list[tuple[float, float]]:
  """Time intervals (seconds) where an impact could be seen: see the module docstring."""
  num_frames = len(visible)
  ok = np.zeros(num_frames, bool)
  ok[1:num_frames - 1] = True
  for j in np.flatnonzero(~np.asarray(visible)):
    ok[max(0, j - 1):j + 2] = False
  intervals, start = [], None
  for f in range(num_frames + 1):
    if f < num_frames and ok[f] and start is None:
      start = f
    elif (f == num_frames or not ok[f]) and start is not None:
      intervals.append((start / fps, f / fps))
      start = None
  return intervals


def _inside(t: float, intervals, margin: float) -> bool:
  return any(lo + margin <= t <= hi - margin for lo, hi in intervals)


def match_events(audio_times: Sequence[float], video_times: Sequence[float], tolerance: float
                 ) -> list[tuple[int, int]]:
  """Index pairs (audio, video) of a one-to-one matching with |offset| <= tolerance (seconds):
  the largest number of pairs, then the smallest total offset."""
  from scipy.optimize import linear_sum_assignment  # pylint: disable=g-import-not-at-top

  a, v = np.asarray(audio_times, np.float64), np.asarray(video_times, np.float64)
  if len(a) == 0 or len(v) == 0:
    return []
  offsets = np.abs(a[:, None] - v[None, :])
  valid = offsets <= tolerance
  # Any invalid pair costs more than all valid pairs together, so the count comes first.
  too_far = offsets[valid].sum() + len(a) + len(v) + 1.0 if valid.any() else 1.0
  cost = np.where(valid, offsets, too_far)
  rows, cols = linear_sum_assignment(cost)
  return [(int(i), int(j)) for i, j in zip(rows, cols) if valid[i, j]]


def _unmatched(times, matched, intervals, slack, merge_seconds) -> list[int]:
  """Unmatched events that count: inside the scored intervals (with slack), and not a second
  detection of a matched event (within 2 * merge_seconds of it on the same side)."""
  matched_times = [times[i] for i in matched]
  return [i for i, t in enumerate(times)
          if i not in matched and _inside(t, intervals, slack)
          and not any(abs(t - m) < 2 * merge_seconds for m in matched_times)]


def count_matches(audio_times, video_times, intervals, fps: float, tolerance_frames: float,
                  slack_frames: float = SLACK_FRAMES, merge_seconds: float = MERGE_SECONDS
                  ) -> dict[str, Any]:
  """True/false positives and false negatives inside the scored intervals, plus offsets."""
  pairs = match_events(audio_times, video_times, tolerance_frames / fps)
  slack = slack_frames / fps
  tp = [(i, j) for i, j in pairs
        if _inside(audio_times[i], intervals, 0.0) or _inside(video_times[j], intervals, 0.0)]
  fn = len(_unmatched(audio_times, [i for i, _ in pairs], intervals, slack, merge_seconds))
  fp = len(_unmatched(video_times, [j for _, j in pairs], intervals, slack, merge_seconds))
  offsets = [(audio_times[i] - video_times[j]) * fps for i, j in tp]
  return {"tp": len(tp), "fp": fp, "fn": fn, "offsets_frames": offsets}


def prf(tp: int, fp: int, fn: int) -> dict[str, float | None]:
  """Precision, recall, F1, each None where undefined: with no event on either side there is
  nothing to score (a still, silent clip must not count as perfectly in sync)."""
  precision = tp / (tp + fp) if tp + fp else None
  recall = tp / (tp + fn) if tp + fn else None
  f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
  return {"precision": precision, "recall": recall, "f1": f1}


def clip_events(video: Any, audio: Any, fps: float, sample_rate: int,
                palette: Mapping[str, Sequence[int]] | None = None) -> dict[str, Any]:
  """Detected events of one clip: audio onsets, visual impacts (seconds), scored intervals."""
  if not np.isfinite(fps) or fps <= 0:
    raise ValueError(f"fps: must be a positive number, got {fps}")
  video = np.asarray(video)
  impacts, visible = visual_impacts(video, fps, palette)
  return {"audio_onsets": audio_onsets(audio, sample_rate).tolist(),
          "visual_impacts": impacts.tolist(),
          "scored_intervals": scored_intervals(visible, fps),
          "fps": float(fps), "num_frames": int(video.shape[0])}


def _tally(events: Sequence[dict[str, Any]], first: str, second: str) -> dict[str, Any]:
  """Matches `first` times (sounds) against `second` times (impacts) over all clips."""
  totals = {}
  for name, tol in (("score", SCORE_TOLERANCE), ("within_1_frame", WITHIN_ONE_FRAME_TOLERANCE),
                    ("offset", OFFSET_WINDOW)):
    tp = fp = fn = 0
    offsets = []
    per_clip = []
    for e in events:
      c = count_matches(e[first], e[second], e["scored_intervals"], e["fps"], tol)
      tp, fp, fn = tp + c["tp"], fp + c["fp"], fn + c["fn"]
      offsets += c["offsets_frames"]
      per_clip.append(prf(c["tp"], c["fp"], c["fn"])["f1"])
    totals[name] = {"tp": tp, "fp": fp, "fn": fn, **prf(tp, fp, fn), "per_clip_f1": per_clip,
                    "offsets": offsets}
  offsets = totals["offset"]["offsets"]
  strict, loose = totals["score"], totals["within_1_frame"]
  return {
      "score": strict["f1"],
      "same_frame": {k: strict[k] for k in ("precision", "recall", "f1", "tp", "fp", "fn")},
      "within_1_frame": {k: loose[k] for k in ("precision", "recall", "f1", "tp", "fp", "fn")},
      "mean_abs_offset_frames": float(np.mean(np.abs(offsets))) if offsets else None,
      "mean_offset_frames": float(np.mean(offsets)) if offsets else None,
      "num_offset_pairs": len(offsets),
      "per_clip": strict["per_clip_f1"],
  }


def ground_truth_times(meta: Mapping[str, Any], merge_seconds: float = MERGE_SECONDS) -> np.ndarray:
  """Impact times (seconds) recorded by the synthetic generator in `meta["events"]`."""
  events = meta.get("events") if isinstance(meta, Mapping) else None
  if events is None:
    raise ValueError("meta: has no 'events' list; ground-truth sync needs synthetic clips")
  return merge_events(np.array([float(e["time"]) for e in events]), merge_seconds)


def sync_score(events: Sequence[dict[str, Any]],
               ground_truth: Sequence[Sequence[float] | None] | None = None) -> dict[str, Any]:
  """Sync over clips from `clip_events` results; with ground-truth impact times per clip (None
  for clips without), also each detector's agreement with the ground truth."""
  events = list(events)
  result = _tally(events, "audio_onsets", "visual_impacts")
  result["tolerances_frames"] = {"score": SCORE_TOLERANCE,
                                 "within_1_frame": WITHIN_ONE_FRAME_TOLERANCE,
                                 "offset_window": OFFSET_WINDOW}
  result["num_clips"] = len(events)
  if ground_truth is not None:
    with_gt = [dict(e, ground_truth=list(g)) for e, g in zip(events, ground_truth) if g is not None]
    if with_gt:
      result["detectors_vs_ground_truth"] = {
          "num_clips": len(with_gt),
          "audio_onsets": _tally(with_gt, "audio_onsets", "ground_truth")["same_frame"],
          "visual_impacts": _tally(with_gt, "ground_truth", "visual_impacts")["same_frame"],
      }
  return result
