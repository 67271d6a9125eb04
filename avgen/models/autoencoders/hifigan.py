"""HiFi-GAN V1 generator in Flax NNX, as transformers' `SpeechT5HifiGan` defines and saves it.

  x = conv_pre((mel - mean) / scale)        (normalization only when `normalize_before`)
  for each stage i:  x = up_i(leaky_relu(x, slope))       transposed conv, stride u_i
                     x = mean_j ResBlock_ij(x)
  wave = tanh(conv_post(leaky_relu(x, 0.01)))

ResBlock (the paper's ResBlock1): for each dilation d,
  x += conv(leaky_relu(conv_d(leaky_relu(x, slope)), slope)).
The final leaky ReLU uses torch's default slope 0.01, not `leaky_relu_slope`, in the original
(jik876/hifi-gan) as in transformers.

Reference: transformers 5 `SpeechT5HifiGan` (config.json + model.safetensors, the layout of
microsoft/speecht5_hifigan). Its input is SpeechT5's log10 mel (mel_frontend.SpeechT5Mel).
Channel-last: mel [B, N, model_in_dim] -> wave [B, N * prod(upsample_rates)].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from avgen.models.autoencoders.conv_layers import Conv, ConvTranspose1d


class Buffer(nnx.Variable):
  """A checkpoint constant that is not trained (SpeechT5HifiGan's mean and scale)."""


@dataclasses.dataclass(frozen=True)
class HiFiGANConfig:
  model_in_dim: int = 80
  sampling_rate: int = 16000
  upsample_initial_channel: int = 512
  upsample_rates: tuple[int, ...] = (4, 4, 4, 4)
  upsample_kernel_sizes: tuple[int, ...] = (8, 8, 8, 8)
  resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
  resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
  leaky_relu_slope: float = 0.1
  normalize_before: bool = True

  @property
  def hop_length(self) -> int:
    return math.prod(self.upsample_rates)

  @classmethod
  def from_transformers(cls, d: Mapping[str, Any], *,
                        what: str = "hifigan config") -> "HiFiGANConfig":
    # transformers 5 writes "speecht5_hifigan"; checkpoints saved by older versions say "hifigan".
    model_type = d.get("model_type", "speecht5_hifigan")
    if model_type not in ("speecht5_hifigan", "hifigan"):
      raise ValueError(f"{what}: model_type is {model_type!r}, not 'speecht5_hifigan' "
                       "(transformers' SpeechT5HifiGan)")
    c = cls(
        model_in_dim=int(d.get("model_in_dim", 80)),
        sampling_rate=int(d.get("sampling_rate", 16000)),
        upsample_initial_channel=int(d.get("upsample_initial_channel", 512)),
        upsample_rates=tuple(int(u) for u in d.get("upsample_rates", (4, 4, 4, 4))),
        upsample_kernel_sizes=tuple(int(k) for k in d.get("upsample_kernel_sizes", (8, 8, 8, 8))),
        resblock_kernel_sizes=tuple(int(k) for k in d.get("resblock_kernel_sizes", (3, 7, 11))),
        resblock_dilation_sizes=tuple(
            tuple(int(x) for x in ds)
            for ds in d.get("resblock_dilation_sizes", ((1, 3, 5), (1, 3, 5), (1, 3, 5)))),
        leaky_relu_slope=float(d.get("leaky_relu_slope", 0.1)),
        normalize_before=bool(d.get("normalize_before", True)))
    problems = []
    if len(c.upsample_rates) != len(c.upsample_kernel_sizes):
      problems.append("upsample_rates and upsample_kernel_sizes differ in length")
    if len(c.resblock_kernel_sizes) != len(c.resblock_dilation_sizes):
      problems.append("resblock_kernel_sizes and resblock_dilation_sizes differ in length")
    if any((k - u) % 2 or k < u for u, k in zip(c.upsample_rates, c.upsample_kernel_sizes)):
      problems.append("each upsample kernel must be >= its rate and differ from it by an even "
                      f"number: rates {c.upsample_rates}, kernels {c.upsample_kernel_sizes}")
    if problems:
      raise ValueError(f"{what}: " + "; ".join(problems))
    return c


def _same_padding(kernel_size: int, dilation: int) -> int:
  return (kernel_size * dilation - dilation) // 2


class ResBlock(nnx.Module):

  def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...], slope: float,
               **kw):
    self.convs1 = nnx.List([Conv(channels, channels, kernel_size, ndim=1, dilation=d,
                                 padding=_same_padding(kernel_size, d), **kw) for d in dilations])
    self.convs2 = nnx.List([Conv(channels, channels, kernel_size, ndim=1,
                                 padding=_same_padding(kernel_size, 1), **kw) for _ in dilations])
    self.slope = slope

  def __call__(self, x):
    for conv1, conv2 in zip(self.convs1, self.convs2):
      h = conv1(jax.nn.leaky_relu(x, self.slope))
      x = x + conv2(jax.nn.leaky_relu(h, self.slope))
    return x


