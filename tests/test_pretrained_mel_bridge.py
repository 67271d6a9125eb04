"""The mel bridge: our 16 kHz / hop 125 diffusion mel into a pretrained vocoder's mel space, and
the bridged BigVGAN / HiFi-GAN codecs, which decode a clip to exactly its sample count."""

import json

import bigvgan
import numpy as np
import pytest
import scipy.signal
import torch
import transformers
from bigvgan.env import AttrDict

from avgen.models import autoencoders
from avgen.models.autoencoders.hifigan import HiFiGANConfig
from avgen.models.autoencoders.mel import MelCodec
from avgen.models.autoencoders.mel_bridge import (
    MelBridge, analysis_gain, filterbank_map, fit_length)
from avgen.models.autoencoders.mel_frontend import BigVGANMel, SpeechT5Mel
from avgen.pretrained import bigvgan as bigvgan_loader
from configs.base import get_base_config
from tests.pretrained_utils import check

SR, SECONDS = 16000, 2.0
S = int(SR * SECONDS)  # 32000 samples: 256 frames of hop 125, as the non-demo configs have
OURS = dict(sample_rate=SR, n_fft=1024, hop_length=125, win_length=1024, n_mels=80, fmin=0.0,
            fmax=8000.0)
# nvidia/bigvgan_v2_22khz_80band_fmax8k_256x and the _256x sibling (fmax None = 11025 Hz).
BIGVGAN_22K = dict(sample_rate=22050, n_fft=1024, num_mels=80, hop_size=256, win_size=1024,
                   fmin=0.0, fmax=8000.0)


def _ours():
  return MelCodec(**OURS)


def _sweep():
  """Exponential sine sweep 100 Hz -> 7 kHz over the clip."""
  t = np.arange(S) / SR
  k = np.log(7000 / 100)
  return (0.5 * np.sin(2 * np.pi * 100 * SECONDS / k * (np.exp(t / SECONDS * k) - 1))
          ).astype(np.float32)


def _speech_like():
  """A voiced source with vibrato through two formant resonances, syllable-rate envelope."""
  t = np.arange(S) / SR
  phase = 2 * np.pi * np.cumsum(140 + 30 * np.sin(2 * np.pi * 3 * t)) / SR
  source = sum(np.sin(k * phase) / k for k in range(1, 40) if k * 170 < 7800)
  voice = np.zeros(S)
  for freq, q, gain in ((700, 3, 1.0), (1800, 4, 0.5)):
    b, a = scipy.signal.iirpeak(freq / (SR / 2), q)
    voice += gain * scipy.signal.lfilter(b, a, source)
  envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 2.5 * t) ** 2
  return (0.3 * voice / np.abs(voice).max() * envelope).astype(np.float32)


