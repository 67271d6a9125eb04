"""From the diffusion model's mel to a pretrained vocoder's mel, and its wave back to our rate.

The audio latent is the project's MelCodec mel at config.data.sample_rate (non-demo: 16 kHz,
hop 125 = 128 frames/s, 1024-sample (64 ms) window, 80 Slaney bins over 0-8 kHz). Published
vocoders were trained on their own analysis: BigVGAN v2 22 kHz at 22050 Hz, hop 256
(86.1 frames/s), 1024-sample (46 ms) window, 80 bins over 0-8 kHz (`..._fmax8k_256x`) or
0-11.025 kHz; SpeechT5's HiFi-GAN at 16 kHz, hop 256, 80 bins over 80-7600 Hz in log10. Fed our
mel directly, such a vocoder would read every frame at the wrong time and every bin at the wrong
frequency. `MelBridge` maps our log-mel to the vocoder's, working on magnitudes (exp of the log):

  bins  mel_t = g * A @ mel_s. A [M_t, M_s] >= 0 is the least-squares fit A @ W_s ~= W_t of the
        two filterbanks, each filter taken as a function of frequency (its triangle sampled every
        1 Hz, which is what the weights on either FFT grid are samples of), one non-negative
        least-squares problem per target bin so that magnitudes stay >= 0. Equal filterbanks
        (same bins, fmin, fmax) give A = I whatever the sample rates; target bins above our
        fmax get ~0 (their floor), which is what band-limited audio gives them.
  gain  a mel bin sums magnitudes over FFT bins, so one sound gives different values under
        different n_fft and window lengths: a steady tone's value scales with n_fft, noise's
        with n_fft * sqrt(window seconds). g = (n_fft_t / n_fft_s) * (T_t / T_s) ** (1/4), the
        geometric mean of the two, errs by at most the square root of their ratio on either
        kind of sound (64 ms -> 46 ms windows: +-0.08 nats, 0.7 dB). Equal analyses give g = 1.
  time  linear interpolation, along time, from our frame centres to the vocoder's (held
        constant beyond our first and last frame), for the number of frames the vocoder's own
        front end gives for the clip at its rate, and at least ceil(S_t / hop_t) so that the
        vocoded wave covers the clip.
  log   as the vocoder's front end takes it (BigVGAN: ln, floor 1e-5; SpeechT5: log10, floor
        mel_floor).

`to_source_rate` then cuts the vocoder's wave to the clip's S_t = round(S * sr_t / sr) samples,
resamples it to our rate with a polyphase low-pass (scipy.signal.resample_poly) and cuts or
zero-pads it to exactly S samples.

The bins and gain are one matrix, computed once per (ours, vocoder) pair. Everything is numpy:
it runs on the host beside the (jitted) vocoder.
"""

from __future__ import annotations

import math

import numpy as np


def filterbank_map(source, target) -> np.ndarray:
  """A [M_t, M_s] >= 0 with A @ W_s ~= W_t, both filterbanks sampled every 1 Hz (see above)."""
  import scipy.optimize  # pylint: disable=g-import-not-at-top

  ws, wt = source.filters_hz(), target.filters_hz()
  width = max(ws.shape[1], wt.shape[1])
  # Above a front end's Nyquist frequency its filters are zero.
  ws = np.pad(ws, [(0, 0), (0, width - ws.shape[1])])
  wt = np.pad(wt, [(0, 0), (0, width - wt.shape[1])])
  # min_a |ws.T a - w|^2 = |R a - R^-T ws w|^2 + const with ws ws.T = R.T R: the same NNLS
  # problems with M_s rows instead of ~10^4 frequencies.
  gram = ws @ ws.T
  r = np.linalg.cholesky(gram).T
  rhs = np.linalg.solve(r.T, ws @ wt.T)  # [M_s, M_t]
  a = np.stack([scipy.optimize.nnls(r, rhs[:, i])[0] for i in range(wt.shape[0])])
  # The non-negative fit of one triangle by others of other widths over- or undershoots its
  # area by up to ~15%, which would shift broadband sounds by as much. Rescale each row so a
  # spectrum flat over the source's band maps exactly: A @ area(W_s) = area of W_t in that band.
  band = ws.sum(axis=0) > 0
  want = (wt * band).sum(axis=1)
  have = a @ ws.sum(axis=1)
  return a * np.where(have > 0, want / np.where(have > 0, have, 1.0), 0.0)[:, None]


