"""One input file -> its manifest record (+ its accepted clips in a clip file). Never raises.

Checks run cheapest first, so a bad file costs no decoding:
  file: exists (`missing`, also a broken symlink), is a regular file (`not_regular_file`), is not
  empty (`empty_file`), can be opened (`unreadable`); header (`ffmpeg -i`): is media
  (`not_media`), has a video (`no_video_stream`) and an audio stream (`no_audio_stream`),
  shorter side >= min_resolution (`min_resolution`), nominal fps >= min_fps (`min_fps`), at least
  one clip long by its header (`too_short`);
  decoding: the clips, each scored and judged by the clip rules of `filters`; then no ffmpeg
  error lines beyond max_decode_errors (`decode_errors`), at least one whole clip (`too_short`)
  and at least one clip that passes every clip rule (else the rule most clips broke).
The header probe and the decode run under time limits (`probe_timeout_s`, `decode_timeout`
in `preprocess_config`): an input that outlasts one is killed and rejected with rule `timeout`.
An exception in our own code becomes a rejection with rule `processing_error`, so one file
cannot stop a run.

An input given as a URL (gs://, s3://, see `storage`) is copied, with its caption sidecars, to a
local temporary directory for ffmpeg and deleted when judged (a worker's disk holds one input at
a time); an output dir given as a URL gets the clip file written locally, then uploaded.
Messages name the URL, not the temporary copy.

The record (one line of manifest.jsonl): path (relative to the input dir, '/'-separated), status
('accepted'/'rejected'), reason (None, or {rule, value, threshold, message}), clips (accepted
clip count), clips_total, clips_failed ({rule: clips}), scores (per rule, the median over
clips), clip_scores (per clip: start, scores, failed rules), header, caption, decoded seconds,
unused_seconds (decoded but in no clip), stopped_early, decode_errors (count and the first
lines), clip_file (relative to the output dir, or None).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import traceback
from typing import Any, Iterator

import numpy as np

from avgen.sample import media
from data_pipeline import captions
from data_pipeline import clips as clips_lib
from data_pipeline import filters
from data_pipeline import schema
from data_pipeline import storage
from data_pipeline.preprocess_config import PreprocessConfig

CLIP_DIR = "clips"
_MAX_ERROR_LINES = 5


class Rejected(Exception):
  """An input breaks a rule; carries what the manifest says about it."""

  def __init__(self, rule: str, message: str, value: Any = None, threshold: Any = None):
    super().__init__(message)
    self.rule, self.message, self.value, self.threshold = rule, message, value, threshold

  def reason(self) -> dict[str, Any]:
    return {"rule": self.rule, "value": self.value, "threshold": self.threshold,
            "message": self.message}


def clip_file_name(rel_path: str) -> str:
  """Clip file of an input, named by a hash of its relative path (any name, fixed length)."""
  digest = hashlib.sha1(rel_path.encode("utf-8", errors="surrogateescape")).hexdigest()
  return f"{CLIP_DIR}/{digest[:24]}{schema.SHARD_SUFFIX}"


def new_record(rel_path: str) -> dict[str, Any]:
  """A manifest record with every field, as for an input rejected before any check."""
  return {
      "path": rel_path, "status": "rejected", "reason": None, "clips": 0, "clips_total": 0,
      "clips_failed": {}, "scores": {}, "clip_scores": [], "header": None, "caption": None,
      "video_seconds": None, "audio_seconds": None, "unused_seconds": None,
      "stopped_early": False, "decode_errors": {"count": 0, "first": []}, "clip_file": None,
  }


def process_input(path: str, rel_path: str, config: PreprocessConfig,
                  output_dir: str | None) -> dict[str, Any]:
  """Judges one input; with `output_dir`, writes its accepted clips to the record's clip_file."""
  record = new_record(rel_path)
  local = path
  try:
    with _local_copy(path) as (local, sidecar_errors):
      _check_file(local)
      header = _read_header(local, config)
      record["header"] = _header_summary(header)
      caption = captions.find_caption(local, header.get("tags", {}))
      record["caption"] = {"source": caption["source"], "missing": not caption["caption"],
                           "errors": sidecar_errors + caption["errors"]}
      _decode_and_judge(local, rel_path, header, caption, config, output_dir, record)
  except Rejected as r:
    record["status"], record["reason"] = "rejected", r.reason()
  except Exception as e:  # pylint: disable=broad-except  (one file must not end the run)
    tb = traceback.extract_tb(e.__traceback__)[-1]
    record["status"] = "rejected"
    record["reason"] = {
        "rule": "processing_error", "value": None, "threshold": None,
        "message": f"{type(e).__name__}: {e} (at {os.path.basename(tb.filename)}:{tb.lineno})"}
  if record["status"] != "accepted":
    record["clip_file"] = None
  if local != path:
    _name_the_url(record, local, path)
  return record


