"""Ingestion I/O: buckets (fsspec memory:// standing in for gs:// and s3://) and time limits.

memory:// lives in one process: the local runner runs with num_workers=0 and Beam with its
in-process DirectRunner (the default running mode).
"""

import os
import shutil
import tempfile
import time
import uuid

import fsspec
import pytest

import media_factory as mf
from data_pipeline import ingest
from data_pipeline import manifest
from data_pipeline import preprocess
from data_pipeline import schema
from data_pipeline import sharding
from data_pipeline import storage
from data_pipeline.preprocess_config import PreprocessConfig

SETTINGS = {"num_frames": 8, "fps": 8.0, "height": 32, "width": 32, "sample_rate": 16000,
            "min_resolution": 40, "max_clips_per_input": 2}
CONFIG = PreprocessConfig(**SETTINGS)
NAMES = ["good.mp4", "blurry.mp4", "sub/dir/nested.mp4", "notes.txt", "clip é 音.mp4"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A local input dir: 3 accepted videos (one with a caption sidecar), 2 rejected inputs."""
  d = tmp_path_factory.mktemp("in")
  good = mf.make_video(d / "good.mp4")
  (d / "good.txt").write_text("a moving pattern\n")  # good.mp4's caption: not an input
  mf.make_video(d / "blurry.mp4", blur=6)
  os.makedirs(d / "sub" / "dir")
  shutil.copy(good, d / "sub" / "dir" / "nested.mp4")
  shutil.copy(good, d / "clip é 音.mp4")
  (d / "notes.txt").write_text("no video here\n")
  return str(d)


@pytest.fixture
def bucket():
  """A fresh memory:// 'bucket' URL, emptied afterwards."""
  url = f"memory://bucket-{uuid.uuid4().hex[:8]}"
  yield url
  fs, root = storage.filesystem(url)
  if fs.exists(root):
    fs.rm(root, recursive=True)


@pytest.fixture
def own_tempdir(tmp_path, monkeypatch):
  """Local temporaries (input copies, clip files, shards in the making) go here, to be counted."""
  d = tmp_path / "tmp"
  d.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(d))
  return d


def _ours(directory):
  return sorted(n for n in os.listdir(directory) if n.startswith("avgen_"))


def _upload(local_dir, url):
  fs, root = storage.filesystem(url)
  for base, _, files in os.walk(local_dir):
    for name in files:
      rel = os.path.relpath(os.path.join(base, name), local_dir).replace(os.sep, "/")
      fs.put_file(os.path.join(base, name), f"{root}/{rel}")


def _files(out):
  """{relative path: bytes} of every file under a local dir or URL."""
  if storage.is_url(out):
    fs, root = storage.filesystem(out)
    return {p[len(root) + 1:]: fs.cat_file(p) for p in fs.find(root)}
  found = {}
  for base, _, files in os.walk(out):
    for name in files:
      path = os.path.join(base, name)
      with open(path, "rb") as f:
        found[os.path.relpath(path, out).replace(os.sep, "/")] = f.read()
  return found


def test_bucket_runs_write_what_local_runs_write(corpus, bucket, own_tempdir, tmp_path):
  from data_pipeline import beam_pipeline  # pylint: disable=g-import-not-at-top
  in_url = f"{bucket}/in"
  _upload(corpus, in_url)
  local_out = str(tmp_path / "out")
  local = preprocess.run_local(corpus, local_out, CONFIG, samples_per_shard=3, num_workers=0,
                               progress=False)
  assert local["inputs"] == local["accepted"] + local["rejected"] == len(NAMES)
  assert local["accepted"] == 3 and local["shards"]["num_shards"] == 2
  assert [rel for _, rel in preprocess.discover_inputs(in_url)] == sorted(NAMES)
  runs = {
      "local runner": preprocess.run_local(in_url, f"{bucket}/out", CONFIG, samples_per_shard=3,
                                           num_workers=0, progress=False),
      "beam": beam_pipeline.run(in_url, f"{bucket}/beam", CONFIG, samples_per_shard=3,
                                runner="DirectRunner"),
  }
  expected = _files(local_out)
  # Messages name where the input is: ffmpeg's 'file:/.../in/notes.txt' is the URL there.
  expected[manifest.MANIFEST_FILE] = expected[manifest.MANIFEST_FILE].replace(
      f"file:{corpus}".encode(), in_url.encode())
  assert in_url.encode() in expected[manifest.MANIFEST_FILE]  # notes.txt's not_media message
  for name, stats in runs.items():
    assert stats == local, name
    out = f"{bucket}/out" if name == "local runner" else f"{bucket}/beam"
    # Byte for byte: manifest, stats, settings, clip files, shards and their index; no
    # temporaries or manifest parts are left.
    assert _files(out) == expected, name
  records = manifest.read_manifest(f"{bucket}/out")
  assert records["good.mp4"]["caption"]["source"] == "sidecar_txt"
  assert _ours(own_tempdir) == []  # every local copy was deleted


