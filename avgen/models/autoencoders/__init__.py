"""Latent spaces: how pixels and waveforms become diffusion inputs and back.

`build_video_codec(config)` and `build_audio_codec(config)` return objects with
`encode(np.ndarray) -> np.ndarray` and `decode(np.ndarray) -> np.ndarray`.

video: "pixels" (uint8 <-> [-1, 1]) or "sd_vae" (SD's KL autoencoder, scaled latents).
audio: normalized log-mel (latent = (log-mel - config.mel.mean) / config.mel.std) and a vocoder:
  "griffin_lim" (no weights; the project's own MelCodec framing), or a pretrained "bigvgan" /
  "hifigan", used one of two ways (config.latent.vocoder_mel):
    "bridge"  the latent is the project's MelCodec mel (config.data.sample_rate, config.mel), as
              for griffin_lim; decoding maps it into the vocoder's own mel space (its rate, hop,
              filterbank; mel_bridge.py), vocodes at the vocoder's rate and resamples the wave to
              config.data.sample_rate. Any checkpoint fits any config.mel.
    "native"  the latent is the vocoder's own mel function (mel_frontend.py) with config.mel's
              settings, which must equal the checkpoint's: exact, but ties the data to the
              vocoder's rate and framing. (The default of configs that lack the field.)
  Decoded waves have exactly the clip's sample count: N * hop for N MelCodec frames, or
  `num_samples` when given.

Pretrained weights come from `avgen.pretrained.load(kind, source)`. Optional config fields
(read with defaults, so older configs keep working):
  latent.video_source / latent.vocoder_source   local dir or hub id (default: the kind's
                                                DEFAULT_SOURCE in avgen/pretrained/<kind>.py)
  latent.codec_dtype                            "float32" (default) or "bfloat16"
  latent.vae_frames_per_chunk                   frames per VAE call (default 8)
  latent.vocoder_chunk_frames                   mel frames per vocoder call (default 512)
  latent.vocoder_mel                            "bridge" or "native" (default "native")
  latent.pretrained_cache_dir                   converted-weights cache (default: the loader's)
"""

from __future__ import annotations

import pathlib

import numpy as np

from avgen.models.autoencoders.griffin_lim import GriffinLimVocoder
from avgen.models.autoencoders.mel import MelCodec
from avgen.models.autoencoders.pixels import PixelCodec

VIDEO_LATENTS = ("pixels", "sd_vae")
AUDIO_LATENTS = ("mel",)
VOCODERS = ("griffin_lim", "bigvgan", "hifigan")
VOCODER_MELS = ("bridge", "native")


class AudioCodec:
  """Mel analysis plus a vocoder: encode wave [S] -> mel [N, n_mels]; decode back to a wave of
  the analysis' sample count for N frames (N * hop for MelCodec), or of `num_samples`."""

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

  def decode(self, latent: np.ndarray, num_samples: int | None = None) -> np.ndarray:
    return self.vocoder.decode(latent, num_samples=num_samples)


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

  def num_samples(self, num_frames: int) -> int:
    return self.frontend.num_samples(num_frames)

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

  decode: latent [N, n_mels] or [B, N, n_mels] -> float32 wave [S] or [B, S] at
  analysis.sample_rate, S = `num_samples` or analysis.num_samples(N). The vocoder runs in time
  chunks of `chunk_frames` of its mel frames (same output as one pass; see chunking.py).
  Without `bridge` the latent is the vocoder's own mel (analysis: MelAnalysis of its front end).
  With a mel_bridge.MelBridge, the latent is the MelCodec `analysis`'s mel, mapped into the
  vocoder's mel space first, and the wave is resampled from the vocoder's rate to ours.
  """

  def __init__(self, module, analysis, chunk_frames: int = 512, bridge=None):
    import jax  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top

    from avgen.models.autoencoders import chunking  # pylint: disable=g-import-not-at-top

    if chunk_frames < 1:
      raise ValueError(f"NeuralVocoder: chunk_frames must be >= 1, got {chunk_frames}")
    self.analysis, self.bridge = analysis, bridge
    self.sample_rate = analysis.sample_rate
    self.hop_length = module.hop_length
    if bridge is not None and bridge.target.hop_length != module.hop_length:
      raise ValueError(f"NeuralVocoder: the bridge's target hop {bridge.target.hop_length} is not "
                       f"the vocoder's {module.hop_length} samples per frame")
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

  def vocode(self, log_mel: np.ndarray) -> np.ndarray:
    """The vocoder's own log-mel [B, N, M] -> float32 wave [B, N * hop] at its sample rate."""
    return np.asarray(self._run(self._state, np.asarray(log_mel, np.float32)), np.float32)

  def decode(self, latent: np.ndarray, num_samples: int | None = None) -> np.ndarray:
    from avgen.models.autoencoders import mel_bridge  # pylint: disable=g-import-not-at-top

    log_mel = self.analysis.to_log_mel(latent)
    if log_mel.ndim == 2:
      return self.decode(latent[None], num_samples)[0]
    if log_mel.ndim != 3:
      raise ValueError(f"NeuralVocoder.decode: latent must be [N, n_mels] or [B, N, n_mels], got "
                       f"{log_mel.shape}")
    frames = log_mel.shape[1]
    if num_samples is None:
      inverse = getattr(self.analysis, "num_samples", None)
      num_samples = inverse(frames) if inverse else frames * self.analysis.hop_length
    if num_samples < 1:
      raise ValueError(f"NeuralVocoder.decode: num_samples must be >= 1, got {num_samples}")
    if self.bridge is None:
      # e.g. SpeechT5's centred frames: S // hop + 1 frames give (S // hop + 1) * hop samples.
      return mel_bridge.fit_length(self.vocode(log_mel), num_samples)
    wave = self.vocode(self.bridge(log_mel, num_samples))
    return self.bridge.to_source_rate(wave, num_samples)


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
  """(pretrained module, its resolved directory); `check(module_config)` runs on its config.json
  before any weights are read."""
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
  return pretrained.load(kind, path, dtype=dtype, cache_dir=cache_dir), path


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
    check = lambda c: _mismatch_error("SD-VAE checkpoint", [
        ("config.latent.video_channels", config.latent.video_channels, c.latent_channels),
        ("config.latent.video_downsample", config.latent.video_downsample, c.downsample)])
    vae, _ = _load(config, "sd_vae", "video_source", check)
    return VAEVideoCodec(vae, _latent_option(config, "vae_frames_per_chunk", 8))
  raise ValueError(f"config.latent.video must be one of {VIDEO_LATENTS}, got {kind!r}")