@contextlib.contextmanager
def _local_copy(path: str) -> Iterator[tuple[str, list[str]]]:
  """(a local path of the input, sidecar download errors): `path` itself unless it is a URL.

  A URL's object and its caption sidecars are downloaded to a fresh temporary directory under
  their own names (so `captions` finds them as beside a local file), deleted afterwards.
  """
  if not storage.is_url(path):
    yield path, []
    return
  tmp = tempfile.mkdtemp(prefix="avgen_input_")
  try:
    local = os.path.join(tmp, storage.basename(path))
    try:
      storage.download(path, local)
    except FileNotFoundError:
      raise Rejected("missing", "object does not exist (removed after the input list was made)"
                     ) from None
    except Exception as e:  # pylint: disable=broad-except  (permissions, network, ...)
      raise Rejected("unreadable", f"cannot download: {type(e).__name__}: {e}") from None
    errors = []
    for sidecar in captions.sidecar_paths(path):
      try:
        storage.download(sidecar, os.path.join(tmp, storage.basename(sidecar)))
      except FileNotFoundError:
        pass
      except Exception as e:  # pylint: disable=broad-except  (reported; the caption search goes on)
        errors.append(f"{storage.basename(sidecar)}: {type(e).__name__}: {e}")
    yield local, errors
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _name_the_url(record: dict[str, Any], local: str, url: str) -> None:
  """Replaces the temporary copy's path in messages by the input's URL."""
  local = os.path.abspath(local)
  fix = lambda text: text.replace(f"file:{local}", url).replace(local, url)
  if record["reason"]:
    record["reason"]["message"] = fix(record["reason"]["message"])
  record["decode_errors"]["first"] = [fix(line) for line in record["decode_errors"]["first"]]


def _check_file(path: str) -> None:
  try:
    info = os.stat(path)
  except FileNotFoundError:
    if os.path.islink(path):
      raise Rejected("missing", f"broken symlink to {os.readlink(path)!r}") from None
    raise Rejected("missing", "file does not exist (removed after the input list was made)"
                   ) from None
  except OSError as e:
    raise Rejected("unreadable", f"cannot stat: {e.strerror}") from None
  if not stat.S_ISREG(info.st_mode):
    # A FIFO or device would block or never end when read.
    raise Rejected("not_regular_file", f"not a regular file (mode {stat.filemode(info.st_mode)})")
  if info.st_size == 0:
    raise Rejected("empty_file", "file is empty (0 bytes)", value=0)
  try:
    with open(path, "rb") as f:
      f.read(1)
  except OSError as e:
    raise Rejected("unreadable", f"cannot read: [Errno {e.errno}] {e.strerror}") from None


