"""The AV-DiT model: text encoder + joint audio-video diffusion transformer.

`build_model(config, rngs)` -> `AVGenModel`; `model(video, audio, t_video, t_audio, text_ids,
text_mask)` -> `DiTOutput(video, audio, align_video, align_audio)`.
"""

from __future__ import annotations

import jax
from flax import nnx

from avgen.models.dit import AVDiT, DiTOutput
from avgen.models.text_encoder import ByteTextEncoder, TextEncoder, build_text_encoder


class AVGenModel(nnx.Module):
  """Text encoder and DiT, trained together (a frozen encoder would be held outside the params)."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    self.text_encoder = build_text_encoder(config, rngs)
    if self.text_encoder.width != config.model.text_width:
      raise ValueError(f"model.text_width={config.model.text_width} but the text encoder gives "
                       f"{self.text_encoder.width}")
    self.dit = AVDiT(config, rngs=rngs)

  def encode_text(self, text_ids: jax.Array, text_mask: jax.Array) -> jax.Array:
    return self.text_encoder(text_ids, text_mask)

  def __call__(self, video, audio, t_video, t_audio, text_ids, text_mask) -> DiTOutput:
    """video [B, T, h, w, C], audio [B, N, n_mels], t_* [B], text_ids / text_mask [B, L]."""
    text = self.encode_text(text_ids, text_mask)
    return self.dit(video, audio, t_video, t_audio, text, text_mask)


def build_model(config, rngs: nnx.Rngs) -> AVGenModel:
  return AVGenModel(config, rngs=rngs)


__all__ = ["AVDiT", "AVGenModel", "ByteTextEncoder", "DiTOutput", "TextEncoder", "build_model",
           "build_text_encoder"]
