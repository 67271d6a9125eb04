"""Grain loader: shapes, pairing of fields, order and its restore, corrupt records, sharding."""

import hashlib
import json
import logging
import os

import numpy as np
import pytest

from avgen.models.autoencoders import MelCodec, PixelCodec
from avgen.models.tokenizer import ByteTokenizer
from configs.base import get_base_config
from data_pipeline import loader
from data_pipeline import schema
from data_pipeline import synthetic

NUM_CLIPS = 40


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("synthetic")
  synthetic.make_dataset(str(path), NUM_CLIPS, seed=0, samples_per_shard=16)  # 3 shards
  return str(path)


@pytest.fixture(scope="module")
def clips():
  return [synthetic.make_clip(np.random.default_rng([0, i]), num_frames=8, height=32, width=32,
                              fps=8.0, sample_rate=16000) for i in range(NUM_CLIPS)]


def _config(batch_size=4, **data):
  c = get_base_config("demo")
  c.data.batch_size = batch_size
  for key, value in data.items():
    c.data[key] = value
  return c


def _key(video_latent):
  return hashlib.sha1(np.ascontiguousarray(video_latent).tobytes()).hexdigest()


def _take(it, n):
  out = [next(it) for _ in range(n)]
  it.close()
  return out


def _keys(batches):
  return [_key(v) for b in batches for v in b["video"]]


def test_batch_shapes_dtypes_and_pairing(data_dir, clips):
  config = _config()
  batches = _take(loader.make_loader(config, os.path.join(data_dir, "*.array_record")), 3)
  b = batches[0]
  assert b["video"].shape == (4, 8, 32, 32, 3) and b["video"].dtype == np.float32
  assert b["audio"].shape == (4, 64, 64) and b["audio"].dtype == np.float32
  assert b["text_ids"].shape == (4, 64) and b["text_ids"].dtype == np.int32
  assert b["text_mask"].shape == (4, 64) and b["text_mask"].dtype == np.bool_
  assert b["skipped_records"].shape == (4,) and b["skipped_records"].dtype == np.int32
  assert not b["skipped_records"].any()
  # Each example's fields come from one and the same clip.
  by_video = {_key(PixelCodec().encode(c["video"])): c for c in clips}
  mel = MelCodec.from_config(config)
  tokenizer = ByteTokenizer(64)
  for batch in batches:
    for i in range(4):
      clip = by_video[_key(batch["video"][i])]
      np.testing.assert_allclose(batch["audio"][i], mel.encode(clip["audio"]), atol=1e-5)
      ids, mask = tokenizer([clip["caption"]])
      np.testing.assert_array_equal(batch["text_ids"][i], ids[0])
      np.testing.assert_array_equal(batch["text_mask"][i], mask[0])


def test_one_epoch_sees_every_example_once_and_epochs_reshuffle(data_dir):
  config = _config(prefetch=0)
  one = list(loader.make_loader(config, data_dir, num_epochs=1))
  assert len(one) == NUM_CLIPS // 4
  assert len(set(_keys(one))) == NUM_CLIPS
  two = _keys(list(loader.make_loader(config, data_dir, num_epochs=2)))
  assert two[:NUM_CLIPS] == _keys(one)
  assert sorted(two[NUM_CLIPS:]) == sorted(two[:NUM_CLIPS]) and two[NUM_CLIPS:] != two[:NUM_CLIPS]


def test_seed_sets_the_order(data_dir):
  config = _config()
  a = _keys(_take(loader.make_loader(config, data_dir, seed=1), 5))
  b = _keys(_take(loader.make_loader(config, data_dir, seed=1), 5))
  c = _keys(_take(loader.make_loader(config, data_dir, seed=2), 5))
  d = _keys(_take(loader.make_loader(_config(shuffle_seed=2), data_dir), 5))
  assert a == b
  assert a != c
  assert c == d  # seed=None reads config.data.shuffle_seed


