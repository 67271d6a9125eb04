"""Each pretrained vocoder's own mel analysis, in JAX: waveform [..., S] -> log-mel [..., N, M].

A vocoder only inverts mels made the way its training data was made, so these reproduce the
originals' functions rather than the project's MelCodec:

BigVGANMel  BigVGAN's `meldataset.mel_spectrogram` (bigvgan 2.4.1), which is also the original
            HiFi-GAN's (jik876/hifi-gan meldataset.py). Reflect-pad (n_fft - hop) / 2 each side,
            frames of n_fft every hop (no centring), periodic Hann of win_size in the middle of
            n_fft, magnitude sqrt(re^2 + im^2 + 1e-9), librosa's Slaney mel filters,
            log(max(mel, 1e-5)). N = (S + 2 pad - n_fft) // hop + 1, which is S // hop when
            n_fft - hop is even: frame k is centred on k * hop + hop / 2.
SpeechT5Mel transformers' SpeechT5FeatureExtractor target mels (what SpeechT5HifiGan inverts).
            Reflect-pad win / 2 each side (centred frames), periodic Hann of win at the start of a
            zero-padded FFT of n_fft = the next power of two, magnitude, Slaney mel filters from
            transformers, log10(max(mel, 1e-10)). N = S // hop + 1: frame k is centred on k * hop.

Both take float waves in [-1, 1] with any leading axes. `frontend(wave)` is jax (float32,
jittable); `frontend.numpy(wave)` is the same function in numpy (returned as float32) for
data-loading workers that should not run JAX.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def _frames(wave, frame_length: int, hop: int):
  """[..., S] -> [..., (S - frame_length) // hop + 1, frame_length] (no padding)."""
  n = (wave.shape[-1] - frame_length) // hop + 1
  index = hop * np.arange(n)[:, None] + np.arange(frame_length)[None, :]
  return wave[..., index]


def _periodic_hann(length: int) -> np.ndarray:
  return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / length)


