"""Paths of the ingestion's inputs and outputs: local paths, or fsspec URLs (gs://, s3://, ...).

A local path (no `scheme://`; `file://` URLs are turned into local paths) goes through `os`, as
before: renames are atomic and appends are flushed to disk. Anything else goes through fsspec
(`gs://` needs gcsfs, `s3://` s3fs: the `gcs` / `s3` extras; `memory://` stands in for a bucket
in tests, and lives in one process only).

Object stores have no rename and no append:
- Whole files are written under a hidden temporary name (`.NAME.<random>.tmp`) and then moved
  to NAME (`put_atomic`, `write_bytes`). On GCS and S3 an upload becomes visible only once it
  is complete (a resumable or multipart upload is invisible until its last part is committed),
  and a move is a server-side copy then a delete: the copy also creates NAME whole or not at
  all. So a reader never finds a partial NAME; a kill between copy and delete leaves the
  temporary, which readers never match (`*.array_record`, `manifest.jsonl`) and the next run
  deletes. On other fsspec file systems (SFTP, local `file://`) the move is a rename. The random
  part keeps two attempts at the same file (a Beam runner retrying a bundle) apart.
- The manifest is appended to as part objects instead (see `manifest`).
Listings are refreshed before use: gcsfs and s3fs cache them per process, and another worker
may have written since.
"""

from __future__ import annotations

import os
import re
import uuid
from typing import Any

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def is_url(path: str) -> bool:
  """Whether `path` is an fsspec URL (`scheme://...`) rather than a local path."""
  return bool(_SCHEME.match(path))


def normalize(path: str) -> str:
  """`file://` URLs become local paths (handled by `os`, with its atomic rename)."""
  if path.startswith("file://"):
    return path[len("file://"):] or "/"
  return path


def join(base: str, *parts: str) -> str:
  if is_url(base):
    return "/".join([base.rstrip("/"), *parts])
  return os.path.join(base, *parts)


def basename(path: str) -> str:
  return path.rstrip("/").rsplit("/", 1)[-1] if is_url(path) else os.path.basename(path)


def protocol(path: str) -> str | None:
  match = _SCHEME.match(path)
  return match.group(1) if match else None


def filesystem(url: str) -> tuple[Any, str]:
  """(fsspec file system, path within it) of a URL."""
  import fsspec.core  # pylint: disable=g-import-not-at-top  (only URLs need it)
  try:
    return fsspec.core.url_to_fs(url)
  except (ImportError, ValueError) as e:
    raise ValueError(f"{url!r}: no file system for this URL ({e}); gs:// needs "
                     "`pip install 'avgen[gcs]'`, s3:// `pip install 'avgen[s3]'`") from None


def exists(path: str) -> bool:
  if not is_url(path):
    return os.path.exists(path)
  fs, p = filesystem(path)
  return fs.exists(p)


def isdir(path: str) -> bool:
  if not is_url(path):
    return os.path.isdir(path)
  fs, p = filesystem(path)
  return fs.isdir(p)


def makedirs(path: str) -> None:
  """Creates a directory (object stores have none: there it is a no-op for most backends)."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)
    return
  fs, p = filesystem(path)
  fs.makedirs(p, exist_ok=True)


def listdir(path: str) -> list[str]:
  """Names in a directory (files and subdirectories), sorted; [] when it does not exist."""
  if not is_url(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []
  fs, p = filesystem(path)
  p = p.rstrip("/")
  fs.invalidate_cache(p)
  try:
    entries = fs.ls(p, detail=False)
  except FileNotFoundError:
    return []
  names = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries}
  names.discard(p.rsplit("/", 1)[-1])  # some stores list a directory placeholder object
  return sorted(n for n in names if n)


def remove(paths: list[str]) -> None:
  """Deletes files (one batched request per file system where the backend batches)."""
  local = [p for p in paths if not is_url(p)]
  for p in local:
    os.remove(p)
  remote = [p for p in paths if is_url(p)]
  if remote:
    fs, _ = filesystem(remote[0])
    fs.rm([filesystem(p)[1] for p in remote])


def read_bytes(path: str) -> bytes:
  if not is_url(path):
    with open(path, "rb") as f:
      return f.read()
  fs, p = filesystem(path)
  return fs.cat_file(p)


def write_bytes(path: str, data: bytes) -> None:
  """Writes a whole file atomically (a reader sees the old file or the new one)."""
  if not is_url(path):
    directory, base = os.path.split(path)
    tmp = os.path.join(directory, f".{base}.tmp")
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    return
  fs, p = filesystem(path)
  tmp = _temporary_name(p)
  fs.pipe_file(tmp, data)
  _move(fs, tmp, p)


def put_atomic(local_path: str, url: str) -> None:
  """Uploads a local file to `url`, never visible there half-written (see the module doc)."""
  fs, p = filesystem(url)
  tmp = _temporary_name(p)
  try:
    fs.put_file(local_path, tmp)
    _move(fs, tmp, p)
  except BaseException:
    try:
      if fs.exists(tmp):
        fs.rm_file(tmp)
    except Exception:  # pylint: disable=broad-except  (the next run deletes it)
      pass
    raise


def download(url: str, local_path: str) -> None:
  """Copies a remote file to a local path; FileNotFoundError when it does not exist."""
  fs, p = filesystem(url)
  fs.get_file(p, local_path)


def is_temporary(name: str) -> bool:
  """A hidden temporary left by an interrupted write (ours, or `schema.write_shard_file`'s)."""
  return name.startswith(".") and name.endswith(".tmp")


def find_files(url: str) -> list[str]:
  """Every file under a URL, as paths relative to it ('/'-separated), sorted."""
  fs, root = filesystem(url)
  root = root.rstrip("/")
  fs.invalidate_cache(root)
  if not fs.isdir(root):
    raise ValueError(f"--input-dir {url!r} is not a directory (no object under that prefix)")
  found = []
  for p in fs.find(root, withdirs=False):
    rel = p[len(root):].lstrip("/")
    if rel and not p.endswith("/"):  # "dir/" placeholder objects are no inputs
      found.append(rel)
  return sorted(found)


def _temporary_name(p: str) -> str:
  directory, _, base = p.rpartition("/")
  return f"{directory}/.{base}.{uuid.uuid4().hex[:12]}.tmp"


def _move(fs, tmp: str, p: str) -> None:
  fs.mv(tmp, p)
  fs.invalidate_cache(p.rpartition("/")[0])
