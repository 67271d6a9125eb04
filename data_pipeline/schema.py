"""The one example format shared by the synthetic set and the real-video pipeline.

An example is a dict:

| field | type | rule |
| --- | --- | --- |
| `video` | uint8 [T, H, W, 3] | T, H, W > 0 |
| `audio` | float32 [S] | mono; S = T / fps * sample_rate (rounded to an integer) |
| `caption` | str | |
| `fps` | float | > 0 |
| `sample_rate` | int | > 0 |
| `meta` | dict | JSON-able: source, start, quality scores; synthetic clips add `events` |
| `video_latent` | float [T, h, w, C] | optional cached latent (e.g. SD-VAE) |
| `audio_mel` | float [N, n_mels] | optional cached normalized log-mel |

On disk an example is one msgpack map: plain fields as they are, arrays as {dtype, shape, data}
with the raw little-endian bytes, and `schema_version`; then a 4-byte little-endian CRC32 of those
bytes, so that flipped or overwritten bytes anywhere (even inside pixel data) are caught on decode.
Shards are ArrayRecord files with one example per record.
"""

from __future__ import annotations

import itertools
import json
import os
import zlib
from typing import Any, Iterable

import ml_dtypes
import msgpack
import numpy as np

SCHEMA_VERSION = 1
REQUIRED_FIELDS = ("video", "audio", "caption", "fps", "sample_rate", "meta")
OPTIONAL_FIELDS = ("video_latent", "audio_mel")
_ARRAY_FIELDS = ("video", "audio", "video_latent", "audio_mel")
# Dtypes allowed for cached latents. bfloat16 has no numpy name, hence the explicit table.
_LATENT_DTYPES = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
}
_DTYPES = {"uint8": np.dtype(np.uint8), **_LATENT_DTYPES}
SHARD_SUFFIX = ".array_record"
# One record per group, so that a reader can fetch any record without decoding its neighbours.
ARRAY_RECORD_OPTIONS = "group_size:1"


class SchemaError(ValueError):
  """An example (or a stored record) breaks the schema; the message names the field."""


def expected_num_samples(num_frames: int, fps: float, sample_rate: int) -> int:
  """Audio samples that go with `num_frames` frames at `fps`."""
  return int(round(num_frames * sample_rate / fps))


