"""SD-VAE (AutoencoderKL) against diffusers, from two tiny random configs; slicing; the codec."""

import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from avgen import pretrained
from avgen.models import autoencoders
from avgen.models.autoencoders.sd_vae import AutoencoderKLConfig
from avgen.pretrained.safetensors_io import CheckpointError
from configs.base import get_base_config
from tests.pretrained_utils import check

CONFIGS = {
    # 2 blocks (f=2), 1 resnet per block, SD's scaling factor, quant convs.
    "two_blocks": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                       latent_channels=4),
    # 3 blocks (f=4), 2 resnets (3 in the decoder), a channel change inside the decoder, no
    # quant conv, SD3-style shift factor.
    "three_blocks": dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=4,
                         latent_channels=3, use_quant_conv=False, scaling_factor=0.5,
                         shift_factor=0.1),
}


def _torch_vae(cfg, seed):
  torch.manual_seed(seed)
  n = len(cfg["block_out_channels"])
  model = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n,
                                  up_block_types=("UpDecoderBlock2D",) * n, **cfg).eval()
  with torch.no_grad():  # GroupNorm affine params start at 1/0: perturb them too
    for p in model.parameters():
      p.add_(torch.randn_like(p) * 0.05)
  return model


def _save(name, tmp_path_factory):
  model = _torch_vae(CONFIGS[name], seed=len(name))
  path = tmp_path_factory.mktemp(name)
  model.save_pretrained(str(path))  # diffusers' default: config.json + safetensors
  assert list(path.glob("*.safetensors"))
  return name, model, path


@pytest.fixture(scope="module", params=list(CONFIGS))
def saved(request, tmp_path_factory):
  return _save(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """One saved config for the tests that are not about numerical parity."""
  return _save("two_blocks", tmp_path_factory)


def _same_state(a, b):
  flat_a = dict(nnx.to_flat_state(nnx.state(a)))
  flat_b = dict(nnx.to_flat_state(nnx.state(b)))
  assert flat_a.keys() == flat_b.keys()
  for key, var in flat_a.items():
    np.testing.assert_array_equal(var[...], flat_b[key][...], err_msg=str(key))


def _nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def test_matches_diffusers(saved):
  name, model, path = saved
  ours = pretrained.load("sd_vae", path, cache=False)
  c = ours.config
  x = torch.rand(2, 3, 16, 16) * 2 - 1
  f = c.downsample
  z = torch.randn(2, c.latent_channels, 16 // f, 16 // f)
  with torch.no_grad():
    posterior = model.encode(x).latent_dist
    image = model.decode(z).sample
  x_ours = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
  key = jax.random.key(3)
  # encode/decode work in the scaled latent space the pipelines use: (z - shift) * scale.
  shift, scale = c.shift_factor or 0.0, c.scaling_factor
  z_scaled = jnp.asarray((z.numpy().transpose(0, 2, 3, 1) - shift) * scale)

  @jax.jit
  def run(x, z):
    return ours.moments(x), ours.encode(x), ours.encode(x, key), ours.decode(z)

  (mean, logvar), latent, sample, decoded = run(x_ours, z_scaled)
  check(f"sd_vae[{name}] posterior mean", _nchw(mean), posterior.mean)
  check(f"sd_vae[{name}] posterior logvar", _nchw(logvar), posterior.logvar)
  check(f"sd_vae[{name}] encode (scaled)", _nchw(latent), (posterior.mean - shift) * scale)
  check(f"sd_vae[{name}] decode", _nchw(decoded), image)
  # A posterior sample is mean + std * eps with the caller's key.
  eps = jax.random.normal(key, mean.shape)
  expected = (mean + jnp.exp(0.5 * logvar) * eps - shift) * scale
  np.testing.assert_allclose(sample, expected, rtol=1e-5, atol=1e-6)


def test_slicing_equals_whole_decode(small):
  _, _, path = small
  vae = pretrained.load("sd_vae", path, cache=False)
  c = vae.config
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(size=(1, 5, 4, 4, c.latent_channels)), jnp.float32)  # [B, T, h, w, C]
  x = jnp.asarray(rng.uniform(-1, 1, (5, 8, 8, 3)), jnp.float32)

  @jax.jit
  def run(z, x):  # chunks of 2 frames (2 full + 1 left over) against all 5 at once
    return (vae.decode(z), vae.decode(z, frames_per_chunk=2), vae.encode(x),
            vae.encode(x, frames_per_chunk=3))

  whole, sliced, encoded, encoded_sliced = run(z, x)
  assert sliced.shape == whole.shape == (1, 5, 4 * c.downsample, 4 * c.downsample, 3)
  np.testing.assert_allclose(sliced, whole, rtol=0, atol=1e-5)
  np.testing.assert_allclose(encoded_sliced, encoded, rtol=0, atol=1e-5)
  # Each frame's image differs (a chunking bug that repeated or shifted frames would show).
  assert np.abs(np.diff(np.asarray(whole), axis=1)).max() > 1e-2
  with pytest.raises(ValueError, match="frames_per_chunk"):
    vae.decode(z, frames_per_chunk=0)


def test_old_attention_names_load(small, tmp_path):
  """Checkpoints from before diffusers' attention rename (query/key/value/proj_attn; 1x1 convs)."""
  _, _, path = small
  tensors = load_file(str(path / "diffusion_pytorch_model.safetensors"))
  old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  renamed = {}
  for key, value in tensors.items():
    for new_name, old_name in old.items():
      if f".attentions.0.{new_name}." in key:
        key = key.replace(f".attentions.0.{new_name}.", f".attentions.0.{old_name}.")
        if key.endswith("weight") and new_name == "to_q":
          value = value[:, :, None, None]  # some of those checkpoints kept the conv layout
    renamed[key] = value
  assert any(".proj_attn." in k for k in renamed)
  save_file(renamed, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  _same_state(pretrained.load("sd_vae", path, cache=False),
              pretrained.load("sd_vae", tmp_path, cache=False))


def test_cached_load_restores_the_same_module(small, tmp_path):
  _, _, path = small
  first = pretrained.load("sd_vae", path, cache_dir=tmp_path)
  second = pretrained.load("sd_vae", path, cache_dir=tmp_path)  # restored from orbax via build()
  assert list(tmp_path.glob("sd_vae/*"))
  assert second.config == first.config
  _same_state(first, second)


def test_checkpoint_errors(small, tmp_path):
  _, model, path = small
  tensors = load_file(str(path / "diffusion_pytorch_model.safetensors"))
  missing = "decoder.conv_out.weight"
  save_file({k: v for k, v in tensors.items() if k != missing},
            str(tmp_path / "diffusion_pytorch_model.safetensors"))
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  with pytest.raises(CheckpointError, match=missing):
    pretrained.load("sd_vae", tmp_path, cache=False)
  extra = dict(tensors, **{"decoder.extra.weight": np.zeros(2, np.float32)})
  save_file(extra, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  with pytest.raises(CheckpointError, match="decoder.extra.weight"):
    pretrained.load("sd_vae", tmp_path, cache=False)
  pickled = tmp_path / "pickled"
  model.save_pretrained(str(pickled), safe_serialization=False)
  with pytest.raises(CheckpointError, match="pickle"):
    pretrained.load("sd_vae", pickled, cache=False)


def test_config_rules():
  base = dict(block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2,
              up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4)
  assert AutoencoderKLConfig.from_diffusers(base).downsample == 2
  for change, message in [
      ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]}, "down_block_types"),
      ({"act_fn": "gelu"}, "act_fn"),
      ({"norm_num_groups": 3}, "norm_num_groups"),
      ({"latents_mean": [0.0] * 4}, "latents_std"),
      ({"_class_name": "AutoencoderTiny"}, "AutoencoderKL"),
  ]:
    with pytest.raises(ValueError, match=message):
      AutoencoderKLConfig.from_diffusers(dict(base, **change))


