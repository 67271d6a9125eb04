"""Token embeddings: video and audio patches, modality embedding, diffusion-time embedding."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from avgen.models.layers import Dense, param


def patchify_video(x: jax.Array, patch: Sequence[int]) -> jax.Array:
  """[B, T, h, w, C] -> [B, T/pt * h/ph * w/pw, pt*ph*pw*C], tokens in (t, row, col) order."""
  if x.ndim != 5:
    raise ValueError(f"patchify_video: video must be [B, T, h, w, C], got {x.shape}")
  b, t, h, w, c = x.shape
  pt, ph, pw = patch
  if t % pt or h % ph or w % pw:
    raise ValueError(f"patchify_video: video (T, h, w) = {(t, h, w)} not divisible by patch {tuple(patch)}")
  x = x.reshape(b, t // pt, pt, h // ph, ph, w // pw, pw, c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, (t // pt) * (h // ph) * (w // pw), pt * ph * pw * c)


def unpatchify_video(tokens: jax.Array, grid: Sequence[int], patch: Sequence[int]) -> jax.Array:
  """Inverse of `patchify_video`: [B, nt*nh*nw, pt*ph*pw*C] -> [B, T, h, w, C]."""
  b, length, dim = tokens.shape
  nt, nh, nw = grid
  pt, ph, pw = patch
  if length != nt * nh * nw or dim % (pt * ph * pw):
    raise ValueError(f"unpatchify_video: tokens {tokens.shape} do not fit grid {tuple(grid)} "
                     f"and patch {tuple(patch)}")
  c = dim // (pt * ph * pw)
  x = tokens.reshape(b, nt, nh, nw, pt, ph, pw, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return x.reshape(b, nt * pt, nh * ph, nw * pw, c)


def patchify_audio(x: jax.Array, patch: int) -> jax.Array:
  """[B, N, M] -> [B, N/p, p*M]: each token is p consecutive mel frames with all bins."""
  if x.ndim != 3:
    raise ValueError(f"patchify_audio: audio must be [B, N, n_mels], got {x.shape}")
  b, n, m = x.shape
  if n % patch:
    raise ValueError(f"patchify_audio: N={n} mel frames not divisible by audio_patch={patch}")
  return x.reshape(b, n // patch, patch * m)


def unpatchify_audio(tokens: jax.Array, patch: int) -> jax.Array:
  """[B, N/p, p*M] -> [B, N, M]."""
  b, length, dim = tokens.shape
  return tokens.reshape(b, length * patch, dim // patch)


class VideoPatchEmbed(nnx.Module):
  """[B, T, h, w, C] -> [B, Lv, width] (a strided conv written as patchify + Dense)."""

  def __init__(self, patch: Sequence[int], channels: int, width: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    self.patch = tuple(patch)
    self.proj = Dense(math.prod(self.patch) * channels, width, ("conv_in", "embed"), rngs=rngs,
                      dtype=dtype, param_dtype=param_dtype)

  def __call__(self, video: jax.Array) -> jax.Array:
    return self.proj(patchify_video(video, self.patch))


class AudioPatchEmbed(nnx.Module):
  """[B, N, n_mels] -> [B, N/p, width]."""

  def __init__(self, patch: int, n_mels: int, width: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.patch = patch
    self.proj = Dense(patch * n_mels, width, ("conv_in", "embed"), rngs=rngs, dtype=dtype,
                      param_dtype=param_dtype)

  def __call__(self, audio: jax.Array) -> jax.Array:
    return self.proj(patchify_audio(audio, self.patch))


class ModalityEmbedding(nnx.Module):
  """One learned vector per modality (0 = video, 1 = audio), added to every token."""

  VIDEO, AUDIO = 0, 1

  def __init__(self, width: int, *, rngs: nnx.Rngs, num_modalities: int = 2, param_dtype=jnp.float32):
    self.table = param(rngs, nnx.initializers.normal(0.02), (num_modalities, width), (None, "embed"),
                       param_dtype)

  def __call__(self, modality: int, dtype=jnp.float32) -> jax.Array:
    return self.table[modality].astype(dtype)


def timestep_sinusoid(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """[B] times in [0, 1] -> float32 [B, dim]; t is scaled by 1000 so frequencies resolve it."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = (1000.0 * t.astype(jnp.float32))[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], -1)


class TimestepEmbedder(nnx.Module):
  """t [B] -> [B, width]: sinusoid -> Dense -> SiLU -> Dense."""

  def __init__(self, width: int, *, rngs: nnx.Rngs, freq_dim: int = 256, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.freq_dim = freq_dim
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.fc1 = Dense(freq_dim, width, (None, "embed"), **kw)
    self.fc2 = Dense(width, width, ("mlp", "embed"), **kw)

  def __call__(self, t: jax.Array) -> jax.Array:
    if t.ndim != 1:
      raise ValueError(f"TimestepEmbedder: t must be [B], got {t.shape}")
    return self.fc2(jax.nn.silu(self.fc1(timestep_sinusoid(t, self.freq_dim))))