class BigVGANMel:
  """BigVGAN's (and the original HiFi-GAN's) mel_spectrogram."""

  kind = "bigvgan_mel"

  def __init__(self, *, sample_rate: int, n_fft: int, num_mels: int, hop_size: int,
               win_size: int, fmin: float = 0.0, fmax: float | None = None):
    import librosa  # pylint: disable=g-import-not-at-top  (slow import; only codecs need it)

    checks = [
        (sample_rate > 0, f"sample_rate must be > 0, got {sample_rate}"),
        (0 < hop_size <= n_fft, f"need 0 < hop_size <= n_fft, got {hop_size}, {n_fft}"),
        (0 < win_size <= n_fft, f"need 0 < win_size <= n_fft, got {win_size}, {n_fft}"),
        (num_mels > 0, f"num_mels must be > 0, got {num_mels}"),
        (fmax is None or 0 <= fmin < fmax <= sample_rate / 2,
         f"need 0 <= fmin < fmax <= sample_rate / 2, got fmin={fmin}, fmax={fmax}"),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(f"BigVGANMel: {message}")
    self.sample_rate, self.n_fft, self.n_mels = int(sample_rate), int(n_fft), int(num_mels)
    self.hop_length, self.win_length = int(hop_size), int(win_size)
    self.fmin, self.fmax = float(fmin), None if fmax is None else float(fmax)
    self.pad = (n_fft - hop_size) // 2
    # torch.stft centres a shorter window inside n_fft.
    window = np.zeros(n_fft)
    left = (n_fft - win_size) // 2
    window[left:left + win_size] = _periodic_hann(win_size)
    self.window = window.astype(np.float32)
    self.mel_basis = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=num_mels, fmin=fmin,
                                         fmax=fmax).astype(np.float32)  # [M, F]

  @classmethod
  def from_config(cls, c) -> "BigVGANMel":
    """From a BigVGANConfig (or any object with BigVGAN's config.json mel field names)."""
    return cls(sample_rate=c.sampling_rate, n_fft=c.n_fft, num_mels=c.num_mels,
               hop_size=c.hop_size, win_size=c.win_size, fmin=c.fmin, fmax=c.fmax)

  def settings(self) -> dict:
    return {"kind": self.kind, "sample_rate": self.sample_rate, "n_fft": self.n_fft,
            "hop_length": self.hop_length, "win_length": self.win_length, "n_mels": self.n_mels,
            "fmin": self.fmin, "fmax": self.fmax}

  def num_frames(self, num_samples: int) -> int:
    return (int(num_samples) + 2 * self.pad - self.n_fft) // self.hop_length + 1

  def num_samples(self, num_frames: int) -> int:
    """The fewest samples that give `num_frames` frames (the inverse of num_frames)."""
    return (int(num_frames) - 1) * self.hop_length + self.n_fft - 2 * self.pad

  def frame_times(self, num_frames: int) -> np.ndarray:
    """Seconds at which each frame's window is centred (frame k starts at k * hop - pad)."""
    centre = (self.n_fft - self.win_length) // 2 + self.win_length / 2 - self.pad
    return (np.arange(num_frames) * self.hop_length + centre) / self.sample_rate

  @property
  def window_seconds(self) -> float:
    return self.win_length / self.sample_rate

  def filters_hz(self) -> np.ndarray:
    """The mel filters as functions of frequency, sampled every 1 Hz: [n_mels, sr // 2 + 1]."""
    import librosa  # pylint: disable=g-import-not-at-top
    return librosa.filters.mel(sr=self.sample_rate, n_fft=self.sample_rate, n_mels=self.n_mels,
                               fmin=self.fmin, fmax=self.fmax).astype(np.float64)

  def log(self, mel, xp=np):
    """Mel magnitudes -> this front end's log-mel (natural log, clamped at 1e-5)."""
    return xp.log(xp.maximum(mel, 1e-5))

  def check_length(self, num_samples: int) -> None:
    if num_samples <= self.pad or self.num_frames(num_samples) < 1:
      raise ValueError(f"BigVGANMel: a wave of {num_samples} samples is too short; reflect "
                       f"padding by {self.pad} needs more than {self.pad} samples and one frame "
                       f"needs {self.n_fft - 2 * self.pad}")

  def __call__(self, wave: jax.Array) -> jax.Array:
    """wave [..., S] -> natural-log mel [..., N, num_mels], float32."""
    return self._log_mel(jnp.asarray(wave, jnp.float32), jnp)

  def numpy(self, wave: np.ndarray) -> np.ndarray:
    return self._log_mel(np.asarray(wave, np.float32), np).astype(np.float32)

  def _log_mel(self, x, xp):
    self.check_length(x.shape[-1])
    x = xp.pad(x, [(0, 0)] * (x.ndim - 1) + [(self.pad, self.pad)], mode="reflect")
    spec = xp.fft.rfft(_frames(x, self.n_fft, self.hop_length) * self.window, axis=-1)
    magnitude = xp.sqrt(xp.square(spec.real) + xp.square(spec.imag) + 1e-9)
    return self.log(magnitude @ self.mel_basis.T, xp)