def vocoder_mel_mode(config) -> str:
  """config.latent.vocoder_mel, checked: "bridge" or "native" (absent: "native")."""
  mode = _latent_option(config, "vocoder_mel", "native")
  if mode not in VOCODER_MELS:
    raise ValueError(f"config.latent.vocoder_mel must be one of {VOCODER_MELS}, got {mode!r}")
  return mode


def build_mel_analysis(config):
  """The audio latent's analysis for `config`: MelCodec, or the chosen vocoder's own mel.

  MelCodec for griffin_lim and for pretrained vocoders with latent.vocoder_mel = "bridge"; the
  vocoder's own mel function for "native". Needs no weights: a native analysis is built from
  config.mel / config.data, and `build_audio_codec` checks those against the checkpoint. Data
  loaders and latent precompute jobs should encode with this, so training mels match what the
  decoder inverts.
  """
  from avgen.models.autoencoders import mel_frontend  # pylint: disable=g-import-not-at-top

  if config.latent.audio != "mel":
    raise ValueError(
        f"config.latent.audio must be one of {AUDIO_LATENTS}, got {config.latent.audio!r}")
  vocoder, m, sr = config.latent.vocoder, config.mel, config.data.sample_rate
  if vocoder == "griffin_lim":
    return MelCodec.from_config(config)
  if vocoder in VOCODERS and vocoder_mel_mode(config) == "bridge":
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


def vocoder_frontend(vocoder: str, module_config, path: pathlib.Path | None = None):
  """The mel front end a pretrained vocoder was trained on, from its checkpoint's files.

  BigVGAN's config.json holds its mel settings. SpeechT5HifiGan's config.json holds only the
  rate, bins and hop; the rest comes from a preprocessor_config.json beside it (as
  SpeechT5FeatureExtractor saves it) or, without one, SpeechT5's defaults: 64 ms window,
  80-7600 Hz (capped at half the rate), log10 with floor 1e-10.
  """
  import json  # pylint: disable=g-import-not-at-top

  from avgen.models.autoencoders import mel_frontend  # pylint: disable=g-import-not-at-top

  c = module_config
  if vocoder == "bigvgan":
    return mel_frontend.BigVGANMel.from_config(c)
  extractor = path / "preprocessor_config.json" if path is not None else None
  if extractor is not None and extractor.is_file():
    frontend = mel_frontend.SpeechT5Mel.from_feature_extractor(json.loads(extractor.read_text()))
  else:
    sr = c.sampling_rate
    frontend = mel_frontend.SpeechT5Mel(
        sample_rate=sr, num_mel_bins=c.model_in_dim, hop_length=c.hop_length,
        win_length=round(0.064 * sr), fmin=80.0, fmax=min(7600.0, sr / 2))
  bad = [f"{name} {ours} but config.json's {field} {theirs}" for name, ours, field, theirs in [
      ("sampling_rate", frontend.sample_rate, "sampling_rate", c.sampling_rate),
      ("num_mel_bins", frontend.n_mels, "model_in_dim", c.model_in_dim),
      ("hop_length (in samples)", frontend.hop_length, "prod(upsample_rates)", c.hop_length)]
         if ours != theirs]
  if bad:
    raise ValueError(f"HiFi-GAN checkpoint {path}: preprocessor_config.json does not fit the "
                     "generator: " + "; ".join(bad))
  return frontend


def build_audio_codec(config) -> AudioCodec:
  from avgen.models.autoencoders import mel_bridge  # pylint: disable=g-import-not-at-top

  analysis = build_mel_analysis(config)
  vocoder = config.latent.vocoder
  if vocoder == "griffin_lim":
    return AudioCodec(analysis, GriffinLimVocoder(analysis, n_iter=config.mel.griffin_lim_iters))
  chunk_frames = _latent_option(config, "vocoder_chunk_frames", 512)
  if vocoder_mel_mode(config) == "native":
    module, _ = _load(config, vocoder, "vocoder_source",
                      lambda c: _check_vocoder(vocoder, c, analysis))
    return AudioCodec(analysis, NeuralVocoder(module, analysis, chunk_frames))
  module, path = _load(config, vocoder, "vocoder_source", lambda c: None)
  bridge = mel_bridge.MelBridge(analysis, vocoder_frontend(vocoder, module.config, path))
  return AudioCodec(analysis, NeuralVocoder(module, analysis, chunk_frames, bridge=bridge))


__all__ = ["AudioCodec", "GriffinLimVocoder", "MelAnalysis", "MelCodec", "NeuralVocoder",
           "PixelCodec", "VAEVideoCodec", "build_audio_codec", "build_mel_analysis",
           "build_video_codec", "vocoder_frontend", "vocoder_mel_mode"]