def validate_example(example: Any) -> None:
  """Raises SchemaError naming the first field that breaks the schema."""
  if not isinstance(example, dict):
    raise SchemaError(f"example must be a dict, got {type(example).__name__}")
  missing = [k for k in REQUIRED_FIELDS if k not in example]
  if missing:
    raise SchemaError(f"example is missing required field(s) {missing}")
  unknown = sorted(set(example) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
  if unknown:
    raise SchemaError(
        f"example has unknown field(s) {unknown}; allowed: {REQUIRED_FIELDS + OPTIONAL_FIELDS}")

  video = example["video"]
  if not isinstance(video, np.ndarray) or video.dtype != np.uint8:
    raise SchemaError(f"field 'video' must be a uint8 numpy array, got {_describe(video)}")
  if video.ndim != 4 or video.shape[-1] != 3 or min(video.shape) == 0:
    raise SchemaError(f"field 'video' must have shape [T>0, H>0, W>0, 3], got {video.shape}")

  fps = example["fps"]
  if (isinstance(fps, bool) or not isinstance(fps, (int, float, np.integer, np.floating))
      or not np.isfinite(fps) or fps <= 0):
    raise SchemaError(f"field 'fps' must be a positive number, got {fps!r}")
  sample_rate = example["sample_rate"]
  if (isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer))
      or sample_rate <= 0):
    raise SchemaError(f"field 'sample_rate' must be a positive int, got {sample_rate!r}")

  audio = example["audio"]
  if not isinstance(audio, np.ndarray) or audio.dtype != np.float32:
    raise SchemaError(f"field 'audio' must be a float32 numpy array, got {_describe(audio)}")
  if audio.ndim != 1:
    raise SchemaError(f"field 'audio' must be mono with shape [S], got {audio.shape}")
  want = expected_num_samples(video.shape[0], fps, sample_rate)
  if audio.shape[0] != want:
    raise SchemaError(
        f"field 'audio' has {audio.shape[0]} samples; T / fps * sample_rate = "
        f"{video.shape[0]} / {fps} * {sample_rate} = {want}")
  if not np.isfinite(audio).all():
    raise SchemaError("field 'audio' contains NaN or inf")

  if not isinstance(example["caption"], str):
    raise SchemaError(f"field 'caption' must be a str, got {type(example['caption']).__name__}")

  meta = example["meta"]
  if not isinstance(meta, dict):
    raise SchemaError(f"field 'meta' must be a dict, got {type(meta).__name__}")
  try:
    json.dumps(meta, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise SchemaError(f"field 'meta' must be JSON-able (str keys, plain values): {e}") from None

  latent = _cached_latent(example, "video_latent")
  if latent is not None and (latent.ndim != 4 or latent.shape[0] != video.shape[0]):
    raise SchemaError(
        f"field 'video_latent' must have shape [T={video.shape[0]}, h, w, C], got {latent.shape}")
  mel = _cached_latent(example, "audio_mel")
  if mel is not None and (mel.ndim != 2 or min(mel.shape) == 0):
    raise SchemaError(f"field 'audio_mel' must have shape [N>0, n_mels>0], got {mel.shape}")


def encode_example(example: dict[str, Any]) -> bytes:
  """Validates `example` and serializes it to bytes (one ArrayRecord record)."""
  validate_example(example)
  record: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
  for key, value in example.items():
    if value is None and key in OPTIONAL_FIELDS:
      continue
    if key in _ARRAY_FIELDS:
      record[key] = _pack_array(value)
    elif key == "fps":
      record[key] = float(value)
    elif key == "sample_rate":
      record[key] = int(value)
    else:
      record[key] = value
  packed = msgpack.packb(record, use_bin_type=True)
  return packed + zlib.crc32(packed).to_bytes(4, "little")


def decode_example(data: bytes) -> dict[str, Any]:
  """Inverse of `encode_example`; anything that is not a valid record raises SchemaError."""
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise SchemaError(f"record must be bytes, got {type(data).__name__}")
  data = bytes(data)
  if len(data) < 5:
    raise SchemaError(f"record has {len(data)} bytes, too short to be an example")
  body, crc = data[:-4], int.from_bytes(data[-4:], "little")
  if zlib.crc32(body) != crc:
    raise SchemaError("record checksum (CRC32) mismatch: the record is corrupt or not an example")
  try:
    record = msgpack.unpackb(body, raw=False, strict_map_key=True)
  except Exception as e:  # msgpack raises several unrelated types on garbage.
    raise SchemaError(f"record is not a msgpack map: {type(e).__name__}: {e}") from None
  if not isinstance(record, dict):
    raise SchemaError(f"record must be a msgpack map, got {type(record).__name__}")
  version = record.pop("schema_version", None)
  if version != SCHEMA_VERSION:
    raise SchemaError(f"record has schema_version {version!r}; this code reads {SCHEMA_VERSION}")
  example = {}
  for key, value in record.items():
    example[key] = _unpack_array(key, value) if key in _ARRAY_FIELDS else value
  validate_example(example)
  return example


def write_shards(
    examples: Iterable[dict[str, Any]],
    output_dir: str,
    samples_per_shard: int,
    prefix: str = "data",
) -> list[str]:
  """Writes examples into ArrayRecord shards `{prefix}-{i:05d}.array_record`; returns paths.

  Each shard is written under a hidden temporary name and renamed once closed, so a reader
  globbing `*.array_record` never sees a half-written shard.
  """
  return write_record_shards((encode_example(e) for e in examples), output_dir,
                             samples_per_shard, prefix)


def write_record_shards(
    records: Iterable[bytes],
    output_dir: str,
    samples_per_shard: int,
    prefix: str = "data",
) -> list[str]:
  """`write_shards` for records already encoded by `encode_example`."""
  if (isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int)
      or samples_per_shard < 1):
    raise ValueError(
        f"write_shards: samples_per_shard must be an int >= 1, got {samples_per_shard!r}")
  if not prefix or "/" in prefix:
    raise ValueError(f"write_shards: prefix must be a non-empty file name part, got {prefix!r}")
  os.makedirs(output_dir, exist_ok=True)
  paths: list[str] = []
  records = iter(records)
  while (first := next(records, None)) is not None:
    # Streams: one shard's records pass through without being held in memory together.
    chunk = itertools.chain([first], itertools.islice(records, samples_per_shard - 1))
    name = f"{prefix}-{len(paths):05d}{SHARD_SUFFIX}"
    paths.append(write_shard_file(os.path.join(output_dir, name), chunk))
  return paths


