r"""Raw videos with sound -> filtered, normalized clips -> ArrayRecord shards, losing track of none.

  python -m data_pipeline.preprocess --input-dir IN --output-dir OUT --num-workers N \
      --samples-per-shard 1000 --mode {filter,convert,shard,all} [--config settings.json] \
      [--runner local|DirectRunner|FlinkRunner|SparkRunner|DataflowRunner ...beam options]

Modes (each resumable; a re-run on the same OUT skips inputs that are done):
  filter   judge every input (header rules, then decode and score every clip); manifest only.
  convert  filter + write each accepted input's passing clips to OUT/clips/<hash>.array_record.
  shard    pack the clip files of the accepted inputs into OUT/shards/data-*-of-*.array_record.
  all      convert, then shard.

Every file under IN is an input except caption sidecars (NAME.txt / NAME.json beside NAME.*, see
`captions`), so a stray file is rejected with a reason rather than overlooked. OUT/manifest.jsonl
holds one line per input (`ingest` documents the fields), OUT/stats.json the summary, and
OUT/preprocess_config.json the settings (a later run on OUT must use the same).

`--runner local` (the default) uses a process pool on this machine; any other value runs the same
steps as an Apache Beam pipeline on that runner (`beam_pipeline`), with the remaining flags
passed to Beam's PipelineOptions.

IN and OUT may be local paths or fsspec URLs (gs://bucket/videos needs `avgen[gcs]`, s3:// needs
`avgen[s3]`); `storage` says how files are copied in and out, and what stays atomic.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import multiprocessing
import os
import sys
from typing import Any, Iterable, Sequence

from data_pipeline import captions
from data_pipeline import ingest
from data_pipeline import manifest
from data_pipeline import sharding
from data_pipeline import storage
from data_pipeline.preprocess_config import PreprocessConfig, check_saved_config

MODES = ("filter", "convert", "shard", "all")
_IN_FLIGHT_PER_WORKER = 2


def discover_inputs(input_dir: str, exclude: str | None = None) -> list[tuple[str, str]]:
  """[(path, path relative to input_dir with '/' separators)] of every input, sorted.

  Symlinks are not followed into directories: a symlink to a directory is an input of its own
  (rejected as not a regular file), so it is visible rather than silently skipped. A URL lists
  every object under its prefix (object stores have no symlinks); paths are then URLs.
  """
  if storage.is_url(input_dir):
    return _discover_url_inputs(input_dir, exclude)
  if not os.path.isdir(input_dir):
    raise ValueError(f"--input-dir {input_dir!r} is not a directory")
  exclude = os.path.realpath(exclude) if exclude else None
  found = []
  for root, dirs, files in os.walk(input_dir, followlinks=False):
    if exclude and os.path.realpath(root) == exclude:
      dirs[:] = []
      continue
    dirs.sort()
    real_dirs = []
    for d in dirs:
      full = os.path.join(root, d)
      if os.path.islink(full):
        files.append(d)  # not followed: recorded as an input
      elif not (exclude and os.path.realpath(full) == exclude):
        real_dirs.append(d)
    dirs[:] = real_dirs
    names = set(files)
    for name in files:
      path = os.path.join(root, name)
      if captions.is_sidecar(path, names):
        continue
      rel = os.path.relpath(path, input_dir).replace(os.sep, "/")
      found.append((path, rel))
  return sorted(found, key=lambda pr: pr[1])


def _discover_url_inputs(input_dir: str, exclude: str | None) -> list[tuple[str, str]]:
  rels = storage.find_files(input_dir)
  if exclude and storage.protocol(exclude) == storage.protocol(input_dir):
    # The output dir inside the input dir is skipped, as for local paths.
    _, root = storage.filesystem(input_dir)
    _, out = storage.filesystem(exclude)
    root, out = root.rstrip("/"), out.rstrip("/")
    if out.startswith(root + "/"):
      prefix = out[len(root) + 1:] + "/"
      rels = [rel for rel in rels if not rel.startswith(prefix)]
  names_by_dir: dict[str, set[str]] = {}
  for rel in rels:
    directory, _, name = rel.rpartition("/")
    names_by_dir.setdefault(directory, set()).add(name)
  found = []
  for rel in rels:
    if captions.is_sidecar(rel, names_by_dir[rel.rpartition("/")[0]]):
      continue
    found.append((storage.join(input_dir, rel), rel))
  return found


def needs_work(record: dict[str, Any] | None, mode: str, output_dir: str,
               clip_names: set[str] | None = None) -> bool:
  """Whether an input with this manifest record must be (re)processed in `mode`.

  `clip_names`: the names in OUT/clips (one listing instead of a request per input on a
  bucket); None looks each clip file up.
  """
  if record is None:
    return True
  if mode == "filter" or record["status"] == "rejected":
    return False
  clip_file = record.get("clip_file")
  if not clip_file:
    return True
  if clip_names is not None:
    return clip_file.rsplit("/", 1)[-1] not in clip_names
  return not storage.exists(storage.join(output_dir, clip_file))


def run_local(input_dir: str, output_dir: str, config: PreprocessConfig, *, mode: str = "all",
              samples_per_shard: int = 1000, num_workers: int = 0, progress: bool = True
              ) -> dict[str, Any]:
  """The whole job on this machine; returns the stats (also in OUT/stats.json)."""
  input_dir, output_dir = storage.normalize(input_dir), storage.normalize(output_dir)
  inputs, existing, pending = prepare(input_dir, output_dir, config, mode, samples_per_shard)
  if mode != "shard" and pending:
    keep_clips = output_dir if mode in ("convert", "all") else None
    with manifest.open_writer(output_dir) as writer:
      for record in _process_all(pending, config, keep_clips, num_workers, progress):
        writer.append(record)
        existing[record["path"]] = record
  records = [existing[rel] for _, rel in inputs]
  shards = None
  if mode in ("shard", "all"):
    plan = sharding.plan_shards(records, samples_per_shard)
    todo = sharding.start(output_dir, plan)
    for shard in _progress(todo, progress, "shards", "shard"):
      sharding.write_shard(output_dir, shard)
    shards = sharding.finish(output_dir, plan, samples_per_shard)
  return finish(output_dir, config, records, shards)


def prepare(input_dir: str, output_dir: str, config: PreprocessConfig, mode: str,
            samples_per_shard: int):
  """Checks the arguments and OUT; returns (inputs, manifest records, inputs to process)."""
  if mode not in MODES:
    raise ValueError(f"--mode must be one of {MODES}, got {mode!r}")
  if (isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int)
      or samples_per_shard < 1):
    raise ValueError(f"--samples-per-shard must be an int >= 1, got {samples_per_shard!r}")
  inputs = discover_inputs(input_dir, exclude=output_dir)
  storage.makedirs(output_dir)
  check_saved_config(output_dir, config)
  _remove_temporaries(output_dir)
  existing = manifest.read_manifest(output_dir)
  clip_names = set(storage.listdir(storage.join(output_dir, ingest.CLIP_DIR)))
  pending = [(path, rel) for path, rel in inputs
             if needs_work(existing.get(rel), mode, output_dir, clip_names)]
  if mode == "shard" and pending:
    raise ValueError(f"--mode shard: {len(pending)} input(s) are not converted yet (first: "
                     f"{pending[0][1]!r}); run --mode convert (or all) first")
  return inputs, existing, pending


def finish(output_dir: str, config: PreprocessConfig, records: list[dict[str, Any]],
           shards: dict[str, Any] | None) -> dict[str, Any]:
  """Rewrites the manifest (one line per input), drops clip files no input claims, writes stats."""
  paths = {r["path"] for r in records}
  gone = [p for p in manifest.read_manifest(output_dir) if p not in paths]
  if gone:
    logging.warning("preprocess: %d input(s) in the old manifest are gone from the input dir "
                    "(first: %r); their lines and clips are removed", len(gone), gone[0])
  manifest.write_manifest(output_dir, records)
  claimed = {os.path.basename(r["clip_file"]) for r in records if r.get("clip_file")}
  clip_dir = storage.join(output_dir, ingest.CLIP_DIR)
  storage.remove([storage.join(clip_dir, name) for name in storage.listdir(clip_dir)
                  if name not in claimed])
  if shards is None:
    shards = _current_shards(output_dir)
  stats = manifest.summarize(records, config, num_inputs=len(records), shards=shards)
  stats["inputs_gone"] = len(gone)
  manifest.write_stats(output_dir, stats)
  return stats


def _current_shards(output_dir: str) -> dict[str, Any] | None:
  index = sharding.read_index(output_dir)
  if not index.get("samples_per_shard"):
    return None
  return {"dir": sharding.SHARD_DIR, "num_shards": index["num_shards"],
          "num_records": index["num_records"], "samples_per_shard": index["samples_per_shard"]}


def _remove_temporaries(output_dir: str) -> None:
  """Hidden temporaries left by a killed run (never read: readers glob '*.array_record')."""
  subs = [ingest.CLIP_DIR, sharding.SHARD_DIR]
  if storage.is_url(output_dir):
    subs += ["", manifest.PARTS_DIR]  # a write killed between its copy and delete (`storage`)
  for sub in subs:
    directory = storage.join(output_dir, sub) if sub else output_dir
    storage.remove([storage.join(directory, name) for name in storage.listdir(directory)
                    if storage.is_temporary(name)])


def _work(task: tuple[str, str, PreprocessConfig, str | None]) -> dict[str, Any]:
  path, rel, config, output_dir = task
  return ingest.process_input(path, rel, config, output_dir)


def _process_all(pending: list[tuple[str, str]], config: PreprocessConfig,
                 output_dir: str | None, num_workers: int, progress: bool
                 ) -> Iterable[dict[str, Any]]:
  """Manifest records of `pending` inputs, in the order they finish."""
  tasks = [(path, rel, config, output_dir) for path, rel in pending]
  bar = _bar(len(tasks), progress, "inputs", "file")
  counts = {"accepted": 0, "rejected": 0}
  try:
    for record in (map(_work, tasks) if num_workers == 0 else _pool_map(tasks, num_workers)):
      counts[record["status"]] += 1
      if bar is not None:
        bar.set_postfix(counts, refresh=False)
        bar.update()
      yield record
  finally:
    if bar is not None:
      bar.close()


def _pool_map(tasks: list[tuple], num_workers: int, work=_work) -> Iterable[dict[str, Any]]:
  """`work` (default `_work`) over tasks in worker processes, surviving workers that die.

  When a worker dies (a crash in a decoder library, the out-of-memory killer), every task then
  in flight is retried alone in a fresh process; one that kills its worker again is rejected
  with rule `worker_died`, so it cannot stop the run or be lost.
  """
  # forkserver: workers start clean (not inheriting the parent's threads and locks), forked from
  # a server that imported the ingest code once (importing avgen pulls in JAX: seconds).
  context = multiprocessing.get_context("forkserver")
  context.set_forkserver_preload(["data_pipeline.ingest"])
  todo = list(reversed(tasks))
  while todo:
    executor = concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context)
    in_flight: dict[concurrent.futures.Future, tuple] = {}
    broken = False
    try:
      while (todo or in_flight) and not broken:
        while todo and len(in_flight) < num_workers * _IN_FLIGHT_PER_WORKER:
          task = todo.pop()
          in_flight[executor.submit(work, task)] = task
        done, _ = concurrent.futures.wait(in_flight,
                                          return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
          try:
            record = future.result()
          except concurrent.futures.process.BrokenProcessPool:
            broken = True  # this task and every other one in flight are suspects
            continue
          del in_flight[future]
          yield record
    finally:
      executor.shutdown(wait=not broken, cancel_futures=True)
    for task in in_flight.values():
      yield _run_alone(task, context, work)


def _run_alone(task: tuple, context, work) -> dict[str, Any]:
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as executor:
    try:
      return executor.submit(work, task).result()
    except concurrent.futures.process.BrokenProcessPool:
      path, rel = task[0], task[1]
      logging.error("preprocess: the worker processing %r died twice", path)
      record = ingest.new_record(rel)
      record["reason"] = {"rule": "worker_died", "value": None, "threshold": None,
                          "message": "the worker process died while processing this input, "
                                     "twice (a crash in a decoder, or out of memory)"}
      return record


def _bar(total: int, enabled: bool, desc: str, unit: str):
  if not enabled:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)


def _progress(items: Sequence[Any], enabled: bool, desc: str, unit: str) -> Iterable[Any]:
  bar = _bar(len(items), enabled, desc, unit)
  try:
    for item in items:
      yield item
      if bar is not None:
        bar.update()
  finally:
    if bar is not None:
      bar.close()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(
      prog="python -m data_pipeline.preprocess", description=__doc__.split("\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
  parser.add_argument("--input-dir", "--input", required=True,
                      help="folder of raw videos: a path, or a URL (gs://, s3://, ...)")
  parser.add_argument("--output-dir", "--output", required=True, help="a path or a URL")
  parser.add_argument("--mode", choices=MODES, default="all")
  parser.add_argument("--num-workers", type=int, default=os.cpu_count() or 1,
                      help="worker processes (local runner); 0 = in this process")
  parser.add_argument("--samples-per-shard", type=int, default=1000)
  parser.add_argument("--config", help="JSON file of settings (data_pipeline/"
                      "preprocess_config.py lists them); default: the built-in values")
  parser.add_argument("--runner", default="local",
                      help="'local', or an Apache Beam runner (DirectRunner, FlinkRunner, ...)")
  parser.add_argument("--no-progress", action="store_true", help="no progress bars")
  args, beam_args = parser.parse_known_args(argv)
  if args.runner == "local" and beam_args:
    parser.error(f"unrecognized arguments: {' '.join(beam_args)} (Beam options need --runner)")
  if args.num_workers < 0:
    parser.error(f"--num-workers must be >= 0, got {args.num_workers}")
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  try:
    config = PreprocessConfig.from_json(args.config) if args.config else PreprocessConfig()
    if args.runner == "local":
      stats = run_local(args.input_dir, args.output_dir, config, mode=args.mode,
                        samples_per_shard=args.samples_per_shard,
                        num_workers=args.num_workers, progress=not args.no_progress)
    else:
      from data_pipeline import beam_pipeline  # pylint: disable=g-import-not-at-top
      stats = beam_pipeline.run(args.input_dir, args.output_dir, config, mode=args.mode,
                                samples_per_shard=args.samples_per_shard, runner=args.runner,
                                beam_args=beam_args)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  print(json.dumps(stats, indent=1, sort_keys=True))
  return stats


if __name__ == "__main__":
  main()
