"""Temporal alignment module: local temporal mixing per modality and audio <-> frame attention.

After the DiT blocks, each modality gets
  video: x_v += g_v * (GELU(conv_t(norm(x_v))) + attn(frames <- audio))   (broadcast per frame)
  audio: x_a += g_a * (GELU(conv_t(norm(x_a))) + attn(audio <- frames))
where conv_t is a 1D conv over time (per spatial location for video), frames are the video tokens
mean-pooled over space, and both attentions use 1D RoPE on the shared time axis. Gates start at 0.

It also returns alignment features per time window of `align_window` frames: the window means of
the two conv features, each through a Dense to `align_width`. They are taken before the gates
(so the alignment loss trains them from step 0) and from the per-modality convs, not from the
cross-modal attention (so one modality's feature is not simply copied from the other's).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avgen.models import rope as rope_lib
from avgen.models.layers import ACT, Attention, Dense, LayerNorm, param
from avgen.parallel.sharding import constrain


class TemporalConv(nnx.Module):
  """Conv over axis 1 of [B, L, ..., C_in] -> [B, L, ..., C_out], 'same' zero padding."""

  def __init__(self, channels_in: int, channels_out: int, kernel_size: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    if kernel_size % 2 == 0:
      raise ValueError(f"TemporalConv: kernel_size must be odd, got {kernel_size}")
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2)
    self.kernel = param(rngs, init, (kernel_size, channels_in, channels_out),
                        ("time", "conv_in", "conv_out"), param_dtype)
    self.bias = param(rngs, nnx.initializers.zeros_init(), channels_out, ("conv_out",), param_dtype)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel[...].astype(self.dtype)
    size, length = k.shape[0], x.shape[1]
    pad = [(0, 0)] * x.ndim
    pad[1] = (size // 2, size // 2)
    xp = jnp.pad(x.astype(self.dtype), pad)
    y = sum(jnp.einsum("bl...c,cd->bl...d", jax.lax.slice_in_dim(xp, j, j + length, axis=1), k[j])
            for j in range(size))
    return y + self.bias[...].astype(self.dtype)


def audio_token_frames(audio_times: Sequence[float], num_frames: int) -> np.ndarray:
  """Frame whose interval [f - 0.5, f + 0.5) holds each audio token's time, clipped to the clip."""
  frames = np.floor(np.asarray(audio_times, np.float64) + 0.5 + 1e-6).astype(np.int64)
  return np.clip(frames, 0, num_frames - 1)


