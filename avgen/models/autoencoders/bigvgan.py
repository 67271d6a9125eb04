"""BigVGAN v2 generator (NVIDIA's `bigvgan` package, 2.4.1) in Flax NNX: log-mel -> waveform.

  x = conv_pre(mel)                                        [B, N, num_mels] -> [B, N, C0]
  for each stage i:  x = up_i(x)  (transposed conv, stride u_i, channels halve)
                     x = mean_j AMP_ij(x)                  (one AMP block per resblock kernel)
  wave = tanh(conv_post(act_post(x)))                      [B, N * prod(u)]   (or clip to [-1, 1])

AMP block (type "1"): for each dilation d,  x += conv'(act(conv_d(act(x)))), where act is an
anti-aliased periodic activation: upsample 2x with a Kaiser-windowed sinc low-pass, apply
snake(x) = x + sin^2(alpha x) / alpha (or snakebeta: ... / beta) per channel, low-pass and
downsample 2x. Type "2" has no conv' and one act per dilation. alpha and beta are stored as logs
when `snake_logscale`.

Layout is channel-last: mel [B, N, num_mels] (natural-log magnitude mel of BigVGAN's own
`meldataset.mel_spectrogram`, see mel_frontend.py) -> wave [B, N * hop].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avgen.models.autoencoders.conv_layers import Conv, ConvTranspose1d
from avgen.models.layers import param

_SNAKE_EPS = 1e-9  # keeps 1 / alpha finite, as in the original
_FILTER_RATIO = 2  # the anti-aliased activation runs at twice the sample rate
_FILTER_TAPS = 12


@dataclasses.dataclass(frozen=True)
class BigVGANConfig:
  """The fields of a BigVGAN config.json: the network, and the mel analysis it was trained on.

  The mel fields (sampling_rate ... fmax) are what `mel_frontend.BigVGANMel` takes; fmax=None
  means sampling_rate / 2, as in the original.
  """

  num_mels: int = 80
  upsample_rates: tuple[int, ...] = (4, 4, 2, 2, 2, 2)
  upsample_kernel_sizes: tuple[int, ...] = (8, 8, 4, 4, 4, 4)
  upsample_initial_channel: int = 1536
  resblock: str = "1"
  resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
  resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
  activation: str = "snakebeta"
  snake_logscale: bool = True
  use_bias_at_final: bool = True
  use_tanh_at_final: bool = True
  sampling_rate: int = 24000
  n_fft: int = 1024
  hop_size: int = 256
  win_size: int = 1024
  fmin: float = 0.0
  fmax: float | None = None

  @property
  def hop_length(self) -> int:
    return math.prod(self.upsample_rates)

  @classmethod
  def from_json(cls, d: Mapping[str, Any], *, what: str = "bigvgan config") -> "BigVGANConfig":
    required = ("num_mels", "upsample_rates", "upsample_kernel_sizes", "upsample_initial_channel",
                "resblock", "resblock_kernel_sizes", "resblock_dilation_sizes", "activation",
                "sampling_rate", "n_fft", "hop_size", "win_size", "fmin", "fmax")
    missing = [k for k in required if k not in d]
    if missing:
      raise ValueError(f"{what}: missing fields {missing}")
    c = cls(
        num_mels=int(d["num_mels"]),
        upsample_rates=tuple(int(u) for u in d["upsample_rates"]),
        upsample_kernel_sizes=tuple(int(k) for k in d["upsample_kernel_sizes"]),
        upsample_initial_channel=int(d["upsample_initial_channel"]),
        resblock=str(d["resblock"]),
        resblock_kernel_sizes=tuple(int(k) for k in d["resblock_kernel_sizes"]),
        resblock_dilation_sizes=tuple(tuple(int(x) for x in ds)
                                      for ds in d["resblock_dilation_sizes"]),
        activation=str(d["activation"]),
        snake_logscale=bool(d.get("snake_logscale", True)),
        use_bias_at_final=bool(d.get("use_bias_at_final", True)),
        use_tanh_at_final=bool(d.get("use_tanh_at_final", True)),
        sampling_rate=int(d["sampling_rate"]), n_fft=int(d["n_fft"]), hop_size=int(d["hop_size"]),
        win_size=int(d["win_size"]), fmin=float(d["fmin"]),
        fmax=None if d["fmax"] is None else float(d["fmax"]))
    problems = []
    if c.hop_size != c.hop_length:
      problems.append(f"hop_size={c.hop_size} differs from prod(upsample_rates)={c.hop_length}: "
                      "the generator would not give hop_size samples per mel frame")
    if c.resblock not in ("1", "2"):
      problems.append(f"resblock must be '1' or '2', got {c.resblock!r}")
    if c.activation not in ("snake", "snakebeta"):
      problems.append(f"activation must be 'snake' or 'snakebeta', got {c.activation!r}")
    if len(c.upsample_rates) != len(c.upsample_kernel_sizes):
      problems.append("upsample_rates and upsample_kernel_sizes differ in length")
    if len(c.resblock_kernel_sizes) != len(c.resblock_dilation_sizes):
      problems.append("resblock_kernel_sizes and resblock_dilation_sizes differ in length")
    if any((k - u) % 2 or k < u for u, k in zip(c.upsample_rates, c.upsample_kernel_sizes)):
      problems.append("each upsample kernel must be >= its rate and differ from it by an even "
                      f"number (else the output length is not N * rate): rates "
                      f"{c.upsample_rates}, kernels {c.upsample_kernel_sizes}")
    if c.upsample_initial_channel % 2 ** len(c.upsample_rates):
      problems.append(f"upsample_initial_channel={c.upsample_initial_channel} must stay whole "
                      f"when halved {len(c.upsample_rates)} times")
    if problems:
      raise ValueError(f"{what}: " + "; ".join(problems))
    return c


def kaiser_sinc_filter(cutoff: float, half_width: float, kernel_size: int) -> np.ndarray:
  """Low-pass FIR: sinc at `cutoff` (cycles/sample) under a Kaiser window, normalized to sum 1.

  The Kaiser beta follows Kaiser's empirical formula for the attenuation a transition band of
  `half_width` allows, as in BigVGAN (and StyleGAN3's filters it borrows).
  """
  half = kernel_size // 2
  atten = 2.285 * (half - 1) * math.pi * (4 * half_width) + 7.95
  if atten > 50.0:
    beta = 0.1102 * (atten - 8.7)
  elif atten >= 21.0:
    beta = 0.5842 * (atten - 21) ** 0.4 + 0.07886 * (atten - 21.0)
  else:
    beta = 0.0
  window = np.kaiser(kernel_size, beta)
  if kernel_size % 2 == 0:
    t = np.arange(-half, half) + 0.5
  else:
    t = np.arange(kernel_size) - half
  taps = 2 * cutoff * window * np.sinc(2 * cutoff * t)
  return (taps / taps.sum()).astype(np.float32)


def upsample_filter(ratio: int = _FILTER_RATIO, taps: int = _FILTER_TAPS) -> np.ndarray:
  return kaiser_sinc_filter(0.5 / ratio, 0.6 / ratio, taps)


downsample_filter = upsample_filter  # the same low-pass, once before and once after the snake


def upsample(x: jax.Array, taps: np.ndarray, ratio: int) -> jax.Array:
  """[B, T, C] -> [B, T * ratio, C]: zero-stuff, low-pass (gain `ratio`), edges replicated.

  Written as `ratio` polyphase branches of shifted slices (output sample ratio*n + p sums the
  taps congruent to p), which XLA fuses into one pass with the activation around it.
  """
  k = len(taps)
  pad = k // ratio - 1
  left = pad * ratio + (k - ratio) // 2
  length = x.shape[1]
  xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)), mode="edge")
  phases = []
  for p in range(ratio):
    acc = None
    for j in range(k):
      if (p + left - j) % ratio:
        continue
      o = (p + left - j) // ratio
      term = (ratio * float(taps[j])) * xp[:, o:o + length]
      acc = term if acc is None else acc + term
    phases.append(acc)
  return jnp.stack(phases, axis=2).reshape(x.shape[0], length * ratio, x.shape[2])


def downsample(x: jax.Array, taps: np.ndarray, ratio: int) -> jax.Array:
  """[B, T, C] -> [B, ceil(T / ratio), C]: low-pass with edges replicated, keep every ratio-th."""
  k = len(taps)
  left, right = k // 2 - (k % 2 == 0), k // 2
  xp = jnp.pad(x, ((0, 0), (left, right), (0, 0)), mode="edge")
  n = (x.shape[1] - 1) // ratio + 1
  acc = None
  for j in range(k):
    term = float(taps[j]) * xp[:, j:j + ratio * (n - 1) + 1:ratio]
    acc = term if acc is None else acc + term
  return acc


class Snake(nnx.Module):
  """x + sin^2(alpha x) / (beta + eps) per channel; beta is alpha for plain snake."""

  def __init__(self, channels: int, *, beta: bool, logscale: bool, rngs: nnx.Rngs,
               param_dtype=jnp.float32):
    init = nnx.initializers.zeros_init() if logscale else nnx.initializers.ones_init()
    self.alpha = param(rngs, init, channels, ("conv_out",), param_dtype)
    self.beta = param(rngs, init, channels, ("conv_out",), param_dtype) if beta else None
    self.logscale = logscale

  def __call__(self, x):
    alpha = self.alpha[...].astype(x.dtype)
    beta = alpha if self.beta is None else self.beta[...].astype(x.dtype)
    if self.logscale:
      alpha, beta = jnp.exp(alpha), jnp.exp(beta)
    return x + jnp.square(jnp.sin(x * alpha)) / (beta + _SNAKE_EPS)


class AntiAliasedSnake(nnx.Module):
  """downsample(snake(upsample(x))): the periodic nonlinearity applied at twice the sample rate."""

  def __init__(self, channels: int, config: BigVGANConfig, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32):
    self.act = Snake(channels, beta=config.activation == "snakebeta",
                     logscale=config.snake_logscale, rngs=rngs, param_dtype=param_dtype)

  def __call__(self, x):
    x = upsample(x, upsample_filter(), _FILTER_RATIO)
    return downsample(self.act(x), downsample_filter(), _FILTER_RATIO)


def _same_padding(kernel_size: int, dilation: int) -> int:
  return (kernel_size * dilation - dilation) // 2


class AMPBlock(nnx.Module):
  """Residual anti-aliased multi-periodicity block (type "1": two convs per dilation)."""

  def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...],
               config: BigVGANConfig, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.convs1 = nnx.List([
        Conv(channels, channels, kernel_size, ndim=1, dilation=d,
             padding=_same_padding(kernel_size, d), **kw) for d in dilations])
    self.convs2 = (nnx.List([
        Conv(channels, channels, kernel_size, ndim=1, padding=_same_padding(kernel_size, 1), **kw)
        for _ in dilations]) if config.resblock == "1" else None)
    per_dilation = 2 if config.resblock == "1" else 1
    self.activations = nnx.List([
        AntiAliasedSnake(channels, config, rngs=rngs, param_dtype=param_dtype)
        for _ in range(per_dilation * len(dilations))])

  def __call__(self, x):
    for i, conv1 in enumerate(self.convs1):
      if self.convs2 is None:
        x = x + conv1(self.activations[i](x))
      else:
        h = conv1(self.activations[2 * i](x))
        x = x + self.convs2[i](self.activations[2 * i + 1](h))
    return x


class BigVGAN(nnx.Module):
  """mel [B, N, num_mels] -> wave [B, N * hop_length] in [-1, 1] (float32 out)."""

  def __init__(self, config: BigVGANConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.config = config
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    c0 = config.upsample_initial_channel
    self.conv_pre = Conv(config.num_mels, c0, 7, ndim=1, padding=3, **kw)
    self.ups = nnx.List([
        ConvTranspose1d(c0 // 2**i, c0 // 2**(i + 1), k, stride=u, padding=(k - u) // 2, **kw)
        for i, (u, k) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes))])
    self.resblocks = nnx.List([
        AMPBlock(c0 // 2**(i + 1), k, d, config, **kw)
        for i in range(len(config.upsample_rates))
        for k, d in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes)])
    last = c0 // 2**len(config.upsample_rates)
    self.activation_post = AntiAliasedSnake(last, config, rngs=rngs, param_dtype=param_dtype)
    self.conv_post = Conv(last, 1, 7, ndim=1, padding=3, use_bias=config.use_bias_at_final, **kw)
    self.dtype = dtype

  @property
  def hop_length(self) -> int:
    return self.config.hop_length

  def __call__(self, mel: jax.Array) -> jax.Array:
    c = self.config
    if mel.ndim != 3 or mel.shape[-1] != c.num_mels:
      raise ValueError(f"BigVGAN: mel must be [B, N, num_mels={c.num_mels}], got {mel.shape}")
    x = self.conv_pre(mel.astype(self.dtype))
    per_stage = len(c.resblock_kernel_sizes)
    for i, up in enumerate(self.ups):
      x = up(x)
      x = sum(self.resblocks[i * per_stage + j](x) for j in range(per_stage)) / per_stage
    x = self.conv_post(self.activation_post(x)).astype(jnp.float32)[..., 0]
    return jnp.tanh(x) if c.use_tanh_at_final else jnp.clip(x, -1.0, 1.0)

  def context_frames(self) -> int:
    """Mel frames either side that can reach an output sample (an upper bound; for chunking)."""
    c = self.config
    # Radius of the anti-aliased activation in input samples: 3 through the up filter plus 3
    # through the down filter (12 taps at 2x).
    act = 2 * (_FILTER_TAPS // (2 * _FILTER_RATIO))
    frames = 3.0  # conv_pre
    samples_per_frame = 1
    for u, k in zip(c.upsample_rates, c.upsample_kernel_sizes):
      frames += (k / u + 1) / samples_per_frame
      samples_per_frame *= u
      block = 0
      for ks, ds in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes):
        per = sum((ks - 1) * d // 2 + act for d in ds)
        if c.resblock == "1":
          per += len(ds) * ((ks - 1) // 2 + act)
        block = max(block, per)
      frames += block / samples_per_frame
    frames += (act + 3) / samples_per_frame  # activation_post, conv_post
    return int(math.ceil(frames)) + 1
