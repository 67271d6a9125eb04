"""Normalized log-mel spectrogram: the audio latent space.

Framing: mel frame k is the STFT frame whose window is centred on sample k * hop + hop / 2, so it
covers the audio around [k * hop, (k + 1) * hop). A wave of S samples has exactly N = S // hop
frames; the signal is zero outside [0, S). Magnitude (not power) spectra, as HiFi-GAN/BigVGAN use:

  latent = (log(max(mel_basis @ |STFT|, log_floor)) - mean) / std
"""

from __future__ import annotations

import numpy as np


class MelCodec:
  """Waveform -> normalized log-mel [N, n_mels]; also the STFT pair the vocoders share."""

  def __init__(
      self,
      sample_rate: int,
      n_fft: int,
      hop_length: int,
      win_length: int,
      n_mels: int,
      fmin: float = 0.0,
      fmax: float | None = None,
      log_floor: float = 1e-5,
      mean: float = 0.0,
      std: float = 1.0,
  ):
    import librosa  # pylint: disable=g-import-not-at-top  (slow import; only codecs need it)

    fmax = sample_rate / 2 if fmax is None else fmax
    checks = [
        (sample_rate > 0, f"sample_rate must be > 0, got {sample_rate}"),
        (0 < hop_length, f"hop_length must be > 0, got {hop_length}"),
        (0 < win_length <= n_fft, f"need 0 < win_length <= n_fft, got {win_length}, {n_fft}"),
        (n_mels > 0, f"n_mels must be > 0, got {n_mels}"),
        (0 <= fmin < fmax <= sample_rate / 2,
         f"need 0 <= fmin < fmax <= sample_rate / 2, got fmin={fmin}, fmax={fmax}, "
         f"sample_rate={sample_rate}"),
        (log_floor > 0, f"log_floor must be > 0, got {log_floor}"),
        (std > 0, f"std must be > 0, got {std}"),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(f"MelCodec: {message}")
    self.sample_rate = int(sample_rate)
    self.n_fft = int(n_fft)
    self.hop_length = int(hop_length)
    self.win_length = int(win_length)
    self.n_mels = int(n_mels)
    self.fmin, self.fmax = float(fmin), float(fmax)
    self.log_floor, self.mean, self.std = float(log_floor), float(mean), float(std)
    # Periodic Hann of win_length, zero-padded to n_fft around the centre.
    n = np.arange(win_length)
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / win_length)
    self.window = np.zeros(n_fft)
    left = (n_fft - win_length) // 2
    self.window[left:left + win_length] = hann
    self.mel_basis = librosa.filters.mel(
        sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax).astype(np.float64)
    # Samples of zeros before sample 0 so that frame 0's window centre lands on hop / 2.
    self._pad_left = n_fft // 2 - hop_length // 2

  def settings(self) -> dict:
    """Everything that decides `encode`'s output; equal settings mean a cached mel is valid."""
    return {"sample_rate": self.sample_rate, "n_fft": self.n_fft, "hop_length": self.hop_length,
            "win_length": self.win_length, "n_mels": self.n_mels, "fmin": self.fmin,
            "fmax": self.fmax, "log_floor": self.log_floor, "mean": self.mean, "std": self.std}

  @classmethod
  def from_config(cls, config) -> "MelCodec":
    m = config.mel
    return cls(sample_rate=config.data.sample_rate, n_fft=m.n_fft, hop_length=m.hop_length,
               win_length=m.win_length, n_mels=m.n_mels, fmin=m.fmin, fmax=m.fmax,
               log_floor=m.log_floor, mean=m.mean, std=m.std)

  def num_frames(self, num_samples: int) -> int:
    return int(num_samples) // self.hop_length

  def num_samples(self, num_frames: int) -> int:
    """The samples that `num_frames` frames stand for (what a vocoder gives back)."""
    return int(num_frames) * self.hop_length

  def frame_times(self, num_frames: int) -> np.ndarray:
    """Seconds at which each frame's window is centred: about (k + 1/2) * hop / sample_rate."""
    centre = (self.n_fft - self.win_length) // 2 + self.win_length / 2 - self._pad_left
    return (np.arange(num_frames) * self.hop_length + centre) / self.sample_rate

  @property
  def window_seconds(self) -> float:
    return self.win_length / self.sample_rate

  def filters_hz(self) -> np.ndarray:
    """The mel filters as functions of frequency, sampled every 1 Hz: [n_mels, sr // 2 + 1]."""
    import librosa  # pylint: disable=g-import-not-at-top
    return librosa.filters.mel(sr=self.sample_rate, n_fft=self.sample_rate, n_mels=self.n_mels,
                               fmin=self.fmin, fmax=self.fmax).astype(np.float64)

  def stft(self, wave: np.ndarray, num_frames: int) -> np.ndarray:
    """wave [..., S] -> complex [..., num_frames, n_fft // 2 + 1] in this codec's framing."""
    wave = np.asarray(wave, np.float64)
    total = (num_frames - 1) * self.hop_length + self.n_fft
    body = wave[..., : max(0, total - self._pad_left)]
    pad = [(0, 0)] * (wave.ndim - 1) + [(self._pad_left, total - self._pad_left - body.shape[-1])]
    padded = np.pad(body, pad)
    frames = np.lib.stride_tricks.sliding_window_view(padded, self.n_fft, axis=-1)
    frames = frames[..., :: self.hop_length, :][..., :num_frames, :]
    return np.fft.rfft(frames * self.window, axis=-1)

  def istft(self, spec: np.ndarray) -> np.ndarray:
    """Least-squares inverse of `stft`: complex [..., N, F] -> wave [..., N * hop]."""
    num_frames = spec.shape[-2]
    frames = np.fft.irfft(spec, n=self.n_fft, axis=-1) * self.window
    total = (num_frames - 1) * self.hop_length + self.n_fft
    out = np.zeros(spec.shape[:-2] + (total,))
    norm = np.zeros(total)
    for k in range(num_frames):
      s = k * self.hop_length
      out[..., s:s + self.n_fft] += frames[..., k, :]
      norm[s:s + self.n_fft] += self.window**2
    out /= np.maximum(norm, 1e-8)
    return out[..., self._pad_left:self._pad_left + num_frames * self.hop_length]

  def encode(self, wave: np.ndarray) -> np.ndarray:
    """wave float [S] or [B, S] -> normalized log-mel float32 [N, n_mels] or [B, N, n_mels]."""
    wave = np.asarray(wave)
    if wave.ndim not in (1, 2) or not np.issubdtype(wave.dtype, np.floating):
      raise ValueError(
          f"MelCodec.encode: wave must be float [S] or [B, S], got {wave.dtype} {wave.shape}")
    num_frames = self.num_frames(wave.shape[-1])
    if num_frames == 0:
      raise ValueError(
          f"MelCodec.encode: wave has {wave.shape[-1]} samples, fewer than "
          f"hop_length={self.hop_length}")
    magnitude = np.abs(self.stft(wave, num_frames))
    mel = magnitude @ self.mel_basis.T
    return ((np.log(np.maximum(mel, self.log_floor)) - self.mean) / self.std).astype(np.float32)

  def to_log_mel(self, latent: np.ndarray) -> np.ndarray:
    """Undo the normalization: latent [..., N, n_mels] -> natural-log mel, float32."""
    latent = np.asarray(latent, np.float32)
    if latent.ndim < 2 or latent.shape[-1] != self.n_mels:
      raise ValueError(
          f"MelCodec: mel latent must have shape [..., N, n_mels={self.n_mels}], "
          f"got {latent.shape}")
    return latent * np.float32(self.std) + np.float32(self.mean)

  def to_mel_magnitude(self, latent: np.ndarray) -> np.ndarray:
    """Undo the normalization and the log: latent [..., N, n_mels] -> mel magnitudes."""
    latent = np.asarray(latent, np.float64)
    if latent.ndim < 2 or latent.shape[-1] != self.n_mels:
      raise ValueError(
          f"MelCodec: mel latent must have shape [..., N, n_mels={self.n_mels}], "
          f"got {latent.shape}")
    return np.exp(latent * self.std + self.mean)
