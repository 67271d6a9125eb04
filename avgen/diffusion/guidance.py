"""Classifier-free guidance with one scale per modality, in one model call.

The conditional and the negative (or empty) prompt run together as one doubled batch, and each
modality's output becomes uncond + s * (cond - uncond). Every parametrization (velocity, eps,
v, x0) is affine in the output given x_t, so guiding the raw output equals guiding x0 or eps.
Scale 1 is the conditional model; scale 0 the unconditional one. A modality held clean by the
sampler (audio -> video, video -> audio) has its output ignored, so its scale does not matter.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from avgen.diffusion.samplers import split_output

# model_fn(video_t, audio_t, t_video, t_audio, text_cond) -> (video_out, audio_out)
ModelFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, Any], Any]


def _is_one(scale) -> bool:
  return isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale == 1


def _combine(out: jax.Array, batch: int, scale) -> jax.Array:
  cond, uncond = out[:batch].astype(jnp.float32), out[batch:].astype(jnp.float32)
  if _is_one(scale):
    return cond
  scale = jnp.asarray(scale, jnp.float32)
  if scale.ndim == 1:  # one scale per example
    scale = scale.reshape((-1,) + (1,) * (out.ndim - 1))
  return uncond + scale * (cond - uncond)


def guided(model_fn: ModelFn, scale_video, scale_audio, text_cond: Any):
  """Returns `denoise_fn(video_t, audio_t, t_video, t_audio) -> (video_out, audio_out)`.

  Args:
    model_fn: `(video_t, audio_t, t_video, t_audio, text_cond) -> (video_out, audio_out)` (or a
      result with `.video` and `.audio`, like `DiTOutput`), evaluated on whatever batch it gets.
    scale_video, scale_audio: guidance scales: Python numbers, scalar arrays or [B] arrays.
    text_cond: a pytree (e.g. `(text_ids, text_mask)`) whose leaves have the doubled batch
      [2B, ...]: rows [0, B) the prompt, rows [B, 2B) the negative or empty prompt.

  The returned function calls `model_fn` exactly once, on the doubled batch (inputs and times
  repeated). When both scales are the Python number 1 the negative half cannot matter, so it
  calls `model_fn` once on the batch of B with the prompt half of `text_cond` instead.
  """
  leaves = jax.tree_util.tree_leaves(text_cond)
  if not leaves:
    raise ValueError("guided: text_cond has no arrays")
  doubled = leaves[0].shape[0]
  if doubled % 2 or any(leaf.shape[0] != doubled for leaf in leaves):
    raise ValueError(f"guided: every text_cond leaf needs the same even leading size 2B "
                     f"(prompt rows, then negative rows); got {[l.shape for l in leaves]}")
  batch = doubled // 2
  no_guidance = _is_one(scale_video) and _is_one(scale_audio)

  def denoise_fn(video_t, audio_t, t_video, t_audio):
    for name, x in (("video_t", video_t), ("audio_t", audio_t), ("t_video", t_video),
                    ("t_audio", t_audio)):
      if x.shape[0] != batch:
        raise ValueError(f"guided: {name} has batch {x.shape[0]} but text_cond has 2B = "
                         f"{doubled} rows, so B must be {batch}")
    if no_guidance:
      prompt = jax.tree_util.tree_map(lambda leaf: leaf[:batch], text_cond)
      out_v, out_a = split_output(model_fn(video_t, audio_t, t_video, t_audio, prompt))
      return out_v.astype(jnp.float32), out_a.astype(jnp.float32)
    two = lambda x: jnp.concatenate([x, x], axis=0)
    out_v, out_a = split_output(
        model_fn(two(video_t), two(audio_t), two(t_video), two(t_audio), text_cond))
    return _combine(out_v, batch, scale_video), _combine(out_a, batch, scale_audio)

  return denoise_fn