@pytest.mark.parametrize("prefetch", [0, 2])
def test_state_restore_continues_exactly(data_dir, prefetch):
  config = _config(prefetch=prefetch)
  it = loader.make_loader(config, data_dir, seed=5)
  for _ in range(13):  # past the first epoch (10 batches)
    next(it)
  state = it.get_state()
  json.dumps(state)  # checkpointable as JSON (orbax stores it so)
  expected = _take(it, 4)
  resumed = loader.make_loader(config, data_dir, seed=5)
  resumed.set_state(state)
  got = _take(resumed, 4)
  for e, g in zip(expected, got):
    for key in e:
      np.testing.assert_array_equal(e[key], g[key], err_msg=key)


def test_shards_are_disjoint_and_cover_the_epoch(data_dir):
  config = _config(batch_size=8)
  seen = []
  for index in range(2):
    batches = list(loader.make_loader(config, data_dir, shard_index=index, shard_count=2,
                                      num_epochs=1))
    assert len(batches) == NUM_CLIPS // 8 and batches[0]["video"].shape[0] == 4
    seen.append(set(_keys(batches)))
  assert not seen[0] & seen[1]
  assert len(seen[0] | seen[1]) == NUM_CLIPS


def test_corrupt_records_are_skipped_and_counted(tmp_path, clips, caplog):
  rng = np.random.default_rng(0)
  records = [schema.encode_example(c) for c in clips[:20]]
  flipped = bytearray(records[0])
  flipped[len(flipped) // 2] ^= 0xFF
  garbage = [rng.bytes(100), b"", bytes(flipped), records[1][:-10], rng.bytes(5000)]
  mixed = records + garbage
  order = rng.permutation(len(mixed))
  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(str(tmp_path / "mixed.array_record"), "group_size:1")
  for i in order:
    writer.write(mixed[i])
  writer.close()
  config = _config(prefetch=0)
  with caplog.at_level(logging.WARNING):
    batches = list(loader.make_loader(config, str(tmp_path / "mixed.array_record"), num_epochs=1))
  assert len(batches) == 5 and len(set(_keys(batches))) == 20
  counted = sum(int(b["skipped_records"].sum()) for b in batches)
  # Corrupt records after the last example of a finite stream are reported in the log.
  tail = [r for r in caplog.records if "end of data" in r.getMessage()]
  trailing = int(tail[0].args[2]) if tail else 0
  assert counted + trailing == len(garbage)
  assert counted > 0


def test_config_mismatch_is_an_error_naming_the_field(data_dir):
  cases = [({"num_frames": 4}, "'video'"), ({"height": 16}, "'video'"), ({"fps": 4}, "'fps'"),
           ({"sample_rate": 22050}, "'sample_rate'")]
  for data, field in cases:
    it = loader.make_loader(_config(prefetch=0, **data), data_dir)
    with pytest.raises(ValueError, match=field):
      next(it)
    it.close()


def test_cached_latents_are_used(tmp_path, clips):
  rng = np.random.default_rng(0)
  examples = []
  for c in clips[:4]:
    examples.append({**c, "video_latent": rng.normal(size=(8, 4, 4, 4)).astype(np.float16),
                     "audio_mel": rng.normal(size=(64, 64)).astype(np.float32)})
  path = schema.write_shards(examples, str(tmp_path), 4)
  config = _config()
  config.latent.video = "sd_vae"
  config.latent.video_downsample = 8
  config.latent.video_channels = 4
  (batch,) = list(loader.make_loader(config, path, num_epochs=1))
  assert batch["video"].shape == (4, 8, 4, 4, 4) and batch["video"].dtype == np.float32
  stored = {_key(e["video_latent"].astype(np.float32)): e for e in examples}
  for i in range(4):
    e = stored[_key(batch["video"][i])]
    np.testing.assert_array_equal(batch["audio"][i], e["audio_mel"])
  config.latent.video_channels = 8
  it = loader.make_loader(config, path)
  with pytest.raises(ValueError, match="video_latent"):
    next(it)
  it.close()


def test_missing_cached_latent_is_an_error(data_dir):
  config = _config(prefetch=0)
  config.latent.video = "sd_vae"
  it = loader.make_loader(config, data_dir)
  with pytest.raises(ValueError, match="video_latent"):
    next(it)
  it.close()


def test_path_errors(tmp_path, data_dir):
  config = _config()
  with pytest.raises(ValueError, match="no path"):
    loader.make_loader(config, [])
  with pytest.raises(ValueError, match="no path"):
    loader.make_loader(config, "")
  missing_glob = str(tmp_path / "nothing-*.array_record")
  with pytest.raises(ValueError, match="matches no file"):
    loader.make_loader(config, missing_glob)
  missing = str(tmp_path / "gone.array_record")
  with pytest.raises(ValueError, match="gone.array_record"):
    loader.make_loader(config, [os.path.join(data_dir, "synthetic-00000.array_record"), missing])
  with pytest.raises(ValueError, match="holds no"):
    loader.make_loader(config, str(tmp_path))
  assert len(loader.resolve_paths(data_dir)) == 3
  assert loader.resolve_paths(os.path.join(data_dir, "*")) == loader.resolve_paths(data_dir)


def test_argument_errors(data_dir):
  with pytest.raises(ValueError, match="not divisible"):
    loader.make_loader(_config(batch_size=4), data_dir, shard_count=3)
  with pytest.raises(ValueError, match="shard_index"):
    loader.make_loader(_config(batch_size=4), data_dir, shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match="num_epochs"):
    loader.make_loader(_config(), data_dir, num_epochs=0)


def test_worker_processes_batch_and_restore(data_dir):
  config = _config(num_workers=1, prefetch=1)
  it = loader.make_loader(config, data_dir, seed=3)
  first = [next(it) for _ in range(3)]
  assert first[0]["video"].shape == (4, 8, 32, 32, 3)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  it.set_state(state)
  got = [next(it) for _ in range(2)]
  it.close()
  assert _keys(got) == _keys(expected)
  assert len(set(_keys(first + expected))) == 20  # no repeats within the first epoch


def test_cached_mel_is_used_only_when_its_settings_match(tmp_path):
  config = _config(batch_size=4)
  config.data.shuffle_seed = 0
  codec = MelCodec.from_config(config)
  synthetic.make_dataset(str(tmp_path), 8, seed=3, samples_per_shard=8, mel_codec=codec)
  record = schema.decode_example(next(iter(_records(tmp_path))))
  np.testing.assert_array_equal(record["audio_mel"], codec.encode(record["audio"]))
  assert record["meta"]["audio_mel_config"] == codec.settings()

  # Poison the cache: with matching settings the loader returns it as stored.
  poisoned = dict(record, audio_mel=np.zeros_like(record["audio_mel"]))
  transform = loader.ExampleTransform(config)
  np.testing.assert_array_equal(transform(schema.encode_example(poisoned))["audio"], 0)
  # Another normalization in the config: the stale cache is ignored and the mel recomputed.
  config.mel.mean = -3.0
  fresh = loader.ExampleTransform(config)(schema.encode_example(poisoned))["audio"]
  np.testing.assert_allclose(fresh, MelCodec.from_config(config).encode(record["audio"]), rtol=1e-6)


def _records(directory):
  from array_record.python.array_record_module import ArrayRecordReader
  path = sorted(p for p in os.listdir(directory) if p.endswith(".array_record"))[0]
  reader = ArrayRecordReader(os.path.join(directory, path))
  out = [reader.read() for _ in range(reader.num_records())]
  reader.close()
  return out


def test_max_objects_bounds_the_shapes_per_clip():
  counts = {len(synthetic.make_clip(np.random.default_rng(i), num_frames=8, height=32, width=32, fps=8.0,
                                    sample_rate=16000, max_objects=1)["meta"]["objects"]) for i in range(10)}
  assert counts == {1}
  with pytest.raises(ValueError, match="max_objects"):
    synthetic.make_clip(np.random.default_rng(0), num_frames=8, height=32, width=32, fps=8.0,
                        sample_rate=16000, max_objects=0)
