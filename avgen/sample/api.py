"""One-call generation from a training workdir (or hub id), over `AudioVideoGenerationPipeline`.

The pipeline of the last checkpoint used is kept, so repeated calls on one workdir load the
weights and compile each program once.
"""

from __future__ import annotations

import os

from avgen.sample.generate import Clip

_cached: dict[tuple, object] = {}


def latest_step(workdir: str) -> int | None:
  """The newest finished checkpoint step, so a cached pipeline is dropped when a newer lands."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return None
  steps = ocp.utils.checkpoint_steps(directory)
  return max(steps) if steps else None


def load_pipeline(workdir: str, *, step: int | None = None, dtype=None, **options):
  """The pipeline for `workdir` (reused while the same checkpoint and dtype are asked for).

  `options` go to `from_pretrained` when the pipeline is created; a cached one is returned as
  it is.
  """
  from avgen.sample import pipeline  # pylint: disable=g-import-not-at-top
  local = pipeline.resolve_checkpoint(workdir)
  key = (local, step, latest_step(local), None if dtype is None else str(dtype))
  if key not in _cached:
    _cached.clear()  # one model in memory at a time
    _cached[key] = pipeline.AudioVideoGenerationPipeline.from_pretrained(local, step=step,
                                                                        dtype=dtype, **options)
  return _cached[key]


def generate_from_workdir(workdir: str, prompt: str, *, mode: str = "text_to_audio_video",
                          audio_path: str | None = None, video_path: str | None = None,
                          negative_prompt: str | None = None, num_steps: int | None = None,
                          sampler: str | None = None, guidance: float | None = None,
                          guidance_video: float | None = None,
                          guidance_audio: float | None = None, strength: float | None = None,
                          seed: int = 0, step: int | None = None, dtype=None) -> Clip:
  """Generates one clip. audio_to_video keeps the given sound; video_to_audio keeps the frames.

  Inputs are passed only to the modes that take them (a mode ignores the other path), so one
  call site can hand both paths to every mode.
  """
  from avgen.sample import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  if mode not in pipeline_lib.MODES:
    raise ValueError(f"mode: must be one of {pipeline_lib.MODES}, got {mode!r}")
  takes_audio = mode in ("audio_to_video", "edit")
  takes_video = mode in ("video_to_audio", "edit")
  if takes_audio and not audio_path:
    raise ValueError(f"mode={mode!r} needs audio_path")
  if takes_video and not video_path:
    raise ValueError(f"mode={mode!r} needs video_path")
  pipe = load_pipeline(workdir, step=step, dtype=dtype)
  return pipe(prompt, mode=mode, audio_path=audio_path if takes_audio else None,
              video_path=video_path if takes_video else None, negative_prompt=negative_prompt,
              num_inference_steps=num_steps, sampler=sampler, guidance_scale=guidance,
              guidance_scale_video=guidance_video, guidance_scale_audio=guidance_audio,
              strength=strength, seed=seed)
