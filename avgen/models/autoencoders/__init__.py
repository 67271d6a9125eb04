"""Latent spaces: how pixels and waveforms become diffusion inputs and back.

`build_video_codec(config)` and `build_audio_codec(config)` return objects with
`encode(np.ndarray) -> np.ndarray` and `decode(np.ndarray) -> np.ndarray`. Built now: pixels
(video) and normalized log-mel + Griffin-Lim (audio). SD-VAE and BigVGAN/HiFi-GAN come later under
the same names.
"""

from __future__ import annotations

import numpy as np

from avgen.models.autoencoders.griffin_lim import GriffinLimVocoder
from avgen.models.autoencoders.mel import MelCodec
from avgen.models.autoencoders.pixels import PixelCodec

VIDEO_LATENTS = ("pixels", "sd_vae")
AUDIO_LATENTS = ("mel",)
VOCODERS = ("griffin_lim", "bigvgan", "hifigan")


class AudioCodec:
  """Mel analysis plus a vocoder: encode wave [S] -> mel [N, n_mels]; decode back to [N * hop]."""

  def __init__(self, mel: MelCodec, vocoder):
    self.mel = mel
    self.vocoder = vocoder
    self.sample_rate = mel.sample_rate
    self.hop_length = mel.hop_length
    self.n_mels = mel.n_mels

  def num_frames(self, num_samples: int) -> int:
    return self.mel.num_frames(num_samples)

  def encode(self, wave: np.ndarray) -> np.ndarray:
    return self.mel.encode(wave)

  def decode(self, latent: np.ndarray) -> np.ndarray:
    return self.vocoder.decode(latent)


def build_video_codec(config):
  kind = config.latent.video
  if kind == "pixels":
    return PixelCodec()
  if kind == "sd_vae":
    raise NotImplementedError(
        "config.latent.video='sd_vae': the SD-VAE port is not built yet. Training can still read "
        "precomputed `video_latent` fields from the shards (the loader uses them when "
        "latent.video != 'pixels'), but decoding latents to frames needs the VAE.")
  raise ValueError(f"config.latent.video must be one of {VIDEO_LATENTS}, got {kind!r}")


def build_audio_codec(config) -> AudioCodec:
  if config.latent.audio != "mel":
    raise ValueError(
        f"config.latent.audio must be one of {AUDIO_LATENTS}, got {config.latent.audio!r}")
  mel = MelCodec.from_config(config)
  vocoder = config.latent.vocoder
  if vocoder == "griffin_lim":
    return AudioCodec(mel, GriffinLimVocoder(mel, n_iter=config.mel.griffin_lim_iters))
  if vocoder in ("bigvgan", "hifigan"):
    raise NotImplementedError(
        f"config.latent.vocoder={vocoder!r}: the {vocoder} port is not built yet; use "
        "'griffin_lim' (set --config.latent.vocoder=griffin_lim).")
  raise ValueError(f"config.latent.vocoder must be one of {VOCODERS}, got {vocoder!r}")


__all__ = ["AudioCodec", "GriffinLimVocoder", "MelCodec", "PixelCodec", "build_audio_codec",
           "build_video_codec"]
