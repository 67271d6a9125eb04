"""Latent spaces: how pixels and waveforms become diffusion inputs and back.

`build_video_codec(config)` and `build_audio_codec(config)` return objects with
`encode(np.ndarray) -> np.ndarray` and `decode(np.ndarray) -> np.ndarray`.

video: "pixels" (uint8 <-> [-1, 1]) or "sd_vae" (SD's KL autoencoder, scaled latents).
audio: normalized log-mel (latent = (log-mel - config.mel.mean) / config.mel.std) and a vocoder:
  "griffin_lim" (no weights; the project's own MelCodec framing), or a pretrained "bigvgan" /
  "hifigan", whose mel analysis is that vocoder's own function (mel_frontend.py), so that the
  latents the model learns are the mels the vocoder was trained to invert.

Pretrained weights come from `avgen.pretrained.load(kind, source)`. Optional config fields
(read with defaults, so older configs keep working):
  latent.video_source / latent.vocoder_source   local dir or hub id (default: the kind's
                                                DEFAULT_SOURCE in avgen/pretrained/<kind>.py)
  latent.codec_dtype                            "float32" (default) or "bfloat16"
  latent.vae_frames_per_chunk                   frames per VAE call (default 8)
  latent.vocoder_chunk_frames                   mel frames per vocoder call (default 512)
  latent.pretrained_cache_dir                   converted-weights cache (default: the loader's)
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

  def __init__(self, mel, vocoder):
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


class MelAnalysis:
  """A pretrained vocoder's own mel front end, normalized like MelCodec: (log-mel - mean) / std.

  Same interface as MelCodec (encode, num_frames, settings, sample_rate, hop_length, n_mels),
  and like it pure numpy, so it can run in grain worker processes.
  """

  def __init__(self, frontend, mean: float = 0.0, std: float = 1.0):
    if std <= 0:
      raise ValueError(f"MelAnalysis: std must be > 0, got {std}")
    self.frontend = frontend
    self.mean, self.std = float(mean), float(std)
    self.sample_rate, self.hop_length = frontend.sample_rate, frontend.hop_length
    self.n_mels = frontend.n_mels

  def settings(self) -> dict:
    return dict(self.frontend.settings(), mean=self.mean, std=self.std)

  def num_frames(self, num_samples: int) -> int:
    return self.frontend.num_frames(num_samples)

  def encode(self, wave: np.ndarray) -> np.ndarray:
    """wave float [S] or [B, S] -> float32 [N, n_mels] or [B, N, n_mels]."""
    wave = np.asarray(wave)
    if wave.ndim not in (1, 2) or not np.issubdtype(wave.dtype, np.floating):
      raise ValueError(f"MelAnalysis.encode: wave must be float [S] or [B, S], got {wave.dtype} "
                       f"{wave.shape}")
    # numpy, not jax: data-loading worker processes call this and should not start JAX.
    log_mel = self.frontend.numpy(wave)
    return ((log_mel - self.mean) / self.std).astype(np.float32)

  def to_log_mel(self, latent: np.ndarray) -> np.ndarray:
    latent = np.asarray(latent, np.float32)
    if latent.ndim < 2 or latent.shape[-1] != self.n_mels:
      raise ValueError(f"MelAnalysis: mel latent must have shape [..., N, n_mels={self.n_mels}], "
                       f"got {latent.shape}")
    return latent * np.float32(self.std) + np.float32(self.mean)


class NeuralVocoder:
  """A pretrained vocoder (BigVGAN / HiFi-GAN module) on normalized mel latents.

  decode: latent [N, n_mels] or [B, N, n_mels] -> float32 wave [N * hop] or [B, N * hop], run in
  time chunks of `chunk_frames` mel frames (same output as one pass; see chunking.py).
  """

  def __init__(self, module, analysis: MelAnalysis, chunk_frames: int = 512):
    import jax  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top

    from avgen.models.autoencoders import chunking  # pylint: disable=g-import-not-at-top

    if chunk_frames < 1:
      raise ValueError(f"NeuralVocoder: chunk_frames must be >= 1, got {chunk_frames}")
    self.analysis = analysis
    self.hop_length = module.hop_length
    self.chunk_frames = int(chunk_frames)
    self.context_frames = module.context_frames()
    graphdef, state = nnx.split(module)
    self._state = state

    def run(state, mel):
      vocoder = nnx.merge(graphdef, state)
      return chunking.vocode_in_chunks(vocoder, mel, hop=self.hop_length,
                                       chunk_frames=self.chunk_frames,
                                       context_frames=self.context_frames)

    self._run = jax.jit(run)

  def decode(self, latent: np.ndarray) -> np.ndarray:
    log_mel = self.analysis.to_log_mel(latent)
    if log_mel.ndim == 2:
      return self.decode(latent[None])[0]
    if log_mel.ndim != 3:
      raise ValueError(f"NeuralVocoder.decode: latent must be [N, n_mels] or [B, N, n_mels], got "
                       f"{log_mel.shape}")
    return np.asarray(self._run(self._state, log_mel), np.float32)


class VAEVideoCodec:
  """SD-VAE latent space: uint8 video [..., H, W, 3] <-> scaled latents [..., H/f, W/f, C]."""

  def __init__(self, vae, frames_per_chunk: int | None = 8):
    import jax  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top

    self.downsample = vae.config.downsample
    self.channels = vae.config.latent_channels
    self.in_channels = vae.config.in_channels
    graphdef, state = nnx.split(vae)
    self._state = state
    k = frames_per_chunk

    def encode(state, x):
      return nnx.merge(graphdef, state).encode(x, frames_per_chunk=k)

    def decode(state, z):
      return nnx.merge(graphdef, state).decode(z, frames_per_chunk=k)

    self._encode, self._decode = jax.jit(encode), jax.jit(decode)

  def encode(self, video: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 posterior-mean latents, scaled."""
    video = np.asarray(video)
    if video.dtype != np.uint8:
      raise TypeError(f"VAEVideoCodec.encode: video must be uint8, got {video.dtype}")
    if video.ndim < 3 or video.shape[-1] != self.in_channels:
      raise ValueError(f"VAEVideoCodec.encode: video must have shape [..., H, W, "
                       f"{self.in_channels}], got {video.shape}")
    x = video.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return np.asarray(self._encode(self._state, x), np.float32)

  def decode(self, latent) -> np.ndarray:
    """Latents [..., h, w, C] -> uint8 [..., h*f, w*f, 3] (decoder output clipped to [-1, 1])."""
    latent = np.asarray(latent, np.float32)
    if latent.ndim < 3 or latent.shape[-1] != self.channels:
      raise ValueError(f"VAEVideoCodec.decode: latent must have shape [..., h, w, "
                       f"{self.channels}], got {latent.shape}")
    images = np.asarray(self._decode(self._state, latent))
    return np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _latent_option(config, name: str, default):
  value = config.latent.get(name, None)
  return default if value is None else value