def test_resume_on_a_bucket_redoes_only_unfinished_inputs(corpus, bucket, own_tempdir,
                                                          monkeypatch):
  in_url, out = f"{bucket}/in", f"{bucket}/out"
  _upload(corpus, in_url)
  calls = []
  real = ingest.process_input

  class Interrupted(BaseException):
    pass

  def interrupted_on_the_third(path, rel, config, output_dir):
    calls.append(rel)
    if len(calls) == 3:
      raise Interrupted
    return real(path, rel, config, output_dir)

  monkeypatch.setattr(ingest, "process_input", interrupted_on_the_third)
  with pytest.raises(Interrupted):
    preprocess.run_local(in_url, out, CONFIG, samples_per_shard=3, num_workers=0,
                         progress=False)
  done = manifest.read_manifest(out)  # from the part object the interrupted run left
  assert sorted(done) == sorted(calls[:2])
  assert storage.listdir(f"{out}/{manifest.PARTS_DIR}") != []
  fs, root = storage.filesystem(out)
  # A kill between an upload's copy and its delete leaves temporaries: the next run drops them.
  fs.pipe_file(f"{root}/clips/.x.array_record.0123.tmp", b"partial")
  fs.pipe_file(f"{root}/.stats.json.0123.tmp", b"partial")

  # The next run fails while uploading its first shard: no shard appears, whole or partial.
  real_move = storage._move  # pylint: disable=protected-access

  def failing_move(fs_, tmp, path):
    if "/shards/data-" in path:
      raise OSError("connection reset")
    real_move(fs_, tmp, path)

  monkeypatch.setattr(storage, "_move", failing_move)
  calls.clear()
  monkeypatch.setattr(ingest, "process_input", lambda *a: (calls.append(a[1]), real(*a))[1])
  with pytest.raises(OSError, match="connection reset"):
    preprocess.run_local(in_url, out, CONFIG, samples_per_shard=3, num_workers=0,
                         progress=False)
  assert sorted(calls) == sorted(set(NAMES) - set(done))
  assert storage.listdir(f"{out}/{sharding.SHARD_DIR}") == [sharding.INDEX_FILE]
  assert not [n for n in storage.listdir(f"{out}/clips") if storage.is_temporary(n)]
  assert not [n for n in storage.listdir(out) if storage.is_temporary(n)]
  monkeypatch.setattr(storage, "_move", real_move)

  calls.clear()
  stats = preprocess.run_local(in_url, out, CONFIG, samples_per_shard=3, num_workers=0,
                               progress=False)
  assert calls == []  # every input was done
  assert stats["inputs"] == stats["accepted"] + stats["rejected"] == len(NAMES)
  clean = f"{bucket}/clean"
  assert stats == preprocess.run_local(in_url, clean, CONFIG, samples_per_shard=3,
                                       num_workers=0, progress=False)
  assert _files(out) == _files(clean)  # no parts, no temporaries, the same shards
  assert _ours(own_tempdir) == []


def test_put_atomic_leaves_nothing_at_the_name_when_the_upload_fails(tmp_path, bucket,
                                                                     monkeypatch):
  local = tmp_path / "f.bin"
  local.write_bytes(b"x" * 1000)
  url = f"{bucket}/d/f.bin"
  fs = fsspec.filesystem("memory")
  real_put = type(fs).put_file

  def torn_put(self, lpath, rpath, **kwargs):
    self.pipe_file(rpath, b"x" * 10)  # the first bytes made it
    raise OSError("connection reset")

  monkeypatch.setattr(type(fs), "put_file", torn_put)
  with pytest.raises(OSError):
    storage.put_atomic(str(local), url)
  assert storage.listdir(f"{bucket}/d") == []
  monkeypatch.setattr(type(fs), "put_file", real_put)
  storage.put_atomic(str(local), url)
  assert storage.listdir(f"{bucket}/d") == ["f.bin"]
  assert storage.read_bytes(url) == local.read_bytes()


