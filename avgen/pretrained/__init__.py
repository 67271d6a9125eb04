"""Pretrained components in Flax NNX, loaded from the original libraries' safetensors layouts.

  module = avgen.pretrained.load("clip_text", "openai/clip-vit-large-patch14")
  module = avgen.pretrained.load("wav2vec2", "/data/wav2vec2-large-robust", dtype=jnp.bfloat16)

`source` is a local directory as transformers / diffusers / bigvgan save it (config.json +
*.safetensors), a hub id 'owner/name[/subfolder][@revision]' (downloaded with huggingface_hub),
or a directory written by `python -m avgen.pretrained convert`. Pickle-only checkpoints are
refused. The first load converts and saves the converted state with orbax under `cache_dir`; a
later load of the same files restores it without converting.

Each kind lives in `avgen/pretrained/<kind>.py`, which exposes
  build(path, dtype) -> nnx.Module           the module from path's config files alone (it is
                                              called under nnx.eval_shape, so it allocates nothing)
  load_from_dir(path, dtype) -> nnx.Module   build + the converted weights
  DEFAULT_SOURCE: str                        the hub id `fetch --all` downloads
and optionally CACHE_VERSION (int, bump when the conversion changes) and HUB_PATTERNS (the
files to download, default hub.DEFAULT_PATTERNS).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avgen.pretrained import hub
from avgen.pretrained.safetensors_io import (
    CheckpointError, check_weights_dir, pickle_files, safetensors_files)

KINDS = ("clip_text", "clip_vision", "t5_encoder", "wav2vec2", "videomae", "sd_vae", "hifigan",
         "bigvgan")
MARKER = "avgen_pretrained.json"  # written last into a converted directory: it is complete
_STATE = "state"

_log = logging.getLogger(__name__)


def kind_module(kind: str) -> ModuleType:
  """The converter module of `kind`, checked for the functions the registry calls."""
  if kind not in KINDS:
    raise ValueError(f"pretrained kind {kind!r} is not one of {KINDS}")
  mod = importlib.import_module(f"avgen.pretrained.{kind}")
  for name in ("build", "load_from_dir"):
    if not callable(getattr(mod, name, None)):
      raise TypeError(f"avgen.pretrained.{kind} does not define {name}(path, dtype)")
  return mod


def load(kind: str, source: str | os.PathLike, *, dtype=jnp.float32,
         cache_dir: str | os.PathLike | None = None, cache: bool = True) -> nnx.Module:
  """The NNX module of `kind` with the weights of `source` (see the module docstring).

  dtype: parameter and compute dtype (norm statistics and softmax stay float32).
  cache_dir: converted-weights cache and hub downloads; default $AVGEN_PRETRAINED_CACHE or
    ~/.cache/avgen/pretrained. cache=False converts every time and writes nothing.
  """
  mod = kind_module(kind)
  dtype = jnp.dtype(dtype)
  root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else hub.default_cache_dir()
  path = _resolve(mod, kind, source, root, what=f"load({kind!r})")
  if (path / MARKER).is_file():
    return restore_converted(kind, path, dtype)
  check_weights_dir(path, what=f"load({kind!r}, {str(source)!r})")
  if not cache:
    return mod.load_from_dir(path, dtype)
  entry = root / kind / _cache_key(mod, kind, path, dtype)
  if (entry / MARKER).is_file():
    try:
      return restore_converted(kind, entry, dtype)
    except Exception as e:  # a damaged cache entry is rebuilt, not fatal
      _log.warning("pretrained cache entry %s unreadable (%s: %s); converting again", entry,
                   type(e).__name__, e)
      shutil.rmtree(entry, ignore_errors=True)
  module = mod.load_from_dir(path, dtype)
  if jax.process_count() > 1:
    # Orbax saves are collective across processes; hosts converting on their own must not enter
    # one. Multi-host jobs fill the cache beforehand with `python -m avgen.pretrained fetch`.
    _log.info("multi-process run: not writing the pretrained cache entry %s", entry)
    return module
  try:
    save_converted(module, kind, path, entry, source=str(source))
  except OSError as e:  # a read-only cache must not stop inference
    _log.warning("could not write pretrained cache %s: %s", entry, e)
  return module


def convert(kind: str, source: str | os.PathLike, out: str | os.PathLike, *, dtype=jnp.float32,
            cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Converts `source` once and writes a directory that `load(kind, out)` restores directly."""
  mod = kind_module(kind)
  root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else hub.default_cache_dir()
  path = _resolve(mod, kind, source, root, what=f"convert({kind!r})")
  out = pathlib.Path(out).expanduser()
  if out.exists() and any(out.iterdir()):
    raise FileExistsError(f"convert: output directory {out} exists and is not empty")
  module = mod.load_from_dir(path, jnp.dtype(dtype))
  save_converted(module, kind, path, out, source=str(source))
  return out