def video_window_pooling(num_frames: int, frame_patch: int, window: int) -> np.ndarray:
  """[W, T/pt] weights: window w's mean over the temporal patches covering its frames."""
  frames = np.arange(num_frames)
  window_of_frame = np.eye(num_frames // window)[frames // window]  # [T, W]
  patch_of_frame = np.eye(num_frames // frame_patch)[frames // frame_patch]  # [T, T/pt]
  overlap = window_of_frame.T @ patch_of_frame
  return (overlap / overlap.sum(-1, keepdims=True)).astype(np.float32)


def audio_window_pooling(audio_frames: np.ndarray, num_frames: int, window: int) -> np.ndarray:
  """[W, La] weights: window w's mean over the audio tokens whose frame lies in it."""
  num_windows = num_frames // window
  member = np.eye(num_windows)[np.asarray(audio_frames) // window].T  # [W, La]
  counts = member.sum(-1, keepdims=True)
  if np.any(counts == 0):
    empty = np.nonzero(counts[:, 0] == 0)[0].tolist()
    raise ValueError(f"temporal alignment: windows {empty} of {window} frame(s) hold no audio token; "
                     "use a smaller model.audio_patch or a larger model.align_window")
  return (member / counts).astype(np.float32)


class TemporalAlignment(nnx.Module):
  """See the module docstring. Video tokens arrive in (t, row, col) order on `grid`."""

  def __init__(self, width: int, num_heads: int, *, grid: Sequence[int], frame_patch: int,
               audio_times: Sequence[float], num_frames: int, align_window: int, align_width: int,
               rngs: nnx.Rngs, qk_norm: bool = True, rope_theta: float = 10000.0, kernel_size: int = 3,
               impl: str = "auto", dtype=jnp.float32, param_dtype=jnp.float32):
    if num_frames % align_window:
      raise ValueError(f"model.align_window={align_window} must divide data.num_frames={num_frames}")
    self.grid = tuple(grid)
    self.frame_patch, self.num_frames, self.align_window = frame_patch, num_frames, align_window
    self.audio_times = tuple(float(t) for t in audio_times)
    self.rope_theta = rope_theta
    self.head_dim = width // num_heads
    # Fail at build time, not at the first call, if a window would hold no audio.
    audio_window_pooling(audio_token_frames(self.audio_times, num_frames), num_frames, align_window)

    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm_v = LayerNorm(width, rngs=rngs, param_dtype=param_dtype)
    self.norm_a = LayerNorm(width, rngs=rngs, param_dtype=param_dtype)
    self.conv_v = TemporalConv(width, width, kernel_size, **kw)
    self.conv_a = TemporalConv(width, width, kernel_size, **kw)
    self.attn_v = Attention(width, num_heads, qk_norm=qk_norm, impl=impl, **kw)  # frames <- audio
    self.attn_a = Attention(width, num_heads, qk_norm=qk_norm, impl=impl, **kw)  # audio <- frames
    self.gate_v = param(rngs, nnx.initializers.zeros_init(), width, ("embed",), param_dtype)
    self.gate_a = param(rngs, nnx.initializers.zeros_init(), width, ("embed",), param_dtype)
    self.align_v = Dense(width, align_width, ("embed", None), **kw)
    self.align_a = Dense(width, align_width, ("embed", None), **kw)

  def __call__(self, xv: jax.Array, xa: jax.Array):
    """xv [B, Lv, D], xa [B, La, D] -> (xv, xa, align_video [B, W, A], align_audio [B, W, A])."""
    b, _, d = xv.shape
    nt, nh, nw = self.grid
    pt = self.frame_patch
    hv = self.norm_v(xv).reshape(b, nt, nh * nw, d)
    ha = self.norm_a(xa)
    fv = jax.nn.gelu(self.conv_v(hv), approximate=True)  # [B, nt, S, D]
    fa = jax.nn.gelu(self.conv_a(ha), approximate=True)  # [B, La, D]

    frames = jnp.mean(hv.astype(jnp.float32), 2).astype(hv.dtype)  # [B, nt, D]
    frame_times = np.arange(nt) * pt + (pt - 1) / 2
    rope_f = rope_lib.rope_tables(frame_times[:, None], (self.head_dim,), self.rope_theta)
    rope_a = rope_lib.rope_tables(np.asarray(self.audio_times)[:, None], (self.head_dim,), self.rope_theta)
    v_from_a = self.attn_v(frames, ha, rope_q=rope_f, rope_k=rope_a)  # [B, nt, D]
    a_from_v = self.attn_a(ha, frames, rope_q=rope_a, rope_k=rope_f)  # [B, La, D]

    pool_v = jnp.asarray(video_window_pooling(self.num_frames, pt, self.align_window))
    pool_a = jnp.asarray(audio_window_pooling(
        audio_token_frames(self.audio_times, self.num_frames), self.num_frames, self.align_window))
    fv_frames = jnp.mean(fv.astype(jnp.float32), 2)
    align_video = self.align_v(jnp.einsum("wt,btd->bwd", pool_v, fv_frames))
    align_audio = self.align_a(jnp.einsum("wl,bld->bwd", pool_a, fa.astype(jnp.float32)))

    update_v = (fv + v_from_a[:, :, None, :]).reshape(b, nt * nh * nw, d)
    xv = xv + self.gate_v[...].astype(xv.dtype) * update_v.astype(xv.dtype)
    xa = xa + self.gate_a[...].astype(xa.dtype) * (fa + a_from_v).astype(xa.dtype)
    return constrain(xv, ACT), constrain(xa, ACT), align_video, align_audio
