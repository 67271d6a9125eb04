"""Offline evaluation of generated clips: `python -m eval.run` (see docs/evaluation.md).

  python -m eval.run --generated DIR --reference DIR_OR_SHARDS \
      --metrics fad,fvd,kvd,clip,clap,av_align,temporal,sync --out report.json

Writes `report.json` (one top-level key per metric, each naming what it computed and with which
embedding model, plus `job`), `report.md` (a summary) and plots in `report_plots/`. The same
inputs and seed give the same report. Every requested metric is checked before any clip is
read: a missing reference set, unknown metric, or feature extractor without weights stops the
job with a message saying what to provide (or, with --skip-unavailable, is recorded as that
metric's `error` while the others run).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Mapping, Sequence

from eval import compute, data, extractors, plots, report
from avgen.metrics import weights as weights_lib

REPORT_VERSION = 1


def _parse_weights(items: Sequence[str]) -> dict[str, str]:
  given = {}
  for item in items:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
      raise ValueError(f"--weights: expected NAME=PATH, got {item!r}")
    if name not in weights_lib.WEIGHTS:
      raise ValueError(f"--weights: unknown extractor {name!r}; "
                       f"known: {sorted(weights_lib.WEIGHTS)}")
    given[name] = path
  return given


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m eval.run", description=__doc__.split("\n")[0])
  p.add_argument("--generated", required=True, help="folder of .mp4/.wav/.txt, or shards")
  p.add_argument("--reference", help="folder or shards; needed by fad, fvd, kvd")
  p.add_argument("--metrics", default="av_align,sync,temporal",
                 help=f"comma-separated, from: {','.join(compute.METRICS)}")
  p.add_argument("--out", required=True, help="report JSON path (summary: same name, .md)")
  p.add_argument("--plots-dir", help="default: <out without .json>_plots")
  p.add_argument("--weights", action="append", default=[], metavar="NAME=PATH",
                 help=f"extractor weights; NAME from {sorted(weights_lib.WEIGHTS)}")
  p.add_argument("--download", action="store_true",
                 help="fetch missing published weights (VGGish, CLAP) instead of failing")
  p.add_argument("--i3d-output", choices=("logits", "features"), default="logits",
                 help="FVD/KVD embedding: the 400 Kinetics logits (the reference FVD) or the "
                      "1024-d pre-logits")
  p.add_argument("--fvd-frames", type=int, default=16,
                 help="FVD/KVD use each clip's first N frames (shorter clips are excluded)")
  p.add_argument("--seed", type=int, default=0, help="seed of every random choice (KID subsets)")
  p.add_argument("--max-clips", type=int, help="use the first N clips of each set (name order)")
  p.add_argument("--skip-unavailable", action="store_true",
                 help="record unavailable metrics as errors and compute the rest")
  p.add_argument("--no-progress", action="store_true", help="no progress bars")
  return p


def preflight(metrics: Sequence[str], has_reference: bool, given: dict[str, str],
              download: bool, skip: bool, options: Mapping[str, dict[str, Any]] | None = None
              ) -> tuple[dict[str, Any], dict[str, str]]:
  """Loads each metric's extractor; returns (extractors, errors). Raises unless `skip`.

  `options`: keyword arguments of a metric's extractor builder. Metrics whose builder and
  options agree (fvd and kvd) share one extractor, so its model loads once.
  """
  loaded, errors, built = {}, {}, {}
  for metric in metrics:
    try:
      if compute.METRICS[metric].needs_reference and not has_reference:
        raise ValueError(f"metric {metric!r} compares against a reference set: pass --reference")
      builder = compute.EXTRACTORS.get(metric)
      if builder is None:
        loaded[metric] = None
        continue
      kwargs = (options or {}).get(metric, {})
      key = (builder, tuple(sorted(kwargs.items())))
      if key not in built:
        built[key] = builder(given, download, **kwargs)
      loaded[metric] = built[key]
    except (ValueError, weights_lib.MissingWeightsError, extractors.ExtractorUnavailableError) as e:
      errors[metric] = str(e)
  if errors and not skip:
    raise SystemExit("eval: cannot compute " + ", ".join(errors) + ":\n"
                     + "\n".join(f"  - {m}: {e}" for m, e in errors.items())
                     + "\n(--skip-unavailable computes the other metrics)")
  return loaded, errors


def _versions() -> dict[str, str]:
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  out = {}
  for pkg in ("numpy", "scipy", "librosa", "opencv-python-headless", "jax", "flax"):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      out[pkg] = "not installed"
  return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = build_parser().parse_args(argv)
  try:
    metrics = compute.parse_metrics(args.metrics)
    given = _parse_weights(args.weights)
  except ValueError as e:
    raise SystemExit(f"eval: {e}") from None
  if not args.out.endswith(".json"):
    raise SystemExit(f"eval: --out must name a .json file, got {args.out!r}")
  video = {"output": args.i3d_output, "num_frames": args.fvd_frames}
  loaded, errors = preflight(metrics, args.reference is not None, given, args.download,
                             args.skip_unavailable, {"fvd": video, "kvd": video})
  progress_on = not args.no_progress

  def progress(items, desc):
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    items = list(items)
    return tqdm(items, desc=desc, total=len(items), disable=not progress_on, file=sys.stderr,
                dynamic_ncols=True)

  try:
    generated = data.load_clip_set(args.generated, max_clips=args.max_clips, progress=progress_on,
                                   label="generated")
    reference = (data.load_clip_set(args.reference, max_clips=args.max_clips, progress=progress_on,
                                    label="reference") if args.reference else None)
  except ValueError as e:
    raise SystemExit(f"eval: {e}") from None
  if not generated.clips:
    raise SystemExit(f"eval: no clip of {args.generated!r} could be read: {generated.skipped[:5]}")

  out: dict[str, Any] = {"job": {
      "report_version": REPORT_VERSION, "metrics": metrics, "seed": args.seed,
      "generated": generated.describe(),
      "reference": reference.describe() if reference else None,
      "max_clips": args.max_clips, "versions": _versions(), "plot_backend": plots.backend()}}
  for metric in metrics:
    if metric in errors:
      out[metric] = {"error": errors[metric]}
      continue
    try:
      out[metric] = compute.compute(metric, generated, reference, loaded.get(metric), progress,
                                    seed=args.seed)
    except ValueError as e:
      if not args.skip_unavailable:
        raise SystemExit(f"eval: {e}") from None
      out[metric] = {"error": str(e)}

  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  plots_dir = args.plots_dir or args.out[:-len(".json")] + "_plots"
  clips_by_name = {c.name: c for c in generated.clips}
  written = plots.write_plots(plots_dir, out, metrics, clips_by_name,
                              {m: compute.METRICS[m].higher_is_better for m in metrics})
  summary_dir = os.path.dirname(os.path.abspath(args.out))
  out["job"]["plots"] = [os.path.relpath(p, summary_dir) for p in written]
  report.write_json(args.out, out)
  with open(args.out[:-len(".json")] + ".md", "w", encoding="utf-8") as f:
    f.write(report.markdown(out, out["job"]["plots"]))
  print(f"eval: wrote {args.out}, {args.out[:-5]}.md and {len(written)} plot(s) in {plots_dir}",
        file=sys.stderr)
  return out


if __name__ == "__main__":
  main()