def _read_header(path: str, config: PreprocessConfig) -> dict[str, Any]:
  try:
    # On expiry subprocess.run SIGKILLs ffmpeg: one process, which starts no others.
    header = media.probe_header(path, timeout=config.probe_timeout_s)
  except media.MediaError as e:
    if isinstance(e.__context__, subprocess.TimeoutExpired):  # raised `from None`, still there
      raise Rejected("timeout", f"timeout: ffmpeg header probe exceeded "
                     f"{config.probe_timeout_s:g} s (probe_timeout_s); ffmpeg was killed",
                     threshold=config.probe_timeout_s) from None
    message = str(e).split(": ffmpeg ", 1)[-1]
    raise Rejected("not_media", f"ffmpeg {message}") from None
  video, audio = header["video"], header["audio"]
  if video is None:
    raise Rejected("no_video_stream", "the file has no video stream" + (
        " (audio only)" if audio else ""))
  if audio is None:
    raise Rejected("no_audio_stream", "the file has no audio stream")
  side = min(video["width"], video["height"])
  if side < config.min_resolution:
    raise Rejected("min_resolution",
                   f"shorter side {side} px < {config.min_resolution} "
                   f"({video['width']}x{video['height']})", value=side,
                   threshold=config.min_resolution)
  fps = video["fps"]
  if fps is None or fps < config.min_fps:
    raise Rejected("min_fps", f"frame rate {fps} < {config.min_fps}", value=fps,
                   threshold=config.min_fps)
  duration = header["duration"]
  if duration is not None and duration < config.clip_seconds:
    raise Rejected("too_short", f"duration {duration} s < one clip ({config.clip_seconds} s)",
                   value=duration, threshold=config.clip_seconds)
  return header


def _header_summary(header: dict[str, Any]) -> dict[str, Any]:
  v, a = header["video"], header["audio"]
  return {"container": header["container"], "duration": header["duration"],
          "width": v["width"], "height": v["height"], "fps": v["fps"], "video_codec": v["codec"],
          "sar": v["sar"], "rotation": v["rotation"], "audio_codec": a["codec"],
          "sample_rate": a["sample_rate"], "channels": a["channels"]}


def _decode_and_judge(path, rel_path, header, caption, config, output_dir, record) -> None:
  writer = _ClipWriter(output_dir, clip_file_name(rel_path)) if output_dir else None
  scenes = filters.SceneCutCounter(config.scene_threshold, config.fps)
  failed_counts: collections.Counter = collections.Counter()
  failed_values: dict[str, list[float]] = collections.defaultdict(list)
  limit = config.decode_timeout(header["duration"])
  try:
    with clips_lib.ClipDecoder(path, header, config, timeout_s=limit) as decoder:
      for clip in decoder:
        cuts = scenes.feed(clip.video)
        first = clip.index * config.num_frames
        inside = sum(first < f < first + config.num_frames for f in cuts)
        scores = filters.clip_scores(clip.video, clip.channels, config.sample_rate, inside,
                                     config)
        failed = filters.failed_rules(scores, config)
        record["clip_scores"].append({"start": clip.start, "scores": scores, "failed": failed})
        for rule in failed:
          failed_counts[rule] += 1
          failed_values[rule].append(scores[rule])
        if not failed and writer is not None:
          writer.write(_example(clip, scores, rel_path, caption, record["header"], config))
    if decoder.timed_out:
      media_seconds = config.decode_seconds(header["duration"])
      raise Rejected("timeout", f"timeout: ffmpeg decode exceeded {limit:g} s (decode_timeout_s "
                     f"{config.decode_timeout_s:g} + decode_timeout_per_second "
                     f"{config.decode_timeout_per_second:g} x {media_seconds:g} s of media); "
                     f"ffmpeg was killed after {len(record['clip_scores'])} clip(s)",
                     threshold=round(limit, 4))
    errors = decoder.errors
    record["decode_errors"] = {"count": len(errors), "first": errors[:_MAX_ERROR_LINES]}
    record["video_seconds"] = round(decoder.video_seconds, 4)
    record["audio_seconds"] = round(decoder.audio_seconds, 4)
    total = len(record["clip_scores"])
    used = total * config.clip_seconds
    record["unused_seconds"] = round(max(decoder.video_seconds, decoder.audio_seconds) - used, 4)
    record["stopped_early"] = decoder.stopped_early
    record["clips_total"] = total
    record["clips_failed"] = dict(sorted(failed_counts.items()))
    if total:
      record["scores"] = {k: round(float(np.median([c["scores"][k]
                                                    for c in record["clip_scores"]])), 4)
                          for k in record["clip_scores"][0]["scores"]}
    if len(errors) > config.max_decode_errors:
      raise Rejected("decode_errors",
                     f"{len(errors)} ffmpeg error line(s) > {config.max_decode_errors} (corrupt "
                     f"or truncated data); first: {errors[0]}", value=len(errors),
                     threshold=config.max_decode_errors)
    if not total:
      seconds = min(decoder.video_seconds, decoder.audio_seconds)
      raise Rejected("too_short", f"decoded {seconds} s of video and audio < one clip "
                     f"({config.clip_seconds} s)", value=round(seconds, 4),
                     threshold=config.clip_seconds)
    accepted = total - sum(1 for c in record["clip_scores"] if c["failed"])
    if not accepted:
      rule, count = max(failed_counts.items(), key=lambda kv: (kv[1], -list(
          filters.CLIP_RULES).index(kv[0])))
      symbol, threshold = filters.describe_rule(rule, config)
      value = round(float(np.median(failed_values[rule])), 4)
      others = ", ".join(f"{k}: {v}" for k, v in sorted(failed_counts.items()))
      raise Rejected(rule, f"no clip passed: {count} of {total} clip(s) fail {rule} "
                     f"(median {value}, must be {symbol} {threshold}); failures by rule: "
                     f"{others}", value=value, threshold=threshold)
    record["status"], record["clips"] = "accepted", accepted
    if writer is not None:
      record["clip_file"] = writer.commit()
  finally:
    if writer is not None:
      writer.discard()


