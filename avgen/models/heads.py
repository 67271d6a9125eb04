"""Output heads ("decoders") from DiT tokens to each modality's diffusion target.

audio: `audio_head_depth` AdaLN transformer layers (1D RoPE over audio tokens), then a
  modulated final norm and a Dense to p*n_mels per token, un-patched to [B, N, n_mels].
video: a modulated final norm and a Dense to pt*ph*pw*channels per token, un-patched to
  [B, T, h, w, channels], `video_head_depth` residual 3x3x3 conv layers, a conv to C.
The last projection of each head is zero-initialised, so the initial prediction is 0.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avgen.models import rope as rope_lib
from avgen.models.embeddings import unpatchify_audio, unpatchify_video
from avgen.models.layers import (ACT, MLP, AdaLN, Attention, Dense, LayerNorm, RMSNorm, block_adaln,
                                 modulate, param)
from avgen.parallel.sharding import constrain


class AdaLNBlock(nnx.Module):
  """x += g1 * Attn(modulate(norm(x))); x += g2 * MLP(modulate(norm(x))); modulation from c."""

  def __init__(self, width: int, num_heads: int, mlp_ratio: float, *, rngs: nnx.Rngs,
               qk_norm: bool = True, impl: str = "auto", adaln: str = "per_block", dtype=jnp.float32,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.adaln = block_adaln(adaln, width, 6, **kw)
    self.norm1 = LayerNorm(width, affine=False)
    self.attn = Attention(width, num_heads, qk_norm=qk_norm, impl=impl, **kw)
    self.norm2 = LayerNorm(width, affine=False)
    self.mlp = MLP(width, int(width * mlp_ratio), **kw)

  def __call__(self, x: jax.Array, c: jax.Array, rope) -> jax.Array:
    """`c`: conditioning [B, D], or the stack's modulation vectors [B, 6, D] (adaln "single")."""
    shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(c)
    x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), rope_q=rope, rope_k=rope)
    x = x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))
    return constrain(x, ACT)


class FinalLayer(nnx.Module):
  """modulate(norm(x), c) -> Dense (zero-initialised unless said otherwise)."""

  def __init__(self, width: int, out_dim: int, names, *, rngs: nnx.Rngs, zero_init: bool = True,
               dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.adaln = AdaLN(width, width, 2, **kw)
    self.norm = LayerNorm(width, affine=False)
    self.proj = Dense(width, out_dim, names, zero_init=zero_init, **kw)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    shift, scale = self.adaln(c)
    return self.proj(modulate(self.norm(x), shift, scale))


class AudioHead(nnx.Module):
  """Audio tokens [B, La, D] + c_a [B, D] -> prediction [B, La*p, n_mels]."""

  def __init__(self, width: int, num_heads: int, depth: int, patch: int, n_mels: int, *,
               rngs: nnx.Rngs, mlp_ratio: float = 4.0, qk_norm: bool = True, rope_theta: float = 10000.0,
               impl: str = "auto", adaln: str = "per_block", dtype=jnp.float32,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.patch, self.head_dim, self.rope_theta = patch, width // num_heads, rope_theta
    self.layers = nnx.List([AdaLNBlock(width, num_heads, mlp_ratio, qk_norm=qk_norm, impl=impl,
                                       adaln=adaln, **kw) for _ in range(depth)])
    # adaln "single": one projection for all layers (each adds its offsets).
    self.layers_adaln = AdaLN(width, width, 6, **kw) if adaln == "single" and depth else None
    self.final = FinalLayer(width, patch * n_mels, ("embed", None), **kw)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    positions = np.arange(x.shape[1], dtype=np.float32)[:, None]
    rope = rope_lib.rope_tables(positions, (self.head_dim,), self.rope_theta)
    cond = c if self.layers_adaln is None else self.layers_adaln.vectors(c)
    for layer in self.layers:
      x = layer(x, cond, rope)
    return unpatchify_audio(self.final(x, c), self.patch)


VIDEO_BATCH = ("batch", None, None, None, None)


class Conv3D(nnx.Module):
  """3D conv over [B, T, h, w, C] with 'same' zero padding.

  Written as a sum over temporal taps of 2D convs: the same math as one 3D conv, but XLA's CPU
  backend runs 2D convs 2-4x faster than 3D ones (measured on the demo shapes).
  """

  def __init__(self, channels_in: int, channels_out: int, kernel: Sequence[int] = (3, 3, 3), *,
               rngs: nnx.Rngs, zero_init: bool = False, dtype=jnp.float32, param_dtype=jnp.float32):
    if any(k % 2 == 0 for k in kernel):
      raise ValueError(f"Conv3D: kernel sizes must be odd for 'same' padding, got {tuple(kernel)}")
    if zero_init:
      init = nnx.initializers.zeros_init()
    else:
      init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1, 2, 3),
                                               out_axis=4)
    self.kernel = param(rngs, init, (*kernel, channels_in, channels_out),
                        ("time", None, None, "conv_in", "conv_out"), param_dtype)
    self.bias = param(rngs, nnx.initializers.zeros_init(), channels_out, ("conv_out",), param_dtype)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    # Split over the batch only: XLA sums the kernel gradient of a spatially split conv over the
    # devices that replicate it too (x4 on a context-8 mesh; see avgen/parallel/sharding.py).
    x = constrain(x, VIDEO_BATCH)
    k = self.kernel[...].astype(self.dtype)
    b, t, h, w, c = x.shape
    taps = k.shape[0]
    xp = jnp.pad(x.astype(self.dtype), ((0, 0), (taps // 2, taps // 2), (0, 0), (0, 0), (0, 0)))
    y = 0
    for j in range(taps):
      frames = xp[:, j:j + t].reshape(b * t, h, w, c)
      y = y + jax.lax.conv_general_dilated(frames, k[j], window_strides=(1, 1), padding="SAME",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return constrain(y.reshape(b, t, h, w, -1) + self.bias[...].astype(self.dtype), VIDEO_BATCH)


class ConvBlock(nnx.Module):
  """x += conv(SiLU(modulate(rmsnorm(x), c))): a residual 3D conv layer conditioned on c."""

  def __init__(self, channels: int, cond_width: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.adaln = AdaLN(cond_width, channels, 2, names=("embed", None, "conv_out"), **kw)
    self.norm = RMSNorm(channels, use_scale=False)
    self.conv = Conv3D(channels, channels, **kw)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    shift, scale = (m[:, :, None, None, :] for m in self.adaln(c))  # [B, 1, 1, 1, C]
    return x + self.conv(jax.nn.silu(modulate(self.norm(x), shift, scale)))


class VideoHead(nnx.Module):
  """Video tokens [B, Lv, D] + c_v [B, D] -> prediction [B, T, h, w, C]."""

  def __init__(self, width: int, grid: Sequence[int], patch: Sequence[int], hidden_channels: int,
               out_channels: int, depth: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.grid, self.patch = tuple(grid), tuple(patch)
    self.final = FinalLayer(width, math.prod(self.patch) * hidden_channels, ("embed", "conv_out"),
                            zero_init=False, **kw)
    self.blocks = nnx.List([ConvBlock(hidden_channels, width, **kw) for _ in range(depth)])
    self.out_norm = RMSNorm(hidden_channels, use_scale=False)
    self.out_conv = Conv3D(hidden_channels, out_channels, zero_init=True, **kw)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    h = unpatchify_video(self.final(x, c), self.grid, self.patch)
    for block in self.blocks:
      h = block(h, c)
    return self.out_conv(jax.nn.silu(self.out_norm(h)))