def save_converted(module: nnx.Module, kind: str, src: pathlib.Path, out: pathlib.Path, *,
                   source: str) -> None:
  """out/{state (orbax), config and tokenizer files copied from src, MARKER}."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  out.parent.mkdir(parents=True, exist_ok=True)
  # Built beside `out` and renamed into place, so a crash never leaves a half entry behind.
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  try:
    for f in src.iterdir():
      if f.is_file() and f.suffix in (".json", ".txt", ".model") and f.name != MARKER:
        shutil.copy2(f, tmp / f.name)
    state = nnx.to_pure_dict(nnx.state(module))
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save((tmp / _STATE).absolute(), state)
      ckptr.wait_until_finished()
    dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(state)})
    meta = {"kind": kind, "source": source, "dtypes": dtypes,
            "num_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))}
    (tmp / MARKER).write_text(json.dumps(meta, indent=1))
    if (out / MARKER).is_file():
      return  # another process finished the same entry first
    if out.exists():
      shutil.rmtree(out, ignore_errors=True)  # an empty dir, or an entry without its marker
    try:
      tmp.rename(out)
    except OSError:
      if not (out / MARKER).is_file():
        raise
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)


def restore_converted(kind: str, path: pathlib.Path, dtype) -> nnx.Module:
  """The module saved by `save_converted` in `path`, cast to `dtype` if stored otherwise."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  meta = json.loads((path / MARKER).read_text())
  if meta.get("kind") != kind:
    raise CheckpointError(f"load({kind!r}): {path} holds a converted {meta.get('kind')!r}, "
                          f"not {kind!r}")
  mod = kind_module(kind)
  abstract = nnx.eval_shape(lambda: mod.build(path, jnp.dtype(dtype)))
  graphdef, abs_state = nnx.split(abstract)
  wanted = nnx.to_pure_dict(abs_state)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    stored = ckptr.metadata((path / _STATE).absolute())
    stored = getattr(stored, "item_metadata", stored)
    stored = _flat(getattr(stored, "tree", stored))
    want = _flat(wanted)
    shapes = lambda d: {k: tuple(v.shape) for k, v in d.items()}
    if shapes(want) != shapes(stored):
      diff = sorted(k for k in set(want) | set(stored)
                    if k not in want or k not in stored or want[k].shape != stored[k].shape)
      raise CheckpointError(f"load({kind!r}): converted state in {path} does not fit the module "
                            f"its config builds; differing entries: {diff[:20]}")
    # Orbax keys list indices as strings; the target takes the module's own tree structure.
    paths = [_key(p) for p, _ in jax.tree_util.tree_flatten_with_path(wanted)[0]]
    target = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(wanted),
        [jax.ShapeDtypeStruct(stored[k].shape, stored[k].dtype, sharding=device) for k in paths])
    restored = ckptr.restore((path / _STATE).absolute(), target)
  restored = jax.tree.map(lambda x, w: jnp.asarray(x, w.dtype), restored, wanted)
  nnx.replace_by_pure_dict(abs_state, restored)
  return nnx.merge(graphdef, abs_state)


def _key(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _flat(tree) -> dict:
  return {_key(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _resolve(mod: ModuleType, kind: str, source, root: pathlib.Path, *, what: str) -> pathlib.Path:
  """The local safetensors directory of `source` (downloaded, or converted from a pickle).

  A kind whose published weights exist only as a torch pickle (bigvgan) defines
  `safetensors_from_pickle(src, out)`, which reads it with torch's weights-only unpickler (no
  code runs); its output is kept under root/<kind>/from_pickle/. Other kinds refuse pickles.
  """
  converts = callable(getattr(mod, "safetensors_from_pickle", None))
  path = hub.resolve(source, what=what, cache_dir=root,
                     patterns=getattr(mod, "HUB_PATTERNS", hub.DEFAULT_PATTERNS),
                     weights_only_pickle=converts)
  if not converts or (path / MARKER).is_file() or safetensors_files(path) or not pickle_files(path):
    return path
  h = hashlib.sha256()
  for f in sorted(pickle_files(path)) + [path / "config.json"]:
    if f.is_file():
      st = f.stat()
      h.update(json.dumps([f.name, st.st_size, st.st_mtime_ns]).encode())
  out = root / kind / "from_pickle" / h.hexdigest()[:20]
  if not (out.is_dir() and safetensors_files(out)):
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".from_pickle.", dir=_mkdirs(out.parent)))
    try:
      mod.safetensors_from_pickle(path, tmp)
      shutil.rmtree(out, ignore_errors=True)
      os.replace(tmp, out)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
    _log.info("%s: converted the pickle in %s to safetensors in %s", what, path, out)
  return out


def _mkdirs(path: pathlib.Path) -> pathlib.Path:
  path.mkdir(parents=True, exist_ok=True)
  return path


def _cache_key(mod: ModuleType, kind: str, path: pathlib.Path, dtype) -> str:
  """Changes when the files, the dtype or the conversion (CACHE_VERSION) change."""
  h = hashlib.sha256()
  h.update(json.dumps([kind, str(dtype), getattr(mod, "CACHE_VERSION", 1)]).encode())
  for f in sorted(path.iterdir()):
    if f.is_file() and f.suffix in (".json", ".safetensors"):
      st = f.stat()
      h.update(json.dumps([f.name, st.st_size, st.st_mtime_ns]).encode())
      if f.suffix == ".json":
        h.update(f.read_bytes())
  return h.hexdigest()[:20]


def default_sources() -> dict[str, str]:
  """{kind: DEFAULT_SOURCE} of every kind whose module is importable."""
  out = {}
  for kind in KINDS:
    try:
      out[kind] = kind_module(kind).DEFAULT_SOURCE
    except (ImportError, AttributeError, TypeError) as e:
      _log.warning("pretrained kind %s unavailable: %s", kind, e)
  return out


__all__ = ["KINDS", "CheckpointError", "convert", "default_sources", "kind_module", "load"]
