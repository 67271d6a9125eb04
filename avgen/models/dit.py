"""AV-DiT: one transformer over the joint sequence [video tokens; audio tokens].

  c_v = temb_v(t_video) + pool(text),  c_a = temb_a(t_audio) + pool(text)
  per block, with (shift, scale, gate) taken from c_v on video tokens and from c_a on audio:
    x += gate1 * SelfAttn(modulate(norm(x)))        joint attention, RoPE on the shared time axis
    x += CrossAttn(norm(x), text)                   text padding masked by length
    x += gate2 * MLP(modulate(norm(x)))
  then the temporal alignment module, the split, and the per-modality heads.

With `shared_weights=False` every projection (qkv, attention out, cross-attention, MLP) has one
copy per modality; the self-attention is still one call over the whole sequence.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from avgen.config import REMAT
from avgen.kernels import masks as masks_lib
from avgen.models import rope as rope_lib
from avgen.models.embeddings import AudioPatchEmbed, ModalityEmbedding, TimestepEmbedder, VideoPatchEmbed
from avgen.models.heads import AudioHead, VideoHead
from avgen.models.layers import ACT, MLP, AdaLN, Attention, Dense, LayerNorm, block_adaln, modulate
from avgen.models.temporal_alignment import TemporalAlignment
from avgen.parallel import context_parallel as cp_lib
from avgen.parallel.sharding import constrain

# Name of the joint self-attention's result in each block, for the "save_attention_out" policy.
ATTENTION_OUT = "attention_out"


class DiTOutput(NamedTuple):
  video: jax.Array  # [B, T, h, w, C]
  audio: jax.Array  # [B, N, n_mels]
  align_video: jax.Array  # [B, W, align_width]
  align_audio: jax.Array  # [B, W, align_width]


class DiTBlock(nnx.Module):
  """One joint block; `num_video` tokens of the sequence are video, the rest audio."""

  def __init__(self, width: int, num_heads: int, mlp_ratio: float, text_width: int, num_video: int,
               *, rngs: nnx.Rngs, shared_weights: bool = True, qk_norm: bool = True, impl: str = "auto",
               context_parallel: str = "ring", adaln: str = "per_block", dtype=jnp.float32,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    copies = 1 if shared_weights else 2
    self.num_video = num_video
    self.context_parallel = context_parallel
    self.adaln_v = block_adaln(adaln, width, 6, **kw)
    self.adaln_a = block_adaln(adaln, width, 6, **kw)
    self.norm1 = LayerNorm(width, affine=False)
    self.norm_cross = LayerNorm(width, rngs=rngs, param_dtype=param_dtype)
    self.norm2 = LayerNorm(width, affine=False)
    # Per-modality copies are [video, audio]; the cross-attention output starts at zero so that
    # the whole block starts as the identity (the other branches are gated by AdaLN-Zero).
    self.attn = nnx.List([Attention(width, num_heads, qk_norm=qk_norm, impl=impl, **kw)
                          for _ in range(copies)])
    self.cross = nnx.List([Attention(width, num_heads, context_width=text_width, qk_norm=qk_norm,
                                     zero_out=True, impl=impl, **kw) for _ in range(copies)])
    self.mlp = nnx.List([MLP(width, int(width * mlp_ratio), **kw) for _ in range(copies)])

  def _split(self, x: jax.Array) -> list[jax.Array]:
    """The sequence as one part (shared weights) or as [video, audio] parts."""
    if len(self.attn) == 1:
      return [x]
    return [x[:, :self.num_video], x[:, self.num_video:]]

  def _per_token(self, video_vec: jax.Array, audio_vec: jax.Array, length: int) -> jax.Array:
    """[B, 1, D] per modality -> [B, L, D]: video's vector on video tokens, audio's on audio."""
    b, _, d = video_vec.shape
    return jnp.concatenate([jnp.broadcast_to(video_vec, (b, self.num_video, d)),
                            jnp.broadcast_to(audio_vec, (b, length - self.num_video, d))], 1)

  def _self_attention(self, h: jax.Array, rope, mask) -> jax.Array:
    parts = [attn.qkv(p) for attn, p in zip(self.attn, self._split(h))]
    q, k, v = (jnp.concatenate(t, 1) for t in zip(*parts))
    q, k = rope_lib.apply_rope(q, *rope), rope_lib.apply_rope(k, *rope)
    # Over the whole joint sequence: split over the mesh's context axis when it has one.
    o = cp_lib.attention(q, k, v, mask=mask, strategy=self.context_parallel, impl=self.attn[0].impl)
    o = checkpoint_name(o, ATTENTION_OUT)
    return jnp.concatenate([attn.output(p) for attn, p in zip(self.attn, self._split(o))], 1)

  def __call__(self, x, c_video, c_audio, text, text_lengths, rope, mask=None) -> jax.Array:
    """`c_video`, `c_audio`: conditioning [B, D] (adaln "per_block") or the stack's modulation
    vectors [B, 6, D] ("single"). `mask`: None or the joint sequence's BlockMask (temporal
    window), static per shape."""
    length = x.shape[1]
    mods = [self._per_token(v, a, length) for v, a in zip(self.adaln_v(c_video), self.adaln_a(c_audio))]
    shift1, scale1, gate1, shift2, scale2, gate2 = mods
    x = x + gate1 * self._self_attention(modulate(self.norm1(x), shift1, scale1), rope, mask)
    h = self.norm_cross(x)
    x = x + jnp.concatenate([cross(p, text, kv_lengths=text_lengths)
                             for cross, p in zip(self.cross, self._split(h))], 1)
    h = modulate(self.norm2(x), shift2, scale2)
    x = x + gate2 * jnp.concatenate([mlp(p) for mlp, p in zip(self.mlp, self._split(h))], 1)
    return constrain(x, ACT)


@functools.lru_cache(maxsize=16)
def joint_window_mask(video_grid: tuple[int, int, int], patch_t: int, audio_timing: tuple,
                      window: float) -> masks_lib.BlockMask:
  """Tokens of the joint sequence see only tokens within +-window frames on the shared time axis.

  Built once per shape from the same token times as RoPE, so kernels can skip whole tiles.
  """
  n, audio_patch, hop, sample_rate, fps = audio_timing
  video = masks_lib.video_token_times(video_grid[0], patch_t, video_grid[1] * video_grid[2])
  audio = masks_lib.audio_token_times(n // audio_patch, audio_patch, hop, sample_rate, fps)
  return masks_lib.self_attention_window(masks_lib.joint_layout(video, audio), float(window))


# Attention kernels: cuDNN's forward (output and softmax statistics; jax binds it as the
# "_wrapper" primitive) and our Pallas kernels (output and logsumexp). Saving a name on the output
# alone is not enough: the backward kernel also needs the statistics, and recomputing them reruns
# the whole attention forward.
ATTENTION_PRIMITIVES = ("dot_product_attention_fwd_wrapper", "dot_product_attention_fwd",
                        "pallas_call")


# An attention over this many keys or fewer (the text's 77, padded to 128 for cuDNN) is cheap to
# rerun but its saved output is as large as a long one's: 1.5 GiB over the 2B's 24 blocks.
SAVE_ATTENTION_MIN_KEYS = 257


def _attention_key_length(avals) -> int | None:
  """The key length of an attention kernel's call: both cuDNN's and our kernels take q then k
  as the first two [b, l, h, d] operands (others are lengths, offsets or block tables)."""
  arrays = [a for a in avals if getattr(a, "ndim", 0) == 4]
  return arrays[1].shape[1] if len(arrays) >= 2 else None


def _dots_and_attention_saveable(prim, *avals, **params) -> bool:
  """Weight matmuls (as "dots") plus every output of the attention kernels' forward, unless
  the attention has so few keys that rerunning it costs less than keeping it."""
  if prim.name in ATTENTION_PRIMITIVES:
    keys = _attention_key_length(avals)
    return keys is None or keys >= SAVE_ATTENTION_MIN_KEYS
  return jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *avals, **params)


def _remat_policy(mode: str):
  """The jax.checkpoint policy of `model.remat` (None: keep only the block's inputs)."""
  policies = jax.checkpoint_policies
  table = {
      "none": None,  # not rematerialized at all (see trunk)
      "full": None,
      "nothing_saveable": policies.nothing_saveable,
      "dots": policies.dots_with_no_batch_dims_saveable,
      "dots_saveable": policies.dots_saveable,
      "everything_saveable": policies.everything_saveable,
      "save_attention_out": policies.save_only_these_names(ATTENTION_OUT),
      "dots_attention": _dots_and_attention_saveable,
      # The saved matmul outputs wait in host memory (on platforms that have "pinned_host").
      "offload_dots": policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
  }
  if mode not in REMAT or mode not in table:
    raise ValueError(f"model.remat: unknown mode {mode!r}; expected one of {REMAT}")
  return table[mode]


class AVDiT(nnx.Module):
  """The joint audio-video DiT; shapes are fixed by the config at construction."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    d, m = config.data, config.model
    dtype, param_dtype = jnp.dtype(m.dtype), jnp.dtype(m.param_dtype)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    down = config.latent.video_downsample
    pt, ph, pw = self.video_patch = tuple(m.video_patch)
    self.video_shape = (d.num_frames, d.height // down, d.width // down, config.latent.video_channels)
    self.audio_shape = (rope_lib.num_mel_frames(config), config.mel.n_mels)
    t, h, w, c = self.video_shape
    n, mels = self.audio_shape
    for name, size, p in (("num_frames", t, pt), ("latent height", h, ph), ("latent width", w, pw)):
      if size % p:
        raise ValueError(f"model.video_patch={tuple(m.video_patch)}: video {name} {size} is not divisible by {p}")
    if n % m.audio_patch:
      raise ValueError(f"model.audio_patch={m.audio_patch} must divide the N={n} mel frames of a clip")
    if m.width % m.num_heads:
      raise ValueError(f"model.width={m.width} must be divisible by model.num_heads={m.num_heads}")
    self.grid = (t // pt, h // ph, w // pw)
    self.num_video = self.grid[0] * self.grid[1] * self.grid[2]
    self.num_audio = n // m.audio_patch
    self.head_dim = m.width // m.num_heads
    self.rope_theta = m.rope_theta
    self.remat_policy_name = m.remat
    _remat_policy(m.remat)
    self.attention_window = float(m.get("attention_window", 0.0))  # absent in older checkpoints
    if self.attention_window < 0:
      raise ValueError(f"model.attention_window={m.attention_window} must be >= 0 (frames; 0: none)")
    # Scalars only: a module's static attributes should stay small and hashable.
    self.audio_timing = (n, m.audio_patch, config.mel.hop_length, d.sample_rate, d.fps)
    audio_pos = rope_lib.audio_positions(*self.audio_timing)
    self.dtype = dtype

    self.video_embed = VideoPatchEmbed(self.video_patch, c, m.width, **kw)
    self.audio_embed = AudioPatchEmbed(m.audio_patch, mels, m.width, **kw)
    self.modality = ModalityEmbedding(m.width, rngs=rngs, param_dtype=param_dtype)
    self.t_embed_v = TimestepEmbedder(m.width, **kw)
    self.t_embed_a = TimestepEmbedder(m.width, **kw)
    self.adaln = m.get("adaln", "per_block")  # absent in older checkpoints
    if self.adaln == "single":  # one projection per modality for all blocks
      self.blocks_adaln_v = AdaLN(m.width, m.width, 6, **kw)
      self.blocks_adaln_a = AdaLN(m.width, m.width, 6, **kw)
    self.text_pool1 = Dense(m.text_width, m.width, ("embed", "mlp"), **kw)
    self.text_pool2 = Dense(m.width, m.width, ("mlp", "embed"), **kw)
    def make_block(rngs):
      return DiTBlock(m.width, m.num_heads, m.mlp_ratio, m.text_width, self.num_video,
                      shared_weights=m.shared_weights, qk_norm=m.qk_norm, impl=m.attention_impl,
                      context_parallel=m.get("context_parallel", "ring"), adaln=self.adaln,
                      rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    self.scan_layers = bool(m.get("scan_layers", False))
    if self.scan_layers:
      # One block's graph with every parameter stacked on a leading `layers` axis: XLA compiles
      # the block once (a loop) instead of depth copies.
      self.blocks = nnx.split_rngs(splits=m.depth)(
          nnx.vmap(make_block, in_axes=0, out_axes=0,
                   transform_metadata={nnx.PARTITION_NAME: "layers"}))(rngs)
    else:
      self.blocks = nnx.List([make_block(rngs) for _ in range(m.depth)])
    self.align = TemporalAlignment(
        m.width, m.num_heads, grid=self.grid, frame_patch=pt, audio_times=audio_pos[:, 0].tolist(),
        num_frames=t, align_window=m.align_window, align_width=m.align_width, qk_norm=m.qk_norm,
        rope_theta=m.rope_theta, impl=m.attention_impl, **kw)
    self.video_head = VideoHead(m.width, self.grid, self.video_patch, m.video_head_channels, c,
                                m.video_head_depth, **kw)
    self.audio_head = AudioHead(m.width, m.num_heads, m.audio_head_depth, m.audio_patch, mels,
                                mlp_ratio=m.mlp_ratio, qk_norm=m.qk_norm, rope_theta=m.rope_theta,
                                impl=m.attention_impl, adaln=self.adaln, **kw)

  def pooled_text(self, text: jax.Array, text_mask: jax.Array) -> jax.Array:
    """Masked mean of the text states through a small MLP -> [B, width]."""
    weights = text_mask.astype(jnp.float32)[..., None]
    mean = jnp.sum(text.astype(jnp.float32) * weights, 1) / jnp.maximum(jnp.sum(weights, 1), 1.0)
    return self.text_pool2(jax.nn.silu(self.text_pool1(mean)))

  def _check(self, video, audio, t_video, t_audio, text, text_mask):
    b = video.shape[0]
    if video.shape[1:] != self.video_shape:
      raise ValueError(f"AVDiT: video must be [B, *{self.video_shape}] (T, h, w, C), got {video.shape}")
    if audio.shape != (b, *self.audio_shape):
      raise ValueError(f"AVDiT: audio must be [{b}, *{self.audio_shape}] (N, n_mels), got {audio.shape}")
    for name, tt in (("t_video", t_video), ("t_audio", t_audio)):
      if tt.shape != (b,):
        raise ValueError(f"AVDiT: {name} must be [B]=[{b}], got {tt.shape}")
    if text.ndim != 3 or text.shape[0] != b or text_mask.shape != text.shape[:2]:
      raise ValueError(f"AVDiT: text states [B, L, D] and mask [B, L] expected, got {text.shape}, "
                       f"{text_mask.shape}")

  def rope_tables(self):
    """(cos, sin) [Lv + La, head_dim/2] for the joint sequence."""
    positions = np.concatenate([
        rope_lib.video_positions(*self.video_shape[:3], self.video_patch),
        rope_lib.audio_positions(*self.audio_timing)])
    return rope_lib.rope_tables(positions, rope_lib.rope_sections(self.head_dim), self.rope_theta)

  def trunk(self, video, audio, t_video, t_audio, text, text_mask):
    """Embeddings and DiT blocks -> (video tokens [B, Lv, D], audio tokens [B, La, D], c_v, c_a)."""
    self._check(video, audio, t_video, t_audio, text, text_mask)
    # The residual stream stays in float32 (the embedding sum promotes it); matmuls run in dtype.
    xv = self.video_embed(video) + self.modality(ModalityEmbedding.VIDEO)
    xa = self.audio_embed(audio) + self.modality(ModalityEmbedding.AUDIO)
    pooled = self.pooled_text(text, text_mask)
    c_video = self.t_embed_v(t_video) + pooled
    c_audio = self.t_embed_a(t_audio) + pooled
    text = text.astype(self.dtype)
    text_lengths = jnp.sum(text_mask, -1).astype(jnp.int32)
    rope = self.rope_tables()
    mask = None
    if self.attention_window:
      mask = joint_window_mask(self.grid, self.video_patch[0], self.audio_timing, self.attention_window)

    x = constrain(jnp.concatenate([xv, xa], 1), ACT)
    cond_video, cond_audio = c_video, c_audio
    if self.adaln == "single":
      cond_video, cond_audio = self.blocks_adaln_v.vectors(c_video), self.blocks_adaln_a.vectors(c_audio)
    context = (cond_video, cond_audio, text, text_lengths, rope)

    def apply(block, x):
      return block(x, *context, mask=mask)

    if self.remat_policy_name != "none":
      apply = nnx.remat(apply, policy=_remat_policy(self.remat_policy_name))
    if self.scan_layers:
      # A plain lax.scan over the stacked block state: unlike nnx.scan it also runs where the
      # parameters are tracers of an enclosing transform (the sampler's loop closes over them).
      graphdef, stacked = nnx.split(self.blocks)

      def layer(x, block_state):
        return apply(nnx.merge(graphdef, block_state), x), None
      x, _ = jax.lax.scan(layer, x, stacked)
    else:
      for block in self.blocks:
        x = apply(block, x)
    return x[:, :self.num_video], x[:, self.num_video:], c_video, c_audio

  def __call__(self, video, audio, t_video, t_audio, text, text_mask) -> DiTOutput:
    """Predictions for noisy video [B, T, h, w, C] and audio [B, N, n_mels] at times t [B]."""
    xv, xa, c_video, c_audio = self.trunk(video, audio, t_video, t_audio, text, text_mask)
    xv, xa, align_video, align_audio = self.align(xv, xa)
    video_out = self.video_head(xv, c_video)
    audio_out = self.audio_head(xa, c_audio)
    f32 = jnp.float32
    return DiTOutput(video_out.astype(f32), audio_out.astype(f32), align_video.astype(f32),
                     align_audio.astype(f32))
