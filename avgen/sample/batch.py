"""Batch generation: one clip per prompt of a file, an index, resumable.

  python -m avgen.sample.batch --checkpoint=/tmp/demo --prompts=prompts.txt --output_dir=out \\
      --batch_size=4 --steps=25

The prompts file is plain text (one prompt per line; blank lines are skipped and counted) or,
when it ends in .jsonl, one JSON object per line with "prompt" and any of: negative_prompt,
seed, guidance_scale, guidance_video, guidance_audio, num_inference_steps, sampler, mode,
audio_path, video_path (relative to the prompts file), strength, name (the output's file stem).
A line's options override the command line's. Row i's seed defaults to --seed + i.

Every line is checked before the model loads; a bad line stops the run with its line number.
Prompts sharing mode, steps, sampler and strength run together, --batch_size at a time (a short
last batch is padded, so one compiled program serves the whole group), split across the local
devices.

Outputs: <output_dir>/<index>_<prompt words>_<hash>.mp4 (H.264 + AAC; --format=wav for audio
only; --wav adds a .wav beside each mp4) and <output_dir>/index.jsonl, one record per prompt in
file order: its options, file, status (done / failed / pending), notes about resampled or cut
inputs, and the error of a failed one. The hash covers the prompt's options, its input files
and the checkpoint, so a rerun skips outputs already made with the same settings and makes
only missing or changed ones. The exit status is 1 if any prompt failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from typing import Any, Sequence

_log = logging.getLogger(__name__)

INDEX = "index.jsonl"
_KEYS = {"prompt": str, "negative_prompt": str, "seed": int, "guidance_scale": float,
         "guidance_video": float, "guidance_audio": float, "num_inference_steps": int,
         "sampler": str, "mode": str, "audio_path": str, "video_path": str, "strength": float,
         "name": str}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class PromptFileError(ValueError):
  """Lines of the prompts file that break a rule (all of them, each with its line number)."""


@dataclasses.dataclass
class Item:
  """One prompt of the file with every option resolved."""
  index: int  # position among the prompts (0-based)
  line: int  # line number in the file (1-based)
  prompt: str
  negative_prompt: str | None
  seed: int
  guidance_video: float | None
  guidance_audio: float | None
  num_inference_steps: int | None
  sampler: str | None
  mode: str
  audio_path: str | None
  video_path: str | None
  strength: float | None
  name: str | None

  def group(self) -> tuple:
    return (self.mode, self.num_inference_steps, self.sampler, self.strength)

  def options(self) -> dict[str, Any]:
    skip = ("index", "line", "name")
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}

  def digest(self, checkpoint_id: str) -> str:
    record = dict(self.options(), checkpoint=checkpoint_id)
    for key in ("audio_path", "video_path"):
      if record[key]:
        st = os.stat(record[key])
        record[key + "_stat"] = [st.st_size, st.st_mtime_ns]
    blob = json.dumps(record, sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:10]


def _slug(text: str, limit: int = 40) -> str:
  words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
  return words[:limit].rstrip("-") or "clip"


def _typed(key: str, value: Any, where: str) -> Any:
  kind = _KEYS[key]
  if value is None and key not in ("prompt", "mode"):
    return None
  if kind is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise PromptFileError(f"{where}: {key!r} must be an integer, got {value!r}")
  elif kind is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise PromptFileError(f"{where}: {key!r} must be a number, got {value!r}")
    value = float(value)
  elif not isinstance(value, str):
    raise PromptFileError(f"{where}: {key!r} must be a string, got {value!r}")
  return value


def _guidance(modality: str, record: dict, defaults: dict) -> float | None:
  """The line's per-modality scale, else its guidance_scale, else the command line's."""
  for source in (record, defaults):
    for key in (f"guidance_{modality}", "guidance_scale"):
      if source.get(key) is not None:
        return source[key]
  return None


def read_prompts(path: str, defaults: dict[str, Any]) -> tuple[list[Item], int]:
  """Items of a prompts file (every line checked) and the number of blank lines skipped.

  `defaults` holds the command line's values for the option keys (and "seed", the base seed).
  Raises PromptFileError listing every bad line.
  """
  from avgen.sample import pipeline  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--prompts: no such file: {path!r}")
  jsonl = path.endswith(".jsonl")
  base = os.path.dirname(os.path.abspath(path))
  items, errors, blank, names = [], [], 0, {}
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  for number, text in enumerate(lines, 1):
    where = f"{path}:{number}"
    if not text.strip():
      blank += 1
      continue
    try:
      if jsonl:
        try:
          record = json.loads(text)
        except json.JSONDecodeError as e:
          raise PromptFileError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
          raise PromptFileError(f"{where}: must be a JSON object, got {type(record).__name__}")
        unknown = sorted(set(record) - set(_KEYS))
        if unknown:
          raise PromptFileError(f"{where}: unknown keys {unknown}; known: {sorted(_KEYS)}")
        if "prompt" not in record:
          raise PromptFileError(f"{where}: needs a \"prompt\" (may be \"\")")
        record = {k: _typed(k, v, where) for k, v in record.items()}
      else:
        record = {"prompt": text.strip()}
      opts = dict(defaults)
      opts.update({k: v for k, v in record.items() if v is not None})
      index = len(items)
      mode = opts.get("mode") or "text_to_audio_video"
      if mode not in pipeline.MODES:
        raise PromptFileError(f"{where}: mode must be one of {pipeline.MODES}, got {mode!r}")
      steps = opts.get("num_inference_steps")
      if steps is not None and steps < 1:
        raise PromptFileError(f"{where}: num_inference_steps must be >= 1, got {steps}")
      strength = opts.get("strength")
      if mode == "edit":
        strength = pipeline.DEFAULT_STRENGTH if strength is None else strength
        if not 0.0 < strength <= 1.0:
          raise PromptFileError(f"{where}: strength must be in (0, 1], got {strength}")
      elif "strength" in record and record["strength"] is not None:
        raise PromptFileError(f"{where}: strength is only for mode 'edit' (mode is {mode!r})")
      else:
        strength = None
      paths = {}
      for key, modes in (("audio_path", ("audio_to_video", "edit")),
                         ("video_path", ("video_to_audio", "edit"))):
        value = opts.get(key) if mode in modes else None
        if mode in modes and not value:
          raise PromptFileError(f"{where}: mode {mode!r} needs {key}")
        if key in record and record[key] and mode not in modes:
          raise PromptFileError(f"{where}: {key} is not used by mode {mode!r}")
        if value:
          value = os.path.join(base, value) if key in record else os.path.abspath(value)
          if not os.path.isfile(value):
            raise PromptFileError(f"{where}: {key}: no such file: {value!r}")
        paths[key] = value
      name = opts.get("name")
      if name is not None:
        if not _NAME.fullmatch(name):
          raise PromptFileError(f"{where}: name {name!r} must be letters, digits, '.', '_' or "
                                "'-' (at most 100, not starting with '.', '_' or '-')")
        if name in names:
          raise PromptFileError(f"{where}: name {name!r} is already used on line {names[name]}")
        names[name] = number
      seed = record.get("seed")
      items.append(Item(
          index=index, line=number, prompt=opts["prompt"],
          negative_prompt=opts.get("negative_prompt"),
          seed=defaults.get("seed", 0) + index if seed is None else seed,
          guidance_video=_guidance("video", record, defaults),
          guidance_audio=_guidance("audio", record, defaults),
          num_inference_steps=steps, sampler=opts.get("sampler"), mode=mode,
          audio_path=paths["audio_path"], video_path=paths["video_path"], strength=strength,
          name=name))
    except PromptFileError as e:
      errors.append(str(e))
  if errors:
    raise PromptFileError(f"{len(errors)} bad line(s) in {path}:\n  " + "\n  ".join(errors))
  if not items:
    raise PromptFileError(f"{path}: holds no prompts")
  return items, blank


def _write_atomic(path: str, text: str) -> None:
  directory = os.path.dirname(path)
  fd, tmp = tempfile.mkstemp(prefix=".index_", dir=directory)
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def _read_index(output_dir: str) -> dict[str, dict]:
  path = os.path.join(output_dir, INDEX)
  if not os.path.isfile(path):
    return {}
  out = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
        out[record["file"]] = record
      except (json.JSONDecodeError, KeyError, TypeError):
        continue  # a damaged index only costs regenerating its clips
  return out


def _save(output, path: str, fmt: str, wav: bool, scale: int) -> None:
  """Writes the clip; the main file is renamed into place last, so its presence means done."""
  directory = os.path.dirname(path)
  stem = os.path.splitext(path)[0]
  if fmt == "wav" or wav:
    fd, tmp = tempfile.mkstemp(suffix=".wav", prefix=".clip_", dir=directory)
    os.close(fd)
    output.save(tmp)
    os.replace(tmp, stem + ".wav")
  if fmt == "mp4":
    output.save(path, scale=scale)


def run_batch(pipe, items: Sequence[Item], output_dir: str, *, batch_size: int = 4,
              fmt: str = "mp4", wav: bool = False, scale: int = 0, progress: bool = True,
              checkpoint_id: str = "") -> dict[str, int]:
  """Generates every item not already done; returns counts {done, generated, skipped, failed}."""
  from avgen.sample import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  if batch_size < 1:
    raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
  if fmt not in ("mp4", "wav"):
    raise ValueError(f"format: must be 'mp4' or 'wav', got {fmt!r}")
  os.makedirs(output_dir, exist_ok=True)
  previous = _read_index(output_dir)
  records = []
  for item in items:
    digest = item.digest(checkpoint_id)
    stem = item.name or f"{item.index:05d}_{_slug(item.prompt)}_{digest}"
    file = f"{stem}.{fmt}"
    done = os.path.isfile(os.path.join(output_dir, file)) and (
        item.name is None or previous.get(file, {}).get("hash") == digest)
    records.append(dict(index=item.index, line=item.line, file=file, hash=digest,
                        status="done" if done else "pending", options=item.options(),
                        notes=previous.get(file, {}).get("notes", []) if done else []))
  skipped = sum(r["status"] == "done" for r in records)
  record_of = {id(item): record for item, record in zip(items, records)}

  def write_index():
    _write_atomic(os.path.join(output_dir, INDEX),
                  "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

  write_index()
  todo: dict[tuple, list[Item]] = {}
  for item, record in zip(items, records):
    if record["status"] != "done":
      todo.setdefault(item.group(), []).append(item)

  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm(total=len(items), initial=skipped, unit="clip", disable=not progress,
             desc="avgen.sample.batch")

  def generate(chunk: list[Item]) -> None:
    mode, steps, sampler, strength = chunk[0].group()
    requests = [pipeline_lib.Request(
        prompt=i.prompt, negative_prompt=i.negative_prompt, seed=i.seed,
        guidance_video=i.guidance_video, guidance_audio=i.guidance_audio, audio=i.audio_path,
        video=i.video_path) for i in chunk]
    outputs = pipe.generate(requests, mode=mode, num_inference_steps=steps, sampler=sampler,
                            strength=strength, pad_to=batch_size)
    for item, output in zip(chunk, outputs):
      record = record_of[id(item)]
      _save(output, os.path.join(output_dir, record["file"]), fmt, wav,
            scale or max(1, 256 // output.video.shape[2]))
      record.update(status="done", notes=output.notes)
      record.pop("error", None)

  generated = failed = 0
  for group_items in todo.values():
    for start in range(0, len(group_items), batch_size):
      chunk = group_items[start:start + batch_size]
      t0 = time.perf_counter()
      try:
        generate(chunk)
        generated += len(chunk)
      except Exception:  # pylint: disable=broad-except
        # Find the item(s) at fault one by one; the rest of the batch still gets made.
        for item in chunk:
          try:
            generate([item])
            generated += 1
          except Exception as e:  # pylint: disable=broad-except
            failed += 1
            record_of[id(item)].update(status="failed", error=f"{type(e).__name__}: {e}")
            _log.error("line %d (%r) failed: %s", item.line, item.prompt, e)
      _log.info("%d clip(s) in %.1f s", len(chunk), time.perf_counter() - t0)
      write_index()
      bar.update(len(chunk))
  bar.close()
  write_index()
  return dict(done=skipped + generated, generated=generated, skipped=skipped, failed=failed)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m avgen.sample.batch", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", "--workdir", required=True,
                 help="training workdir, its checkpoints/ folder, or a hub id")
  p.add_argument("--prompts", "--prompts_file", required=True, help=".txt or .jsonl")
  p.add_argument("--output_dir", required=True)
  p.add_argument("--batch_size", type=int, default=4, help="prompts per compiled call")
  p.add_argument("--format", choices=("mp4", "wav"), default="mp4")
  p.add_argument("--wav", action="store_true", help="also write a .wav beside each mp4")
  p.add_argument("--scale", type=int, default=0, help="mp4 upscale (0: to about 256 px)")
  p.add_argument("--mode", default=None, help="default mode for lines without one")
  p.add_argument("--steps", type=int, default=None)
  p.add_argument("--sampler", default=None)
  p.add_argument("--guidance", type=float, default=None)
  p.add_argument("--guidance_video", type=float, default=None)
  p.add_argument("--guidance_audio", type=float, default=None)
  p.add_argument("--negative_prompt", default=None)
  p.add_argument("--strength", type=float, default=None)
  p.add_argument("--audio", default=None, help="default audio_path")
  p.add_argument("--video", default=None, help="default video_path")
  p.add_argument("--seed", type=int, default=0, help="row i's seed is seed + i unless given")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
  p.add_argument("--no_progress", action="store_true")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  defaults = {"seed": args.seed, "mode": args.mode, "num_inference_steps": args.steps,
              "sampler": args.sampler, "guidance_scale": args.guidance,
              "guidance_video": args.guidance_video, "guidance_audio": args.guidance_audio,
              "negative_prompt": args.negative_prompt, "strength": args.strength,
              "audio_path": args.audio, "video_path": args.video}
  try:
    items, blank = read_prompts(args.prompts, defaults)
  except (FileNotFoundError, PromptFileError) as e:
    print(f"avgen.sample.batch: {e}", file=sys.stderr)
    return 2
  if blank:
    print(f"{args.prompts}: {blank} blank line(s) skipped")
  from avgen.sample import api, pipeline  # pylint: disable=g-import-not-at-top
  try:
    pipe = api.load_pipeline(args.checkpoint, step=args.step, dtype=args.dtype)
  except (FileNotFoundError, ValueError) as e:
    print(f"avgen.sample.batch: {e}", file=sys.stderr)
    return 2
  workdir = pipeline.resolve_checkpoint(args.checkpoint)
  checkpoint_id = f"{workdir}@{args.step if args.step is not None else api.latest_step(workdir)}"
  counts = run_batch(pipe, items, args.output_dir, batch_size=args.batch_size, fmt=args.format,
                     wav=args.wav, scale=args.scale, progress=not args.no_progress,
                     checkpoint_id=checkpoint_id)
  print(f"{counts['done']}/{len(items)} done ({counts['generated']} made now, "
        f"{counts['skipped']} already there), {counts['failed']} failed; index: "
        f"{os.path.join(args.output_dir, INDEX)}")
  return 1 if counts["failed"] else 0


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