def analysis_gain(source, target) -> float:
  """g of the module docstring: the geometric mean of the tone and noise scalings."""
  tone = target.n_fft / source.n_fft
  noise = tone * math.sqrt(target.window_seconds / source.window_seconds)
  return math.sqrt(tone * noise)


def fit_length(wave: np.ndarray, num_samples: int) -> np.ndarray:
  """Cuts or zero-pads the last axis to `num_samples`."""
  have = wave.shape[-1]
  if have >= num_samples:
    return wave[..., :num_samples]
  return np.pad(wave, [(0, 0)] * (wave.ndim - 1) + [(0, num_samples - have)])


class MelBridge:
  """Our MelCodec log-mel -> `target`'s log-mel of the same sound at the target's sample rate.

  source: a MelCodec (what the diffusion model generates). target: a vocoder's front end
  (mel_frontend.BigVGANMel or SpeechT5Mel), built from the vocoder checkpoint's settings.
  """

  def __init__(self, source, target):
    for name, f in (("source", source), ("target", target)):
      missing = [a for a in ("sample_rate", "hop_length", "n_fft", "n_mels", "window_seconds",
                             "num_frames", "frame_times", "filters_hz") if not hasattr(f, a)]
      if missing:
        raise TypeError(f"MelBridge: {name} {type(f).__name__} lacks {missing}")
    if not hasattr(target, "log"):
      raise TypeError(f"MelBridge: target {type(target).__name__} lacks log(mel)")
    self.source, self.target = source, target
    self.gain = analysis_gain(source, target)
    self.matrix = (self.gain * filterbank_map(source, target)).astype(np.float32)  # [M_t, M_s]

  @property
  def sample_rate(self) -> int:
    return self.target.sample_rate

  def target_num_samples(self, num_samples: int) -> int:
    return int(round(num_samples * self.target.sample_rate / self.source.sample_rate))

  def target_num_frames(self, num_samples: int) -> int:
    """Vocoder frames for a clip of `num_samples` samples at OUR rate."""
    n = self.target_num_samples(num_samples)
    return max(self.target.num_frames(n), -(-n // self.target.hop_length))

  def __call__(self, log_mel: np.ndarray, num_samples: int) -> np.ndarray:
    """log_mel [..., N, M_s] (natural log) of a clip of `num_samples` samples at our rate ->
    the target's log-mel [..., target_num_frames(num_samples), M_t], float32."""
    log_mel = np.asarray(log_mel, np.float32)
    if log_mel.ndim < 2 or log_mel.shape[-1] != self.source.n_mels:
      raise ValueError(f"MelBridge: log_mel must be [..., N, {self.source.n_mels}], got "
                       f"{log_mel.shape}")
    if num_samples < 1:
      raise ValueError(f"MelBridge: num_samples must be >= 1, got {num_samples}")
    num_frames = log_mel.shape[-2]
    # exp of a generated latent can overflow float32 only for absurd values; clip them there.
    mel = np.exp(np.minimum(log_mel, 30.0)) @ self.matrix.T  # [..., N, M_t]
    times = self.target.frame_times(self.target_num_frames(num_samples))
    position = np.interp(times, self.source.frame_times(num_frames), np.arange(num_frames))
    lo = np.floor(position).astype(np.int64)
    hi = np.minimum(lo + 1, num_frames - 1)
    frac = (position - lo).astype(np.float32)[:, None]
    mel = mel[..., lo, :] * (1 - frac) + mel[..., hi, :] * frac
    return self.target.log(mel).astype(np.float32)

  def to_source_rate(self, wave: np.ndarray, num_samples: int) -> np.ndarray:
    """The vocoder's wave [..., L] at its rate -> [..., num_samples] at our rate, float32."""
    import scipy.signal  # pylint: disable=g-import-not-at-top

    wave = fit_length(np.asarray(wave, np.float32), self.target_num_samples(num_samples))
    ours, theirs = self.source.sample_rate, self.target.sample_rate
    if ours != theirs:
      g = math.gcd(ours, theirs)
      wave = scipy.signal.resample_poly(wave, ours // g, theirs // g, axis=-1)
    return fit_length(wave, num_samples).astype(np.float32)
