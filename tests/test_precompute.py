"""Latent precompute: shard copies with cached `video_latent` / `audio_mel` and their settings,
read back by the loader; pixel + mel codecs and an SD-VAE from a tiny random diffusers model."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import train_utils
from avgen.models.autoencoders.mel import MelCodec
from avgen.models.autoencoders.pixels import PixelCodec
from data_pipeline import loader, precompute, schema, synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs(directory, config, corrupt_at=None):
  """Two shards of synthetic clips (5 + 3); a garbage record inserted at `corrupt_at` of the 2nd."""
  d = config.data
  clips = [synthetic.make_clip(np.random.default_rng(i), num_frames=d.num_frames,
                               height=d.height, width=d.width, fps=float(d.fps),
                               sample_rate=d.sample_rate) for i in range(8)]
  records = [schema.encode_example(c) for c in clips]
  second = records[5:]
  if corrupt_at is not None:
    second.insert(corrupt_at, b"not a record at all")
  os.makedirs(directory, exist_ok=True)
  schema.write_shard_file(os.path.join(directory, "a.array_record"), records[:5])
  schema.write_shard_file(os.path.join(directory, "b.array_record"), second)
  return os.path.join(directory, "*.array_record")


def test_pixel_and_mel_latents_are_cached_and_used(tmp_path):
  config = train_utils.tiny_config()
  pattern = _inputs(tmp_path / "in", config, corrupt_at=1)
  out = str(tmp_path / "out")
  summary = precompute.run(config, pattern, out, batch_size=2)
  assert summary["records"] == 9 and summary["corrupt_copied"] == 1
  assert [s["status"] for s in summary["shards"]] == ["written", "written"]
  assert json.load(open(os.path.join(out, "precompute.json")))["records"] == 9

  mel = MelCodec.from_config(config)
  for name in ("a.array_record", "b.array_record"):
    before = schema.read_records(str(tmp_path / "in" / name))
    after = schema.read_records(os.path.join(out, name))
    assert len(before) == len(after)
    for old, new in zip(before, after):
      try:
        src = schema.decode_example(old)
      except schema.SchemaError:
        assert new == old  # a corrupt record is copied byte for byte, for the loader to count
        continue
      ex = schema.decode_example(new)
      np.testing.assert_array_equal(ex["video"], src["video"])
      assert ex["caption"] == src["caption"] and ex["meta"]["events"] == src["meta"]["events"]
      np.testing.assert_array_equal(ex["video_latent"], PixelCodec().encode(src["video"]))
      np.testing.assert_array_equal(ex["audio_mel"], mel.encode(src["audio"]))
      assert ex["meta"]["video_latent_config"] == {"kind": "pixels"}
      assert ex["meta"]["audio_mel_config"] == mel.settings()

  # The loader takes the caches as stored when their settings are the config's...
  transform = loader.ExampleTransform(config)
  ex = schema.decode_example(schema.read_records(os.path.join(out, "a.array_record"), 0, 1)[0])
  poisoned = schema.encode_example(dict(ex, video_latent=np.zeros_like(ex["video_latent"]),
                                        audio_mel=np.zeros_like(ex["audio_mel"])))
  used = transform(poisoned)
  assert not used["video"].any() and not used["audio"].any()
  # ...and recomputes a mel made with other settings.
  config.mel.mean = -3.0
  fresh = loader.ExampleTransform(config)(poisoned)["audio"]
  np.testing.assert_allclose(fresh, MelCodec.from_config(config).encode(ex["audio"]), rtol=1e-6)
  config.mel.mean = -6.0
  # Batches from the copies: the corrupt record is counted as in the input.
  batches = list(loader.make_loader(config, os.path.join(out, "*.array_record"), num_epochs=1))
  assert sum(int(b["skipped_records"].sum()) for b in batches) == 1

  # A re-run skips finished shards; --overwrite rewrites them.
  assert [s["status"] for s in precompute.run(config, pattern, out)["shards"]] == ["exists"] * 2
  with pytest.raises(ValueError, match="made with other settings .*fields"):
    precompute.run(config, pattern, out, fields=["audio_mel"])
  assert [s["status"] for s in precompute.run(config, pattern, out, overwrite=True,
                                               fields=["audio_mel"])["shards"]] == ["written"] * 2
  ex = schema.decode_example(schema.read_records(os.path.join(out, "a.array_record"), 0, 1)[0])
  assert "video_latent" not in ex and "video_latent_config" not in ex["meta"]


def test_bad_inputs_stop_the_job_with_the_record_named(tmp_path):
  config = train_utils.tiny_config()
  pattern = _inputs(tmp_path / "in", config)
  with pytest.raises(ValueError, match="holds input shard"):
    precompute.run(config, pattern, str(tmp_path / "in"))
  with pytest.raises(ValueError, match="--fields"):
    precompute.run(config, pattern, str(tmp_path / "out"), fields=["video_latents"])
  with pytest.raises(ValueError, match="task-index"):
    precompute.plan(pattern, str(tmp_path / "out"), task_index=2, num_tasks=2)
  other = train_utils.tiny_config()
  other.data.height = other.data.width = 32
  with pytest.raises(ValueError, match=r"a\.array_record record 0: .*'video'.*height=32"):
    precompute.run(other, pattern, str(tmp_path / "out"))
  assert not [f for f in os.listdir(tmp_path / "out") if "array_record" in f]  # nothing partial
  # Tasks split the shards between processes.
  assert [os.path.basename(s) for s, _ in precompute.plan(pattern, "o", task_index=1,
                                                          num_tasks=2)] == ["b.array_record"]


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  vae = diffusers.AutoencoderKL(
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
      block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4).eval()
  with torch.no_grad():
    for p in vae.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  path = tmp_path_factory.mktemp("vae")
  vae.save_pretrained(str(path))
  return vae, str(path)


def test_sd_vae_latents_match_diffusers_and_are_checked_by_the_loader(tiny_vae, tmp_path,
                                                                     monkeypatch):
  import torch  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("AVGEN_PRETRAINED_CACHE", str(tmp_path / "cache"))
  vae, path = tiny_vae
  config = train_utils.tiny_config()
  config.latent.video, config.latent.video_source = "sd_vae", path
  config.latent.video_downsample, config.latent.video_channels = 2, 4
  config.model.video_patch = (1, 2, 2)
  pattern = _inputs(tmp_path / "in", config)
  out = str(tmp_path / "out")
  summary = precompute.run(config, pattern, out, fields=["video_latent"], batch_size=3)
  assert summary["video_latent_config"] == loader.video_latent_settings(config)
  assert summary["video_latent_config"]["source"] == path and summary["audio_mel_config"] is None

  record = schema.read_records(os.path.join(out, "b.array_record"), 2, 3)[0]
  ex = schema.decode_example(record)
  d = config.data
  assert ex["video_latent"].shape == (d.num_frames, d.height // 2, d.width // 2, 4)
  x = torch.tensor(ex["video"].astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
  with torch.no_grad():
    want = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
  got = ex["video_latent"].transpose(0, 3, 1, 2)
  err = np.abs(got - want.numpy()).max() / np.abs(want.numpy()).max()
  print(f"[rel-err] precomputed sd_vae latent vs diffusers: {err:.2e}")
  assert err < 1e-5

  np.testing.assert_array_equal(loader.ExampleTransform(config)(record)["video"],
                                ex["video_latent"])
  config.latent.codec_dtype = "bfloat16"
  with pytest.raises(ValueError, match=r"video_latent.*dtype: stored 'float32', config 'bfloat16'"):
    loader.ExampleTransform(config)(record)


def test_command_line(tmp_path):
  config = train_utils.tiny_config()
  pattern = _inputs(tmp_path / "in", config)
  cmd = [sys.executable, "-m", "data_pipeline.precompute", "--input", pattern,
         "--output-dir", str(tmp_path / "out"), f"--config={REPO}/tests/train_utils.py",
         "--fields=audio_mel", "--config.mel.mean=-5.0"]
  env = dict(os.environ, PYTHONPATH=f"{REPO}:{REPO}/tests", JAX_PLATFORMS="cpu", XLA_FLAGS="")
  run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "8 records in 2 shard(s)" in run.stdout
  ex = schema.decode_example(schema.read_records(str(tmp_path / "out" / "a.array_record"), 0, 1)[0])
  assert ex["meta"]["audio_mel_config"]["mean"] == -5.0
  # Another config on the same output folder is refused, naming what differs.
  with pytest.raises(ValueError, match=r"audio_mel_config.mean: stored -5.0, config -6.0"):
    precompute.run(config, pattern, str(tmp_path / "out"), fields=["audio_mel"])