def _resample(wave, rate, source_rate=SR):
  g = np.gcd(source_rate, rate)
  return scipy.signal.resample_poly(wave, rate // g, source_rate // g).astype(np.float32)


def _check_close(name, ours, ref, tol):
  """|ours - ref| / |ref| (Frobenius) of mel magnitudes: how much of the sound is off."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, f"shape {ours.shape} vs reference {ref.shape}"
  err = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
  print(f"[rel-err] {name}: {err:.3f}")
  assert err <= tol, f"{name}: relative error {err:.3f} > {tol}"


def _magnitude(frontend, log_mel):
  return np.power(10.0 if isinstance(frontend, SpeechT5Mel) else np.e, log_mel.astype(np.float64))


def test_equal_filterbanks_map_to_identity_and_others_keep_broadband_level():
  ours = _ours()
  fmax8k = BigVGANMel(**BIGVGAN_22K)
  np.testing.assert_allclose(filterbank_map(ours, fmax8k), np.eye(80), atol=1e-6)
  # Same analysis: nothing to correct. Other n_fft / window: the tone-noise geometric mean.
  same = BigVGANMel(sample_rate=SR, n_fft=1024, num_mels=80, hop_size=125, win_size=1024,
                    fmax=8000.0)
  assert analysis_gain(ours, same) == 1.0
  assert analysis_gain(ours, fmax8k) == pytest.approx((1024 / 22050 / 0.064) ** 0.25)

  full = BigVGANMel(**dict(BIGVGAN_22K, fmax=None))
  a = filterbank_map(ours, full)
  assert a.shape == (80, 80) and (a >= 0).all()
  ws, wt = ours.filters_hz(), full.filters_hz()
  # A spectrum flat where our filters see (0-8 kHz) keeps each target bin's level there; bins
  # wholly above 8 kHz get 0.
  covered = wt[:, :ws.shape[1]] @ (ws.sum(axis=0) > 0)
  np.testing.assert_allclose(a @ ws.sum(axis=1), covered, rtol=1e-6, atol=1e-9)
  above = np.flatnonzero(covered == 0)
  assert len(above) >= 3 and np.abs(a[above]).max() == 0
  # Each target bin draws on our bins at the same frequencies: its weights peak where the two
  # filters' centres are closest.
  centre = lambda w: (w * np.arange(w.shape[1])).sum(1) / w.sum(1)
  cs, ct = centre(ws), centre(wt)
  for i in range(0, 70, 7):
    assert abs(cs[np.argmax(a[i])] - ct[i]) < 1.5 * np.diff(cs).max()


def test_same_analysis_bridge_is_near_identity():
  """Bridging to a front end with our own settings must give (nearly) that front end's mel:
  this catches a wrong time axis or gain, which a cross-rate comparison only bounds."""
  ours = _ours()
  target = BigVGANMel(sample_rate=SR, n_fft=1024, num_mels=80, hop_size=125, win_size=1024,
                      fmax=8000.0)
  bridge = MelBridge(ours, target)
  wave = _speech_like()
  got = bridge(ours.to_log_mel(ours.encode(wave)), S)
  ref = target.numpy(wave)
  assert got.shape == (256, 80) and ref.shape == (255, 80)  # at least ceil(S / hop) frames
  # Interior frames (the ends differ by the padding rule: zeros vs reflection).
  _check_close("same-analysis bridge (interior frames)", _magnitude(target, got[8:247]),
               _magnitude(target, ref[8:247]), tol=0.02)


@pytest.mark.parametrize("signal", ["sweep", "speech_like"])
@pytest.mark.parametrize("vocoder", ["bigvgan_22k_fmax8k", "speecht5_16k"])
def test_bridge_matches_the_vocoders_own_mel(signal, vocoder):
  """mel(ours) -> bridge vs the vocoder's own mel of the same audio at its rate.

  Measured (relative error of magnitudes, interior frames): bigvgan sweep 0.12, speech-like
  0.12; speecht5 sweep 0.14, speech-like 0.17. What remains is what no map can restore: our
  64 ms window against BigVGAN's 46 ms, and our frames sampled at another rate (one target
  frame of misalignment gives ~0.4, half of one of our frames ~0.18)."""
  wave = {"sweep": _sweep, "speech_like": _speech_like}[signal]()
  target = (BigVGANMel(**BIGVGAN_22K) if vocoder.startswith("bigvgan") else SpeechT5Mel())
  ours = _ours()
  bridge = MelBridge(ours, target)
  got = bridge(ours.to_log_mel(ours.encode(wave)), S)
  ref = target.numpy(_resample(wave, target.sample_rate))
  s_t = round(S * target.sample_rate / SR)
  assert got.shape == (max(target.num_frames(s_t), -(-s_t // target.hop_length)), 80)
  assert got.shape[0] * target.hop_length >= s_t
  n = min(len(got), len(ref))
  a, b = _magnitude(target, got[3:n - 3]), _magnitude(target, ref[3:n - 3])
  _check_close(f"bridge {vocoder} {signal}", a, b,
               tol=0.16 if vocoder.startswith("bigvgan") else 0.2)
  # The loudest bin of each frame is where the vocoder's own analysis puts it.
  assert np.mean(np.argmax(a, 1) != np.argmax(b, 1)) < 0.25
  assert np.abs(np.argmax(a, 1) - np.argmax(b, 1)).max() <= 4
  # Frame energies agree to within the gain's stated bound (0.08 nats) plus margin.
  energy = np.log(a.sum(1) / b.sum(1))
  assert abs(energy.mean()) < 0.15, energy.mean()


def test_to_source_rate_resamples_and_cuts_exactly():
  bridge = MelBridge(_ours(), BigVGANMel(**BIGVGAN_22K))
  t = np.arange(44100 + 300) / 22050
  tone = np.sin(2 * np.pi * 1000 * t).astype(np.float32)  # longer than the clip: cut
  out = bridge.to_source_rate(tone[None], S)
  assert out.shape == (1, S) and out.dtype == np.float32
  spectrum = np.abs(np.fft.rfft(out[0]))
  assert abs(np.argmax(spectrum) * SR / S - 1000) < 1
  assert bridge.to_source_rate(tone[:20000], 31999).shape == (31999,)  # short: zero-padded
  assert fit_length(np.ones((2, 5)), 3).shape == (2, 3)


def _bridged_config(kind, source, tmp_path):
  c = get_base_config("demo")
  c.data.sample_rate, c.data.num_frames, c.data.fps = SR, 16, 8
  c.data.audio_seconds = SECONDS
  for k, v in OURS.items():
    if k != "sample_rate":
      setattr(c.mel, k, v)
  c.latent.vocoder, c.latent.vocoder_source, c.latent.vocoder_mel = kind, str(source), "bridge"
  c.latent.vocoder_chunk_frames = 64
  c.latent.pretrained_cache_dir = str(tmp_path / "cache")
  return c


@pytest.fixture(scope="module")
def tiny_bigvgan_22k(tmp_path_factory):
  """A small random BigVGAN v2 with the 22 kHz model's mel settings and hop 256."""
  root = tmp_path_factory.mktemp("bigvgan22k")
  cfg = dict(num_mels=80, upsample_rates=[8, 8, 4], upsample_kernel_sizes=[16, 16, 8],
             upsample_initial_channel=16, resblock="1", resblock_kernel_sizes=[3],
             resblock_dilation_sizes=[[1, 3]], activation="snakebeta", snake_logscale=True,
             use_bias_at_final=False, use_tanh_at_final=False, sampling_rate=22050, n_fft=1024,
             hop_size=256, win_size=1024, fmin=0, fmax=8000)
  torch.manual_seed(0)
  model = bigvgan.BigVGAN(AttrDict(cfg)).eval()
  model.save_pretrained(str(root / "package"))
  return model, bigvgan_loader.safetensors_from_pickle(root / "package", root / "safetensors")


