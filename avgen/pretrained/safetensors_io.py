"""Reading safetensors checkpoints into numpy and placing them into NNX modules.

`read_safetensors_dir(path)` -> {key: np.ndarray} (memory-mapped; bf16 via ml_dtypes), across
one file or a sharded set. `Tensors` wraps that dict and records which keys a converter took, so
that a checkpoint entry nobody used is reported instead of silently dropped. `assign(abstract,
arrays)` fills an abstract module (from `nnx.eval_shape`) with arrays keyed by its state paths,
checking that every variable gets one array of its shape and every array has a variable.

Torch -> Flax layout helpers: `linear` (out, in) -> (in, out); `conv` (out, in, *k) -> (*k, in,
out); `heads_in` / `heads_bias` / `heads_out` split attention projections into (heads, head_dim).
"""

from __future__ import annotations

import json
import pathlib
import re
import struct
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

# safetensors dtype codes (the format's spec) -> numpy dtypes.
_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files like `diffusion_pytorch_model.fp16.safetensors` are alternative precisions of the same
# weights; a directory holding both is read from the full-precision files.
_VARIANT = re.compile(r"\.(fp16|bf16|fp32|non_ema|ema)\.safetensors$")


class CheckpointError(ValueError):
  """A checkpoint directory or file that cannot be converted, with the reason."""


