"""Real-video ingestion end to end, on media made by ffmpeg (tests/media_factory.py).

Target format: the demo config's (32x32, 8 frames at 8 fps = 1 s clips, 16 kHz), so the grain
loader reads the shards with `configs.base.get_base_config("demo")`.
"""

import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import media_factory as mf
from avgen.sample import media
from data_pipeline import clips as clips_lib
from data_pipeline import ingest
from data_pipeline import manifest
from data_pipeline import preprocess
from data_pipeline import schema
from data_pipeline import sharding
from data_pipeline.preprocess_config import PreprocessConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {"num_frames": 8, "fps": 8.0, "height": 32, "width": 32, "sample_rate": 16000,
            "min_resolution": 40, "max_clips_per_input": 2}
CONFIG = PreprocessConfig(**SETTINGS)
NON_UTF8 = os.fsdecode(b"latin1-\xe9.mp4")
UNICODE = "clip é 音 with spaces.mp4"
INJECTION = "x; touch INJECTED $(touch INJECTED2).mp4"

# name -> (status, rule). Accepted inputs are 2 s long: two 1 s clips.
GOOD = {
    "good.mp4": ("accepted", None),
    UNICODE: ("accepted", None),
    "-starts-with-dash.mp4": ("accepted", None),
    INJECTION: ("accepted", None),
    NON_UTF8: ("accepted", None),
    "surround_48k.mp4": ("accepted", None),
    "vfr.mp4": ("accepted", None),
    "long.mp4": ("accepted", None),
    "sub/dir/nested.mp4": ("accepted", None),
    "short_audio.mp4": ("accepted", None),  # 6 s of video, 1.5 s of sound: one clip
}
FILTERED = {
    "blurry.mp4": ("rejected", "blur"),
    "cuts.mp4": ("rejected", "scene_cuts"),
    "noisy.mp4": ("rejected", "snr_db"),
    "sparse.mp4": ("rejected", "silence_ratio"),
    "clipped.mp4": ("rejected", "clipping_ratio"),
    "tiny.mp4": ("rejected", "min_resolution"),
    "low_fps.mp4": ("rejected", "min_fps"),
    "short.mp4": ("rejected", "too_short"),
}
BROKEN = {
    "no_audio.mp4": ("rejected", "no_audio_stream"),
    "audio_only.m4a": ("rejected", "no_video_stream"),
    "image.mp4": ("rejected", "no_audio_stream"),  # a PNG: a one-frame video, no sound
    "notes.txt": ("rejected", "not_media"),  # a text file that is no video's sidecar
    "empty.mp4": ("rejected", "empty_file"),
    "truncated_moov_at_end.mp4": ("rejected", "not_media"),
    "truncated.mp4": ("rejected", "decode_errors"),
    "corrupt.mp4": ("rejected", "decode_errors"),
    "unreadable.mp4": ("rejected", "unreadable"),
    "broken_link.mp4": ("rejected", "missing"),
    "fifo.mp4": ("rejected", "not_regular_file"),
    "dir_link": ("rejected", "not_regular_file"),
}


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
  """Every medium once; corpora copy from here."""
  d = tmp_path_factory.mktemp("media")
  make = lambda name, **kw: mf.make_video(d / name, **kw)
  make("good.mp4")
  make("titled.mp4", metadata={"title": "A test pattern with beeps"})
  make("surround_48k.mp4", channels=6, sample_rate=48000)
  make("vfr.mp4", fps=60, vfr=True)
  make("long.mp4", seconds=20)
  make("short_audio.mp4", seconds=6, audio_seconds=1.5)
  make("blurry.mp4", blur=6)
  make("cuts.mp4", cut_every=0.25)
  make("noisy.mp4", noise=0.3)
  make("sparse.mp4", audio="sparse")
  make("clipped.mp4", audio="tone", clip_gain=8)
  make("tiny.mp4", size=(16, 16))
  make("low_fps.mp4", fps=12)
  make("short.mp4", seconds=0.5)
  make("no_audio.mp4", audio=None)
  make("audio_only.m4a", video=False, container="m4a")
  make("four_seconds.mp4", seconds=4)
  mf.make_image(d / "image.mp4")
  data = (d / "four_seconds.mp4").read_bytes()
  (d / "truncated.mp4").write_bytes(data[:len(data) * 6 // 10])  # moov first: data cut short
  corrupt = bytearray(data)
  rng = np.random.default_rng(0)
  for i in rng.integers(len(corrupt) // 10, len(corrupt), 200):
    corrupt[i] = rng.integers(256)
  (d / "corrupt.mp4").write_bytes(bytes(corrupt))
  # Remuxed without +faststart: the index (moov) goes last, and a cut file loses it.
  mf.ffmpeg(["-i", str(d / "four_seconds.mp4"), "-c", "copy", "-f", "mp4",
             "file:" + str(d / "moov_at_end.mp4")])
  data = (d / "moov_at_end.mp4").read_bytes()
  (d / "truncated_moov_at_end.mp4").write_bytes(data[:len(data) * 6 // 10])
  return d


def _build_corpus(root, media_dir, names):
  os.makedirs(root, exist_ok=True)
  sources = {UNICODE: "titled.mp4"}
  for name in names:
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    source = sources.get(name, name)
    if os.path.exists(media_dir / source):
      shutil.copy(media_dir / source, path)
    elif name in (INJECTION, NON_UTF8, "-starts-with-dash.mp4", "sub/dir/nested.mp4",
                  "unreadable.mp4"):
      shutil.copy(media_dir / "good.mp4", path)
    elif name == "notes.txt":
      with open(path, "w") as f:
        f.write("just some notes, no video\n")
    elif name == "empty.mp4":
      open(path, "wb").close()
    elif name == "broken_link.mp4":
      os.symlink(os.path.join(root, "no such file.mp4"), path)
    elif name == "fifo.mp4":
      os.mkfifo(path)
    elif name == "dir_link":
      os.symlink(os.path.join(root, "sub"), path)
    else:
      raise AssertionError(f"no recipe for {name!r}")
  if "good.mp4" in names:
    with open(os.path.join(root, "good.txt"), "w") as f:
      f.write("a sharp moving pattern\nwith beeps\n")  # its caption sidecar: not an input
  if "unreadable.mp4" in names:
    os.chmod(os.path.join(root, "unreadable.mp4"), 0)
  return root


def _without_dac_override():
  """Command prefix under which root, too, gets EACCES on a mode-000 file."""
  if os.geteuid() != 0:
    return []
  setpriv = shutil.which("setpriv")
  assert setpriv, "running as root: setpriv (util-linux) is needed to test unreadable files"
  return [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--"]


@pytest.fixture(scope="module")
def cli_run(media_dir, tmp_path_factory):
  """The CLI (mode all, 2 workers) on the whole corpus: returns (input dir, output dir, stats)."""
  expected = {**GOOD, **FILTERED, **BROKEN}
  root = str(tmp_path_factory.mktemp("corpus"))
  work_dir = str(tmp_path_factory.mktemp("cwd"))
  in_dir = _build_corpus(os.path.join(root, "in"), media_dir, list(expected))
  out_dir = os.path.join(root, "out")
  settings = os.path.join(root, "settings.json")
  with open(settings, "w") as f:
    json.dump(SETTINGS, f)
  cmd = [*_without_dac_override(), sys.executable, "-m", "data_pipeline.preprocess",
         "--input-dir", in_dir, "--output-dir", out_dir, "--config", settings, "--mode", "all",
         "--num-workers", "2", "--samples-per-shard", "3", "--no-progress"]
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run(cmd, cwd=work_dir, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return in_dir, out_dir, json.loads(proc.stdout), work_dir


def test_every_input_is_accounted_for_with_its_rule(cli_run):
  in_dir, out_dir, stats, work_dir = cli_run
  expected = {**GOOD, **FILTERED, **BROKEN}
  records = manifest.read_manifest(out_dir)
  lines = open(os.path.join(out_dir, manifest.MANIFEST_FILE), "rb").read().splitlines()
  assert len(lines) == len(expected) and set(records) == set(expected)
  got = {path: (r["status"], r["reason"] and r["reason"]["rule"]) for path, r in records.items()}
  assert got == expected
  assert stats["inputs"] == stats["accepted"] + stats["rejected"] == len(expected)
  assert stats["accepted"] == len(GOOD)
  assert stats == manifest.read_stats(out_dir)
  for path, r in records.items():
    if r["status"] == "rejected":
      assert r["reason"]["message"], path
  # A filter rejects its own defect and nothing else: every clip failed that rule only.
  for path, (_, rule) in FILTERED.items():
    if records[path]["clips_total"]:
      assert records[path]["clips_failed"] == {rule: records[path]["clips_total"]}, path
      assert records[path]["reason"]["value"] == pytest.approx(
          np.median([c["scores"][rule] for c in records[path]["clip_scores"]]), abs=1e-4)
  for path in GOOD:
    clips = 1 if path == "short_audio.mp4" else 2
    assert records[path]["clips"] == records[path]["clips_total"] == clips, path
    assert records[path]["clips_failed"] == {}
  assert records["long.mp4"]["stopped_early"] and records["long.mp4"]["video_seconds"] == 2.0
  assert records["short_audio.mp4"]["stopped_early"]  # the silent rest is not decoded
  assert records["short_audio.mp4"]["audio_seconds"] == 1.5
  assert "partial file" in " ".join(records["truncated.mp4"]["decode_errors"]["first"])
  assert "moov atom not found" in records["truncated_moov_at_end.mp4"]["reason"]["message"]
  assert "Permission denied" in records["unreadable.mp4"]["reason"]["message"]
  # File names reach ffmpeg as single arguments: nothing was run.
  for directory in (in_dir, os.path.dirname(in_dir), work_dir, REPO):
    assert not glob.glob(os.path.join(directory, "INJECTED*")), directory


def test_shards_hold_the_accepted_clips_in_the_target_format(cli_run):
  _, out_dir, stats, _ = cli_run
  shard_paths = sorted(glob.glob(os.path.join(out_dir, sharding.SHARD_DIR, "*.array_record")))
  sizes = [len(schema.read_records(p)) for p in shard_paths]
  clips = 2 * len(GOOD) - 1  # short_audio.mp4 has one clip
  assert sizes == [3] * (clips // 3) + ([clips % 3] if clips % 3 else [])
  assert stats["shards"]["num_records"] == stats["clips_kept"] == clips
  examples = [schema.decode_example(r) for p in shard_paths for r in schema.read_records(p)]
  sources = [(e["meta"]["source"], e["meta"]["start"]) for e in examples]
  assert sources == sorted(sources, key=lambda s: (s[0].encode("utf-8", "surrogateescape"), s[1]))
  for e in examples:
    assert e["video"].shape == (8, 32, 32, 3) and e["video"].dtype == np.uint8
    assert e["audio"].shape == (16000,) and e["audio"].dtype == np.float32
    assert e["fps"] == 8.0 and e["sample_rate"] == 16000
    assert set(e["meta"]["scores"]) == {"blur", "scene_cuts", "snr_db", "silence_ratio",
                                        "clipping_ratio"}
  by_source = {e["meta"]["source"]: e for e in examples}
  assert by_source["good.mp4"]["caption"] == "a sharp moving pattern with beeps"
  assert by_source["good.mp4"]["meta"]["caption_source"] == "sidecar_txt"
  assert by_source[UNICODE]["caption"] == "A test pattern with beeps"
  assert by_source["surround_48k.mp4"]["caption"] == ""
  assert by_source["surround_48k.mp4"]["meta"]["caption_missing"] is True
  assert by_source["surround_48k.mp4"]["meta"]["source_channels"] == 6
  assert "latin1-\\xe9.mp4" in by_source  # a non-UTF-8 name, escaped inside the record
  # Nothing half-written is left where a reader looks.
  leftovers = [p for p in glob.glob(os.path.join(out_dir, "**", ".*"), recursive=True)]
  assert leftovers == []


def test_loader_reads_the_shards(cli_run):
  from configs.base import get_base_config  # pylint: disable=g-import-not-at-top
  from data_pipeline import loader  # pylint: disable=g-import-not-at-top
  _, out_dir, stats, _ = cli_run
  config = get_base_config("demo")
  config.data.batch_size = 2
  config.data.prefetch = 0
  it = loader.make_loader(config, os.path.join(out_dir, sharding.SHARD_DIR), num_epochs=1)
  batches = list(it)
  assert len(batches) == stats["clips_kept"] // 2
  assert batches[0]["video"].shape == (2, 8, 32, 32, 3)
  assert batches[0]["audio"].shape[:2] == (2, 64)  # 1 s at hop 250
  assert sum(int(b["skipped_records"].sum()) for b in batches) == 0


def test_tfds_data_source_reads_the_shards(cli_run, tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from data_pipeline.tfds_builder import AvgenClips  # pylint: disable=g-import-not-at-top
  _, out_dir, stats, _ = cli_run
  shard_dir = os.path.join(out_dir, sharding.SHARD_DIR)
  AvgenClips(shards=shard_dir, data_dir=str(tmp_path)).download_and_prepare()
  source = tfds.data_source("avgen_clips", data_dir=str(tmp_path), split="train")
  assert len(source) == stats["clips_kept"]
  ours = {}
  for path in glob.glob(os.path.join(shard_dir, "*.array_record")):
    for record in schema.read_records(path):
      e = schema.decode_example(record)
      ours[(e["meta"]["source"], e["meta"]["start"])] = e
  seen = set()
  for i in range(len(source)):
    t = source[i]
    meta = json.loads(t["meta"])
    e = ours[(meta["source"], meta["start"])]
    np.testing.assert_array_equal(t["video"], e["video"])
    np.testing.assert_array_equal(t["audio"], e["audio"])
    assert t["caption"].decode() == e["caption"] and t["sample_rate"] == 16000
    seen.add((meta["source"], meta["start"]))
  assert seen == set(ours)
  assert "tensorflow" not in sys.modules


def test_normalized_clips_keep_time_crop_and_sync(tmp_path):
  # Source: 48 frames at 24 fps, 64x36 (16:9); frame k has grey level 10 + 20 * (k % 12); a red
  # ramp across the width; one click at 0.4375 s (the middle of output frame 3).
  num, sr = 48, 16000
  video = np.zeros((num, 36, 64, 3), np.uint8)
  video[..., 1:] = (10 + 20 * (np.arange(num) % 12)).astype(np.uint8)[:, None, None, None]
  video[..., 0] = (np.arange(64) * 4).astype(np.uint8)
  audio = np.zeros(2 * sr, np.float32)
  click = int(0.4375 * sr)
  audio[click:click + 40] = 0.8
  path = mf.write_frames(tmp_path / "timing.mp4", video, 24, audio, sr)
  config = PreprocessConfig(**dict(SETTINGS, min_resolution=0, max_clips_per_input=0))
  with clips_lib.ClipDecoder(path, media.probe_header(path), config) as decoder:
    clips = list(decoder)
  assert [c.start for c in clips] == [0.0, 1.0]
  frames = np.concatenate([c.video for c in clips])
  sound = np.concatenate([c.channels[:, 0] for c in clips])
  assert frames.shape == (16, 32, 32, 3) and sound.shape == (32000,)
  # Frame n is the source frame on screen at (n + 0.5) / 8 s: k = floor((n + 0.5) * 3).
  shown = np.round((frames[..., 1].mean((1, 2)) - 10) / 20)
  np.testing.assert_array_equal(shown, (np.floor((np.arange(16) + 0.5) * 3) % 12))
  # Centre crop (not a squeeze): the 36 middle source columns, x in [14, 50), fill the width.
  source_red = media.read_video(path)[0][0, 18, :, 0].astype(float)  # as the decoder sees it
  centres = 14 + (np.arange(32) + 0.5) * 36 / 32 - 0.5
  red = frames[0, 16, :, 0].astype(float)
  np.testing.assert_allclose(red, np.interp(centres, np.arange(64), source_red), atol=8)
  # The click lands in frame 3's audio (samples 6000..8000), where its picture is.
  assert 6000 <= int(np.argmax(np.abs(sound))) < 8000
  assert decoder.errors == [] and decoder.video_seconds == decoder.audio_seconds == 2.0


SMALL = ["good.mp4", "blurry.mp4", UNICODE, "surround_48k.mp4",
         "sub/dir/nested.mp4", "notes.txt"]


def test_beam_direct_runner_writes_the_same_shards_and_manifest(media_dir, tmp_path):
  from data_pipeline import beam_pipeline  # pylint: disable=g-import-not-at-top
  in_dir = _build_corpus(str(tmp_path / "in"), media_dir, SMALL)
  local_out, beam_out = str(tmp_path / "local"), str(tmp_path / "beam")
  local = preprocess.run_local(in_dir, local_out, CONFIG, samples_per_shard=3, progress=False)
  beam = beam_pipeline.run(in_dir, beam_out, CONFIG, samples_per_shard=3, runner="DirectRunner")
  assert beam == local and local["accepted"] == 4 and local["shards"]["num_shards"] == 3
  for name in (manifest.MANIFEST_FILE, manifest.STATS_FILE):
    assert open(os.path.join(local_out, name), "rb").read() == open(
        os.path.join(beam_out, name), "rb").read(), name
  local_shards = sorted(os.listdir(os.path.join(local_out, sharding.SHARD_DIR)))
  assert local_shards == sorted(os.listdir(os.path.join(beam_out, sharding.SHARD_DIR)))
  for name in local_shards:
    if name.endswith(schema.SHARD_SUFFIX):
      assert schema.read_records(os.path.join(local_out, sharding.SHARD_DIR, name)) == \
          schema.read_records(os.path.join(beam_out, sharding.SHARD_DIR, name))


def test_resume_after_interruption_redoes_nothing_and_leaves_no_partial_file(
    media_dir, tmp_path, monkeypatch):
  in_dir = _build_corpus(str(tmp_path / "in"), media_dir, SMALL)
  out = str(tmp_path / "out")
  calls = []
  real = ingest.process_input

  class Interrupted(BaseException):  # like KeyboardInterrupt, which pytest would act on
    pass

  def interrupted_on_the_fourth(path, rel, config, output_dir):
    calls.append(rel)
    if len(calls) == 4:
      raise Interrupted
    return real(path, rel, config, output_dir)

  monkeypatch.setattr(ingest, "process_input", interrupted_on_the_fourth)
  with pytest.raises(Interrupted):
    preprocess.run_local(in_dir, out, CONFIG, samples_per_shard=3, progress=False)
  done = manifest.read_manifest(out)
  assert len(done) == 3
  monkeypatch.setattr(ingest, "process_input", real)

  # The next run dies while writing the second shard, after some of its records.
  real_read = schema.read_records
  reads = []

  def failing_read(path, start=0, stop=None):
    reads.append(path)
    if len(reads) == 3:
      raise OSError("disk went away")
    return real_read(path, start, stop)

  monkeypatch.setattr(schema, "read_records", failing_read)
  calls.clear()
  monkeypatch.setattr(ingest, "process_input",
                      lambda *a: (calls.append(a[1]), real(*a))[1])
  with pytest.raises(OSError, match="disk went away"):
    preprocess.run_local(in_dir, out, CONFIG, samples_per_shard=3, progress=False)
  assert sorted(calls) == sorted(set(r for _, r in preprocess.discover_inputs(in_dir)) -
                                 set(done))  # only what the first run had not finished
  shard_dir = os.path.join(out, sharding.SHARD_DIR)
  assert sorted(os.listdir(shard_dir)) == ["data-00000-of-00003.array_record", "shards.json"]
  monkeypatch.setattr(schema, "read_records", real_read)

  calls.clear()
  stats = preprocess.run_local(in_dir, out, CONFIG, samples_per_shard=3, progress=False)
  assert calls == []  # every input was done
  clean = str(tmp_path / "clean")
  assert stats == preprocess.run_local(in_dir, clean, CONFIG, samples_per_shard=3,
                                       progress=False)
  for name in os.listdir(os.path.join(clean, sharding.SHARD_DIR)):
    assert open(os.path.join(clean, sharding.SHARD_DIR, name), "rb").read() == open(
        os.path.join(shard_dir, name), "rb").read(), name
  assert open(os.path.join(clean, manifest.MANIFEST_FILE), "rb").read() == open(
      os.path.join(out, manifest.MANIFEST_FILE), "rb").read()


def test_modes_filter_convert_shard_add_up_to_all(media_dir, tmp_path):
  in_dir = _build_corpus(str(tmp_path / "in"), media_dir, SMALL)
  staged, direct = str(tmp_path / "staged"), str(tmp_path / "all")
  run = lambda out, mode: preprocess.run_local(in_dir, out, CONFIG, mode=mode,
                                               samples_per_shard=3, progress=False)
  stats = run(staged, "filter")
  assert stats["accepted"] == 4 and stats["clips_written"] == 0 and stats["shards"] is None
  assert not os.path.exists(os.path.join(staged, ingest.CLIP_DIR))
  with pytest.raises(ValueError, match=r"--mode shard: 4 input\(s\) are not converted yet"):
    run(staged, "shard")
  assert run(staged, "convert")["clips_written"] == 8
  assert not os.path.exists(os.path.join(staged, sharding.SHARD_DIR))
  final = run(staged, "shard")
  assert final == run(direct, "all")
  for name in os.listdir(os.path.join(direct, sharding.SHARD_DIR)):
    assert open(os.path.join(direct, sharding.SHARD_DIR, name), "rb").read() == open(
        os.path.join(staged, sharding.SHARD_DIR, name), "rb").read(), name
  # A different setting on the same output is refused before any work.
  with pytest.raises(ValueError, match=r"other settings \(min_blur: 100.0 -> 5\)"):
    preprocess.run_local(in_dir, staged, PreprocessConfig(**dict(SETTINGS, min_blur=5)),
                         progress=False)


def test_probe_header_reads_streams_and_tags(media_dir):
  info = media.probe_header(media_dir / "surround_48k.mp4")
  assert info["video"] == {"index": 0, "codec": "h264", "width": 64, "height": 48, "fps": 24.0,
                           "sar": 1.0, "rotation": 0.0}
  assert info["audio"] == {"index": 0, "codec": "aac", "sample_rate": 48000, "channels": 6}
  assert info["duration"] == pytest.approx(2.0, abs=0.05)
  assert media.probe_header(media_dir / "titled.mp4")["tags"]["title"] == (
      "A test pattern with beeps")
  assert media.probe_header(media_dir / "vfr.mp4")["video"]["fps"] == pytest.approx(40, abs=2)
  assert media.probe_header(media_dir / "audio_only.m4a")["video"] is None
  with pytest.raises(media.MediaError, match="cannot read it as media: .*moov atom not found"):
    media.probe_header(media_dir / "truncated_moov_at_end.mp4")


def test_a_worker_that_dies_costs_only_its_own_input():
  tasks = [(f"/in/{name}", name, None, None)
           for name in ("a.mp4", "b crash.mp4", "c.mp4", "d.mp4", "e.mp4")]
  records = list(preprocess._pool_map(tasks, 2, work=mf.die_on_crash_names))
  by_path = {r["path"]: r for r in records}
  assert len(records) == len(tasks) and set(by_path) == {t[1] for t in tasks}
  assert by_path["b crash.mp4"]["status"] == "rejected"
  assert by_path["b crash.mp4"]["reason"]["rule"] == "worker_died"
  assert all(r["status"] == "accepted" for p, r in by_path.items() if p != "b crash.mp4")


def test_anamorphic_and_rotated_sources_come_out_square_and_upright(tmp_path):
  # Coded 64x48 with a red ramp along x (4 per column) and pixels twice as wide as tall: the
  # picture is 128x48, so its centre square covers coded columns [20, 44).
  ramp = tmp_path / "anamorphic.mp4"
  mf.ffmpeg(["-f", "lavfi", "-i", "color=c=gray:size=64x48:rate=24:duration=2,format=rgb24,"
             "geq=r='4*X':g=100:b=100,setsar=2", "-f", "lavfi", "-i",
             "sine=sample_rate=16000:duration=2", "-c:v", "libx264", "-preset", "ultrafast",
             "-crf", "10", "-pix_fmt", "yuv420p", "-c:a", "aac", "file:" + str(ramp)])
  rotated = tmp_path / "rotated.mp4"  # the same, with a display matrix turning it by 90 degrees
  mf.ffmpeg(["-display_rotation", "90", "-i", str(ramp), "-c", "copy", "file:" + str(rotated)])
  config = PreprocessConfig(**dict(SETTINGS, min_resolution=0))
  frames = {}
  for path in (ramp, rotated):
    header = media.probe_header(path)
    with clips_lib.ClipDecoder(str(path), header, config) as decoder:
      frames[path.name] = next(iter(decoder)).video[0, ..., 0].astype(float)  # red, [H, W]
  assert media.probe_header(ramp)["video"]["sar"] == 2.0
  flat = frames["anamorphic.mp4"]
  expected = 4 * (20 + (np.arange(32) + 0.5) * 24 / 32 - 0.5)
  np.testing.assert_allclose(flat[16], expected, atol=8)
  assert np.abs(np.diff(flat, axis=0)).max() <= 4  # constant down each column
  upright = frames["rotated.mp4"]
  assert np.abs(np.diff(upright, axis=1)).max() <= 4  # the ramp now runs down the rows
  np.testing.assert_allclose(np.sort(upright[:, 16]), np.sort(expected), atol=8)