def write_shard_file(path: str, records: Iterable[bytes]) -> str:
  """Writes one ArrayRecord file atomically: a hidden temporary name, renamed when closed.

  A reader globbing `*.array_record` never sees a half-written file, and an interrupted write
  leaves only the temporary (removed here on an exception).
  """
  # pylint: disable-next=g-import-not-at-top
  from array_record.python.array_record_module import ArrayRecordWriter

  directory, base = os.path.split(path)
  tmp_path = os.path.join(directory, f".{base}.tmp")
  writer = ArrayRecordWriter(tmp_path, ARRAY_RECORD_OPTIONS)
  try:
    for record in records:
      writer.write(record)
    writer.close()
    writer = None
    os.replace(tmp_path, path)
  except BaseException:
    if writer is not None:
      writer.close()
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise
  return path


def read_records(path: str, start: int = 0, stop: int | None = None) -> list[bytes]:
  """Raw records [start, stop) of one ArrayRecord file (decode with `decode_example`)."""
  # pylint: disable-next=g-import-not-at-top
  from array_record.python.array_record_module import ArrayRecordReader

  reader = ArrayRecordReader(path)
  try:
    stop = reader.num_records() if stop is None else stop
    return list(reader.read(range(start, stop))) if stop > start else []
  finally:
    reader.close()


def _pack_array(x: np.ndarray) -> dict[str, Any]:
  x = np.ascontiguousarray(x)
  if x.dtype.byteorder == ">":
    x = x.astype(x.dtype.newbyteorder("<"))
  return {"dtype": x.dtype.name, "shape": list(x.shape), "data": x.tobytes()}


def _unpack_array(key: str, value: Any) -> np.ndarray:
  if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data"}:
    raise SchemaError(f"field {key!r}: stored array must be a map of dtype, shape, data")
  dtype = _DTYPES.get(value["dtype"]) if isinstance(value["dtype"], str) else None
  if dtype is None:
    raise SchemaError(f"field {key!r}: unsupported stored dtype {value['dtype']!r}")
  shape = value["shape"]
  if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
    raise SchemaError(f"field {key!r}: stored shape must be a list of ints >= 0, got {shape!r}")
  data = value["data"]
  if not isinstance(data, bytes) or len(data) != int(np.prod(shape)) * dtype.itemsize:
    raise SchemaError(f"field {key!r}: stored data has the wrong length for {dtype} {shape}")
  return np.frombuffer(data, dtype).reshape(shape).copy()


def _cached_latent(example: dict[str, Any], field: str) -> np.ndarray | None:
  """The optional precomputed latent `field`, checked to be a float array."""
  value = example.get(field)
  if value is not None and (not isinstance(value, np.ndarray) or value.dtype.name not in _LATENT_DTYPES):
    raise SchemaError(f"field {field!r} must be a float array ({sorted(_LATENT_DTYPES)}), got "
                      f"{_describe(value)}")
  return value


def _describe(x: Any) -> str:
  if isinstance(x, np.ndarray):
    return f"ndarray {x.dtype} {x.shape}"
  return type(x).__name__