def _load(config, kind: str, source_field: str, check):
  """The pretrained module; `check(module_config)` runs on its config.json before any weights."""
  import pathlib  # pylint: disable=g-import-not-at-top

  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from avgen import pretrained  # pylint: disable=g-import-not-at-top
  from avgen.pretrained import hub  # pylint: disable=g-import-not-at-top

  mod = pretrained.kind_module(kind)
  source = _latent_option(config, source_field, None) or mod.DEFAULT_SOURCE
  dtype = jnp.dtype(_latent_option(config, "codec_dtype", "float32"))
  cache_dir = _latent_option(config, "pretrained_cache_dir", None)
  root = pathlib.Path(cache_dir).expanduser() if cache_dir else hub.default_cache_dir()
  path = hub.resolve(source, what=f"load({kind!r}) from config.latent.{source_field}",
                     cache_dir=root, patterns=getattr(mod, "HUB_PATTERNS", hub.DEFAULT_PATTERNS))
  check(nnx.eval_shape(lambda: mod.build(path, dtype)).config)
  return pretrained.load(kind, path, dtype=dtype, cache_dir=cache_dir)


def _mismatch_error(what: str, pairs) -> None:
  bad = [f"{name}={ours!r} but the {what} has {theirs!r}" for name, ours, theirs in pairs
         if ours != theirs]
  if bad:
    raise ValueError(f"config does not match the {what}: " + "; ".join(bad))


def build_video_codec(config):
  kind = config.latent.video
  if kind == "pixels":
    return PixelCodec()
  if kind == "sd_vae":
    vae = _load(config, "sd_vae", "video_source", lambda c: _mismatch_error("SD-VAE checkpoint", [
        ("config.latent.video_channels", config.latent.video_channels, c.latent_channels),
        ("config.latent.video_downsample", config.latent.video_downsample, c.downsample)]))
    return VAEVideoCodec(vae, _latent_option(config, "vae_frames_per_chunk", 8))
  raise ValueError(f"config.latent.video must be one of {VIDEO_LATENTS}, got {kind!r}")


