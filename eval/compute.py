"""Each metric of the eval job: what it needs, and how its report entry is computed."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from avgen.metrics import av_align, frechet, kernel, similarity, sync, temporal
from eval import extractors
from eval.data import Clip, ClipSet


@dataclasses.dataclass(frozen=True)
class MetricSpec:
  needs_reference: bool
  needs: tuple[str, ...]  # clip fields: video, audio, caption
  summary: str
  # Spec target: (comparison, value), from the original spec; None where it sets none.
  target: tuple[str, float] | None = None
  higher_is_better: bool = True


METRICS = {
    "fad": MetricSpec(True, ("audio",), "Fréchet audio distance (VGGish)", ("<", 2.0), False),
    "fvd": MetricSpec(True, ("video",), "Fréchet video distance (I3D)", ("<", 500.0), False),
    "kvd": MetricSpec(True, ("video",), "kernel video distance (I3D)", None, False),
    "clip": MetricSpec(False, ("video", "caption"), "CLIP score (raw cosine)", (">", 0.28)),
    "clap": MetricSpec(False, ("audio", "caption"), "CLAP score (raw cosine)", (">", 0.30)),
    "av_align": MetricSpec(False, ("video", "audio"), "AV-Align (TempoTokens)", (">", 0.70)),
    "temporal": MetricSpec(False, ("video",), "temporal consistency", ("<", 0.15), False),
    "sync": MetricSpec(False, ("video", "audio"), "synthetic sync F1 (same frame)"),
}
EXTRACTORS = {"fad": extractors.vggish, "fvd": extractors.i3d, "kvd": extractors.i3d,
              "clip": extractors.clip, "clap": extractors.clap, "temporal": extractors.lpips}


def parse_metrics(text: str) -> list[str]:
  names = [m.strip() for m in text.split(",") if m.strip()]
  unknown = [m for m in names if m not in METRICS]
  if unknown or not names:
    raise ValueError(f"--metrics: unknown metric(s) {unknown or text!r}; "
                     f"known: {', '.join(METRICS)}")
  return list(dict.fromkeys(names))


def usable(clips: Sequence[Clip], needs: Sequence[str]) -> tuple[list[Clip], list[dict[str, str]]]:
  """Clips that have every field a metric needs, and the others with the reason."""
  kept, excluded = [], []
  for clip in clips:
    missing = [f for f in needs
               if (not clip.caption if f == "caption" else getattr(clip, f) is None)]
    if missing:
      excluded.append({"name": clip.name, "reason": f"no {' and no '.join(missing)}"})
    else:
      kept.append(clip)
  return kept, excluded


def _require(clips: list[Clip], what: str, metric: str, minimum: int = 1) -> None:
  if len(clips) < minimum:
    raise ValueError(f"metric {metric!r}: {what} has {len(clips)} usable clip(s); "
                     f"needs >= {minimum}")


def compute_av_align(gen: list[Clip], progress: Callable) -> dict[str, Any]:
  results = [av_align.av_align_clip(c.video, c.fps, c.audio, c.sample_rate)
             for c in progress(gen, "av_align")]
  out = av_align.summarize(results, [c.name for c in gen])
  out["definition"] = ("mean over clips of I / (|A| + |V| - I): A = librosa onsets, V = strict "
                       "local maxima of mean Farneback flow magnitude, a match within one frame")
  return out


def compute_sync(gen: list[Clip], ref: list[Clip] | None, progress: Callable) -> dict[str, Any]:
  def run(clips, label):
    events = [sync.clip_events(c.video, c.audio, c.fps, c.sample_rate)
              for c in progress(clips, label)]
    truth = [sync.ground_truth_times(c.meta).tolist() if c.meta and "events" in c.meta else None
             for c in clips]
    result = sync.sync_score(events, truth if any(t is not None for t in truth) else None)
    result["per_clip"] = dict(zip([c.name for c in clips], result["per_clip"]))
    return result

  out = run(gen, "sync")
  out["definition"] = (
      "F1 of one-to-one matches between audio onsets and visual impacts (reversals of "
      "palette-coloured objects) within 0.5 frame, on sub-frame times; within_1_frame uses 1.5 "
      "frames; offsets are audio minus video in frames")
  if ref:
    out["reference"] = {k: v for k, v in run(ref, "sync (reference)").items() if k != "per_clip"}
  return out


def compute_temporal(gen: list[Clip], extractor, progress: Callable) -> dict[str, Any]:
  if extractor is None:
    one = temporal.pixel_consistency
  else:
    one = lambda videos: temporal.lpips_consistency(videos, extractor.model)
  results = [one([c.video]) for c in progress(gen, "temporal")]
  out = {k: v for k, v in results[0].items() if k not in ("score", "per_clip")}
  per_clip = [r["score"] for r in results]
  out.update(score=float(np.mean(per_clip)), per_clip=dict(zip([c.name for c in gen], per_clip)))
  if extractor is None:
    out["note"] = ("LPIPS weights were not found, so this is NOT LPIPS and not comparable with the "
                   "LPIPS < 0.15 target; provide --weights lpips=PATH for LPIPS")
  else:
    out["embedding_model"] = extractor.name
  return out


def video_features(clips: list[Clip], extractor, progress: Callable, label: str) -> np.ndarray:
  """Per-clip video embeddings, `extractor.batch_size` clips per call, kept on each clip so that
  FVD and KVD of one job share one pass."""
  todo = [c for c in clips if extractor.name not in c.features]
  batch = max(1, extractor.batch_size)
  chunks = [todo[i:i + batch] for i in range(0, len(todo), batch)]
  for chunk in progress(chunks, label):
    for clip, row in zip(chunk, extractor.embed["video"]([c.video for c in chunk])):
      clip.features[extractor.name] = np.asarray(row)
  if not clips:
    return np.zeros((0, 0), np.float32)
  return np.stack([c.features[extractor.name] for c in clips])


def compute_video_distance(metric: str, gen: list[Clip], ref: list[Clip], extractor,
                           progress: Callable, seed: int) -> dict[str, Any]:
  """FVD (Fréchet) or KVD (kernel) between per-clip video features of the two sets."""
  short = []
  if extractor.min_frames:
    def long_enough(clips, label):
      kept = []
      for c in clips:
        if len(c.video) < extractor.min_frames:
          short.append({"name": c.name, "set": label,
                        "reason": f"{len(c.video)} frames; the embedding uses the first "
                                  f"{extractor.min_frames}"})
        else:
          kept.append(c)
      return kept
    gen, ref = long_enough(gen, "generated"), long_enough(ref, "reference")
  gen_features = video_features(gen, extractor, progress, f"{metric} (generated)")
  ref_features = video_features(ref, extractor, progress, f"{metric} (reference)")
  for label, f in (("generated", gen_features), ("reference", ref_features)):
    if len(f) < 2:
      raise ValueError(f"metric {metric!r}: the {label} set gives {len(f)} feature vector(s); "
                       "needs >= 2")
  out = {"embedding_model": extractor.name,
         "num_features": {"generated": len(gen_features), "reference": len(ref_features)},
         "excluded_short": short}
  if extractor.note:
    out["note"] = extractor.note
  if metric == "fvd":
    out["score"] = frechet.frechet_distance_from_features(gen_features, ref_features)
    out["definition"] = "Fréchet distance between Gaussian fits of per-clip video features"
    if min(len(gen_features), len(ref_features)) <= gen_features.shape[1]:
      out["rank_warning"] = (f"fewer clips than feature dimensions ({gen_features.shape[1]}): "
                             "the covariances are singular and the score is biased; use more "
                             "clips")
  else:
    result = kernel.kernel_distance(gen_features, ref_features, seed=seed)
    out.update(score=result.pop("mean"), **result)
    out["definition"] = ("mean over random subsets of the unbiased MMD^2 with kernel "
                         "(x.y/D + 1)^3 between per-clip video features")
  return out


def compute_fad(gen: list[Clip], ref: list[Clip], extractor, progress: Callable) -> dict[str, Any]:
  embed = extractor.embed["audio"]

  def features(clips, label):
    rows, excluded = [], []
    for c in progress(clips, label):
      emb, _ = embed([c.audio], c.sample_rate)
      if len(emb) == 0:
        excluded.append({"name": c.name, "reason": "shorter than one 0.96 s VGGish example"})
      rows.append(emb)
    return np.concatenate(rows), excluded

  gen_features, gen_excluded = features(gen, "fad (generated)")
  ref_features, ref_excluded = features(ref, "fad (reference)")
  for label, f in (("generated", gen_features), ("reference", ref_features)):
    if len(f) < 2:
      raise ValueError(f"metric 'fad': the {label} set gives {len(f)} VGGish embedding(s); "
                       "needs >= 2")
  return {
      "score": frechet.frechet_distance_from_features(gen_features, ref_features),
      "embedding_model": extractor.name,
      "definition": ("Fréchet distance between Gaussian fits (mean, unbiased covariance) of all "
                     "VGGish embeddings of each set; symmetric eigendecomposition sqrtm"),
      "num_embeddings": {"generated": len(gen_features), "reference": len(ref_features)},
      "rank_warning": (None if min(len(gen_features), len(ref_features)) > gen_features.shape[1]
                       else "fewer embeddings than dimensions (128): the covariances are singular "
                            "and the score is biased; use more clips"),
      "excluded_short": gen_excluded + ref_excluded,
  }


def compute_text_score(metric: str, gen: list[Clip], extractor,
                       progress: Callable) -> dict[str, Any]:
  clips = list(progress(gen, metric))
  captions = [c.caption for c in clips]
  if metric == "clip":
    out = similarity.clip_score([c.video for c in clips], captions, extractor.embed["image"],
                                extractor.embed["text"])
  else:
    rates = {c.sample_rate for c in clips}
    if len(rates) != 1:
      raise ValueError(f"metric 'clap': clips have different sample rates {sorted(rates)}")
    out = similarity.clap_score([c.audio for c in clips], rates.pop(), captions,
                                extractor.embed["audio"], extractor.embed["text"])
  out["per_clip"] = dict(zip([c.name for c in clips], out["per_clip"]))
  out["embedding_model"] = extractor.name
  return out


def compute(metric: str, generated: ClipSet, reference: ClipSet | None, extractor,
            progress: Callable, seed: int = 0) -> dict[str, Any]:
  """The report entry of one metric."""
  spec = METRICS[metric]
  gen, excluded = usable(generated.clips, spec.needs)
  _require(gen, "the generated set", metric)
  ref = None
  if reference is not None:
    ref, ref_excluded = usable(reference.clips, spec.needs)
    excluded += [dict(e, set="reference") for e in ref_excluded]
  if metric == "av_align":
    out = compute_av_align(gen, progress)
  elif metric == "sync":
    out = compute_sync(gen, ref, progress)
  elif metric == "temporal":
    out = compute_temporal(gen, extractor, progress)
  elif metric == "fad":
    out = compute_fad(gen, ref, extractor, progress)
  elif metric in ("clip", "clap"):
    out = compute_text_score(metric, gen, extractor, progress)
  elif metric in ("fvd", "kvd"):
    out = compute_video_distance(metric, gen, ref, extractor, progress, seed)
    excluded += out.pop("excluded_short")
  else:
    raise extractors.ExtractorUnavailableError(f"metric {metric!r} has no implementation")
  out["summary"] = spec.summary
  out["excluded_clips"] = excluded
  if spec.target is not None and not out.get("fallback"):  # the LPIPS target is not for pixels
    out["spec_target"] = f"{spec.target[0]} {spec.target[1]}"
  return out
