"""BigVGAN (bigvgan 2.4.1) and HiFi-GAN (transformers SpeechT5HifiGan) against the originals,
their mel front ends, chunked vocoding, and the audio codec built from a config."""

import json
import shutil

import bigvgan
import jax
import jax.numpy as jnp
import numpy as np

import pytest
import torch
import transformers
from flax import nnx
from bigvgan.env import AttrDict
from bigvgan.meldataset import mel_spectrogram

from avgen import pretrained
from avgen.models import autoencoders
from avgen.models.autoencoders.bigvgan import BigVGAN, BigVGANConfig
from avgen.models.autoencoders.chunking import chunk_windows, vocode_in_chunks
from avgen.models.autoencoders.hifigan import HiFiGAN, HiFiGANConfig
from avgen.models.autoencoders.mel_frontend import BigVGANMel, SpeechT5Mel
from avgen.models.autoencoders.sd_vae import AutoencoderKL, AutoencoderKLConfig
from avgen.pretrained import bigvgan as bigvgan_loader
from avgen.pretrained.safetensors_io import CheckpointError
from configs.base import get_base_config
from tests.pretrained_utils import check

_MEL = dict(sampling_rate=8000, n_fft=64, hop_size=8, win_size=64, fmin=0, fmax=None)
BIGVGAN_CONFIGS = {
    # AMP type 1 (two convs per dilation), snakebeta in log scale, no final bias, clamp not tanh:
    # the BigVGAN-v2 settings.
    "v2_amp1_snakebeta": dict(
        num_mels=8, upsample_rates=[4, 2], upsample_kernel_sizes=[8, 4],
        upsample_initial_channel=32, resblock="1", resblock_kernel_sizes=[3, 5],
        resblock_dilation_sizes=[[1, 3], [1, 2]], activation="snakebeta", snake_logscale=True,
        use_bias_at_final=False, use_tanh_at_final=False, **_MEL),
    # AMP type 2, plain snake in linear scale, final bias and tanh, three stages; saved after
    # remove_weight_norm (plain `weight` keys).
    "v1_amp2_snake_plain": dict(
        num_mels=6, upsample_rates=[2, 2, 2], upsample_kernel_sizes=[4, 4, 6],
        upsample_initial_channel=24, resblock="2", resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3, 5]], activation="snake", snake_logscale=False,
        use_bias_at_final=True, use_tanh_at_final=True, **dict(_MEL, hop_size=8)),
}
HIFIGAN_CONFIGS = {
    "two_stages_normalized": dict(
        model_in_dim=8, sampling_rate=8000, upsample_initial_channel=32, upsample_rates=[4, 2],
        upsample_kernel_sizes=[8, 4], resblock_kernel_sizes=[3, 5],
        resblock_dilation_sizes=[[1, 3], [1, 2]], normalize_before=True),
    "three_stages_plain": dict(
        model_in_dim=6, upsample_initial_channel=16, upsample_rates=[2, 2, 2],
        upsample_kernel_sizes=[4, 4, 6], resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3, 5]], leaky_relu_slope=0.2, normalize_before=False),
}