class HiFiGAN(nnx.Module):
  """mel [B, N, model_in_dim] -> wave [B, N * hop_length] in (-1, 1) (float32 out)."""

  def __init__(self, config: HiFiGANConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.config = config
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    c0 = config.upsample_initial_channel
    self.conv_pre = Conv(config.model_in_dim, c0, 7, ndim=1, padding=3, **kw)
    self.upsampler = nnx.List([
        ConvTranspose1d(c0 // 2**i, c0 // 2**(i + 1), k, stride=u, padding=(k - u) // 2, **kw)
        for i, (u, k) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes))])
    self.resblocks = nnx.List([
        ResBlock(c0 // 2**(i + 1), k, d, config.leaky_relu_slope, **kw)
        for i in range(len(config.upsample_rates))
        for k, d in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes)])
    self.conv_post = Conv(c0 // 2**len(config.upsample_rates), 1, 7, ndim=1, padding=3, **kw)
    self.mean = Buffer(jnp.zeros((config.model_in_dim,), param_dtype))
    self.scale = Buffer(jnp.ones((config.model_in_dim,), param_dtype))
    self.dtype = dtype

  @property
  def hop_length(self) -> int:
    return self.config.hop_length

  def __call__(self, mel: jax.Array) -> jax.Array:
    c = self.config
    if mel.ndim != 3 or mel.shape[-1] != c.model_in_dim:
      raise ValueError(f"HiFiGAN: mel must be [B, N, model_in_dim={c.model_in_dim}], got "
                       f"{mel.shape}")
    x = mel.astype(jnp.float32)
    if c.normalize_before:
      x = (x - self.mean[...].astype(jnp.float32)) / self.scale[...].astype(jnp.float32)
    x = self.conv_pre(x.astype(self.dtype))
    per_stage = len(c.resblock_kernel_sizes)
    for i, up in enumerate(self.upsampler):
      x = up(jax.nn.leaky_relu(x, c.leaky_relu_slope))
      x = sum(self.resblocks[i * per_stage + j](x) for j in range(per_stage)) / per_stage
    x = self.conv_post(jax.nn.leaky_relu(x, 0.01))
    return jnp.tanh(x.astype(jnp.float32))[..., 0]

  def context_frames(self) -> int:
    """Mel frames either side that can reach an output sample (an upper bound; for chunking)."""
    c = self.config
    frames, samples_per_frame = 3.0, 1  # conv_pre
    for u, k in zip(c.upsample_rates, c.upsample_kernel_sizes):
      frames += (k / u + 1) / samples_per_frame
      samples_per_frame *= u
      block = max(sum((ks - 1) * d // 2 + (ks - 1) // 2 for d in ds)
                  for ks, ds in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes))
      frames += block / samples_per_frame
    frames += 3 / samples_per_frame  # conv_post
    return int(math.ceil(frames)) + 1
