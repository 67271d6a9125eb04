"""Schema round trip and validation; synthetic clips: determinism, sound/vision sync, framing."""

import glob
import math
import os
import zlib

import ml_dtypes
import msgpack
import numpy as np
import pytest
from array_record.python.array_record_data_source import ArrayRecordDataSource

from data_pipeline import schema
from data_pipeline import synthetic

DIMS = dict(num_frames=8, height=32, width=32, fps=8.0, sample_rate=16000)


def _clip(seed=0, **overrides):
  return synthetic.make_clip(np.random.default_rng(seed), **{**DIMS, **overrides})


def _assert_examples_equal(a, b):
  assert set(a) == set(b)
  for key in a:
    if isinstance(a[key], np.ndarray):
      assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    else:
      assert a[key] == b[key], key


# ---- schema


def test_round_trip_with_optional_latents():
  ex = _clip(1)
  ex["video_latent"] = np.random.default_rng(0).normal(size=(8, 4, 4, 4)).astype(ml_dtypes.bfloat16)
  ex["audio_mel"] = np.random.default_rng(1).normal(size=(64, 64)).astype(np.float16)
  out = schema.decode_example(schema.encode_example(ex))
  _assert_examples_equal(ex, out)
  out["video"][0, 0, 0, 0] = 7  # decoded arrays are writable copies


def _mutations():
  def set_field(key, value):
    return lambda ex: ex.__setitem__(key, value)

  def set_with(key, fn):
    return lambda ex: ex.__setitem__(key, fn(ex[key]))

  def drop(key):
    return lambda ex: ex.pop(key)

  t = DIMS["num_frames"]
  return {
      "missing caption": (drop("caption"), "caption"),
      "unknown field": (set_field("labels", [1]), "labels"),
      "video float": (set_with("video", lambda v: v.astype(np.float32)), "'video'"),
      "video 3 dims": (set_with("video", lambda v: v[0]), "'video'"),
      "video 4 channels": (set_field("video", np.zeros((t, 32, 32, 4), np.uint8)), "'video'"),
      "video no frames": (set_field("video", np.zeros((0, 32, 32, 3), np.uint8)), "'video'"),
      "audio float64": (set_with("audio", lambda a: a.astype(np.float64)), "'audio'"),
      "audio stereo": (set_with("audio", lambda a: np.stack([a, a], 1)), "'audio'"),
      "audio too short": (set_with("audio", lambda a: a[:-1]), "'audio' has 15999"),
      "audio nan": (lambda ex: ex["audio"].__setitem__(3, np.nan), "'audio'"),
      "caption bytes": (set_field("caption", b"a red circle"), "'caption'"),
      "fps zero": (set_field("fps", 0.0), "'fps'"),
      "fps bool": (set_field("fps", True), "'fps'"),
      "fps changes audio length": (set_field("fps", 4.0), "'audio'"),
      "sample_rate float": (set_field("sample_rate", 16000.0), "'sample_rate'"),
      "meta list": (set_field("meta", ["synthetic"]), "'meta'"),
      "meta numpy value": (set_field("meta", {"quality": np.float32(0.5)}), "'meta'"),
      "meta nan": (set_field("meta", {"quality": float("nan")}), "'meta'"),
      "latent int": (set_field("video_latent", np.zeros((t, 4, 4, 4), np.int32)), "'video_latent'"),
      "latent wrong T": (set_field("video_latent", np.zeros((t + 1, 4, 4, 4), np.float32)),
                         "'video_latent'"),
      "mel 1 dim": (set_field("audio_mel", np.zeros(64, np.float32)), "'audio_mel'"),
  }


@pytest.mark.parametrize("name", list(_mutations()))
def test_encode_rejects(name):
  mutate, field = _mutations()[name]
  ex = _clip(2)
  mutate(ex)
  with pytest.raises(schema.SchemaError, match=field.replace("(", r"\(")):
    schema.encode_example(ex)


def test_encode_rejects_non_dict():
  with pytest.raises(schema.SchemaError, match="dict"):
    schema.encode_example([1, 2])


def _sign(packed):
  return packed + zlib.crc32(packed).to_bytes(4, "little")


def _valid_record():
  return schema.encode_example(_clip(3))


