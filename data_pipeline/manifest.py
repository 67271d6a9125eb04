"""OUT/manifest.jsonl (one record per input, see `ingest`) and OUT/stats.json (its summary).

During a run, records are appended one line at a time and flushed to disk, so a run that is
killed keeps every finished input; a line cut short by the kill is dropped on the next open. A
later line for the same path replaces an earlier one (an input judged by `--mode filter`, then
converted). At the end of a run the file is rewritten (temporary name + rename) with exactly one
line per input, sorted by path.
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any, Iterable

from data_pipeline.preprocess_config import PreprocessConfig

MANIFEST_FILE = "manifest.jsonl"
STATS_FILE = "stats.json"


def read_manifest(output_dir: str) -> dict[str, dict[str, Any]]:
  """{path: record}, the last line for each path winning; a torn last line is ignored."""
  path = os.path.join(output_dir, MANIFEST_FILE)
  records: dict[str, dict[str, Any]] = {}
  if not os.path.exists(path):
    return records
  with open(path, "rb") as f:
    data = f.read()
  lines = data.split(b"\n")
  # Everything before the last newline is whole; what follows it was cut short.
  for number, line in enumerate(lines[:-1], 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: line {number} is not JSON ({e}); the manifest was edited or "
                       "damaged") from None
    records[record["path"]] = record
  return records


class ManifestWriter:
  """Appends records as lines, each flushed to disk before `append` returns."""

  def __init__(self, output_dir: str):
    self.path = os.path.join(output_dir, MANIFEST_FILE)
    os.makedirs(output_dir, exist_ok=True)
    whole = _whole_lines_length(self.path) if os.path.exists(self.path) else 0
    self._file = open(self.path, "ab")
    if self._file.tell() != whole:
      # Drop a torn last line (a killed run), so the next line starts on a line of its own.
      self._file.truncate(whole)
      self._file.seek(whole)

  def append(self, record: dict[str, Any]) -> None:
    self._file.write(_dumps(record) + b"\n")
    self._file.flush()
    os.fsync(self._file.fileno())

  def close(self) -> None:
    self._file.close()

  def __enter__(self) -> "ManifestWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def write_manifest(output_dir: str, records: Iterable[dict[str, Any]]) -> str:
  """Rewrites the manifest atomically: one line per path, sorted by path."""
  path = os.path.join(output_dir, MANIFEST_FILE)
  unique = {r["path"]: r for r in records}
  tmp = os.path.join(output_dir, f".{MANIFEST_FILE}.tmp")
  with open(tmp, "wb") as f:
    for key in sorted(unique):
      f.write(_dumps(unique[key]) + b"\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return path


def summarize(records: Iterable[dict[str, Any]], config: PreprocessConfig,
              num_inputs: int | None = None, shards: dict[str, Any] | None = None
              ) -> dict[str, Any]:
  """Counts per status and rule, clips kept and rejected, hours in and kept."""
  records = list(records)
  by_status = collections.Counter(r["status"] for r in records)
  by_rule = collections.Counter(r["reason"]["rule"] for r in records if r["status"] == "rejected")
  clips_failed: collections.Counter = collections.Counter()
  for r in records:
    clips_failed.update(r.get("clips_failed") or {})
  clips_kept = sum(r["clips"] for r in records if r["status"] == "accepted")
  clips_total = sum(r.get("clips_total") or 0 for r in records)
  seconds_in = 0.0
  for r in records:
    decoded = max(r.get("video_seconds") or 0.0, r.get("audio_seconds") or 0.0)
    seconds_in += decoded or ((r.get("header") or {}).get("duration") or 0.0)
  stats = {
      "inputs": len(records) if num_inputs is None else num_inputs,
      "recorded": len(records),
      "accepted": by_status.get("accepted", 0),
      "rejected": by_status.get("rejected", 0),
      "rejected_by_rule": dict(sorted(by_rule.items())),
      "clips_total": clips_total,
      "clips_kept": clips_kept,
      "clips_failed_by_rule": dict(sorted(clips_failed.items())),
      "clips_written": sum(r["clips"] for r in records if r.get("clip_file")),
      "hours_in": round(seconds_in / 3600.0, 4),
      "hours_kept": round(clips_kept * config.clip_seconds / 3600.0, 4),
      "captions_missing": sum(1 for r in records if r["status"] == "accepted"
                              and (r.get("caption") or {}).get("missing")),
  }
  stats["shards"] = shards
  return stats


def write_stats(output_dir: str, stats: dict[str, Any]) -> str:
  path = os.path.join(output_dir, STATS_FILE)
  tmp = os.path.join(output_dir, f".{STATS_FILE}.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(stats, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)
  return path


def read_stats(output_dir: str) -> dict[str, Any]:
  with open(os.path.join(output_dir, STATS_FILE), encoding="utf-8") as f:
    return json.load(f)


def _whole_lines_length(path: str, chunk: int = 1 << 20) -> int:
  """Length of the file up to and including its last newline (scanning back from the end)."""
  with open(path, "rb") as f:
    end = f.seek(0, os.SEEK_END)
    while end > 0:
      start = max(0, end - chunk)
      f.seek(start)
      cut = f.read(end - start).rfind(b"\n")
      if cut >= 0:
        return start + cut + 1
      end = start
  return 0


def _dumps(record: dict[str, Any]) -> bytes:
  # ensure_ascii keeps file names that are not valid UTF-8 (surrogate escapes) writable.
  return json.dumps(record, sort_keys=True, allow_nan=False).encode("ascii")