def _perturb(model, seed):
  """Random weights away from the inits (snake alphas at 0 / 1, convs at N(0, 0.01))."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      scale = 0.3 if name.endswith(("alpha", "beta")) else 0.1
      p.add_(torch.randn(p.shape, generator=g) * scale)


def _save_bigvgan(name, root):
  cfg = BIGVGAN_CONFIGS[name]
  torch.manual_seed(0)
  model = bigvgan.BigVGAN(AttrDict(dict(cfg))).eval()
  _perturb(model, seed=len(name))
  if name.endswith("plain"):
    model.remove_weight_norm()
  pickled = root / "bigvgan_package"
  model.save_pretrained(str(pickled))  # what the package writes: bigvgan_generator.pt + config
  return model, pickled


@pytest.fixture(scope="module", params=list(BIGVGAN_CONFIGS))
def bigvgan_saved(request, tmp_path_factory):
  model, pickled = _save_bigvgan(request.param, tmp_path_factory.mktemp(request.param))
  converted = bigvgan_loader.safetensors_from_pickle(pickled, pickled.parent / "safetensors")
  return request.param, model, pickled, converted


def _save_hifigan(name, root):
  torch.manual_seed(0)
  config = transformers.SpeechT5HifiGanConfig(**HIFIGAN_CONFIGS[name])
  model = transformers.SpeechT5HifiGan(config).eval()
  _perturb(model, seed=len(name))
  with torch.no_grad():
    model.mean.copy_(torch.randn(config.model_in_dim))
    model.scale.copy_(torch.rand(config.model_in_dim) + 0.5)
  model.save_pretrained(str(root))  # transformers' default: config.json + model.safetensors
  return name, model, root


@pytest.fixture(scope="module", params=list(HIFIGAN_CONFIGS))
def hifigan_saved(request, tmp_path_factory):
  return _save_hifigan(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """One config of each vocoder, for the tests that are not about parity across configs."""
  root = tmp_path_factory.mktemp("small")
  model, pickled = _save_bigvgan("v2_amp1_snakebeta", root)
  converted = bigvgan_loader.safetensors_from_pickle(pickled, root / "safetensors")
  _, hifigan, hifigan_path = _save_hifigan("two_stages_normalized", root / "hifigan")
  return {"bigvgan": (model, converted), "hifigan": (hifigan, hifigan_path)}


def _same_state(a, b):
  flat_a = dict(nnx.to_flat_state(nnx.state(a)))
  flat_b = dict(nnx.to_flat_state(nnx.state(b)))
  assert flat_a.keys() == flat_b.keys()
  for key, var in flat_a.items():
    assert type(var) is type(flat_b[key]), key
    np.testing.assert_array_equal(var[...], flat_b[key][...], err_msg=str(key))


def test_bigvgan_matches_original(bigvgan_saved):
  name, model, pickled, converted = bigvgan_saved
  assert (pickled / "bigvgan_generator.pt").is_file() and not list(pickled.glob("*.safetensors"))
  ours = pretrained.load("bigvgan", converted, cache=False)
  mel = torch.randn(2, model.h.num_mels, 21)
  with torch.no_grad():
    ref = model(mel)[:, 0]
  got = jax.jit(ours)(jnp.asarray(mel.numpy().transpose(0, 2, 1)))
  assert got.shape == (2, 21 * ours.hop_length)
  assert 0.05 < float(np.abs(ref.numpy()).max()) < 1.0  # neither silent nor clipped throughout
  check(f"bigvgan[{name}]", got, ref)


def test_bigvgan_pickle_directory_is_converted_weights_only(small, tmp_path):
  """The package's own save (a pickle, as on the hub) loads through a cached weights-only
  conversion; a pickle holding more than tensors is refused."""
  model, converted = small["bigvgan"]
  pickled = converted.parent / "bigvgan_package"
  cache = tmp_path / "cache"
  ours = pretrained.load("bigvgan", pickled, cache=False, cache_dir=cache)
  made = list((cache / "bigvgan" / "from_pickle").glob("*/model.safetensors"))
  assert len(made) == 1
  _same_state(ours, pretrained.load("bigvgan", converted, cache=False))

  evil = tmp_path / "evil"
  evil.mkdir()
  shutil.copy2(pickled / "config.json", evil / "config.json")
  torch.save({"generator": {"w": torch.zeros(1)}, "hook": _Evil()}, evil / "bigvgan_generator.pt")
  with pytest.raises(CheckpointError, match="refusing to unpickle"):
    pretrained.load("bigvgan", evil, cache=False, cache_dir=cache)


class _Evil:
  """Stands for arbitrary pickled code: torch's weights-only unpickler must refuse it."""


def test_bigvgan_filters_are_the_originals(small):
  """The Kaiser-sinc filters we compute equal the buffers the original saves."""
  model, _ = small["bigvgan"]
  state = model.state_dict()
  up = state["activation_post.upsample.filter"].numpy().reshape(-1)
  down = state["activation_post.downsample.lowpass.filter"].numpy().reshape(-1)
  np.testing.assert_allclose(bigvgan_loader.upsample_filter(), up, rtol=1e-6, atol=1e-8)
  np.testing.assert_allclose(bigvgan_loader.downsample_filter(), down, rtol=1e-6, atol=1e-8)


