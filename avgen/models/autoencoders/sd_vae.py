"""Stable Diffusion's KL autoencoder (diffusers `AutoencoderKL`) in Flax NNX, channel-last.

  image x in [-1, 1], [N, H, W, 3]
  encoder(x) -> moments [N, H/f, W/f, 2c];  mean, logvar = split(moments), logvar in [-30, 20]
  latent z = (mean (+ exp(logvar / 2) * eps) - shift) * scale        (the diffusion latent space)
  decoder(z / scale + shift) -> image [N, H, W, 3]

f = 2 ** (len(block_out_channels) - 1). `scale`/`shift` are the checkpoint's scaling_factor and
shift_factor (diffusers leaves them to the pipelines; here they belong to encode/decode so
that callers only ever see the diffusion latent space). Checkpoints that set latents_mean and
latents_std use z = (mean - latents_mean) * scale / latents_std instead, as their pipelines do.

Video is decoded frame by frame in chunks ("VAE slicing"): `decode(z, frames_per_chunk=k)` runs
the decoder on k frames at a time inside one compiled loop; every frame's output is the same as
decoding all frames at once, since nothing in the network mixes frames.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from avgen.kernels import attention
from avgen.models.autoencoders.conv_layers import Conv, GroupNorm
from avgen.models.layers import Dense

_EPS = 1e-6  # every GroupNorm of diffusers' VAE


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
  """The fields of a diffusers AutoencoderKL config.json that decide the network and latents."""

  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_diffusers(cls, d: Mapping[str, Any], *,
                     what: str = "sd_vae config") -> "AutoencoderKLConfig":
    """Validates a diffusers config dict; anything this port does not implement is an error."""
    channels = tuple(int(c) for c in d.get("block_out_channels", (64,)))
    n = len(channels)
    down = tuple(d.get("down_block_types", ("DownEncoderBlock2D",) * n))
    up = tuple(d.get("up_block_types", ("UpDecoderBlock2D",) * n))
    problems = []
    if d.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
      problems.append(f"_class_name is {d.get('_class_name')!r}, not 'AutoencoderKL'")
    if any(t != "DownEncoderBlock2D" for t in down) or len(down) != n:
      problems.append(f"down_block_types must be {n} x 'DownEncoderBlock2D', got {down}")
    if any(t != "UpDecoderBlock2D" for t in up) or len(up) != n:
      problems.append(f"up_block_types must be {n} x 'UpDecoderBlock2D', got {up}")
    if d.get("act_fn", "silu") not in ("silu", "swish"):
      problems.append(f"act_fn {d.get('act_fn')!r} is not supported (only silu)")
    groups = int(d.get("norm_num_groups", 32))
    if any(c % groups for c in channels):
      problems.append(f"norm_num_groups={groups} must divide every block_out_channels {channels}")
    shift = d.get("shift_factor")
    mean, std = d.get("latents_mean"), d.get("latents_std")
    latent_channels = int(d.get("latent_channels", 4))
    if (mean is None) != (std is None):
      problems.append("latents_mean and latents_std must be given together")
    elif mean is not None and shift is not None:
      problems.append("shift_factor and latents_mean/latents_std are two latent normalizations; "
                      "give one")
    elif mean is not None and not (len(mean) == len(std) == latent_channels):
      problems.append(f"latents_mean/std need latent_channels={latent_channels} entries")
    if problems:
      raise ValueError(f"{what}: " + "; ".join(problems))
    return cls(
        in_channels=int(d.get("in_channels", 3)), out_channels=int(d.get("out_channels", 3)),
        block_out_channels=channels, layers_per_block=int(d.get("layers_per_block", 1)),
        latent_channels=latent_channels, norm_num_groups=groups,
        scaling_factor=float(d.get("scaling_factor", 0.18215)),
        shift_factor=None if shift is None else float(shift),
        latents_mean=None if mean is None else tuple(float(x) for x in mean),
        latents_std=None if std is None else tuple(float(x) for x in std),
        use_quant_conv=bool(d.get("use_quant_conv", True)),
        use_post_quant_conv=bool(d.get("use_post_quant_conv", True)),
        mid_block_add_attention=bool(d.get("mid_block_add_attention", True)))


class ResnetBlock(nnx.Module):
  """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), with a 1x1 shortcut when channels change."""

  def __init__(self, in_channels: int, out_channels: int, groups: int, **kw):
    self.norm1 = GroupNorm(groups, in_channels, eps=_EPS, **kw)
    self.conv1 = Conv(in_channels, out_channels, 3, ndim=2, padding=1, **kw)
    self.norm2 = GroupNorm(groups, out_channels, eps=_EPS, **kw)
    self.conv2 = Conv(out_channels, out_channels, 3, ndim=2, padding=1, **kw)
    self.conv_shortcut = (Conv(in_channels, out_channels, 1, ndim=2, **kw)
                          if in_channels != out_channels else None)

  def __call__(self, x):
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
    return skip + h


class SpatialSelfAttention(nnx.Module):
  """x + out(attn(q, k, v)) over the H*W positions of GroupNorm(x), one head of all channels."""

  def __init__(self, channels: int, groups: int, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.group_norm = GroupNorm(groups, channels, eps=_EPS, **kw)
    self.to_q = Dense(channels, channels, ("conv_in", "conv_out"), **kw)
    self.to_k = Dense(channels, channels, ("conv_in", "conv_out"), **kw)
    self.to_v = Dense(channels, channels, ("conv_in", "conv_out"), **kw)
    self.to_out = Dense(channels, channels, ("conv_in", "conv_out"), **kw)

  def __call__(self, x):
    n, h, w, c = x.shape
    t = self.group_norm(x).reshape(n, h * w, 1, c)
    # The head dim is all channels (512 in SD's VAE), beyond what cuDNN's fused kernels take.
    out = attention(self.to_q(t), self.to_k(t), self.to_v(t), impl="xla")
    return x + self.to_out(out.reshape(n, h, w, c))


class MidBlock(nnx.Module):
  def __init__(self, channels: int, groups: int, add_attention: bool, **kw):
    self.resnets = nnx.List([ResnetBlock(channels, channels, groups, **kw) for _ in range(2)])
    self.attention = SpatialSelfAttention(channels, groups, **kw) if add_attention else None

  def __call__(self, x):
    x = self.resnets[0](x)
    if self.attention is not None:
      x = self.attention(x)
    return self.resnets[1](x)


class DownBlock(nnx.Module):
  """Resnets, then (except in the last block) a stride-2 3x3 conv padded on the bottom/right."""

  def __init__(self, in_channels, out_channels, num_layers, groups, downsample: bool, **kw):
    self.resnets = nnx.List([ResnetBlock(in_channels if i == 0 else out_channels, out_channels,
                                         groups, **kw) for i in range(num_layers)])
    self.downsample = (Conv(out_channels, out_channels, 3, ndim=2, stride=2,
                            padding=((0, 1), (0, 1)), **kw) if downsample else None)

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    return x if self.downsample is None else self.downsample(x)


class UpBlock(nnx.Module):
  """Resnets, then (except in the last block) nearest-neighbour 2x and a 3x3 conv."""

  def __init__(self, in_channels, out_channels, num_layers, groups, upsample: bool, **kw):
    self.resnets = nnx.List([ResnetBlock(in_channels if i == 0 else out_channels, out_channels,
                                         groups, **kw) for i in range(num_layers)])
    self.upsample = (Conv(out_channels, out_channels, 3, ndim=2, padding=1, **kw)
                     if upsample else None)

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    if self.upsample is not None:
      x = self.upsample(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
    return x


class Encoder(nnx.Module):
  """image [N, H, W, in] -> moments [N, H/f, W/f, 2 * latent_channels]."""

  def __init__(self, c: AutoencoderKLConfig, **kw):
    ch, g = c.block_out_channels, c.norm_num_groups
    self.conv_in = Conv(c.in_channels, ch[0], 3, ndim=2, padding=1, **kw)
    self.down_blocks = nnx.List([
        DownBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block, g, i < len(ch) - 1, **kw)
        for i in range(len(ch))])
    self.mid_block = MidBlock(ch[-1], g, c.mid_block_add_attention, **kw)
    self.conv_norm_out = GroupNorm(g, ch[-1], eps=_EPS, **kw)
    self.conv_out = Conv(ch[-1], 2 * c.latent_channels, 3, ndim=2, padding=1, **kw)

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """latent [N, h, w, latent_channels] -> image [N, h*f, w*f, out]."""

  def __init__(self, c: AutoencoderKLConfig, **kw):
    ch, g = tuple(reversed(c.block_out_channels)), c.norm_num_groups
    self.conv_in = Conv(c.latent_channels, ch[0], 3, ndim=2, padding=1, **kw)
    self.mid_block = MidBlock(ch[0], g, c.mid_block_add_attention, **kw)
    self.up_blocks = nnx.List([
        UpBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block + 1, g, i < len(ch) - 1, **kw)
        for i in range(len(ch))])
    self.conv_norm_out = GroupNorm(g, ch[-1], eps=_EPS, **kw)
    self.conv_out = Conv(ch[-1], c.out_channels, 3, ndim=2, padding=1, **kw)

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """SD-VAE: `encode(x)` image -> scaled latent, `decode(z)` scaled latent -> image (channel-last).

  Both take any leading axes ([H, W, C], [N, H, W, C], [B, T, H, W, C], ...), treating every
  [H, W, C] slice as one image. dtype is the parameter and compute dtype; norm statistics and
  the attention softmax are float32, and `decode` returns float32.
  """

  def __init__(self, config: AutoencoderKLConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.config = config
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    c2, c = 2 * config.latent_channels, config.latent_channels
    self.encoder = Encoder(config, **kw)
    self.decoder = Decoder(config, **kw)
    self.quant_conv = Conv(c2, c2, 1, ndim=2, **kw) if config.use_quant_conv else None
    self.post_quant_conv = Conv(c, c, 1, ndim=2, **kw) if config.use_post_quant_conv else None
    self.dtype = dtype

  # ---- the Gaussian posterior and the latent normalization

  def moments(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images [N, H, W, C] -> (mean, logvar) of the posterior, unscaled, float32."""
    m = self.encoder(x)
    if self.quant_conv is not None:
      m = self.quant_conv(m)
    mean, logvar = jnp.split(m.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def _normalize(self, z):
    c = self.config
    if c.latents_mean is not None:
      return (z - jnp.asarray(c.latents_mean)) * c.scaling_factor / jnp.asarray(c.latents_std)
    return (z - (c.shift_factor or 0.0)) * c.scaling_factor

  def _denormalize(self, z):
    c = self.config
    if c.latents_mean is not None:
      return z * jnp.asarray(c.latents_std) / c.scaling_factor + jnp.asarray(c.latents_mean)
    return z / c.scaling_factor + (c.shift_factor or 0.0)

  # ---- public API

  def encode(self, x: jax.Array, key: jax.Array | None = None, *,
             frames_per_chunk: int | None = None) -> jax.Array:
    """images [..., H, W, in_channels] in [-1, 1] -> latents [..., H/f, W/f, latent_channels].

    Without `key` the posterior mean; with it a sample mean + std * N(0, 1).
    frames_per_chunk: encode this many [H, W, C] slices at a time (see `decode`).
    """
    c = self.config
    f = c.downsample
    if x.ndim < 3 or x.shape[-1] != c.in_channels or x.shape[-3] % f or x.shape[-2] % f:
      raise ValueError(f"AutoencoderKL.encode: images must be [..., H, W, {c.in_channels}] with H "
                       f"and W divisible by {f}, got {x.shape}")

    def encode_frames(frames):
      mean, logvar = self.moments(frames)
      return jnp.concatenate([mean, logvar], axis=-1)

    lead = x.shape[:-3]
    moments = map_frames(encode_frames, x.reshape((-1,) + x.shape[-3:]), frames_per_chunk)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    z = mean
    if key is not None:
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    z = self._normalize(z)
    return z.reshape(lead + z.shape[1:])

  def decode(self, z: jax.Array, *, frames_per_chunk: int | None = None) -> jax.Array:
    """latents [..., h, w, latent_channels] -> images [..., h*f, w*f, out_channels], float32.

    frames_per_chunk: decode this many [h, w, c] slices at a time (bounds activation memory;
    the output is the same as decoding all at once).
    """
    c = self.config
    if z.ndim < 3 or z.shape[-1] != c.latent_channels:
      raise ValueError(f"AutoencoderKL.decode: latents must be [..., h, w, {c.latent_channels}], "
                       f"got {z.shape}")
    lead = z.shape[:-3]
    out = map_frames(self._decode_frames, z.reshape((-1,) + z.shape[-3:]), frames_per_chunk)
    return out.reshape(lead + out.shape[1:])

  def _decode_frames(self, z):
    z = self._denormalize(z.astype(jnp.float32)).astype(self.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)


def map_frames(fn, frames: jax.Array, frames_per_chunk: int | None) -> jax.Array:
  """fn over [n, ...] frames, `frames_per_chunk` at a time in a `lax.map` loop (None: all at once).

  Full chunks share one compiled body; a remainder of n % k frames is one more call.
  """
  if frames_per_chunk is not None and frames_per_chunk < 1:
    raise ValueError(f"AutoencoderKL: frames_per_chunk must be >= 1, got {frames_per_chunk}")
  n = frames.shape[0]
  if frames_per_chunk is None or frames_per_chunk >= n:
    return fn(frames)
  k = int(frames_per_chunk)
  full = (n // k) * k
  out = jax.lax.map(fn, frames[:full].reshape((n // k, k) + frames.shape[1:]))
  out = out.reshape((full,) + out.shape[2:])
  if full < n:
    out = jnp.concatenate([out, fn(frames[full:])])
  return out
