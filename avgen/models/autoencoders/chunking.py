"""Vocoding long mels in time chunks with the same output as one whole pass.

A convolutional vocoder's output sample depends on mel frames within a finite radius (its
`context_frames()`). Chunk i covers frames [s_i, e_i); it is vocoded from a window that adds at
least `context` frames each side (or reaches the sequence's true edge, where whole decoding sees
the same padding), and only the samples of [s_i, e_i) are kept. Every window has the same length,
so one compiled function serves all, and `lax.map` runs them one at a time: memory is bounded by
one window whatever the total length.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def chunk_windows(num_frames: int, chunk_frames: int, context_frames: int
                  ) -> list[tuple[int, int, int]]:
  """[(window_start, keep_start, keep_stop)] with windows of chunk + 2 * context frames.

  Requires num_frames > chunk + 2 * context (else decode whole). The kept ranges tile
  [0, num_frames) in order; each lies at least `context` frames inside its window except at the
  sequence's edges.
  """
  if chunk_frames < 1 or context_frames < 0:
    raise ValueError(f"chunk_windows: need chunk_frames >= 1 and context_frames >= 0, got "
                     f"{chunk_frames}, {context_frames}")
  width = chunk_frames + 2 * context_frames
  if num_frames <= width:
    raise ValueError(f"chunk_windows: {num_frames} frames fit one window of {width}; decode whole")
  out = []
  for start in range(0, num_frames, chunk_frames):
    stop = min(start + chunk_frames, num_frames)
    window = min(max(start - context_frames, 0), num_frames - width)
    out.append((window, start, stop))
  return out


def vocode_in_chunks(vocoder: Callable[[jax.Array], jax.Array], mel: jax.Array, *, hop: int,
                     chunk_frames: int, context_frames: int) -> jax.Array:
  """vocoder(mel [B, n, M]) -> [B, n * hop], applied chunk by chunk to mel [B, N, M].

  Traceable (all chunk bounds are static), so it can sit inside `jax.jit`.
  """
  num_frames = mel.shape[1]
  width = chunk_frames + 2 * context_frames
  if num_frames <= width:
    return vocoder(mel)
  plan = chunk_windows(num_frames, chunk_frames, context_frames)
  windows = jnp.stack([mel[:, w:w + width] for w, _, _ in plan])
  waves = jax.lax.map(vocoder, windows)  # [chunks, B, width * hop]
  pieces = [waves[i, :, (start - w) * hop:(stop - w) * hop]
            for i, (w, start, stop) in enumerate(plan)]
  return jnp.concatenate(pieces, axis=1)