def build_mel_analysis(config):
  """The audio latent's analysis for `config`: MelCodec, or the chosen vocoder's own mel.

  Needs no weights: a pretrained vocoder's analysis is built from config.mel / config.data,
  and `build_audio_codec` checks those against the checkpoint. Data loaders and latent
  precompute jobs should encode with this, so training mels match what the vocoder inverts.
  """
  from avgen.models.autoencoders import mel_frontend  # pylint: disable=g-import-not-at-top

  if config.latent.audio != "mel":
    raise ValueError(
        f"config.latent.audio must be one of {AUDIO_LATENTS}, got {config.latent.audio!r}")
  vocoder, m, sr = config.latent.vocoder, config.mel, config.data.sample_rate
  if vocoder == "griffin_lim":
    return MelCodec.from_config(config)
  if vocoder == "bigvgan":
    if m.log_floor != 1e-5:
      raise ValueError(f"config.mel.log_floor={m.log_floor}: BigVGAN's mel clamps at 1e-5 "
                       "before the log; set config.mel.log_floor=1e-5")
    frontend = mel_frontend.BigVGANMel(sample_rate=sr, n_fft=m.n_fft, num_mels=m.n_mels,
                                       hop_size=m.hop_length, win_size=m.win_length,
                                       fmin=m.fmin, fmax=m.fmax)
    return MelAnalysis(frontend, m.mean, m.std)
  if vocoder == "hifigan":
    frontend = mel_frontend.SpeechT5Mel(sample_rate=sr, num_mel_bins=m.n_mels,
                                        hop_length=m.hop_length, win_length=m.win_length,
                                        fmin=m.fmin, fmax=m.fmax, mel_floor=m.log_floor)
    if frontend.n_fft != m.n_fft:
      raise ValueError(f"config.mel.n_fft={m.n_fft}: SpeechT5's mel uses the next power of two "
                       f"above win_length={m.win_length}, {frontend.n_fft}")
    return MelAnalysis(frontend, m.mean, m.std)
  raise ValueError(f"config.latent.vocoder must be one of {VOCODERS}, got {vocoder!r}")


def _check_vocoder(vocoder: str, c, analysis: MelAnalysis) -> None:
  if vocoder == "bigvgan":
    _mismatch_error("BigVGAN checkpoint", [
        ("config.data.sample_rate", analysis.sample_rate, c.sampling_rate),
        ("config.mel.n_mels", analysis.n_mels, c.num_mels),
        ("config.mel.n_fft", analysis.frontend.n_fft, c.n_fft),
        ("config.mel.hop_length", analysis.hop_length, c.hop_size),
        ("config.mel.win_length", analysis.frontend.win_length, c.win_size),
        ("config.mel.fmin", analysis.frontend.fmin, float(c.fmin)),
        ("config.mel.fmax", analysis.frontend.fmax or c.sampling_rate / 2,
         c.fmax or c.sampling_rate / 2)])
  else:  # SpeechT5HifiGan's config records only its rate, mel bins and upsampling
    _mismatch_error("HiFi-GAN checkpoint", [
        ("config.data.sample_rate", analysis.sample_rate, c.sampling_rate),
        ("config.mel.n_mels", analysis.n_mels, c.model_in_dim),
        ("config.mel.hop_length", analysis.hop_length, c.hop_length)])


def build_audio_codec(config) -> AudioCodec:
  analysis = build_mel_analysis(config)
  vocoder = config.latent.vocoder
  if vocoder == "griffin_lim":
    return AudioCodec(analysis, GriffinLimVocoder(analysis, n_iter=config.mel.griffin_lim_iters))
  module = _load(config, vocoder, "vocoder_source", lambda c: _check_vocoder(vocoder, c, analysis))
  return AudioCodec(analysis, NeuralVocoder(
      module, analysis, _latent_option(config, "vocoder_chunk_frames", 512)))


__all__ = ["AudioCodec", "GriffinLimVocoder", "MelAnalysis", "MelCodec", "NeuralVocoder",
           "PixelCodec", "VAEVideoCodec", "build_audio_codec", "build_mel_analysis",
           "build_video_codec"]