@pytest.mark.parametrize("make_bytes", [
    lambda: b"",
    lambda: np.random.default_rng(0).bytes(1000),
    lambda: b"\xff" * 64,
    lambda: _sign(msgpack.packb(17)),
    lambda: _sign(msgpack.packb({"caption": "x"})),  # no schema_version
    lambda: _sign(b"\xc1" * 10),  # msgpack's never-used byte
    lambda: _valid_record()[:-100],  # truncated
    lambda: _valid_record()[:500] + b"\x00" * 50 + _valid_record()[550:],  # overwritten bytes
    lambda: _tamper(lambda r: r.__setitem__("schema_version", 99)),
    lambda: _tamper(lambda r: r["audio"].__setitem__("data", r["audio"]["data"][:-4])),
    lambda: _tamper(lambda r: r["video"].__setitem__("dtype", "object")),
    lambda: _tamper(lambda r: r.pop("meta")),
], ids=["empty", "random", "ff", "int", "no_version", "bad_msgpack", "truncated", "overwritten",
        "version", "short_data", "dtype", "missing_field"])
def test_decode_garbage_raises_schema_error(make_bytes):
  with pytest.raises(schema.SchemaError):
    schema.decode_example(make_bytes())


def _tamper(edit):
  """Edits the stored map and re-signs it, so only the content rules can catch the edit."""
  record = msgpack.unpackb(_valid_record()[:-4], raw=False)
  edit(record)
  return _sign(msgpack.packb(record, use_bin_type=True))


def test_write_shards_counts_names_and_contents(tmp_path):
  clips = [_clip(i) for i in range(7)]
  paths = schema.write_shards(iter(clips), str(tmp_path), samples_per_shard=3, prefix="t")
  assert [os.path.basename(p) for p in paths] == [
      "t-00000.array_record", "t-00001.array_record", "t-00002.array_record"]
  assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths)  # no temp files
  source = ArrayRecordDataSource(paths)
  assert len(source) == 7
  for i, clip in enumerate(clips):
    _assert_examples_equal(clip, schema.decode_example(source[i]))


def test_write_shards_bad_example_leaves_only_complete_shards(tmp_path):
  bad = _clip(9)
  bad["fps"] = -1.0
  with pytest.raises(schema.SchemaError, match="fps"):
    schema.write_shards([_clip(0), _clip(1), _clip(2), _clip(3), bad], str(tmp_path), 3)
  assert os.listdir(tmp_path) == ["data-00000.array_record"]


def test_write_shards_rejects_bad_shard_size(tmp_path):
  with pytest.raises(ValueError, match="samples_per_shard"):
    schema.write_shards([_clip(0)], str(tmp_path), 0)


# ---- synthetic clips


def test_clip_is_deterministic_and_seed_dependent():
  _assert_examples_equal(_clip(5), _clip(5))
  assert not np.array_equal(_clip(5)["video"], _clip(6)["video"])


def test_clip_fields_and_caption():
  for seed in range(30):
    ex = _clip(seed)
    schema.validate_example(ex)
    objects = ex["meta"]["objects"]
    assert 1 <= len(objects) <= 3
    assert len({o["color"] for o in objects}) == len(objects)
    for o in objects:
      assert f"{o['color']} {o['shape']}" in ex["caption"]
    assert ex["caption"].endswith("bounces" if len(objects) == 1 else "bounce")


def _events(num=60, **dims):
  for seed in range(num):
    ex = _clip(seed, **dims)
    yield ex, ex["meta"]["events"]


def test_audio_onsets_at_event_times():
  sr = DIMS["sample_rate"]
  num_events = 0
  for ex, events in _events():
    audio = ex["audio"]
    if not events:
      assert not audio.any()
      continue
    first = math.ceil(events[0]["time"] * sr)
    assert not audio[:first].any(), "sound before the first impact"
    for e in events:
      num_events += 1
      n = math.ceil(e["time"] * sr)
      # A sharp onset: within 3 ms the tone is near its full amplitude.
      assert np.abs(audio[n:n + 48]).max() > 0.5 * synthetic.TONE_AMPLITUDE, e
      assert e["frame"] == math.floor(e["time"] * DIMS["fps"])
      assert 0 < e["time"] < DIMS["num_frames"] / DIMS["fps"]
  assert num_events > 60  # clips do make sounds (about 2-3 per object per second)


def test_sound_is_silent_between_distant_events():
  sr = DIMS["sample_rate"]
  checked = 0
  for ex, events in _events():
    for a, b in zip(events, events[1:]):
      gap_start = math.ceil(a["time"] * sr) + int(synthetic.TONE_SECONDS * sr)
      gap_end = math.ceil(b["time"] * sr)
      if gap_end > gap_start:
        assert not ex["audio"][gap_start:gap_end].any()
        checked += 1
  assert checked > 20


