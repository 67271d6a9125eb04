"""Text-alignment scores as plain cosine similarities between embeddings (CLIP score, CLAP score).

Published "CLIP score"s differ by convention: torchmetrics reports 100 * max(cos, 0), and
Hessel et al.'s CLIPScore 2.5 * max(cos, 0). Ours is the raw cosine (no scale, no clipping), the
scale of the spec's targets (CLIP > 0.28, CLAP > 0.30).

The encoders come in as callables, so that this module needs no model code: an image encoder maps
uint8 frames [N, H, W, 3] to embeddings [N, D]; an audio encoder maps (waveforms, sample_rate)
to [N, D]; a text encoder maps a list of N strings to [N, D]. Each does its own preprocessing.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

ImageEncoder = Callable[[np.ndarray], Any]
AudioEncoder = Callable[[Sequence[np.ndarray], int], Any]
TextEncoder = Callable[[Sequence[str]], Any]


def cosine_similarity(a: Any, b: Any) -> np.ndarray:
  """Row-wise cosine similarity of a [N, D] and b [N, D] -> [N] (float64)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(f"cosine_similarity: embeddings must both be [N, D], got {a.shape} and "
                     f"{b.shape}")
  norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
  if np.any(norms == 0):
    raise ValueError("cosine_similarity: an embedding has zero norm; the cosine is undefined")
  return np.sum(a * b, axis=1) / norms


def _check_captions(captions: Sequence[str], count: int, what: str) -> list[str]:
  captions = list(captions)
  if len(captions) != count:
    raise ValueError(f"captions: {len(captions)} captions for {count} {what}")
  bad = [i for i, c in enumerate(captions) if not isinstance(c, str) or not c.strip()]
  if bad:
    raise ValueError(f"captions: clip(s) {bad[:10]} have no caption (empty or not a string); "
                     "a text-alignment score needs one per clip")
  return captions


def clip_score(videos: Sequence[np.ndarray], captions: Sequence[str], image_encoder: ImageEncoder,
               text_encoder: TextEncoder, *, frames_per_clip: int | None = None) -> dict[str, Any]:
  """Per clip: the mean over its frames of cos(image embedding, caption embedding).

  Args:
    videos: uint8 [T, H, W, 3] per clip.
    captions: one caption per clip.
    image_encoder, text_encoder: see the module docstring.
    frames_per_clip: use this many evenly spaced frames per clip (None: all frames).
  """
  captions = _check_captions(captions, len(videos), "videos")
  text = np.asarray(text_encoder(captions))
  per_clip = []
  for i, video in enumerate(videos):
    video = np.asarray(video)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
      raise ValueError(f"videos[{i}]: must be uint8 [T, H, W, 3], got {video.dtype} {video.shape}")
    if frames_per_clip is not None:
      video = video[np.linspace(0, len(video) - 1, frames_per_clip).round().astype(int)]
    image = np.asarray(image_encoder(video))
    per_clip.append(float(cosine_similarity(image, np.repeat(text[i:i + 1], len(image), 0)).mean()))
  return {"score": float(np.mean(per_clip)), "per_clip": per_clip,
          "definition": ("mean over clips of the mean over frames of cos(image, caption); "
                         "raw cosine")}


def clap_score(audios: Sequence[np.ndarray], sample_rate: int, captions: Sequence[str],
               audio_encoder: AudioEncoder, text_encoder: TextEncoder) -> dict[str, Any]:
  """Per clip: cos(audio embedding, caption embedding); the score is the mean over clips."""
  captions = _check_captions(captions, len(audios), "audio clips")
  audio = np.asarray(audio_encoder(list(audios), sample_rate))
  text = np.asarray(text_encoder(captions))
  per_clip = cosine_similarity(audio, text)
  return {"score": float(per_clip.mean()), "per_clip": [float(v) for v in per_clip],
          "definition": "mean over clips of cos(audio, caption); raw cosine"}
