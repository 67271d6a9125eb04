"""Griffin-Lim vocoder: normalized log-mel -> waveform with no learned parts (demo configs).

mel -> linear magnitude by non-negative least squares (per frame) against the mel filterbank,
then phase by fast Griffin-Lim (alternating projections with momentum, Perraudin et al. 2013)
using the MelCodec's own STFT framing, so the waveform lines up with the mel frames.
"""

from __future__ import annotations

import numpy as np

from avgen.models.autoencoders.mel import MelCodec


class GriffinLimVocoder:

  def __init__(self, mel: MelCodec, n_iter: int = 32, momentum: float = 0.99, seed: int = 0):
    if n_iter < 0:
      raise ValueError(f"GriffinLimVocoder: n_iter must be >= 0, got {n_iter}")
    if not 0 <= momentum < 1:
      raise ValueError(f"GriffinLimVocoder: momentum must be in [0, 1), got {momentum}")
    self.mel = mel
    self.n_iter = int(n_iter)
    self.momentum = float(momentum)
    self.seed = int(seed)

  def decode(self, latent: np.ndarray, num_samples: int | None = None) -> np.ndarray:
    """latent [N, n_mels] or [B, N, n_mels] -> float32 wave [S] or [B, S] in [-1, 1], where
    S = num_samples (cut or zero-padded) or N * hop."""
    import scipy.optimize  # pylint: disable=g-import-not-at-top

    mel = self.mel.to_mel_magnitude(latent)
    if mel.ndim == 3:
      return np.stack([self.decode(x, num_samples) for x in np.asarray(latent)])
    if mel.ndim != 2:
      raise ValueError(
          "GriffinLimVocoder.decode: latent must be [N, n_mels] or [B, N, n_mels], "
          f"got {mel.shape}")
    basis = self.mel.mel_basis
    magnitude = np.stack([scipy.optimize.nnls(basis, frame)[0] for frame in mel])  # [N, F]
    rng = np.random.default_rng(self.seed)
    angles = np.exp(2j * np.pi * rng.random(magnitude.shape))
    previous = np.zeros_like(angles)
    num_frames = magnitude.shape[0]
    for _ in range(self.n_iter):
      rebuilt = self.mel.stft(self.mel.istft(magnitude * angles), num_frames)
      # The momentum term extrapolates along the last step (the "fast" in fast Griffin-Lim).
      angles = rebuilt - (self.momentum / (1 + self.momentum)) * previous
      angles /= np.abs(angles) + 1e-12
      previous = rebuilt
    wave = np.clip(self.mel.istft(magnitude * angles), -1.0, 1.0).astype(np.float32)
    if num_samples is None or num_samples == wave.shape[-1]:
      return wave
    if num_samples < 1:
      raise ValueError(f"GriffinLimVocoder.decode: num_samples must be >= 1, got {num_samples}")
    return np.pad(wave, (0, max(0, num_samples - wave.shape[-1])))[:num_samples]
