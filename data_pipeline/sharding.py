"""Packs the clip files of accepted inputs into fixed-size shards: OUT/shards/*.array_record.

The plan depends only on the manifest: accepted inputs sorted by path, their clips in order,
cut into runs of `samples_per_shard` (the last shard may be shorter). Shard i of n is
`data-{i:05d}-of-{n:05d}.array_record`; records are copied as stored (no decode, no re-encode),
so the local run and the Beam pipeline write byte-identical shards.

Each shard is written under a hidden temporary name and renamed when whole (`schema
.write_shard_file`). `OUT/shards/shards.json` lists every shard with the (input, first clip,
end clip) pieces it holds and a fingerprint of them; a re-run rewrites only shards whose
fingerprint changed (`start`), and removes shards of an earlier plan that the new one lacks.

For an output dir given as a URL (`storage`), a shard is built in a local temporary directory
from its clip files (downloaded one at a time, each deleted once read: the disk holds the shard
and one clip file) and then uploaded with `storage.put_atomic`, never visible half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterable

from data_pipeline import schema
from data_pipeline import storage

SHARD_DIR = "shards"
INDEX_FILE = "shards.json"
PREFIX = "data"


def shard_name(index: int, count: int) -> str:
  return f"{PREFIX}-{index:05d}-of-{count:05d}{schema.SHARD_SUFFIX}"


def plan_shards(records: Iterable[dict[str, Any]], samples_per_shard: int
                ) -> list[dict[str, Any]]:
  """[{name, pieces: [[path, clip_file, start, stop], ...], num_records, fingerprint}]."""
  if (isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int)
      or samples_per_shard < 1):
    raise ValueError(f"samples_per_shard must be an int >= 1, got {samples_per_shard!r}")
  accepted = sorted((r for r in records if r["status"] == "accepted"), key=lambda r: r["path"])
  missing = [r["path"] for r in accepted if not r.get("clip_file")]
  if missing:
    raise ValueError(
        f"{len(missing)} accepted input(s) have no clip file yet (first: {missing[0]!r}); they "
        "were judged by --mode filter only: run --mode convert (or all) first")
  shards: list[list[list[Any]]] = []
  current: list[list[Any]] = []
  room = samples_per_shard
  for r in accepted:
    start = 0
    while start < r["clips"]:
      take = min(room, r["clips"] - start)
      current.append([r["path"], r["clip_file"], start, start + take])
      start += take
      room -= take
      if room == 0:
        shards.append(current)
        current, room = [], samples_per_shard
  if current:
    shards.append(current)
  plan = []
  for i, pieces in enumerate(shards):
    blob = json.dumps(pieces, sort_keys=True).encode("utf-8", errors="surrogateescape")
    plan.append({"name": shard_name(i, len(shards)), "pieces": pieces,
                 "num_records": sum(stop - start for _, _, start, stop in pieces),
                 "fingerprint": hashlib.sha1(blob).hexdigest()})
  return plan


def write_shard(output_dir: str, shard: dict[str, Any]) -> str:
  """Writes one planned shard from the clip files; returns its path."""
  if storage.is_url(output_dir):
    return _write_remote_shard(output_dir, shard)

  def records():
    for _, clip_file, start, stop in shard["pieces"]:
      yield from schema.read_records(os.path.join(output_dir, clip_file), start, stop)

  directory = os.path.join(output_dir, SHARD_DIR)
  os.makedirs(directory, exist_ok=True)
  return schema.write_shard_file(os.path.join(directory, shard["name"]), records())


def _write_remote_shard(output_dir: str, shard: dict[str, Any]) -> str:
  tmp = tempfile.mkdtemp(prefix="avgen_shard_")
  try:
    def records():
      for _, clip_file, start, stop in shard["pieces"]:
        local = os.path.join(tmp, os.path.basename(clip_file))
        storage.download(storage.join(output_dir, clip_file), local)
        try:
          yield from schema.read_records(local, start, stop)
        finally:
          os.remove(local)

    local_shard = schema.write_shard_file(os.path.join(tmp, shard["name"]), records())
    path = storage.join(output_dir, SHARD_DIR, shard["name"])
    storage.put_atomic(local_shard, path)
    return path
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def start(output_dir: str, plan: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The planned shards to write: those not on disk as planned by the last shard run.

  Their entries leave the index before any is written, so a run killed halfway never leaves an
  index that vouches for a shard that was overwritten.
  """
  old = read_index(output_dir).get("shards", [])
  present = set(storage.listdir(storage.join(output_dir, SHARD_DIR)))
  done = {s["name"]: s["fingerprint"] for s in old if s["name"] in present}
  todo = [s for s in plan if done.get(s["name"]) != s["fingerprint"]]
  todo_names = {s["name"] for s in todo}
  _write_index(output_dir, [s for s in old if s["name"] not in todo_names], None)
  return todo


def finish(output_dir: str, plan: list[dict[str, Any]], samples_per_shard: int
           ) -> dict[str, Any]:
  """After every planned shard is written: removes stale shards, writes the index."""
  directory = storage.join(output_dir, SHARD_DIR)
  storage.makedirs(directory)
  keep = {s["name"] for s in plan}
  storage.remove([storage.join(directory, name) for name in storage.listdir(directory)
                  if name.endswith(schema.SHARD_SUFFIX) and name not in keep])
  index = _write_index(output_dir, plan, samples_per_shard)
  return {"dir": SHARD_DIR, "num_shards": len(plan), "num_records": index["num_records"],
          "samples_per_shard": samples_per_shard}


def _write_index(output_dir: str, shards: list[dict[str, Any]],
                 samples_per_shard: int | None) -> dict[str, Any]:
  directory = storage.join(output_dir, SHARD_DIR)
  storage.makedirs(directory)
  index = {"samples_per_shard": samples_per_shard, "num_shards": len(shards),
           "num_records": sum(s["num_records"] for s in shards), "shards": shards}
  storage.write_bytes(storage.join(directory, INDEX_FILE),
                      (json.dumps(index, indent=1, sort_keys=True) + "\n").encode("utf-8"))
  return index


def read_index(output_dir: str) -> dict[str, Any]:
  path = storage.join(output_dir, SHARD_DIR, INDEX_FILE)
  if not storage.exists(path):
    return {}
  return json.loads(storage.read_bytes(path))
