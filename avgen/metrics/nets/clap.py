"""CLAP (LAION, HTS-AT audio tower + RoBERTa text tower): the embeddings of the CLAP score.

A Flax NNX port of transformers' `ClapModel`, unfused (`laion/clap-htsat-unfused`) and fused
(`enable_fusion=True`: `laion/clap-htsat-fused`, `laion/larger_clap_*`), loaded from a folder
written by `save_pretrained` (config.json and model.safetensors). `get_audio_features` /
`get_text_features` give the L2-normalized projected embeddings, as the original's methods of
the same names.

Audio tower (HTS-AT):
  mel features [B, 1, T, M] -> BatchNorm over mel bins -> time stretched to spec_size * r frames
  (bicubic, align_corners, A = -0.75, as torch) with r = spec_size / M -> folded into a
  [spec_size, spec_size] image (r time chunks stacked along frequency) -> 4x4 patch conv + LN
  -> Swin stages (window attention with relative position bias; odd layers shift windows by
  half a window, with a mask between regions that the shift made adjacent; 2x2 patch merging
  between stages) -> LN -> mean over tokens -> projection (Linear, ReLU, Linear).
Feature fusion (fused checkpoints; LAION-CLAP's "aff_2d"): the input has 4 mel channels, the
  whole clip's mel shrunk to 10 s and three 10 s chunks of it (front, middle, back thirds), each
  folded into an image as above. The patch conv embeds the first; for clips marked `is_longer`
  the chunks go through their own conv (kernel and stride 3x wider in time), are laid side by
  side in time (zero-padded to the same width) and mixed in by attentional feature fusion:
  w = sigmoid(local(x + y) + global(x + y)), out = 2 x w + 2 y (1 - w), where local is
  1x1 conv, BN, ReLU, 1x1 conv, BN and global the same after a spatial mean. Other clips use the
  first channel alone (for clips up to 10 s all four channels are the same mel).
Text tower: RoBERTa (post-LN BERT layers; positions count non-pad tokens from pad_id + 1),
  pooler tanh(W h_0 + b) on the first token -> projection (Linear, ReLU, Linear).

Preprocessing (48 kHz log-mel with repeat-padding to 10 s, RoBERTa BPE) is the original's own
`ClapProcessor` from transformers, which is numpy-only; see `ClapEncoders`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avgen.metrics.nets import common
from avgen.models.layers import Dense, LayerNorm


@dataclasses.dataclass(frozen=True)
class AudioSettings:
  num_mel_bins: int = 64
  spec_size: int = 256
  window_size: int = 8
  patch_size: int = 4
  patch_stride: int = 4
  patch_dim: int = 96  # patch_embeds_hidden_size
  depths: tuple[int, ...] = (2, 2, 6, 2)
  num_heads: tuple[int, ...] = (4, 8, 16, 32)
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  patch_norm: bool = True
  layer_norm_eps: float = 1e-5
  projection_dim: int = 512
  enable_fusion: bool = False
  aff_block_r: int = 4  # channel reduction inside the fusion block


@dataclasses.dataclass(frozen=True)
class TextSettings:
  vocab_size: int = 50265
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_positions: int = 514
  type_vocab_size: int = 1
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 1
  projection_dim: int = 512


def settings_from_config(config: dict[str, Any]) -> tuple[AudioSettings, TextSettings]:
  """Our settings from a transformers ClapConfig dict; refuses what the port does not cover."""
  audio, text = config.get("audio_config", {}), config.get("text_config", {})
  if audio.get("enable_fusion") and audio.get("fusion_type") == "channel_map":
    raise ValueError("CLAP: audio_config.fusion_type='channel_map' (a 4-channel patch conv) is "
                     "not ported; the released fused checkpoints use the default (attentional "
                     "feature fusion)")
  required = [("audio_config", audio, "hidden_act", "gelu"),
              ("text_config", text, "hidden_act", "gelu"),
              ("config", config, "projection_hidden_act", "relu"),
              ("audio_config", audio, "flatten_patch_embeds", True),
              ("audio_config", audio, "patch_embed_input_channels", 1)]
  for where, part, key, want in required:
    if key in part and part[key] != want:
      raise ValueError(f"CLAP: {where}.{key}={part[key]!r} is not ported (expects {want!r})")
  stride = audio.get("patch_stride", 4)
  stride = stride[0] if isinstance(stride, (list, tuple)) else stride
  size = audio.get("patch_size", 4)
  size = size[0] if isinstance(size, (list, tuple)) else size
  if size != stride:
    raise ValueError(f"CLAP: patch_size {size} != patch_stride {stride} is not ported")
  projection = config.get("projection_dim", 512)
  a = AudioSettings(
      num_mel_bins=audio.get("num_mel_bins", 64), spec_size=audio.get("spec_size", 256),
      window_size=audio.get("window_size", 8), patch_size=size, patch_stride=stride,
      patch_dim=audio.get("patch_embeds_hidden_size", 96),
      depths=tuple(audio.get("depths", (2, 2, 6, 2))),
      num_heads=tuple(audio.get("num_attention_heads", (4, 8, 16, 32))),
      mlp_ratio=audio.get("mlp_ratio", 4.0), qkv_bias=audio.get("qkv_bias", True),
      patch_norm=audio.get("enable_patch_layer_norm", True),
      layer_norm_eps=audio.get("layer_norm_eps", 1e-5), projection_dim=projection,
      enable_fusion=bool(audio.get("enable_fusion", False)),
      aff_block_r=audio.get("aff_block_r", 4))
  t = TextSettings(
      vocab_size=text.get("vocab_size", 50265), hidden_size=text.get("hidden_size", 768),
      num_layers=text.get("num_hidden_layers", 12), num_heads=text.get("num_attention_heads", 12),
      intermediate_size=text.get("intermediate_size", 3072),
      max_positions=text.get("max_position_embeddings", 514),
      type_vocab_size=text.get("type_vocab_size", 1),
      layer_norm_eps=text.get("layer_norm_eps", 1e-12), pad_token_id=text.get("pad_token_id", 1),
      projection_dim=projection)
  return a, t


def _gelu(x):
  return jax.nn.gelu(x, approximate=False)  # transformers' "gelu" is the erf form


def _l2_normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Projection(nnx.Module):
  """Linear -> ReLU -> Linear into the shared embedding space."""

  def __init__(self, width: int, dim: int, *, rngs: nnx.Rngs):
    self.linear1 = Dense(width, dim, ("embed", "mlp"), rngs=rngs)
    self.linear2 = Dense(dim, dim, ("mlp", "embed"), rngs=rngs)

  def __call__(self, x):
    return self.linear2(jax.nn.relu(self.linear1(x)))


# ---------------------------------------------------------------------------------------------
# Audio tower


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] weights of torch's 1D bicubic resize, align_corners=True, A = -0.75."""
  a = -0.75
  def cubic(d):
    d = abs(d)
    if d <= 1:
      return ((a + 2) * d - (a + 3)) * d * d + 1
    if d < 2:
      return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return 0.0
  out = np.zeros((size_out, size_in))
  scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
  for i in range(size_out):
    x = i * scale
    base = int(np.floor(x))
    for k in range(base - 1, base + 3):
      out[i, min(max(k, 0), size_in - 1)] += cubic(x - k)  # border samples repeat
  return out