def test_hifigan_matches_transformers(hifigan_saved):
  name, model, path = hifigan_saved
  ours = pretrained.load("hifigan", path, cache=False)
  mel = torch.randn(2, 21, model.config.model_in_dim)
  with torch.no_grad():
    ref = model(mel)
  got = jax.jit(ours)(jnp.asarray(mel.numpy()))
  assert got.shape == (2, 21 * ours.hop_length)
  assert float(np.abs(ref.numpy()).max()) > 0.02
  check(f"hifigan[{name}]", got, ref)


@pytest.mark.parametrize("settings", [
    dict(sample_rate=22050, n_fft=1024, num_mels=80, hop_size=256, win_size=1024, fmin=0,
         fmax=8000),  # nvidia/bigvgan_v2_22khz_80band_fmax8k_256x
    dict(sample_rate=16000, n_fft=512, num_mels=40, hop_size=128, win_size=400, fmin=20,
         fmax=None),  # shorter window than n_fft, fmax = sr / 2
])
def test_bigvgan_mel_matches_meldataset(settings):
  wave = np.random.default_rng(0).uniform(-0.9, 0.9, (2, 3000)).astype(np.float32)
  ref = mel_spectrogram(torch.from_numpy(wave), settings["n_fft"], settings["num_mels"],
                        settings["sample_rate"], settings["hop_size"], settings["win_size"],
                        settings["fmin"], settings["fmax"])
  frontend = BigVGANMel(**settings)
  got = jax.jit(frontend.__call__)(jnp.asarray(wave))
  assert got.shape == (2, frontend.num_frames(3000), settings["num_mels"])
  check(f"bigvgan_mel[{settings['sample_rate']}]", np.asarray(got).transpose(0, 2, 1), ref)


@pytest.mark.parametrize("settings", [
    {},  # SpeechT5's defaults: 16 kHz, 80 bins, 16 ms hop, 64 ms window, 80-7600 Hz
    dict(sampling_rate=8000, num_mel_bins=20, hop_length=10, win_length=25, fmin=0, fmax=4000),
])
def test_speecht5_mel_matches_feature_extractor(settings):
  extractor = transformers.SpeechT5FeatureExtractor(**settings)
  waves = np.random.default_rng(1).uniform(-0.9, 0.9, (2, 4001)).astype(np.float32)
  frontend = SpeechT5Mel.from_feature_extractor(extractor.to_dict())
  got = jax.jit(frontend.__call__)(jnp.asarray(waves))
  for i, wave in enumerate(waves):
    ref = extractor(audio_target=wave, sampling_rate=extractor.sampling_rate,
                    return_tensors="np")["input_values"][0]
    assert got.shape[1] == frontend.num_frames(4001) == ref.shape[0]
    check(f"speecht5_mel[{extractor.sampling_rate}][{i}]", got[i], ref)


def test_mel_rejects_short_waves():
  frontend = BigVGANMel(sample_rate=8000, n_fft=64, num_mels=8, hop_size=8, win_size=64)
  with pytest.raises(ValueError, match="too short"):
    frontend(jnp.zeros(20))
  with pytest.raises(ValueError, match="fmax"):
    BigVGANMel(sample_rate=8000, n_fft=64, num_mels=8, hop_size=8, win_size=64, fmax=5000)


def test_chunk_windows_tile_and_keep_context():
  plan = chunk_windows(100, 16, 5)
  assert [(s, e) for _, s, e in plan] == [(s, min(s + 16, 100)) for s in range(0, 100, 16)]
  for w, s, e in plan:
    assert 0 <= w and w + 26 <= 100
    assert s - w >= 5 or w == 0
    assert w + 26 - e >= 5 or w + 26 == 100


