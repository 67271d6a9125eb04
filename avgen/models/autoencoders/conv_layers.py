"""Convolution and norm layers of the pretrained codecs (SD-VAE, HiFi-GAN, BigVGAN), channel-last.

Kernels are stored as [*window, in, out], the layout `avgen.pretrained.safetensors_io.conv` gives
for a torch ConvNd weight; a transposed convolution keeps torch's [in, out, *window] order moved
to [*window, in, out] as well, and flips the window when it runs. Inputs are [B, *spatial, C].
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from avgen.models.layers import param

# Logical names of a kernel's window axes: a 1D window runs along time (audio); 2D windows are
# spatial and never sharded.
_WINDOW_NAMES = {1: ("time",), 2: (None, None)}
_LAYOUTS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}


def _tuple(v, n: int) -> tuple[int, ...]:
  return (int(v),) * n if isinstance(v, int) else tuple(int(x) for x in v)


class Conv(nnx.Module):
  """y = conv(x, W) + b with torch's Conv1d/Conv2d meaning of stride, dilation and padding.

  padding: an int p (p zeros each side of every axis, as torch) or ((lo, hi), ...) per axis.
  """

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int], *,
               ndim: int, stride=1, dilation=1, padding=0, use_bias: bool = True,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    self.kernel_size = _tuple(kernel_size, ndim)
    self.stride, self.dilation = _tuple(stride, ndim), _tuple(dilation, ndim)
    if isinstance(padding, int):
      self.padding = tuple((padding, padding) for _ in range(ndim))
    else:
      self.padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    self.ndim, self.dtype = ndim, dtype
    init = nnx.initializers.lecun_normal()
    self.kernel = param(rngs, init, self.kernel_size + (in_channels, out_channels),
                        _WINDOW_NAMES[ndim] + ("conv_in", "conv_out"), param_dtype)
    self.bias = (param(rngs, nnx.initializers.zeros_init(), out_channels, ("conv_out",),
                       param_dtype) if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype), window_strides=self.stride,
        padding=self.padding, rhs_dilation=self.dilation, dimension_numbers=_LAYOUTS[self.ndim])
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class ConvTranspose1d(nnx.Module):
  """torch ConvTranspose1d(in, out, k, stride, padding): output length (L-1)*stride - 2p + k.

  The kernel is torch's weight [in, out, k] stored as [k, in, out]. A transposed convolution is
  the gradient of a strided one: dilate the input by `stride`, pad k-1-p each side and correlate
  with the window reversed.
  """

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int,
               padding: int = 0, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    if not 0 <= padding <= kernel_size - 1:
      raise ValueError(f"ConvTranspose1d: need 0 <= padding <= kernel_size - 1, got padding="
                       f"{padding}, kernel_size={kernel_size}")
    self.kernel_size, self.stride, self.padding = int(kernel_size), int(stride), int(padding)
    self.dtype = dtype
    init = nnx.initializers.lecun_normal()
    self.kernel = param(rngs, init, (kernel_size, in_channels, out_channels),
                        ("time", "conv_in", "conv_out"), param_dtype)
    self.bias = param(rngs, nnx.initializers.zeros_init(), out_channels, ("conv_out",),
                      param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    edge = self.kernel_size - 1 - self.padding
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...][::-1].astype(self.dtype), window_strides=(1,),
        padding=((edge, edge),), lhs_dilation=(self.stride,), dimension_numbers=_LAYOUTS[1])
    return y + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
  """torch.nn.GroupNorm over the trailing channel axis; statistics in float32."""

  def __init__(self, num_groups: int, channels: int, *, eps: float, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    if channels % num_groups:
      raise ValueError(f"GroupNorm: {num_groups} groups do not divide {channels} channels")
    self.num_groups, self.eps, self.dtype = num_groups, eps, dtype
    self.scale = param(rngs, nnx.initializers.ones_init(), channels, ("conv_out",), param_dtype)
    self.bias = param(rngs, nnx.initializers.zeros_init(), channels, ("conv_out",), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    shape = x.shape
    g = x.astype(jnp.float32).reshape(shape[0], -1, self.num_groups, shape[-1] // self.num_groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(g - mean).mean(axis=(1, 3), keepdims=True)
    y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)
