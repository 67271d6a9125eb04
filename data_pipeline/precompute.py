r"""Latent precompute: copies of shards with each clip's `video_latent` and `audio_mel` cached.

  python -m data_pipeline.precompute --input '/data/shards/*.array_record' \
      --output-dir /data/latents --config=configs/stage2.py:size=B [--config.latent.video_source=S]

Training then reads `--config.data.path='/data/latents/*.array_record'` and skips the VAE (which
the loader does not run) and the STFT. Each output shard has the input's name and the same
records in the same order, each with
  video_latent  the config's video codec (`build_video_codec`: SD-VAE posterior mean, scaled;
                or pixels in [-1, 1]) of the clip's frames, float32 [T, h, w, C];
  audio_mel     the config's mel analysis (`build_mel_analysis`: the vocoder's own mel,
                normalized), float32 [N, n_mels];
and the settings they were made with in `meta["video_latent_config"]` / `meta["audio_mel_config"]`,
so that the loader uses a cache only for a config that would compute the same values.

Nothing is dropped: a record that does not decode (corrupt) is copied unchanged, so the loader
meets and counts it as it would in the input; a record that disagrees with the config (frames,
size, fps, sample rate) stops the job with the shard and record named. Output shards are written
under a temporary name and renamed when complete; a re-run skips shards already written
(`--overwrite` rewrites them), so an interrupted job resumes; `OUT/precompute_settings.json`
records the fields, codec settings and clip shape they are made for, and a run with other
settings on the same OUT is refused. `--num-tasks N --task-index I` lets
N processes (one per GPU or host) split the input shards. `OUT/precompute[-I-of-N].json` lists
every input shard with its record counts.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Iterator, Sequence

import numpy as np

from data_pipeline import loader as loader_lib
from data_pipeline import schema

FIELDS = ("video_latent", "audio_mel")
SETTINGS_FILE = "precompute_settings.json"  # what the copies in a folder are made for
_log = logging.getLogger("data_pipeline.precompute")


class Precomputer:
  """Adds the cached fields to decoded examples (video encoded `batch_size` clips at a time)."""

  def __init__(self, config, fields: Sequence[str] = FIELDS, batch_size: int = 8):
    from avgen.models import autoencoders  # pylint: disable=g-import-not-at-top

    fields = tuple(fields)
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown or not fields:
      raise ValueError(f"precompute: --fields {list(fields)}: unknown {unknown}; choose from "
                       f"{list(FIELDS)}")
    if batch_size < 1:
      raise ValueError(f"precompute: --batch-size must be >= 1, got {batch_size}")
    self.fields, self.batch_size = fields, int(batch_size)
    # The loader's own checks and settings: what is written here is what it will accept.
    self.check = loader_lib.ExampleTransform(config, tokenize=False).check
    self.video_settings = loader_lib.video_latent_settings(config)
    self.video_codec = autoencoders.build_video_codec(config) if "video_latent" in fields else None
    self.mel = autoencoders.build_mel_analysis(config) if "audio_mel" in fields else None
    self.settings = {"video_latent_config": self.video_settings if self.video_codec else None,
                     "audio_mel_config": self.mel.settings() if self.mel else None}

  def encode_videos(self, videos: list[np.ndarray]) -> list[np.ndarray]:
    """Latents of clips of one shape, in calls of batch_size clips (the last one padded, so the
    codec compiles once)."""
    out = []
    for start in range(0, len(videos), self.batch_size):
      chunk = videos[start:start + self.batch_size]
      stacked = np.stack(chunk + [chunk[-1]] * (self.batch_size - len(chunk)))
      latents = np.asarray(self.video_codec.encode(stacked), np.float32)
      out.extend(latents[:len(chunk)])
    return out

  def process(self, records: list[bytes], where: str) -> tuple[list[bytes], int]:
    """(output records, number of corrupt records copied unchanged)."""
    decoded = []
    for i, record in enumerate(records):
      try:
        ex = schema.decode_example(record)
      except schema.SchemaError as e:
        _log.warning("%s record %d is corrupt (%s); copied unchanged", where, i, e)
        decoded.append(None)
        continue
      try:
        self.check(ex)
      except ValueError as e:
        raise ValueError(f"precompute: {where} record {i}: {e}") from None
      decoded.append(ex)
    examples = [ex for ex in decoded if ex is not None]
    if self.video_codec is not None and examples:
      for ex, latent in zip(examples, self.encode_videos([ex["video"] for ex in examples])):
        ex["video_latent"] = latent
        ex["meta"]["video_latent_config"] = self.video_settings
    if self.mel is not None:
      for ex in examples:
        ex["audio_mel"] = np.asarray(self.mel.encode(ex["audio"]), np.float32)
        ex["meta"]["audio_mel_config"] = self.settings["audio_mel_config"]
    out = [record if ex is None else schema.encode_example(ex)
           for record, ex in zip(records, decoded)]
    return out, sum(ex is None for ex in decoded)


def _num_records(path: str) -> int:
  # pylint: disable-next=g-import-not-at-top
  from array_record.python.array_record_module import ArrayRecordReader
  reader = ArrayRecordReader(path)
  try:
    return reader.num_records()
  finally:
    reader.close()


def _shard_records(pre: Precomputer, path: str, counts: dict[str, int]) -> Iterator[bytes]:
  """The output records of one shard, read and encoded batch_size records at a time."""
  total = _num_records(path)
  for start in range(0, total, pre.batch_size):
    records = schema.read_records(path, start, min(total, start + pre.batch_size))
    out, corrupt = pre.process(records, os.path.basename(path))
    counts["records"] += len(out)
    counts["corrupt_copied"] += corrupt
    yield from out


def plan(inputs: str | Sequence[str], output_dir: str, *, task_index: int = 0,
         num_tasks: int = 1) -> list[tuple[str, str]]:
  """[(input shard, output shard)] of this task, after the checks on paths."""
  if not (isinstance(num_tasks, int) and num_tasks >= 1 and 0 <= task_index < num_tasks):
    raise ValueError(f"precompute: need 0 <= --task-index < --num-tasks, got {task_index}, "
                     f"{num_tasks}")
  files = loader_lib.resolve_paths(inputs)
  out_real = os.path.realpath(output_dir)
  inside = [f for f in files if os.path.dirname(os.path.realpath(f)) == out_real]
  if inside:
    raise ValueError(f"precompute: --output-dir {output_dir!r} holds input shard(s) "
                     f"{inside[:3]}; write the copies to another folder")
  names: dict[str, str] = {}
  for f in files:
    name = os.path.basename(f)
    if name in names:
      raise ValueError(f"precompute: inputs {names[name]!r} and {f!r} have the same file name; "
                       "their copies would overwrite each other in --output-dir")
    names[name] = f
  return [(f, os.path.join(output_dir, os.path.basename(f))) for f in files[task_index::num_tasks]]


def _check_claim(output_dir: str, made_for: dict[str, Any], overwrite: bool) -> bool:
  """Refuses an output_dir whose copies were made for other settings (a resumed job would
  otherwise mix shards of two configs) unless overwriting; True if the claim is to be written."""
  path = os.path.join(output_dir, SETTINGS_FILE)
  if overwrite or not os.path.exists(path):
    return True
  with open(path) as f:
    stored = json.load(f)
  if stored != made_for:
    flat = lambda d: {f"{k}.{kk}": vv for k, v in d.items()
                      for kk, vv in (v.items() if isinstance(v, dict) else [("", v)])}
    diff = loader_lib.settings_difference(flat(stored), flat(made_for))
    raise ValueError(f"precompute: --output-dir {output_dir!r} holds copies made with other "
                     f"settings ({diff}); use another folder, or --overwrite to redo them all")
  return False


def _write_claim(output_dir: str, made_for: dict[str, Any]) -> None:
  path = os.path.join(output_dir, SETTINGS_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(made_for, f, indent=1)
  os.replace(path + ".tmp", path)


def run(config, inputs: str | Sequence[str], output_dir: str, *, fields: Sequence[str] = FIELDS,
        batch_size: int = 8, overwrite: bool = False, task_index: int = 0,
        num_tasks: int = 1) -> dict[str, Any]:
  """Writes the latent copies of `inputs` into `output_dir`; returns the summary it saves."""
  from avgen import config as config_lib  # pylint: disable=g-import-not-at-top
  config_lib.validate(config)
  jobs = plan(inputs, output_dir, task_index=task_index, num_tasks=num_tasks)
  pre = Precomputer(config, fields, batch_size)
  os.makedirs(output_dir, exist_ok=True)
  d = config.data
  made_for = {"fields": list(pre.fields), **pre.settings,
              "data": {"num_frames": int(d.num_frames), "height": int(d.height),
                       "width": int(d.width), "fps": float(d.fps),
                       "sample_rate": int(d.sample_rate)}}
  made_for = json.loads(json.dumps(made_for))  # tuples -> lists, as stored
  # Written just before the first shard, so a job that fails its checks claims nothing.
  claim = _check_claim(output_dir, made_for, overwrite)
  shards = []
  start = time.perf_counter()
  for i, (src, dst) in enumerate(jobs):
    entry = {"input": os.path.abspath(src), "output": os.path.abspath(dst)}
    if os.path.exists(dst) and not overwrite:
      entry.update(status="exists", records=_num_records(dst))
      _log.info("[%d/%d] %s exists; skipped (--overwrite rewrites it)", i + 1, len(jobs), dst)
    else:
      counts = {"records": 0, "corrupt_copied": 0}
      if claim:
        _write_claim(output_dir, made_for)
        claim = False
      schema.write_shard_file(dst, _shard_records(pre, src, counts))
      entry.update(status="written", **counts)
      _log.info("[%d/%d] %s: %d records (%d corrupt, copied unchanged)", i + 1, len(jobs), dst,
                counts["records"], counts["corrupt_copied"])
    shards.append(entry)
  summary = {
      "fields": list(pre.fields), **pre.settings, "task": [task_index, num_tasks],
      "seconds": round(time.perf_counter() - start, 3), "shards": shards,
      "records": sum(s["records"] for s in shards),
      "corrupt_copied": sum(s.get("corrupt_copied", 0) for s in shards),
  }
  name = "precompute.json" if num_tasks == 1 else f"precompute-{task_index}-of-{num_tasks}.json"
  tmp = os.path.join(output_dir, f".{name}.tmp")
  with open(tmp, "w") as f:
    json.dump(summary, f, indent=1)
  os.replace(tmp, os.path.join(output_dir, name))
  return summary


def main(argv=None) -> None:
  # pylint: disable=g-import-not-at-top  (flags only for the command line)
  from absl import app, flags
  from ml_collections import config_flags

  config_flag = config_flags.DEFINE_config_file("config", None, "Config file (get_config(arg)).")
  input_flag = flags.DEFINE_string("input", None, "Glob, folder or file of input shards.")
  output_flag = flags.DEFINE_string("output-dir", None, "Folder for the shard copies.")
  fields_flag = flags.DEFINE_list("fields", list(FIELDS), "Fields to compute.")
  batch_flag = flags.DEFINE_integer("batch-size", 8, "Clips per video-codec call.")
  overwrite_flag = flags.DEFINE_bool("overwrite", False, "Rewrite existing output shards.")
  task_flag = flags.DEFINE_integer("task-index", 0, "This process's task (0..num-tasks-1).")
  tasks_flag = flags.DEFINE_integer("num-tasks", 1, "Processes splitting the input shards.")
  flags.mark_flags_as_required(["config", "input", "output-dir"])

  def _main(args):
    if len(args) > 1:
      raise app.UsageError(f"precompute: unexpected arguments {args[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    try:
      summary = run(config_flag.value, input_flag.value, output_flag.value,
                    fields=fields_flag.value, batch_size=batch_flag.value,
                    overwrite=overwrite_flag.value, task_index=task_flag.value,
                    num_tasks=tasks_flag.value)
    except ValueError as e:
      raise SystemExit(str(e)) from None  # messages name the input or config field
    print(f"precompute: {summary['records']} records in {len(summary['shards'])} shard(s) -> "
          f"{output_flag.value} ({summary['corrupt_copied']} corrupt copied unchanged)")

  app.run(_main, argv)


if __name__ == "__main__":
  main()
