"""A small Python API over a training workdir (the full pipeline API comes with issue 9)."""

from __future__ import annotations

import numpy as np

from avgen.sample.generate import Clip
from avgen.sample.load import load_generator


def generate_from_workdir(workdir: str, prompt: str, *, mode: str = "text_to_audio_video",
                          audio_path: str | None = None, video_path: str | None = None,
                          negative_prompt: str | None = None, num_steps: int | None = None,
                          sampler: str | None = None, guidance: float | None = None, seed: int = 0,
                          step: int | None = None) -> Clip:
  """Generates one clip. audio_to_video keeps the given sound; video_to_audio keeps the frames."""
  from avgen.sample import media
  if mode == "audio_to_video" and not audio_path:
    raise ValueError("mode='audio_to_video' needs audio_path")
  if mode == "video_to_audio" and not video_path:
    raise ValueError("mode='video_to_audio' needs video_path")
  config, generator, params = load_generator(workdir, step=step)
  d = config.data
  video_cond = audio_cond = None
  kept_audio = kept_video = None
  if mode == "audio_to_video":
    kept_audio = _fit_audio(media.read_audio(audio_path, sample_rate=d.sample_rate),
                            round(d.audio_seconds * d.sample_rate))
    audio_cond = generator.audio_codec.encode(kept_audio)[None]
  elif mode == "video_to_audio":
    frames, _ = media.read_video(video_path, fps=d.fps, size=(d.height, d.width))
    kept_video = _fit_frames(frames, d.num_frames)
    video_cond = generator.video_codec.encode(kept_video)[None]
  clips = generator(params, [prompt], seed=seed, negative_prompt=negative_prompt, num_steps=num_steps,
                    sampler=sampler, guidance_video=guidance, guidance_audio=guidance,
                    video_cond=video_cond, audio_cond=audio_cond)
  clip = clips[0]
  # The conditioning input is returned as given, not as its decoded latent.
  if kept_audio is not None:
    clip.audio = kept_audio
  if kept_video is not None:
    clip.video = kept_video
  return clip


def _fit_audio(audio: np.ndarray, length: int) -> np.ndarray:
  """Crops to the clip length or pads with silence (documented behaviour for mismatched input)."""
  out = np.zeros(length, np.float32)
  out[: min(length, len(audio))] = audio[:length]
  return out


def _fit_frames(frames: np.ndarray, count: int) -> np.ndarray:
  """First `count` frames; a short video repeats its last frame."""
  if len(frames) == 0:
    raise ValueError("the video has no frames")
  idx = np.minimum(np.arange(count), len(frames) - 1)
  return frames[idx]