def test_bridged_bigvgan_codec_decodes_the_clip_exactly(tiny_bigvgan_22k, tmp_path):
  model, path = tiny_bigvgan_22k
  c = _bridged_config("bigvgan", path, tmp_path)
  # The latent is our MelCodec mel, whatever the vocoder: the data keep their 256 frames.
  analysis = autoencoders.build_mel_analysis(c)
  assert isinstance(analysis, MelCodec) and analysis.num_frames(S) == 256
  codec = autoencoders.build_audio_codec(c)
  latent = codec.encode(_speech_like())
  assert latent.shape == (256, 80)
  out = codec.decode(latent)
  assert out.shape == (S,) == (round(c.data.audio_seconds * c.data.sample_rate),)
  assert out.dtype == np.float32
  # The same path by hand with the PyTorch original: bridge, vocode at 22050 Hz, cut to the
  # clip's 44100 samples, resample to 16 kHz.
  bridge = MelBridge(analysis, BigVGANMel(**BIGVGAN_22K))
  mel = bridge(analysis.to_log_mel(latent), S)
  assert mel.shape == (173, 80)  # ceil(44100 / 256): the vocoded wave covers the clip
  with torch.no_grad():
    wave = model(torch.from_numpy(mel.T[None].copy()))[0, 0].numpy()
  expected = _resample(wave[:44100], SR, 22050)
  assert expected.shape == (S,)
  check("bridged bigvgan decode (chunked) vs original", out, expected)
  batch = codec.decode(np.stack([latent, latent]))
  assert batch.shape == (2, S)
  np.testing.assert_allclose(batch[1], out, atol=1e-6)
  assert codec.decode(latent, num_samples=S - 77).shape == (S - 77,)


