"""The eval job's outputs: report.json (one key per metric) and a Markdown summary."""

from __future__ import annotations

import json
import math
from typing import Any


def _clean(value: Any) -> Any:
  """JSON-safe: numpy scalars to Python, NaN/inf to None (JSON has no NaN)."""
  if isinstance(value, dict):
    return {str(k): _clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  if hasattr(value, "item") and not isinstance(value, (str, bytes)):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def write_json(path: str, report: dict[str, Any]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(_clean(report), f, indent=2, sort_keys=True, allow_nan=False)
    f.write("\n")


def _fmt(value: Any) -> str:
  if value is None:
    return "n/a"
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def markdown(report: dict[str, Any], plots: list[str]) -> str:
  job = report["job"]
  lines = ["# avgen evaluation", "",
           f"- generated: `{job['generated']['source']}` ({job['generated']['num_clips']} clips)"]
  if job.get("reference"):
    lines.append(f"- reference: `{job['reference']['source']}` "
                 f"({job['reference']['num_clips']} clips)")
  lines += [f"- seed: {job['seed']}", "",
            "| metric | score | spec target | what was computed |", "| --- | --- | --- | --- |"]
  for name in job["metrics"]:
    entry = report.get(name, {})
    if "error" in entry:
      lines.append(f"| {name} | **not computed** | | {entry['error']} |")
      continue
    what = entry.get("embedding_model") or entry.get("variant") or entry.get("method", "")
    if entry.get("fallback"):
      what = f"**fallback: {entry['method']}** (not LPIPS)"
    lines.append(f"| {name} | {_fmt(entry.get('score'))} | {entry.get('spec_target', '')} | "
                 f"{entry.get('summary', '')}: {what} |")
  lines.append("")
  for name in job["metrics"]:
    entry = report.get(name, {})
    notes = [f"- {k}: {entry[k]}" for k in ("definition", "note", "rank_warning") if entry.get(k)]
    if name == "sync" and "within_1_frame" in entry:
      w = entry["within_1_frame"]
      notes.append(f"- within 1 frame: precision {_fmt(w['precision'])}, recall "
                   f"{_fmt(w['recall'])}, F1 {_fmt(w['f1'])}; mean |offset| "
                   f"{_fmt(entry['mean_abs_offset_frames'])} frames")
      check = entry.get("detectors_vs_ground_truth") or entry.get("reference", {}).get(
          "detectors_vs_ground_truth")
      if check:
        notes.append(f"- detectors vs ground truth ({check['num_clips']} clips): audio F1 "
                     f"{_fmt(check['audio_onsets']['f1'])}, visual F1 "
                     f"{_fmt(check['visual_impacts']['f1'])}")
    if entry.get("excluded_clips"):
      notes.append(f"- {len(entry['excluded_clips'])} clip(s) not scored: "
                   + "; ".join(f"{e['name']} ({e['reason']})"
                               for e in entry["excluded_clips"][:10]))
    if notes:
      lines += [f"## {name}", "", *notes, ""]
  skipped = job["generated"]["skipped"] + (job.get("reference") or {}).get("skipped", [])
  if skipped:
    lines += ["## unreadable inputs", ""]
    lines += [f"- {s['name']}: {s['reason']}" for s in skipped] + [""]
  if plots:
    lines += ["## plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
  return "\n".join(lines)