def test_pitch_follows_colour():
  sr = DIMS["sample_rate"]
  checked = 0
  for ex, events in _events(40):
    for e in events[:1]:
      if len(events) > 1 and events[1]["time"] - e["time"] < synthetic.TONE_SECONDS:
        continue  # overlapping tones
      n = math.ceil(e["time"] * sr)
      tone = ex["audio"][n:n + int(synthetic.TONE_SECONDS * sr)].astype(np.float64)
      obj = ex["meta"]["objects"][e["object"]]
      if obj["shape"] != "circle" or len(tone) < 800:
        continue  # circles are pure sines, so the spectral peak is the pitch
      spectrum = np.abs(np.fft.rfft(tone, n=16 * len(tone)))
      peak = np.argmax(spectrum) * sr / (16 * len(tone))
      # Pitches are >= 20% apart; the decay widens the peak by ~ 1 / (2 pi 12 ms) = 13 Hz.
      assert abs(peak - obj["pitch_hz"]) < 0.05 * obj["pitch_hz"], (peak, obj)
      checked += 1
  assert checked >= 5


def _object_pixels(ex, obj):
  return np.all(ex["video"] == synthetic.COLORS[obj["color"]][0], axis=-1)  # [T, H, W]


def test_objects_stay_inside_frame_and_touch_walls_at_events():
  fps = DIMS["fps"]
  for seed in range(80):
    ex = _clip(seed, height=40, width=48)  # non-square catches x/y mix-ups
    objects = ex["meta"]["objects"]
    if len(objects) != 1:
      continue  # one object: nothing occludes it
    obj = objects[0]
    half = obj["half_size"]
    areas = {"circle": math.pi * half**2, "square": 4 * half**2, "triangle": 2 * half**2}
    area = areas[obj["shape"]]
    pixels = _object_pixels(ex, obj)
    for f in range(DIMS["num_frames"]):
      # A shape cut by the frame edge would lose a large part of its area.
      assert pixels[f].sum() > 0.75 * area, (seed, f)
    for e in ex["meta"]["events"]:
      ys, xs = np.nonzero(pixels[e["frame"]])
      vx, vy = obj["velocity"]
      # Frame f is drawn at (f + 0.5) / fps: at most half a frame of motion from the impact.
      slack = {"left": xs.min(), "right": 47 - xs.max(), "top": ys.min(), "bottom": 39 - ys.max()}
      speed = abs(vx) if e["wall"] in ("left", "right") else abs(vy)
      assert slack[e["wall"]] <= speed * 0.5 / fps + 1.5, (seed, e, slack)


def test_make_dataset_is_deterministic_and_prefix_stable(tmp_path):
  a = synthetic.make_dataset(str(tmp_path / "a"), 10, seed=3, samples_per_shard=4)
  b = synthetic.make_dataset(str(tmp_path / "b"), 10, seed=3, samples_per_shard=4)
  c = synthetic.make_dataset(str(tmp_path / "c"), 6, seed=3, samples_per_shard=4)
  d = synthetic.make_dataset(str(tmp_path / "d"), 10, seed=4, samples_per_shard=4)
  ra, rb, rc, rd = (ArrayRecordDataSource(p) for p in (a, b, c, d))
  assert len(a) == 3 and len(ra) == 10
  assert [ra[i] for i in range(10)] == [rb[i] for i in range(10)]
  assert [ra[i] for i in range(6)] == [rc[i] for i in range(6)]
  assert ra[0] != rd[0]


def test_cli_writes_shards(tmp_path):
  synthetic.main(["--output-dir", str(tmp_path), "--num-clips", "5", "--num-frames", "4",
                  "--height", "16", "--width", "24", "--samples-per-shard", "2", "--seed", "1"])
  paths = sorted(glob.glob(str(tmp_path / "*.array_record")))
  assert len(paths) == 3
  ex = schema.decode_example(ArrayRecordDataSource(paths)[4])
  assert ex["video"].shape == (4, 16, 24, 3) and ex["audio"].shape == (8000,)


def test_make_clip_rejects_bad_dims():
  with pytest.raises(ValueError, match="num_frames"):
    _clip(0, num_frames=0)
  with pytest.raises(ValueError, match="height"):
    _clip(0, height=4)


def test_size_and_speed_ranges_are_obeyed():
  side = min(DIMS["height"], DIMS["width"])
  for seed in range(20):
    ex = _clip(seed, size_range=(0.2, 0.25), speed_range=(0.3, 0.4))
    for o in ex["meta"]["objects"]:
      assert 0.2 * side <= o["half_size"] <= 0.25 * side
      assert 0.3 * side <= math.hypot(*o["velocity"]) <= 0.4 * side


@pytest.mark.parametrize("overrides, field", [
    (dict(size_range=(0.3, 0.1)), "size_range"),
    (dict(size_range=(0.1, 0.5)), "size_range"),
    (dict(speed_range=(0.0, 1.0)), "speed_range"),
])
def test_bad_ranges_are_refused(overrides, field):
  with pytest.raises(ValueError, match=field):
    _clip(0, **overrides)