@pytest.fixture(scope="module")
def tiny_hifigan_16k(tmp_path_factory):
  root = tmp_path_factory.mktemp("hifigan16k")
  torch.manual_seed(0)
  config = transformers.SpeechT5HifiGanConfig(
      model_in_dim=80, sampling_rate=16000, upsample_initial_channel=16,
      upsample_rates=[4, 4, 4, 4], upsample_kernel_sizes=[8, 8, 8, 8],
      resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]])
  model = transformers.SpeechT5HifiGan(config).eval()
  model.save_pretrained(str(root))
  return model, root


def test_bridged_hifigan_codec_trims_centred_frames_to_the_clip(tiny_hifigan_16k, tmp_path):
  """SpeechT5's centred framing gives S // hop + 1 frames, one hop more wave than the clip."""
  model, path = tiny_hifigan_16k
  c = _bridged_config("hifigan", path, tmp_path)
  codec = autoencoders.build_audio_codec(c)
  latent = codec.encode(_sweep())
  out = codec.decode(latent)
  assert out.shape == (S,)
  target = SpeechT5Mel()  # no preprocessor_config.json: SpeechT5's defaults
  mel = MelBridge(codec.mel, target)(codec.mel.to_log_mel(latent), S)
  assert mel.shape == (S // 256 + 1, 80) == (target.num_frames(S), 80)
  with torch.no_grad():
    expected = model(torch.from_numpy(mel))
  assert expected.shape == ((S // 256 + 1) * 256,)
  check("bridged hifigan decode vs original", out, expected[:S])


def test_hifigan_preprocessor_config_is_read_and_checked(tiny_hifigan_16k, tmp_path):
  _, path = tiny_hifigan_16k
  config = HiFiGANConfig.from_transformers(json.loads((path / "config.json").read_text()))
  extractor = transformers.SpeechT5FeatureExtractor(fmin=0, fmax=8000)
  folder = tmp_path / "with_extractor"
  folder.mkdir()
  for f in path.iterdir():
    (folder / f.name).write_bytes(f.read_bytes())
  (folder / "preprocessor_config.json").write_text(json.dumps(extractor.to_dict()))
  frontend = autoencoders.vocoder_frontend("hifigan", config, folder)
  assert (frontend.fmin, frontend.fmax, frontend.hop_length) == (0.0, 8000.0, 256)
  (folder / "preprocessor_config.json").write_text(
      json.dumps(dict(extractor.to_dict(), hop_length=10)))  # 160 samples, not the model's 256
  with pytest.raises(ValueError, match="hop_length"):
    autoencoders.vocoder_frontend("hifigan", config, folder)


def test_vocoder_mel_mode_is_checked():
  c = get_base_config("S")
  assert c.latent.vocoder_mel == "bridge" and c.latent.vocoder == "bigvgan"
  assert (c.data.sample_rate, c.mel.hop_length, c.mel.n_mels) == (16000, 125, 80)
  assert isinstance(autoencoders.build_mel_analysis(c), MelCodec)
  c.latent.vocoder_mel = "magic"
  with pytest.raises(ValueError, match="config.latent.vocoder_mel"):
    autoencoders.build_mel_analysis(c)