class SpeechT5Mel:
  """SpeechT5FeatureExtractor's log10 mel (the target features SpeechT5HifiGan inverts)."""

  kind = "speecht5_mel"

  def __init__(self, *, sample_rate: int = 16000, num_mel_bins: int = 80, hop_length: int = 256,
               win_length: int = 1024, fmin: float = 80.0, fmax: float = 7600.0,
               mel_floor: float = 1e-10):
    from transformers.audio_utils import mel_filter_bank  # pylint: disable=g-import-not-at-top

    checks = [
        (sample_rate > 0, f"sample_rate must be > 0, got {sample_rate}"),
        (hop_length > 0, f"hop_length must be > 0, got {hop_length}"),
        (win_length > 1, f"win_length must be > 1, got {win_length}"),
        (num_mel_bins > 0, f"num_mel_bins must be > 0, got {num_mel_bins}"),
        (0 <= fmin < fmax <= sample_rate / 2,
         f"need 0 <= fmin < fmax <= sample_rate / 2, got fmin={fmin}, fmax={fmax}"),
        (mel_floor > 0, f"mel_floor must be > 0, got {mel_floor}"),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(f"SpeechT5Mel: {message}")
    self.sample_rate, self.n_mels = int(sample_rate), int(num_mel_bins)
    self.hop_length, self.win_length = int(hop_length), int(win_length)
    self.n_fft = 2 ** int(math.ceil(math.log2(win_length)))
    self.fmin, self.fmax, self.mel_floor = float(fmin), float(fmax), float(mel_floor)
    window = np.zeros(self.n_fft)
    window[:win_length] = _periodic_hann(win_length)
    self.window = window.astype(np.float32)
    self.mel_filters = mel_filter_bank(
        num_frequency_bins=self.n_fft // 2 + 1, num_mel_filters=num_mel_bins, min_frequency=fmin,
        max_frequency=fmax, sampling_rate=sample_rate, norm="slaney",
        mel_scale="slaney").astype(np.float32)  # [F, M]

  @classmethod
  def from_feature_extractor(cls, d: dict) -> "SpeechT5Mel":
    """From a SpeechT5FeatureExtractor preprocessor_config.json (hop/win given in ms)."""
    sr = int(d.get("sampling_rate", 16000))
    return cls(sample_rate=sr, num_mel_bins=int(d.get("num_mel_bins", 80)),
               hop_length=int(d.get("hop_length", 16)) * sr // 1000,
               win_length=int(d.get("win_length", 64)) * sr // 1000,
               fmin=float(d.get("fmin", 80)), fmax=float(d.get("fmax", 7600)),
               mel_floor=float(d.get("mel_floor", 1e-10)))

  def settings(self) -> dict:
    return {"kind": self.kind, "sample_rate": self.sample_rate, "n_fft": self.n_fft,
            "hop_length": self.hop_length, "win_length": self.win_length, "n_mels": self.n_mels,
            "fmin": self.fmin, "fmax": self.fmax, "mel_floor": self.mel_floor}

  def num_frames(self, num_samples: int) -> int:
    half = self.win_length // 2
    return (int(num_samples) + 2 * half - self.win_length) // self.hop_length + 1

  def num_samples(self, num_frames: int) -> int:
    """The fewest samples that give `num_frames` frames (the inverse of num_frames)."""
    half = self.win_length // 2
    return max((int(num_frames) - 1) * self.hop_length + self.win_length - 2 * half, half + 1)

  def frame_times(self, num_frames: int) -> np.ndarray:
    """Seconds at which each frame's window is centred (frame k starts at k * hop - win // 2)."""
    centre = self.win_length / 2 - self.win_length // 2
    return (np.arange(num_frames) * self.hop_length + centre) / self.sample_rate

  @property
  def window_seconds(self) -> float:
    return self.win_length / self.sample_rate

  def filters_hz(self) -> np.ndarray:
    """The mel filters as functions of frequency, sampled every 1 Hz: [n_mels, sr // 2 + 1]."""
    from transformers.audio_utils import mel_filter_bank  # pylint: disable=g-import-not-at-top
    return mel_filter_bank(
        num_frequency_bins=self.sample_rate // 2 + 1, num_mel_filters=self.n_mels,
        min_frequency=self.fmin, max_frequency=self.fmax, sampling_rate=self.sample_rate,
        norm="slaney", mel_scale="slaney").T.astype(np.float64)

  def log(self, mel, xp=np):
    """Mel magnitudes -> this front end's log-mel (log10, clamped at mel_floor)."""
    return xp.log10(xp.maximum(mel, self.mel_floor))

  def check_length(self, num_samples: int) -> None:
    if num_samples <= self.win_length // 2:
      raise ValueError(f"SpeechT5Mel: a wave of {num_samples} samples is too short; reflect "
                       f"padding by {self.win_length // 2} needs more samples than that")

  def __call__(self, wave: jax.Array) -> jax.Array:
    """wave [..., S] -> log10 mel [..., num_frames(S), num_mel_bins], float32."""
    return self._log_mel(jnp.asarray(wave, jnp.float32), jnp)

  def numpy(self, wave: np.ndarray) -> np.ndarray:
    return self._log_mel(np.asarray(wave, np.float32), np).astype(np.float32)

  def _log_mel(self, x, xp):
    self.check_length(x.shape[-1])
    half = self.win_length // 2
    x = xp.pad(x, [(0, 0)] * (x.ndim - 1) + [(half, half)], mode="reflect")
    frames = _frames(x, self.win_length, self.hop_length)
    frames = xp.pad(frames, [(0, 0)] * (frames.ndim - 1) + [(0, self.n_fft - self.win_length)])
    magnitude = xp.abs(xp.fft.rfft(frames * self.window, axis=-1))
    return self.log(magnitude @ self.mel_filters, xp)