def read_safetensors_file(path: pathlib.Path) -> dict[str, np.ndarray]:
  """{key: array} of one .safetensors file; arrays are read-only memory maps."""
  path = pathlib.Path(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise CheckpointError(f"{path}: too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", raw)
    if header_len > 100_000_000:
      raise CheckpointError(f"{path}: header length {header_len} is implausible; not safetensors?")
    try:
      header = json.loads(f.read(header_len))
    except ValueError as e:
      raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
  header.pop("__metadata__", None)
  data_start = 8 + header_len
  size = path.stat().st_size
  buf = np.memmap(path, dtype=np.uint8, mode="r") if size > data_start else np.zeros(0, np.uint8)
  out = {}
  for key, info in header.items():
    if info["dtype"] not in _DTYPES:
      raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
    dtype = np.dtype(_DTYPES[info["dtype"]])
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - begin != nbytes or data_start + end > size:
      raise CheckpointError(f"{path}: tensor {key!r} {shape} {info['dtype']} has bad offsets "
                            f"{begin}..{end} (file truncated?)")
    out[key] = buf[data_start + begin: data_start + end].view(dtype).reshape(shape)
  return out


def safetensors_files(path: pathlib.Path) -> list[pathlib.Path]:
  """The weight files of a checkpoint directory, in the order its index names them."""
  path = pathlib.Path(path)
  indexes = sorted(p for p in path.glob("*.safetensors.index.json") if not _variant_index(p))
  if indexes:
    weight_map = json.loads(indexes[0].read_text())["weight_map"]
    names = sorted(set(weight_map.values()))
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
      raise CheckpointError(f"{indexes[0]} names shard files that are not in {path}: {missing}")
    return [path / n for n in names]
  files = sorted(path.glob("*.safetensors"))
  plain = [f for f in files if not _VARIANT.search(f.name)]
  return plain or files


def _variant_index(p: pathlib.Path) -> bool:
  return bool(re.search(r"\.(fp16|bf16|non_ema|ema)\.safetensors\.index\.json$", p.name))


def pickle_files(path: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in pathlib.Path(path).iterdir() if p.suffix in PICKLE_SUFFIXES)


def check_weights_dir(path: pathlib.Path, *, what: str) -> list[pathlib.Path]:
  """The safetensors files of `path`; refuses pickle-only and empty directories."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise CheckpointError(f"{what}: {path} is not a directory")
  files = safetensors_files(path)
  if files:
    return files
  pickles = pickle_files(path)
  if pickles:
    raise CheckpointError(
        f"{what}: {path} holds only pickle checkpoints ({', '.join(p.name for p in pickles)}); "
        "avgen loads safetensors only, because unpickling runs arbitrary code. Convert once in "
        "PyTorch, e.g. `model = <Class>.from_pretrained(dir); model.save_pretrained(out, "
        "safe_serialization=True)`, or pick a hub revision that has *.safetensors files.")
  raise CheckpointError(f"{what}: no *.safetensors files in {path}")


def read_safetensors_dir(path: pathlib.Path, *, what: str = "checkpoint") -> dict[str, np.ndarray]:
  """{key: array} across all weight files of a directory; a key in two files is an error."""
  out: dict[str, np.ndarray] = {}
  for f in check_weights_dir(path, what=what):
    for key, value in read_safetensors_file(f).items():
      if key in out:
        raise CheckpointError(f"{what}: tensor {key!r} appears in more than one file of {path}")
      out[key] = value
  return out


def read_config(path: pathlib.Path, *, what: str, name: str = "config.json") -> dict:
  f = pathlib.Path(path) / name
  if not f.is_file():
    raise CheckpointError(f"{what}: {path} has no {name}")
  try:
    return json.loads(f.read_text())
  except ValueError as e:
    raise CheckpointError(f"{what}: {f} is not valid JSON ({e})") from None


class Tensors(Mapping[str, np.ndarray]):
  """A checkpoint's tensors under an optional key prefix, remembering which ones were read."""

  def __init__(self, arrays: Mapping[str, np.ndarray], *, what: str, prefix: str = ""):
    self._arrays, self.what, self.prefix = arrays, what, prefix
    self._used: set[str] = set()

  @classmethod
  def from_dir(cls, path: pathlib.Path, *, what: str) -> "Tensors":
    return cls(read_safetensors_dir(path, what=what), what=what)

  def with_prefix(self, candidates: Iterable[str], marker: str) -> "Tensors":
    """Picks the first prefix p in `candidates` for which p + marker is a key.

    Task heads save the backbone under a prefix (`wav2vec2.`, `videomae.`, `text_model.` ...);
    this lets one converter read the bare model and its task-head checkpoints alike.
    """
    candidates = list(candidates)
    for p in candidates:
      if p + marker in self._arrays:
        self.prefix = p
        return self
    near = [k for k in self._arrays if k.endswith(marker.split(".")[-1])][:5]
    raise CheckpointError(f"{self.what}: no key {marker!r} under any of the prefixes {candidates}; "
                          f"is this the right kind of checkpoint? (keys like it: {near})")

  def __getitem__(self, key: str) -> np.ndarray:
    full = self.prefix + key
    if full not in self._arrays:
      raise CheckpointError(f"{self.what}: checkpoint has no tensor {full!r}")
    self._used.add(full)
    return self._arrays[full]

  def at_root(self, key: str) -> np.ndarray:
    """The tensor `key` itself, ignoring the prefix (e.g. a head beside the prefixed backbone)."""
    if key not in self._arrays:
      raise CheckpointError(f"{self.what}: checkpoint has no tensor {key!r}")
    self._used.add(key)
    return self._arrays[key]

  def __contains__(self, key) -> bool:
    return (self.prefix + key) in self._arrays

  def __iter__(self):
    return iter(self._arrays)

  def __len__(self) -> int:
    return len(self._arrays)

  def unused(self, ignore: Iterable[str] = ()) -> list[str]:
    """Keys never read, except those matching one of the `ignore` regexes."""
    patterns = [re.compile(p) for p in ignore]
    return sorted(k for k in self._arrays
                  if k not in self._used and not any(p.search(k) for p in patterns))

  def check_all_used(self, ignore: Iterable[str] = ()) -> None:
    """Raises listing every tensor the converter did not use (a mapping bug or wrong kind)."""
    left = self.unused(ignore)
    if left:
      shown = ", ".join(left[:20]) + (f" ... ({len(left)} in all)" if len(left) > 20 else "")
      raise CheckpointError(f"{self.what}: checkpoint tensors not used by the conversion: {shown}")


def linear(w: np.ndarray) -> np.ndarray:
  """torch Linear weight (out, in) -> kernel (in, out)."""
  return np.asarray(w).T


def conv(w: np.ndarray) -> np.ndarray:
  """torch ConvNd weight (out, in/groups, *k) -> (*k, in/groups, out)."""
  w = np.asarray(w)
  return np.transpose(w, tuple(range(2, w.ndim)) + (1, 0))


def heads_in(w: np.ndarray, num_heads: int) -> np.ndarray:
  """torch Linear weight (heads * head_dim, in) -> Dense kernel (in, heads, head_dim)."""
  w = np.asarray(w)
  return w.T.reshape(w.shape[1], num_heads, w.shape[0] // num_heads)


def heads_bias(b: np.ndarray, num_heads: int) -> np.ndarray:
  """(heads * head_dim,) -> (heads, head_dim)."""
  b = np.asarray(b)
  return b.reshape(num_heads, b.shape[0] // num_heads)


def heads_out(w: np.ndarray, num_heads: int) -> np.ndarray:
  """torch Linear weight (out, heads * head_dim) -> Dense kernel (heads, head_dim, out)."""
  w = np.asarray(w)
  return w.T.reshape(num_heads, w.shape[1] // num_heads, w.shape[0])


def path_key(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def assign(abstract: nnx.Module, arrays: Mapping[str, np.ndarray], *, what: str) -> nnx.Module:
  """`abstract` (shapes only) with every variable set from `arrays[path_key(path)]`.

  Arrays are cast to each variable's dtype. Missing, unexpected and mis-shaped entries are all
  collected and reported in one error.
  """
  graphdef, state = nnx.split(abstract)
  flat = list(nnx.to_flat_state(state))
  targets = {path_key(p): v for p, v in flat}
  missing = sorted(set(targets) - set(arrays))
  unexpected = sorted(set(arrays) - set(targets))
  wrong = [f"{k}: checkpoint {tuple(np.shape(arrays[k]))} vs model {tuple(targets[k].shape)}"
           for k in sorted(set(targets) & set(arrays))
           if tuple(np.shape(arrays[k])) != tuple(targets[k].shape)]
  if missing or unexpected or wrong:
    parts = []
    if missing:
      parts.append(f"model variables with no checkpoint value: {missing}")
    if unexpected:
      parts.append(f"converted values with no model variable: {unexpected}")
    if wrong:
      parts.append(f"shape mismatches: {wrong}")
    raise CheckpointError(f"{what}: " + "; ".join(parts))
  for path, var in flat:
    value = np.asarray(arrays[path_key(path)])
    var.set_value(jnp.asarray(value, dtype=var.dtype))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def abstract_state_dict(module: nnx.Module) -> dict[str, jax.ShapeDtypeStruct]:
  """{path_key: ShapeDtypeStruct} of a module's variables (for messages and tests)."""
  _, state = nnx.split(module)
  return {path_key(p): jax.ShapeDtypeStruct(v.shape, v.dtype) for p, v in nnx.to_flat_state(state)}