def test_latents_mean_std_normalization(tmp_path):
  """Checkpoints with latents_mean/std use z = (mean - m) * scale / s, and decode inverts it."""
  model = _torch_vae(dict(block_out_channels=(8,), layers_per_block=1, norm_num_groups=4,
                          latent_channels=2, latents_mean=(0.5, -1.0), latents_std=(2.0, 0.5),
                          scaling_factor=0.7), seed=5)
  model.save_pretrained(str(tmp_path))
  assert json.loads((tmp_path / "config.json").read_text())["latents_mean"] == [0.5, -1.0]
  vae = pretrained.load("sd_vae", tmp_path, cache=False)
  x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (1, 4, 4, 3)), jnp.float32)
  raw = jnp.asarray(np.random.default_rng(2).normal(size=(1, 4, 4, 2)), jnp.float32)
  scaled = (raw - jnp.array([0.5, -1.0])) * 0.7 / jnp.array([2.0, 0.5])
  (mean, _), z, decoded = jax.jit(lambda x, z: (vae.moments(x), vae.encode(x), vae.decode(z)))(
      x, scaled)
  np.testing.assert_allclose(z, (mean - jnp.array([0.5, -1.0])) * 0.7 / jnp.array([2.0, 0.5]),
                             rtol=1e-6, atol=1e-6)
  with torch.no_grad():
    ref = model.decode(torch.from_numpy(np.asarray(raw).transpose(0, 3, 1, 2))).sample
  check("sd_vae[latents_mean] decode", _nchw(decoded), ref)


def test_video_codec_from_config(small, tmp_path):
  _, _, path = small
  vae_config = json.loads((path / "config.json").read_text())
  c = get_base_config("demo")
  c.data.height = c.data.width = 16
  c.latent.video = "sd_vae"
  c.latent.video_source = str(path)
  c.latent.video_channels = vae_config["latent_channels"]
  c.latent.video_downsample = 2 ** (len(vae_config["block_out_channels"]) - 1)
  c.latent.vae_frames_per_chunk = 2
  codec = autoencoders.build_video_codec(c)
  video = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
  latent = codec.encode(video)
  f = c.latent.video_downsample
  assert latent.shape == (3, 16 // f, 16 // f, c.latent.video_channels)
  assert latent.dtype == np.float32
  frames = codec.decode(latent)
  assert frames.shape == video.shape and frames.dtype == np.uint8
  with pytest.raises(TypeError, match="uint8"):
    codec.encode(video.astype(np.float32))
  # A mismatch is found from config.json alone, before any weights are read.
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  c.latent.video_source = str(tmp_path)
  c.latent.video_channels += 1
  with pytest.raises(ValueError, match="config.latent.video_channels"):
    autoencoders.build_video_codec(c)
