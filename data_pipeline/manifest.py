"""OUT/manifest.jsonl (one record per input, see `ingest`) and OUT/stats.json (its summary).

During a run, records are appended one line at a time and flushed to disk, so a run that is
killed keeps every finished input; a line cut short by the kill is dropped on the next open. A
later line for the same path replaces an earlier one (an input judged by `--mode filter`, then
converted). At the end of a run the file is rewritten (temporary name + rename) with exactly one
line per input, sorted by path.

An output dir given as a URL (gs://, s3://, see `storage`) cannot be appended to: there the
records go to part objects under OUT/.manifest.parts/ instead (JSON lines, uploaded whole: at
least every `_PART_RECORDS` records or `_PART_SECONDS` seconds, and when the run ends), which
`read_manifest` reads after the manifest, in name (= time) order; the final rewrite replaces
them. A kill loses at most the records not yet uploaded: those inputs are processed again.
"""

from __future__ import annotations

import collections
import json
import os
import time
import uuid
from typing import Any, Iterable

from data_pipeline import storage
from data_pipeline.preprocess_config import PreprocessConfig

MANIFEST_FILE = "manifest.jsonl"
STATS_FILE = "stats.json"
PARTS_DIR = ".manifest.parts"
_PART_RECORDS = 64
_PART_SECONDS = 30.0


def read_manifest(output_dir: str) -> dict[str, dict[str, Any]]:
  """{path: record}, the last line for each path winning; a torn last line is ignored."""
  path = storage.join(output_dir, MANIFEST_FILE)
  records: dict[str, dict[str, Any]] = {}
  if storage.is_url(output_dir):
    parts_dir = storage.join(output_dir, PARTS_DIR)
    for name in ([MANIFEST_FILE] if storage.exists(path) else []) + [
        f"{PARTS_DIR}/{n}" for n in storage.listdir(parts_dir) if n.endswith(".jsonl")]:
      _parse(storage.read_bytes(storage.join(output_dir, name)),
             storage.join(output_dir, name), records)
    return records
  if not os.path.exists(path):
    return records
  with open(path, "rb") as f:
    data = f.read()
  _parse(data, path, records)
  return records


def _parse(data: bytes, path: str, records: dict[str, dict[str, Any]]) -> None:
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


def open_writer(output_dir: str) -> "ManifestWriter | PartWriter":
  """The record appender of an output dir: a local file's, or a URL's (module doc)."""
  return PartWriter(output_dir) if storage.is_url(output_dir) else ManifestWriter(output_dir)


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


class PartWriter:
  """Buffers records and uploads them as part objects (an object store has no append)."""

  def __init__(self, output_dir: str):
    self.parts_dir = storage.join(output_dir, PARTS_DIR)
    # Names sort by time, so a later run's parts win over an earlier run's.
    self._prefix = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
    self._count = 0
    self._lines: list[bytes] = []
    self._since = time.monotonic()

  def append(self, record: dict[str, Any]) -> None:
    if not self._lines:
      self._since = time.monotonic()
    self._lines.append(_dumps(record) + b"\n")
    if (len(self._lines) >= _PART_RECORDS
        or time.monotonic() - self._since >= _PART_SECONDS):
      self.flush()

  def flush(self) -> None:
    if self._lines:
      name = f"{self._prefix}-{self._count:06d}.jsonl"
      storage.write_bytes(storage.join(self.parts_dir, name), b"".join(self._lines))
      self._count += 1
      self._lines = []

  def close(self) -> None:
    self.flush()

  def __enter__(self) -> "PartWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()  # also on an exception: what finished is kept


def write_manifest(output_dir: str, records: Iterable[dict[str, Any]]) -> str:
  """Rewrites the manifest atomically: one line per path, sorted by path."""
  path = storage.join(output_dir, MANIFEST_FILE)
  unique = {r["path"]: r for r in records}
  storage.write_bytes(path, b"".join(_dumps(unique[key]) + b"\n" for key in sorted(unique)))
  if storage.is_url(output_dir):
    # Every part's records are in the manifest now (`records` holds every input's).
    parts_dir = storage.join(output_dir, PARTS_DIR)
    storage.remove([storage.join(parts_dir, n) for n in storage.listdir(parts_dir)])
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
  path = storage.join(output_dir, STATS_FILE)
  storage.write_bytes(path, (json.dumps(stats, indent=2, sort_keys=True) + "\n").encode())
  return path


def read_stats(output_dir: str) -> dict[str, Any]:
  return json.loads(storage.read_bytes(storage.join(output_dir, STATS_FILE)))


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