def _ffmpeg_processes_naming(text):
  found = []
  for pid in os.listdir("/proc"):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = f.read().decode(errors="replace")
    except OSError:
      continue
    if "ffmpeg" in cmdline and text in cmdline:
      found.append(pid)
  return found


def test_inputs_that_hang_ffmpeg_are_killed_and_rejected_at_the_limit(corpus, tmp_path,
                                                                     monkeypatch):
  # A FIFO nobody writes to, and two playlists (ffconcat, as a web video could be) naming it:
  # ffmpeg blocks opening it, in the header probe or after decoding the first file. A FIFO as
  # an input of its own never reaches ffmpeg: the regular-file check rejects it first.
  in_dir = tmp_path / "in"
  in_dir.mkdir()
  shutil.copy(os.path.join(corpus, "good.mp4"), in_dir / "good.mp4")
  shutil.copy(os.path.join(corpus, "blurry.mp4"), in_dir / "blurry.mp4")
  os.mkdir(in_dir / "stalled")
  os.mkfifo(in_dir / "stalled" / "pipe.mp4")
  (in_dir / "probe_hangs.mp4").write_text("ffconcat version 1.0\nfile stalled/pipe.mp4\n")
  (in_dir / "decode_hangs.mp4").write_text(
      "ffconcat version 1.0\nfile good.mp4\nfile stalled/pipe.mp4\n")
  config = PreprocessConfig(**SETTINGS, probe_timeout_s=2, decode_timeout_s=2,
                            decode_timeout_per_second=0.5)
  assert config.decode_timeout(2.0) == 3.0 and config.decode_timeout(60.0) == 3.0  # 2 clips
  assert config.decode_timeout(None) == 2.0
  seconds = {}
  real = ingest.process_input

  def timed(path, rel, cfg, output_dir):
    start = time.monotonic()
    try:
      return real(path, rel, cfg, output_dir)
    finally:
      seconds[rel] = time.monotonic() - start

  monkeypatch.setattr(ingest, "process_input", timed)
  out = str(tmp_path / "out")
  stats = preprocess.run_local(str(in_dir), out, config, samples_per_shard=3, num_workers=0,
                               progress=False)
  records = manifest.read_manifest(out)
  got = {path: (r["status"], r["reason"] and r["reason"]["rule"]) for path, r in records.items()}
  assert got == {"good.mp4": ("accepted", None), "blurry.mp4": ("rejected", "blur"),
                 "stalled/pipe.mp4": ("rejected", "not_regular_file"),
                 "probe_hangs.mp4": ("rejected", "timeout"),
                 "decode_hangs.mp4": ("rejected", "timeout")}
  assert stats["inputs"] == stats["accepted"] + stats["rejected"] == 5
  assert stats["rejected_by_rule"]["timeout"] == 2 and stats["shards"]["num_records"] == 2
  probe, decode = records["probe_hangs.mp4"]["reason"], records["decode_hangs.mp4"]["reason"]
  assert probe["message"].startswith("timeout: ffmpeg header probe exceeded 2 s")
  assert probe["threshold"] == 2
  # The playlist's header has no duration: the base limit alone.
  assert decode["message"].startswith("timeout: ffmpeg decode exceeded 2 s")
  assert decode["threshold"] == 2.0 and records["decode_hangs.mp4"]["clip_file"] is None
  for rel in ("probe_hangs.mp4", "decode_hangs.mp4"):
    assert 2.0 <= seconds[rel] < 5.0, (rel, seconds[rel])  # waited the limit, and no more
  assert seconds["stalled/pipe.mp4"] < 1.0
  assert _ffmpeg_processes_naming(str(in_dir)) == []  # every ffmpeg was killed and reaped
  assert sorted(os.listdir(os.path.join(out, ingest.CLIP_DIR))) == [
      os.path.basename(ingest.clip_file_name("good.mp4"))]
  assert schema.read_records(os.path.join(out, sharding.SHARD_DIR,
                                          sharding.shard_name(0, 1))) != []