def _example(clip, scores, rel_path, caption, header, config) -> dict[str, Any]:
  return {
      "video": clip.video,
      "audio": clip.channels.mean(axis=1, dtype=np.float32),
      "caption": caption["caption"],
      "fps": float(config.fps),
      "sample_rate": int(config.sample_rate),
      "meta": {
          # The stored record is msgpack (UTF-8 only): bytes of a name that are not UTF-8 are
          # written as \xNN escapes; the manifest keeps the exact name.
          "source": os.fsencode(rel_path).decode("utf-8", errors="backslashreplace"),
          "start": clip.start, "clip_index": clip.index,
          "scores": scores, "caption_source": caption["source"],
          "caption_missing": not caption["caption"],
          "source_width": header["width"], "source_height": header["height"],
          "source_fps": header["fps"], "source_sample_rate": header["sample_rate"],
          "source_channels": header["channels"],
      },
  }


class _ClipWriter:
  """Writes records under a hidden temporary name; `commit` renames it into place.

  For an output URL the file is written in a local temporary directory and `commit` uploads it
  (`storage.put_atomic`: never visible half-written).
  """

  def __init__(self, output_dir: str, rel_name: str):
    self.rel_name = rel_name
    self.path = storage.join(output_dir, rel_name)
    self._local_dir = None
    if storage.is_url(output_dir):
      self._local_dir = tempfile.mkdtemp(prefix="avgen_clips_")
      directory, base = self._local_dir, storage.basename(self.path)
    else:
      directory, base = os.path.split(self.path)
      os.makedirs(directory, exist_ok=True)
    self.tmp_path = os.path.join(directory, f".{base}.tmp")
    self._writer = None

  def write(self, example: dict[str, Any]) -> None:
    if self._writer is None:
      # pylint: disable-next=g-import-not-at-top
      from array_record.python.array_record_module import ArrayRecordWriter
      self._writer = ArrayRecordWriter(self.tmp_path, schema.ARRAY_RECORD_OPTIONS)
    self._writer.write(schema.encode_example(example))

  def commit(self) -> str:
    self._writer.close()
    self._writer = None
    if self._local_dir is not None:
      storage.put_atomic(self.tmp_path, self.path)
      os.remove(self.tmp_path)
    else:
      os.replace(self.tmp_path, self.path)
    return self.rel_name

  def discard(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
    if os.path.exists(self.tmp_path):
      os.remove(self.tmp_path)
    if self._local_dir is not None:
      shutil.rmtree(self._local_dir, ignore_errors=True)
