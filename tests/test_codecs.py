"""Latent spaces: pixels round trip, mel framing and time localisation, Griffin-Lim pitch."""

import numpy as np
import pytest

from avgen.models import autoencoders
from avgen.models.autoencoders import GriffinLimVocoder, MelCodec, PixelCodec
from configs.base import get_base_config

SR = 16000


@pytest.fixture(scope="module")
def config():
  return get_base_config("demo")


@pytest.fixture(scope="module")
def mel(config):
  return MelCodec.from_config(config)


def test_pixel_round_trip_exact_and_range():
  codec = PixelCodec()
  video = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
  latent = codec.encode(video)
  assert latent.dtype == np.float32
  assert latent.min() == -1.0 and latent.max() == 1.0
  np.testing.assert_array_equal(codec.decode(latent), video)
  noisy = latent + np.random.default_rng(0).uniform(-0.003, 0.003, latent.shape)  # < half a step
  np.testing.assert_array_equal(codec.decode(noisy), video)
  assert codec.decode(np.full((2, 2, 3), 5.0)).max() == 255  # clipped, not wrapped
  assert codec.decode(np.full((2, 2, 3), -5.0)).min() == 0


def test_pixel_rejects_bad_input():
  with pytest.raises(TypeError, match="uint8"):
    PixelCodec().encode(np.zeros((4, 4, 3), np.float32))
  with pytest.raises(ValueError, match="3"):
    PixelCodec().encode(np.zeros((4, 4, 4), np.uint8))


@pytest.mark.parametrize("num_samples", [16000, 16249, 250, 4321])
def test_mel_frame_count(mel, num_samples):
  wave = np.random.default_rng(0).normal(size=num_samples).astype(np.float32) * 0.1
  out = mel.encode(wave)
  assert out.shape == (num_samples // mel.hop_length, 64)
  assert mel.num_frames(num_samples) == num_samples // mel.hop_length
  assert out.dtype == np.float32


def test_mel_batch_matches_single(mel):
  waves = np.random.default_rng(1).normal(size=(3, 4000)).astype(np.float32) * 0.1
  batch = mel.encode(waves)
  assert batch.shape == (3, 16, 64)
  for i in range(3):
    np.testing.assert_allclose(batch[i], mel.encode(waves[i]), atol=1e-5)


def test_mel_silence_is_the_normalized_floor(mel, config):
  out = mel.encode(np.zeros(SR, np.float32))
  expected = (np.log(config.mel.log_floor) - config.mel.mean) / config.mel.std
  np.testing.assert_allclose(out, expected, rtol=1e-6)


@pytest.mark.parametrize("frame", [0, 7, 20, 63])
def test_mel_impulse_localises_in_its_frame(mel, frame):
  hop = mel.hop_length
  wave = np.zeros(SR, np.float32)
  wave[frame * hop + hop // 2] = 1.0  # the middle of [frame * hop, (frame + 1) * hop)
  energy = mel.encode(wave).mean(axis=1)
  assert np.argmax(energy) == frame
  # Symmetric about the impulse: the frames either side see the same window value.
  if 0 < frame < 63:
    np.testing.assert_allclose(energy[frame - 1], energy[frame + 1], atol=1e-4)


def test_mel_rejects_bad_input_and_params(mel):
  with pytest.raises(ValueError, match="hop_length"):
    mel.encode(np.zeros(100, np.float32))
  with pytest.raises(ValueError, match="float"):
    mel.encode(np.zeros(1000, np.int16))
  with pytest.raises(ValueError, match="win_length"):
    MelCodec(SR, n_fft=512, hop_length=128, win_length=1024, n_mels=64)
  with pytest.raises(ValueError, match="fmax"):
    MelCodec(SR, n_fft=512, hop_length=128, win_length=512, n_mels=64, fmax=9000.0)


def test_stft_istft_round_trip(mel):
  wave = np.random.default_rng(2).normal(size=4000)
  spec = mel.stft(wave, mel.num_frames(4000))
  np.testing.assert_allclose(mel.istft(spec), wave, atol=1e-8)


@pytest.mark.parametrize("freq", [440.0, 1000.0, 3000.0])
def test_griffin_lim_pure_tone_keeps_pitch(config, freq):
  codec = autoencoders.build_audio_codec(config)
  wave = (0.3 * np.sin(2 * np.pi * freq * np.arange(SR) / SR)).astype(np.float32)
  latent = codec.encode(wave)
  out = codec.decode(latent)
  assert out.shape == (latent.shape[0] * config.mel.hop_length,) and out.dtype == np.float32
  spectrum = np.abs(np.fft.rfft(out))
  peak = np.argmax(spectrum) * SR / len(out)
  assert abs(peak - freq) < 0.05 * freq, peak
  # Loudness survives the mel inversion (within a factor of 1.5 in RMS).
  ratio = np.sqrt(np.mean(out**2)) / np.sqrt(np.mean(wave**2))
  assert 0.67 < ratio < 1.5, ratio


def test_griffin_lim_keeps_onset_time(config):
  codec = autoencoders.build_audio_codec(config)
  t = np.arange(SR) / SR
  start = 0.5
  wave = np.where(t >= start, 0.3 * np.sin(2 * np.pi * 660 * (t - start)), 0).astype(np.float32)
  out = codec.decode(codec.encode(wave))
  envelope = np.abs(out).reshape(-1, 160).max(axis=1)  # 10 ms blocks
  onset = np.argmax(envelope > 0.3 * envelope.max()) * 0.01
  assert abs(onset - start) <= 0.04, onset


def test_griffin_lim_batch_shape(config, mel):
  vocoder = GriffinLimVocoder(mel, n_iter=2)
  assert vocoder.decode(np.zeros((2, 8, 64), np.float32)).shape == (2, 8 * mel.hop_length)
  with pytest.raises(ValueError, match="n_mels"):
    vocoder.decode(np.zeros((8, 80), np.float32))


def test_builders(config):
  assert isinstance(autoencoders.build_video_codec(config), PixelCodec)
  c = get_base_config("demo")
  c.latent.video = "sd_vae"
  c.latent.video_source = "/no/such/vae"  # pretrained codecs load weights (test_pretrained_*.py)
  with pytest.raises(ValueError, match="sd_vae.*/no/such/vae"):
    autoencoders.build_video_codec(c)
  c.latent.video = "vqgan"
  with pytest.raises(ValueError, match="latent.video"):
    autoencoders.build_video_codec(c)
  c.latent.vocoder_source = "/no/such/vocoder"
  for name in ("bigvgan", "hifigan"):
    c.latent.vocoder = name
    with pytest.raises(ValueError, match=f"{name}.*/no/such/vocoder"):
      autoencoders.build_audio_codec(c)
  c.latent.vocoder = "wavenet"
  with pytest.raises(ValueError, match="vocoder"):
    autoencoders.build_audio_codec(c)