@pytest.mark.parametrize("kind", ["bigvgan", "hifigan"])
def test_chunked_vocoding_equals_whole(kind, small):
  vocoder = pretrained.load(kind, small[kind][1], cache=False)
  c = vocoder.config
  mel = jnp.asarray(np.random.default_rng(2).normal(
      size=(2, 70, getattr(c, "num_mels", None) or c.model_in_dim)), jnp.float32)
  hop, context = vocoder.hop_length, vocoder.context_frames()

  @jax.jit
  def run(mel):
    whole = vocoder(mel)
    chunked = vocode_in_chunks(vocoder, mel, hop=hop, chunk_frames=9, context_frames=context)
    # Too little context: chunk edges see zero padding instead of the neighbouring frames.
    starved = vocode_in_chunks(vocoder, mel, hop=hop, chunk_frames=9, context_frames=1)
    return whole, chunked, starved

  whole, chunked, starved = run(mel)
  assert chunked.shape == whole.shape == (2, 70 * hop)
  check(f"{kind} chunked vs whole", chunked, whole)
  assert float(jnp.abs(starved - whole).max()) > 1e-4 * float(jnp.abs(whole).max())


@pytest.mark.parametrize("kind", ["bigvgan", "hifigan"])
def test_cached_load_restores_the_same_module(kind, small, tmp_path):
  first = pretrained.load(kind, small[kind][1], cache_dir=tmp_path)
  second = pretrained.load(kind, small[kind][1], cache_dir=tmp_path)  # orbax restore via build()
  assert list(tmp_path.glob(f"{kind}/*"))
  assert second.config == first.config
  _same_state(first, second)


def _bigvgan_config(converted):
  h = json.loads((converted / "config.json").read_text())
  c = get_base_config("demo")
  c.latent.vocoder, c.latent.vocoder_mel = "bigvgan", "native"
  c.latent.vocoder_source = str(converted)
  c.latent.vocoder_chunk_frames = 16
  c.data.sample_rate = h["sampling_rate"]
  c.mel.n_mels, c.mel.n_fft, c.mel.hop_length = h["num_mels"], h["n_fft"], h["hop_size"]
  c.mel.win_length, c.mel.fmin = h["win_size"], float(h["fmin"])
  c.mel.fmax = h["sampling_rate"] / 2 if h["fmax"] is None else h["fmax"]
  return c


def test_audio_codec_from_config(small, tmp_path):
  model, converted = small["bigvgan"]
  c = _bigvgan_config(converted)
  c.latent.pretrained_cache_dir = str(tmp_path / "cache")
  codec = autoencoders.build_audio_codec(c)
  num_samples = 1200  # 150 mel frames: several chunks of 16 with the model's context
  wave = np.random.default_rng(3).uniform(-0.5, 0.5, num_samples).astype(np.float32)
  latent = codec.encode(wave)
  frames = num_samples // c.mel.hop_length
  assert latent.shape == (frames, c.mel.n_mels) == (codec.num_frames(num_samples), codec.n_mels)
  # The latent is BigVGAN's own mel, normalized with config.mel.mean / std.
  ref = mel_spectrogram(torch.from_numpy(wave[None]), c.mel.n_fft, c.mel.n_mels,
                        c.data.sample_rate, c.mel.hop_length, c.mel.win_length, c.mel.fmin,
                        c.mel.fmax)[0].numpy().T
  np.testing.assert_allclose(latent * c.mel.std + c.mel.mean, ref, rtol=1e-5, atol=1e-5)
  # decode = the original vocoder on the un-normalized mel (here in chunks of 16 frames).
  out = codec.decode(latent)
  with torch.no_grad():
    expected = model(torch.from_numpy(ref.T[None].copy()))[0, 0]
  assert out.shape == (num_samples,) and out.dtype == np.float32
  check("bigvgan codec decode", out, expected)
  assert codec.decode(np.stack([latent, latent])).shape == (2, num_samples)
  # A mismatch is found from config.json alone, before any weights are read.
  config_only = tmp_path / "config_only"
  config_only.mkdir()
  (config_only / "config.json").write_text((converted / "config.json").read_text())
  c.latent.vocoder_source = str(config_only)
  c.data.sample_rate = 16000
  with pytest.raises(ValueError, match="config.data.sample_rate=16000"):
    autoencoders.build_audio_codec(c)


