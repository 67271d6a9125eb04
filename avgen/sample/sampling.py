"""The traced sampling program behind the pipeline, the batch CLI and the exported sampler.

`sample_rows` runs one of the four modes for a batch of rows with classifier-free guidance. It
is a pure function of arrays (plus static mode, sampler and shapes), so it jits, runs inside
`shard_map` with one slice of rows per device, and exports with `jax.export`:

  text_to_audio_video  both modalities start from noise at t = 1.
  audio_to_video       the audio latent is held clean (t = 0) in every model call.
  video_to_audio       the video latent is held clean.
  edit                 both latents are noised to t = times[0] (the strength) and integrated
                       from there to 0 with the prompt: SDEdit on the joint model.

Each row draws its noise from its own key, so a row's result depends on its seed and inputs
only, not on the batch it ran in or on how the batch was split across devices.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from avgen.diffusion import guidance, samplers

MODES = ("text_to_audio_video", "audio_to_video", "video_to_audio", "edit")

# model_fn(video_t, audio_t, t_video, t_audio, text_cond) -> (video_out, audio_out)
ModelFn = Callable[..., Any]


class GivenTimes:
  """An objective whose `sample_times` is a given array (a schedule's tail for edits).

  Everything else is the wrapped objective's. Times are an input of the compiled program, so a
  new strength with the same number of steps to run reuses it.
  """

  def __init__(self, objective, times: jax.Array):
    self._objective = objective
    self._times = times

  def sample_times(self, num_steps: int) -> jax.Array:
    if num_steps != self._times.shape[0] - 1:
      raise ValueError(f"GivenTimes: asked for {num_steps} steps, holds {self._times.shape[0] - 1}")
    return self._times

  def __getattr__(self, name):
    return getattr(self._objective, name)


def schedule(objective, num_steps: int, *, strength: float | None = None) -> np.ndarray:
  """The times a call integrates over: num_steps + 1 from 1 to 0, or the last part for an edit.

  An edit with strength s runs round(s * num_steps) of the num_steps-step schedule's steps (at
  least one), starting from the schedule's time at that point, like SDEdit / img2img.
  """
  times = np.asarray(objective.sample_times(num_steps), np.float32)
  if strength is None:
    return times
  if not 0.0 < strength <= 1.0:
    raise ValueError(f"strength: must be in (0, 1] (the share of the schedule to run), got "
                     f"{strength}")
  run = max(1, int(round(strength * num_steps)))
  return times[num_steps - run:]


def row_keys(seeds) -> np.ndarray:
  """uint32 key data [B, 2] (raw, so it shards and exports like any array) for integer seeds."""
  return np.stack([np.asarray(jax.random.key_data(jax.random.key(int(s))), np.uint32)
                   for s in seeds])


def row_noise(keys: jax.Array, video_shape, audio_shape) -> tuple[jax.Array, jax.Array]:
  """Per-row standard normal noise [B, *video_shape], [B, *audio_shape] from key data [B, 2]."""
  def one(data):
    k_video, k_audio = jax.random.split(jax.random.wrap_key_data(data))
    return (jax.random.normal(k_video, tuple(video_shape), jnp.float32),
            jax.random.normal(k_audio, tuple(audio_shape), jnp.float32))
  return jax.vmap(one)(keys)


def sample_rows(model_fn: ModelFn, objective, text, negative_text, keys: jax.Array,
                video_x0: jax.Array | None, audio_x0: jax.Array | None, scale_video: jax.Array,
                scale_audio: jax.Array, times: jax.Array, *, mode: str, sampler: str,
                video_shape, audio_shape) -> tuple[jax.Array, jax.Array]:
  """Clean latents (video [B, *video_shape], audio [B, *audio_shape]) for B rows.

  Args:
    model_fn: `(video_t, audio_t, t_video, t_audio, text_cond) -> (video_out, audio_out)` on any
      batch; `text_cond` has the rows of `text` or `negative_text`.
    objective: the model's objective (`avgen.diffusion.objectives`).
    text, negative_text: pytrees of [B, ...] arrays (e.g. ids and mask): prompt and negative.
    keys: uint32 key data [B, 2], one per row (see `row_keys`).
    video_x0, audio_x0: clean latents of the given inputs: audio for audio_to_video, video for
      video_to_audio, both for edit; None where the mode takes none.
    scale_video, scale_audio: guidance scales [B].
    times: the times to integrate over, [n + 1] descending to 0 (see `schedule`).
    mode: one of MODES.
    sampler: a sampler of `avgen.diffusion.samplers` that fits the objective.
    video_shape, audio_shape: per-row latent shapes.
  """
  if mode not in MODES:
    raise ValueError(f"mode: must be one of {MODES}, got {mode!r}")
  needs = {"audio_to_video": ("audio",), "video_to_audio": ("video",),
           "edit": ("video", "audio")}.get(mode, ())
  for name, x0 in (("video", video_x0), ("audio", audio_x0)):
    if (name in needs) != (x0 is not None):
      raise ValueError(f"sample_rows: mode {mode!r} {'needs' if name in needs else 'takes no'} "
                       f"{name}_x0")
  video_noise, audio_noise = row_noise(keys, video_shape, audio_shape)
  doubled = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), text, negative_text)
  denoise = guidance.guided(model_fn, scale_video, scale_audio, doubled)
  num_steps = times.shape[0] - 1
  given = GivenTimes(objective, times)
  video_cond = audio_cond = None
  if mode == "audio_to_video":
    audio_cond = audio_x0
  elif mode == "video_to_audio":
    video_cond = video_x0
  elif mode == "edit":
    start = jnp.full((keys.shape[0],), times[0], jnp.float32)
    video_noise = objective.noisy(video_x0, video_noise, start)
    audio_noise = objective.noisy(audio_x0, audio_noise, start)
  return samplers.sample(denoise, given, video_noise, audio_noise, sampler=sampler,
                         num_steps=num_steps, video_cond=video_cond, audio_cond=audio_cond)


def guided_step(model_fn: ModelFn, text, negative_text, video_t: jax.Array, audio_t: jax.Array,
                t_video: jax.Array, t_audio: jax.Array, scale_video: jax.Array,
                scale_audio: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One guided model evaluation (the denoiser step the samplers call), for export."""
  doubled = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), text, negative_text)
  return guidance.guided(model_fn, scale_video, scale_audio, doubled)(
      video_t, audio_t, t_video, t_audio)