def _shift_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
  """[num_windows, w*w, w*w] additive mask: -100 between tokens of different shift regions."""
  def regions(n):
    i = np.arange(n)
    return (i >= n - window).astype(int) + (i >= n - shift).astype(int)
  label = regions(height)[:, None] * 3 + regions(width)[None, :]
  windows = label.reshape(height // window, window, width // window, window)
  windows = windows.transpose(0, 2, 1, 3).reshape(-1, window * window)
  return np.where(windows[:, :, None] != windows[:, None, :], -100.0, 0.0).astype(np.float32)


def _relative_index(window: int) -> np.ndarray:
  """[w*w, w*w] index into the (2w-1)^2 relative-position bias table."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :] + window - 1  # [2, N, N]
  return rel[0] * (2 * window - 1) + rel[1]


class SwinLayer(nnx.Module):
  """x += WindowAttention(LN(x)); x += MLP(LN(x)), on a [B, H*W, C] token grid."""

  def __init__(self, dim: int, heads: int, resolution: tuple[int, int], window: int, shift: int,
               s: AudioSettings, *, rngs: nnx.Rngs):
    height, width = resolution
    if min(resolution) <= window:  # the whole grid is one window: no shift (as the original)
      window, shift = min(resolution), 0
    if height % window or width % window:
      raise ValueError(f"CLAP: token grid {resolution} is not a multiple of window {window}")
    self.resolution, self.window, self.shift, self.heads = resolution, window, shift, heads
    head_dim = dim // heads
    kw = dict(rngs=rngs)
    self.norm1 = LayerNorm(dim, eps=s.layer_norm_eps, **kw)
    self.query = Dense(dim, (heads, head_dim), ("embed", "heads", "kv"), use_bias=s.qkv_bias, **kw)
    self.key = Dense(dim, (heads, head_dim), ("embed", "heads", "kv"), use_bias=s.qkv_bias, **kw)
    self.value = Dense(dim, (heads, head_dim), ("embed", "heads", "kv"), use_bias=s.qkv_bias, **kw)
    self.out = Dense((heads, head_dim), dim, ("heads", "kv", "embed"), **kw)
    table_init = nnx.with_partitioning(nnx.initializers.zeros_init(), (None, "heads"))
    table_shape = ((2 * window - 1)**2, heads)
    self.bias_table = nnx.Param(table_init(rngs.params(), table_shape, jnp.float32))
    self.norm2 = LayerNorm(dim, eps=s.layer_norm_eps, **kw)
    self.fc1 = Dense(dim, int(s.mlp_ratio * dim), ("embed", "mlp"), **kw)
    self.fc2 = Dense(int(s.mlp_ratio * dim), dim, ("mlp", "embed"), **kw)

  def attention(self, x: jax.Array) -> jax.Array:
    b, _, c = x.shape
    (height, width), w, s = self.resolution, self.window, self.shift
    grid = x.reshape(b, height, width, c)
    if s:
      grid = jnp.roll(grid, (-s, -s), axis=(1, 2))
    windows = grid.reshape(b, height // w, w, width // w, w, c).transpose(0, 1, 3, 2, 4, 5)
    windows = windows.reshape(-1, w * w, c)  # [B * nW, N, C]
    q, k, v = self.query(windows), self.key(windows), self.value(windows)  # [B*nW, N, h, d]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / np.sqrt(q.shape[-1])
    bias = self.bias_table[...][_relative_index(w)]  # [N, N, h]
    scores = scores + bias.transpose(2, 0, 1)[None]
    if s:
      mask = _shift_mask(height, width, w, s)  # constants, built once per trace
      scores = scores.reshape(b, mask.shape[0], *scores.shape[1:]) + mask[None, :, None]
      scores = scores.reshape(-1, *scores.shape[2:])
    weights = jax.nn.softmax(scores, axis=-1)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision="highest")
    out = self.out(attended).reshape(b, height // w, width // w, w, w, c)
    out = out.transpose(0, 1, 3, 2, 4, 5)
    out = out.reshape(b, height, width, c)
    if s:
      out = jnp.roll(out, (s, s), axis=(1, 2))
    return out.reshape(b, height * width, c)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attention(self.norm1(x))
    return x + self.fc2(_gelu(self.fc1(self.norm2(x))))


class PatchMerging(nnx.Module):
  """2x2 neighbours concatenated (as the original orders them) -> LN -> Linear(4C, 2C)."""

  def __init__(self, dim: int, resolution: tuple[int, int], *, rngs: nnx.Rngs):
    if resolution[0] % 2 or resolution[1] % 2:
      raise ValueError(f"CLAP: patch merging needs an even token grid, got {resolution}")
    self.resolution = resolution
    self.norm = LayerNorm(4 * dim, eps=1e-5, rngs=rngs)
    self.reduction = Dense(4 * dim, 2 * dim, ("mlp", "embed"), use_bias=False, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, _, c = x.shape
    grid = x.reshape(b, *self.resolution, c)
    merged = jnp.concatenate([grid[:, row::2, col::2] for col in range(2) for row in range(2)], -1)
    return self.reduction(self.norm(merged.reshape(b, -1, 4 * c)))


class BatchNorm(nnx.Module):
  """Inference BatchNorm over the last axis (torch's BatchNorm2d in eval mode, eps 1e-5)."""

  def __init__(self, dim: int):
    self.mean = nnx.Variable(jnp.zeros((dim,)))
    self.var = nnx.Variable(jnp.ones((dim,)))
    self.scale = nnx.Param(jnp.ones((dim,)))
    self.bias = nnx.Param(jnp.zeros((dim,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = (x - self.mean[...]) * jax.lax.rsqrt(self.var[...] + 1e-5)
    return x * self.scale[...] + self.bias[...]


class FusionBlock(nnx.Module):
  """Attentional feature fusion of two [B, H, W, C] maps (transformers' ClapAudioAFFBlock)."""

  def __init__(self, channels: int, reduction: int, *, rngs: nnx.Rngs):
    inner = int(channels // reduction)
    self.local1 = common.Conv2D(channels, inner, 1, rngs=rngs)
    self.local_bn1 = BatchNorm(inner)
    self.local2 = common.Conv2D(inner, channels, 1, rngs=rngs)
    self.local_bn2 = BatchNorm(channels)
    self.global1 = common.Conv2D(channels, inner, 1, rngs=rngs)
    self.global_bn1 = BatchNorm(inner)
    self.global2 = common.Conv2D(inner, channels, 1, rngs=rngs)
    self.global_bn2 = BatchNorm(channels)

  def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
    both = x + residual
    local = self.local_bn2(self.local2(jax.nn.relu(self.local_bn1(self.local1(both)))))
    pooled = jnp.mean(both, axis=(1, 2), keepdims=True)
    glob = self.global_bn2(self.global2(jax.nn.relu(self.global_bn1(self.global1(pooled)))))
    weight = jax.nn.sigmoid(local + glob)
    return 2 * x * weight + 2 * residual * (1 - weight)


class ClapAudioTower(nnx.Module):
  """Log-mel features [B, C, T, M] -> pooled features [B, patch_dim * 2^(stages-1)].

  C is 1, or 4 for fused checkpoints (whole clip, then three chunks).
  """

  def __init__(self, s: AudioSettings, *, rngs: nnx.Rngs):
    self.s = s
    if s.spec_size % s.num_mel_bins:
      raise ValueError(f"CLAP: spec_size {s.spec_size} must be a multiple of num_mel_bins "
                       f"{s.num_mel_bins}")
    self.freq_ratio = s.spec_size // s.num_mel_bins
    m = s.num_mel_bins
    self.bn_mean = nnx.Variable(jnp.zeros((m,)))
    self.bn_var = nnx.Variable(jnp.ones((m,)))
    self.bn_scale = nnx.Param(jnp.ones((m,)))
    self.bn_bias = nnx.Param(jnp.zeros((m,)))
    self.patch = common.Conv2D(1, s.patch_dim, s.patch_size, stride=s.patch_stride, rngs=rngs)
    self.patch_norm = LayerNorm(s.patch_dim, eps=1e-5, rngs=rngs) if s.patch_norm else None
    if s.enable_fusion:
      p = s.patch_size
      self.chunk_patch = common.Conv2D(1, s.patch_dim, (p, 3 * p), stride=(p, 3 * p), rngs=rngs)
      self.fusion = FusionBlock(s.patch_dim, s.aff_block_r, rngs=rngs)
    else:
      self.chunk_patch = self.fusion = None
    grid = s.spec_size // s.patch_stride
    stages, merges = [], []
    for i, (depth, heads) in enumerate(zip(s.depths, s.num_heads)):
      dim, res = s.patch_dim * 2**i, (grid // 2**i, grid // 2**i)
      stages.append(nnx.List([
          SwinLayer(dim, heads, res, s.window_size, 0 if j % 2 == 0 else s.window_size // 2, s,
                    rngs=rngs) for j in range(depth)]))
      if i < len(s.depths) - 1:
        merges.append(PatchMerging(dim, res, rngs=rngs))
    self.stages, self.merges = nnx.List(stages), nnx.List(merges)
    self.width = s.patch_dim * 2 ** (len(s.depths) - 1)
    self.norm = LayerNorm(self.width, eps=s.layer_norm_eps, rngs=rngs)

  def to_image(self, features: jax.Array) -> jax.Array:
    """[B, C, T, M] normalized mel -> [B, spec_size, spec_size, C] (frequency rows, time cols)."""
    s, r = self.s, self.freq_ratio
    b, channels, frames, mels = features.shape
    spec_width = s.spec_size * r
    if frames > spec_width or mels != s.num_mel_bins:
      raise ValueError(f"CLAP: input features [.., {frames}, {mels}] must have <= {spec_width} "
                       f"frames and {s.num_mel_bins} mel bins")
    x = features
    if frames < spec_width:
      x = jnp.einsum("ot,bctm->bcom", bicubic_matrix(frames, spec_width).astype(np.float32), x,
                     precision="highest")
    # r consecutive time chunks of spec_size frames, each [spec_size, M], stacked along frequency.
    x = x.reshape(b, channels, r, s.spec_size, mels).transpose(0, 1, 2, 4, 3)
    return x.reshape(b, channels, r * mels, s.spec_size).transpose(0, 2, 3, 1)

  def embed_patches(self, image: jax.Array, is_longer: jax.Array | None) -> jax.Array:
    """[B, S, S, C] -> [B, S/p, S/p, D]; fused models mix in the chunks of `is_longer` clips."""
    x = self.patch(image[..., :1])
    if self.fusion is None or is_longer is None:
      return x
    b, height, width, dim = x.shape
    chunks = image[..., 1:].transpose(0, 3, 1, 2)[..., None]  # [B, 3, S, S, 1]
    local = self.chunk_patch(chunks.reshape(-1, *chunks.shape[2:]))  # [B*3, h, w', D]
    local = local.reshape(b, 3, *local.shape[1:]).transpose(0, 2, 1, 3, 4)  # [B, h, 3, w', D]
    local = local.reshape(b, height, -1, dim)  # the chunks side by side in time
    local = jnp.pad(local, ((0, 0), (0, 0), (0, width - local.shape[2]), (0, 0)))
    longer = jnp.asarray(is_longer, bool).reshape(b, 1, 1, 1)
    return jnp.where(longer, self.fusion(x, local), x)

  def __call__(self, features: jax.Array, is_longer: jax.Array | None = None) -> jax.Array:
    channels = 4 if self.fusion is not None else 1
    if features.ndim != 4 or features.shape[1] != channels:
      raise ValueError(f"CLAP: input features must be [B, {channels}, T, M] for this "
                       f"{'fused' if channels == 4 else 'unfused'} model, got {features.shape}")
    bn = (features - self.bn_mean[...]) / jnp.sqrt(self.bn_var[...] + 1e-5)
    bn = bn * self.bn_scale[...] + self.bn_bias[...]  # per mel bin (the last axis)
    x = self.embed_patches(self.to_image(bn), is_longer)
    x = x.reshape(x.shape[0], -1, x.shape[-1])  # tokens in (row, column) order
    if self.patch_norm is not None:
      x = self.patch_norm(x)
    for i, stage in enumerate(self.stages):
      for layer in stage:
        x = layer(x)
      if i < len(self.merges):
        x = self.merges[i](x)
    # The original regroups the final grid before its average pool; a mean ignores the order.
    return jnp.mean(self.norm(x), axis=1)


# ---------------------------------------------------------------------------------------------
# Text tower


class TextLayer(nnx.Module):
  """Post-LN BERT layer: x = LN(x + Attn(x)); x = LN(x + W2 gelu(W1 x))."""

  def __init__(self, s: TextSettings, *, rngs: nnx.Rngs):
    d, h = s.hidden_size, s.num_heads
    kw = dict(rngs=rngs)
    self.query = Dense(d, (h, d // h), ("embed", "heads", "kv"), **kw)
    self.key = Dense(d, (h, d // h), ("embed", "heads", "kv"), **kw)
    self.value = Dense(d, (h, d // h), ("embed", "heads", "kv"), **kw)
    self.out = Dense((h, d // h), d, ("heads", "kv", "embed"), **kw)
    self.attn_norm = LayerNorm(d, eps=s.layer_norm_eps, **kw)
    self.fc1 = Dense(d, s.intermediate_size, ("embed", "mlp"), **kw)
    self.fc2 = Dense(s.intermediate_size, d, ("mlp", "embed"), **kw)
    self.mlp_norm = LayerNorm(d, eps=s.layer_norm_eps, **kw)

  def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
    q, k, v = self.query(x), self.key(x), self.value(x)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / np.sqrt(q.shape[-1])
    scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
    attended = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v, precision="highest")
    x = self.attn_norm(x + self.out(attended))
    return self.mlp_norm(x + self.fc2(_gelu(self.fc1(x))))


class ClapTextTower(nnx.Module):
  """Token ids [B, L] and mask -> pooled features [B, hidden_size]."""

  def __init__(self, s: TextSettings, *, rngs: nnx.Rngs):
    self.s = s
    init = nnx.initializers.normal(0.02)
    table = lambda n: nnx.Param(nnx.with_partitioning(init, ("vocab", "embed"))(
        rngs.params(), (n, s.hidden_size), jnp.float32))
    self.word = table(s.vocab_size)
    self.position = table(s.max_positions)
    self.token_type = table(s.type_vocab_size)
    self.embed_norm = LayerNorm(s.hidden_size, eps=s.layer_norm_eps, rngs=rngs)
    self.layers = nnx.List([TextLayer(s, rngs=rngs) for _ in range(s.num_layers)])
    self.pooler = Dense(s.hidden_size, s.hidden_size, ("embed", "embed"), rngs=rngs)

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    not_pad = (ids != self.s.pad_token_id).astype(jnp.int32)
    positions = jnp.cumsum(not_pad, axis=1) * not_pad + self.s.pad_token_id
    x = self.word[...][ids] + self.position[...][positions] + self.token_type[...][0]
    x = self.embed_norm(x)
    for layer in self.layers:
      x = layer(x, mask.astype(bool))
    return jnp.tanh(self.pooler(x[:, 0]))


class Clap(nnx.Module):
  """Both towers and their projections; `get_*_features` return unit-norm embeddings."""

  def __init__(self, audio: AudioSettings, text: TextSettings, *, rngs: nnx.Rngs):
    self.audio = ClapAudioTower(audio, rngs=rngs)
    self.audio_projection = Projection(self.audio.width, audio.projection_dim, rngs=rngs)
    self.text = ClapTextTower(text, rngs=rngs)
    self.text_projection = Projection(text.hidden_size, text.projection_dim, rngs=rngs)

  def get_audio_features(self, input_features: jax.Array,
                         is_longer: jax.Array | None = None) -> jax.Array:
    """`is_longer` [B] (fused models): clips whose chunks are fused in; None: none of them."""
    return _l2_normalize(self.audio_projection(self.audio(input_features, is_longer)))

  def get_text_features(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    return _l2_normalize(self.text_projection(self.text(input_ids, attention_mask)))


# ---------------------------------------------------------------------------------------------
# Loading


def _load_audio(tower: ClapAudioTower, state: dict[str, np.ndarray], prefix: str) -> None:
  take, assign = common.take, common.assign
  assign(tower.bn_mean, take(state, f"{prefix}.batch_norm.running_mean"), "batch_norm.running_mean")
  assign(tower.bn_var, take(state, f"{prefix}.batch_norm.running_var"), "batch_norm.running_var")
  assign(tower.bn_scale, take(state, f"{prefix}.batch_norm.weight"), "batch_norm.weight")
  assign(tower.bn_bias, take(state, f"{prefix}.batch_norm.bias"), "batch_norm.bias")
  state.pop(f"{prefix}.batch_norm.num_batches_tracked", None)
  common.assign_conv(tower.patch, state, f"{prefix}.patch_embed.proj")
  if tower.fusion is not None:
    common.assign_conv(tower.chunk_patch, state, f"{prefix}.patch_embed.mel_conv2d")
    f, p = tower.fusion, f"{prefix}.patch_embed.fusion_model"
    # nn.Sequential indices: local (conv, BN, ReLU, conv, BN), global (pool, conv, BN, ReLU, ...)
    for conv, bn, index in ((f.local1, f.local_bn1, "local_att.0"),
                            (f.local2, f.local_bn2, "local_att.3"),
                            (f.global1, f.global_bn1, "global_att.1"),
                            (f.global2, f.global_bn2, "global_att.4")):
      common.assign_conv(conv, state, f"{p}.{index}")
      head, position = index.split(".")
      _assign_batch_norm(bn, state, f"{p}.{head}.{int(position) + 1}")
  if tower.patch_norm is not None:
    _assign_norm(tower.patch_norm, state, f"{prefix}.patch_embed.norm")
  for i, stage in enumerate(tower.stages):
    for j, layer in enumerate(stage):
      p = f"{prefix}.layers.{i}.blocks.{j}"
      _assign_norm(layer.norm1, state, f"{p}.layernorm_before")
      for name in ("query", "key", "value"):
        common.assign_dense(getattr(layer, name), state, f"{p}.attention.self.{name}")
      common.assign_dense(layer.out, state, f"{p}.attention.output.dense")
      assign(layer.bias_table, take(state, f"{p}.attention.self.relative_position_bias_table"),
             f"{p}.relative_position_bias_table")
      state.pop(f"{p}.attention.self.relative_position_index", None)  # recomputed
      _assign_norm(layer.norm2, state, f"{p}.layernorm_after")
      common.assign_dense(layer.fc1, state, f"{p}.intermediate.dense")
      common.assign_dense(layer.fc2, state, f"{p}.output.dense")
    if i < len(tower.merges):
      _assign_norm(tower.merges[i].norm, state, f"{prefix}.layers.{i}.downsample.norm")
      common.assign_dense(tower.merges[i].reduction, state,
                          f"{prefix}.layers.{i}.downsample.reduction")
  _assign_norm(tower.norm, state, f"{prefix}.norm")


def _load_text(tower: ClapTextTower, state: dict[str, np.ndarray], prefix: str) -> None:
  take, assign = common.take, common.assign
  e = f"{prefix}.embeddings"
  assign(tower.word, take(state, f"{e}.word_embeddings.weight"), "word_embeddings")
  assign(tower.position, take(state, f"{e}.position_embeddings.weight"), "position_embeddings")
  assign(tower.token_type, take(state, f"{e}.token_type_embeddings.weight"),
         "token_type_embeddings")
  _assign_norm(tower.embed_norm, state, f"{e}.LayerNorm")
  for buffer in ("position_ids", "token_type_ids"):
    state.pop(f"{e}.{buffer}", None)
  for i, layer in enumerate(tower.layers):
    p = f"{prefix}.encoder.layer.{i}"
    for name in ("query", "key", "value"):
      common.assign_dense(getattr(layer, name), state, f"{p}.attention.self.{name}")
    common.assign_dense(layer.out, state, f"{p}.attention.output.dense")
    _assign_norm(layer.attn_norm, state, f"{p}.attention.output.LayerNorm")
    common.assign_dense(layer.fc1, state, f"{p}.intermediate.dense")
    common.assign_dense(layer.fc2, state, f"{p}.output.dense")
    _assign_norm(layer.mlp_norm, state, f"{p}.output.LayerNorm")
  common.assign_dense(tower.pooler, state, f"{prefix}.pooler.dense")


def _assign_batch_norm(norm: BatchNorm, state, prefix: str) -> None:
  for ours, theirs in (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"),
                       ("var", "running_var")):
    common.assign(getattr(norm, ours), common.take(state, f"{prefix}.{theirs}"),
                  f"{prefix}.{theirs}")
  state.pop(f"{prefix}.num_batches_tracked", None)


def _assign_norm(norm: LayerNorm, state, prefix: str) -> None:
  common.assign(norm.scale, common.take(state, f"{prefix}.weight"), f"{prefix}.weight")
  common.assign(norm.bias, common.take(state, f"{prefix}.bias"), f"{prefix}.bias")


def load_clap(folder: str) -> Clap:
  """A ClapModel folder (`save_pretrained`: config.json + model.safetensors) -> Flax `Clap`."""
  config_path = os.path.join(folder, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"CLAP: {folder!r} has no config.json "
                            "(a ClapModel.save_pretrained folder)")
  with open(config_path, encoding="utf-8") as f:
    audio_settings, text_settings = settings_from_config(json.load(f))
  weights = [os.path.join(folder, n) for n in sorted(os.listdir(folder))
             if n.endswith(".safetensors")]
  if not weights:
    raise FileNotFoundError(f"CLAP: {folder!r} holds no *.safetensors weights")
  state = {}
  for path in weights:
    state.update(common.load_torch_state_dict(path))
  model = common.abstract(lambda: Clap(audio_settings, text_settings, rngs=nnx.Rngs(0)))
  _load_audio(model.audio, state, "audio_model.audio_encoder")
  _load_text(model.text, state, "text_model")
  for name in ("audio_projection", "text_projection"):
    projection = getattr(model, name)
    common.assign_dense(projection.linear1, state, f"{name}.linear1")
    common.assign_dense(projection.linear2, state, f"{name}.linear2")
  for unused in ("logit_scale_a", "logit_scale_t"):  # logit scales matter for training only
    state.pop(unused, None)
  common.check_consumed(state, "CLAP")
  common.check_all_assigned(model, "CLAP")
  return model


# Jitted once per module, so every caller with the same shapes shares one compilation.
audio_embeddings = nnx.jit(
    lambda model, features, is_longer=None: model.get_audio_features(features, is_longer))
text_embeddings = nnx.jit(lambda model, ids, mask: model.get_text_features(ids, mask))


FUSION_SEED = 0


class ClapEncoders:
  """Audio and text encoders for `avgen.metrics.similarity.clap_score` from a CLAP folder.

  The folder also needs the processor files (`ClapProcessor.save_pretrained(folder)`): the
  tokenizer and feature extractor run as the original's, in numpy.
  """

  def __init__(self, folder: str, model: Clap | None = None, batch_size: int = 16):
    from transformers import ClapProcessor  # pylint: disable=g-import-not-at-top
    self.processor = ClapProcessor.from_pretrained(folder)
    self.model = model or load_clap(folder)
    self.batch_size = batch_size

  @property
  def sample_rate(self) -> int:
    return int(self.processor.feature_extractor.sampling_rate)

  def audio(self, audios: Sequence[np.ndarray], sample_rate: int) -> np.ndarray:
    import librosa  # pylint: disable=g-import-not-at-top
    target = self.sample_rate
    audios = [np.asarray(a, np.float32) if sample_rate == target else
              librosa.resample(np.asarray(a, np.float32), orig_sr=sample_rate, target_sr=target)
              for a in audios]
    extractor = self.processor.feature_extractor
    out = []
    if self.fused:
      for i in range(0, len(audios), self.batch_size):
        pairs = [self.fused_features(a) for a in audios[i:i + self.batch_size]]
        features = np.stack([f for f, _ in pairs])
        is_longer = np.array([longer for _, longer in pairs])
        out.append(np.asarray(audio_embeddings(self.model, jnp.asarray(features),
                                               jnp.asarray(is_longer))))
      return np.concatenate(out)
    # The unfused recipe: repeat-pad short clips to max_length_s; longer ones are cut to their
    # first max_length_s here, so the extractor's random crop never runs (deterministic).
    audios = [a[:int(extractor.nb_max_samples)] for a in audios]
    for i in range(0, len(audios), self.batch_size):
      features = extractor(audios[i:i + self.batch_size], sampling_rate=target,
                           truncation="rand_trunc", padding="repeatpad",
                           return_tensors="np")["input_features"]
      out.append(np.asarray(audio_embeddings(self.model, jnp.asarray(features))))
    return np.concatenate(out)

  @property
  def fused(self) -> bool:
    return self.model.audio.fusion is not None

  def fused_features(self, audio: np.ndarray) -> tuple[np.ndarray, bool]:
    """One clip's [4, T, M] mel and whether its chunks are fused in, by the original's "fusion"
    recipe: clips up to max_length_s repeat-padded (4 copies of one mel); longer clips get the
    whole mel shrunk to max_length_s plus 3 chunks from the front, middle and back thirds.

    Two changes keep scores deterministic and independent of the batch: the random chunk starts
    are drawn with numpy seed FUSION_SEED for each clip, and `is_longer` is the clip's own (the
    extractor marks a random clip of a batch without long clips as longer, a training-time
    device, which would fuse copies of the same mel into that clip's embedding).
    """
    extractor = self.processor.feature_extractor
    limit, hop = int(extractor.nb_max_samples), int(extractor.hop_length)
    # The extractor fuses when the whole clip's mel (1 + n // hop frames) outgrows a chunk.
    longer = len(audio) > limit and len(audio) // hop != limit // hop
    saved = np.random.get_state()
    np.random.seed(FUSION_SEED)
    try:
      features = extractor([audio], sampling_rate=self.sample_rate, truncation="fusion",
                           padding="repeatpad", return_tensors="np")["input_features"][0]
    finally:
      np.random.set_state(saved)
    return np.asarray(features, np.float32), longer

  def text(self, texts: Sequence[str]) -> np.ndarray:
    out = []
    for i in range(0, len(texts), self.batch_size):
      tokens = self.processor.tokenizer(list(texts[i:i + self.batch_size]), padding=True,
                                        return_tensors="np")
      out.append(np.asarray(text_embeddings(self.model, jnp.asarray(tokens["input_ids"]),
                                            jnp.asarray(tokens["attention_mask"]))))
    return np.concatenate(out)