def test_hifigan_audio_codec_from_config(small):
  model, path = small["hifigan"]
  c = get_base_config("demo")
  c.latent.vocoder, c.latent.vocoder_source = "hifigan", str(path)
  c.latent.vocoder_mel = "native"
  c.latent.pretrained_cache_dir = None
  c.data.sample_rate = model.config.sampling_rate
  c.mel.n_mels, c.mel.hop_length = model.config.model_in_dim, 8  # hop = prod(upsample_rates)
  c.mel.n_fft = c.mel.win_length = 64
  c.mel.fmin, c.mel.fmax, c.mel.log_floor = 80.0, 3800.0, 1e-10
  codec = autoencoders.build_audio_codec(c)
  wave = np.random.default_rng(4).uniform(-0.5, 0.5, 803).astype(np.float32)
  latent = codec.encode(wave)
  # SpeechT5's framing is centred: one more frame than hop-aligned framing.
  assert latent.shape == (803 // 8 + 1, c.mel.n_mels) == (codec.num_frames(803), codec.n_mels)
  extractor = transformers.SpeechT5FeatureExtractor(
      sampling_rate=8000, num_mel_bins=c.mel.n_mels, hop_length=1, win_length=8, fmin=80,
      fmax=3800)  # hop and window in ms: 8 and 64 samples
  ref = extractor(audio_target=wave, sampling_rate=c.data.sample_rate,
                  return_tensors="np")["input_values"][0]
  check("speecht5 mel via codec (numpy)", latent * c.mel.std + c.mel.mean, ref)
  with torch.no_grad():
    expected = model(torch.from_numpy(ref))
  assert expected.shape == ((803 // 8 + 1) * 8,)
  # Cut to the clip's length: given, or by default the fewest samples giving these frames.
  check("hifigan codec decode", codec.decode(latent, num_samples=803), expected[:803])
  assert codec.decode(latent).shape == (803 // 8 * 8,) == (codec.mel.num_samples(101),)
  c.mel.n_mels += 1
  with pytest.raises(ValueError, match="config.mel.n_mels"):
    autoencoders.build_audio_codec(c)


def test_bigvgan_config_rules():
  good = BIGVGAN_CONFIGS["v2_amp1_snakebeta"]
  BigVGANConfig.from_json(good)
  for change, message in [({"resblock": "3"}, "resblock"), ({"activation": "relu"}, "activation"),
                          ({"hop_size": 16}, "hop_size"), ({"upsample_kernel_sizes": [7, 4]},
                                                          "upsample kernel")]:
    with pytest.raises(ValueError, match=message):
      BigVGANConfig.from_json(dict(good, **change))
  with pytest.raises(ValueError, match="missing fields"):
    BigVGANConfig.from_json({k: v for k, v in good.items() if k != "num_mels"})


def test_every_param_has_logical_names():
  """All three ports (built abstractly from their configs) name every parameter's axes."""
  allowed = {"embed", "mlp", "heads", "kv", "vocab", "conv_in", "conv_out", "time", None}
  builders = [
      lambda: BigVGAN(BigVGANConfig.from_json(BIGVGAN_CONFIGS["v2_amp1_snakebeta"]),
                      rngs=nnx.Rngs(0)),
      lambda: HiFiGAN(HiFiGANConfig(), rngs=nnx.Rngs(0)),
      lambda: AutoencoderKL(AutoencoderKLConfig(block_out_channels=(32, 64), norm_num_groups=8),
                            rngs=nnx.Rngs(0)),
  ]
  for build in builders:
    model, count = nnx.eval_shape(build), 0
    for path, node in nnx.iter_graph(model):
      if isinstance(node, nnx.Param):
        names = node.get_metadata().get("out_sharding")
        assert names is not None and len(names) == node.ndim, f"{path}: names {names}"
        assert set(names) <= allowed, f"{path}: unknown names {names}"
        count += 1
    assert count > 20
