"""Evaluation the trainer can run every N steps on the clips it just sampled.

Only metrics that need no reference set and no downloaded weights run by default (AV-Align,
the synthetic sync score, pixel-space temporal consistency); `temporal` uses LPIPS instead when
the caller passes a loaded model. Returns flat scalars ready for a metrics writer.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from avgen.metrics import av_align, sync, temporal

DEFAULT_METRICS = ("av_align", "sync", "temporal")
KNOWN_METRICS = ("av_align", "sync", "temporal")


def evaluate_samples(videos: Any, audios: Any, meta: Mapping[str, Any],
                     metrics: Sequence[str] = DEFAULT_METRICS, *, lpips_model=None,
                     prefix: str = "eval/") -> dict[str, float]:
  """Scores a batch of generated clips.

  Args:
    videos: uint8 [B, T, H, W, 3] (or a list of [T, H, W, 3]).
    audios: float [B, S] (or a list of [S]) in [-1, 1].
    meta: {"fps": float, "sample_rate": int}; optional "events": per-clip lists of ground-truth
      impact times (seconds) when the clips re-create known synthetic clips.
    metrics: any of KNOWN_METRICS.
    lpips_model: an `avgen.metrics.nets.lpips.LPIPS`; without it `temporal` is the pixel fallback.
    prefix: put before every key.

  Returns:
    {prefix + name: float}; a metric with no defined value (e.g. AV-Align when no clip has any
    peak) is left out rather than logged as a made-up number.
  """
  unknown = sorted(set(metrics) - set(KNOWN_METRICS))
  if unknown:
    raise ValueError(f"metrics: unknown in-training metric(s) {unknown}; "
                     f"known: {list(KNOWN_METRICS)}")
  for key in ("fps", "sample_rate"):
    if key not in meta:
      raise ValueError(f"meta: needs {key!r}, got keys {sorted(meta)}")
  fps, rate = float(meta["fps"]), int(meta["sample_rate"])
  videos, audios = list(videos), [np.asarray(a, np.float32) for a in audios]
  if len(videos) != len(audios) or not videos:
    raise ValueError(f"videos and audios: need the same number (>= 1) of clips, got "
                     f"{len(videos)} and {len(audios)}")
  out: dict[str, float] = {}
  if "av_align" in metrics:
    names = [str(i) for i in range(len(videos))]
    result = av_align.summarize([av_align.av_align_clip(v, fps, a, rate)
                                 for v, a in zip(videos, audios)], names)
    if result["score"] is not None:
      out[prefix + "av_align"] = result["score"]
  if "sync" in metrics:
    events = [sync.clip_events(v, a, fps, rate) for v, a in zip(videos, audios)]
    result = sync.sync_score(events, meta.get("events"))
    if result["score"] is not None:  # None: no event in any clip
      out[prefix + "sync_score"] = result["score"]
      out[prefix + "sync_f1_within_1_frame"] = result["within_1_frame"]["f1"]
    if result["mean_abs_offset_frames"] is not None:
      out[prefix + "sync_mean_abs_offset_frames"] = result["mean_abs_offset_frames"]
  if "temporal" in metrics:
    result = (temporal.pixel_consistency(videos) if lpips_model is None
              else temporal.lpips_consistency(videos, lpips_model))
    out[prefix + "temporal_" + result["method"]] = result["score"]
  return out
