"""The AV-DiT model: text conditioning + joint audio-video diffusion transformer.

`build_model(config, rngs)` -> `AVGenModel`; `model(video, audio, t_video, t_audio, text_ids,
text_mask)` -> `DiTOutput(video, audio, align_video, align_audio)` with the trainable `byte`
encoder, or `model(video, audio, t_video, t_audio, text_mask=mask, text_states=states)` with a
frozen pretrained encoder, whose states [B, L, text_width] are computed outside the model
(`text_encoder.build_frozen_text_encoder`).
"""

from __future__ import annotations

import jax
from flax import nnx

from avgen.models.dit import AVDiT, DiTOutput
from avgen.models.text_encoder import (ByteTextEncoder, TextEncoder, build_frozen_text_encoder,
                                       build_text_encoder, is_frozen)


class AVGenModel(nnx.Module):
  """The DiT and, for `model.text_encoder="byte"`, the text encoder trained with it.

  A frozen encoder is not a submodule: its weights would otherwise be trained, put in the
  optimizer state and written into every checkpoint.
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    self.text_kind = config.model.text_encoder
    self.text_width = config.model.text_width
    self.text_encoder = build_text_encoder(config, rngs)
    if self.text_encoder is not None and self.text_encoder.width != config.model.text_width:
      raise ValueError(f"model.text_width={config.model.text_width} but the text encoder gives "
                       f"{self.text_encoder.width}")
    self.dit = AVDiT(config, rngs=rngs)

  def encode_text(self, text_ids: jax.Array, text_mask: jax.Array) -> jax.Array:
    if self.text_encoder is None:
      raise ValueError(f"model.text_encoder={self.text_kind!r} is frozen and held outside the "
                       "model: encode the ids with its FrozenTextEncoder and pass text_states")
    return self.text_encoder(text_ids, text_mask)

  def __call__(self, video, audio, t_video, t_audio, text_ids=None, text_mask=None, *,
               text_states=None) -> DiTOutput:
    """video [B, T, h, w, C], audio [B, N, n_mels], t_* [B], text_mask bool [B, L], and either
    text_ids int [B, L] (byte encoder) or text_states [B, L, text_width] (frozen encoder)."""
    if text_mask is None:
      raise ValueError("AVGenModel: text_mask [B, L] is required")
    if text_states is None:
      if text_ids is None:
        raise ValueError("AVGenModel: give text_ids (byte encoder) or text_states (frozen one)")
      text = self.encode_text(text_ids, text_mask)
    else:
      if text_ids is not None:
        raise ValueError("AVGenModel: give text_ids or text_states, not both")
      if self.text_encoder is not None:
        raise ValueError("AVGenModel: model.text_encoder='byte' is trained with the model; pass "
                         "text_ids, not precomputed text_states")
      if text_states.ndim != 3 or text_states.shape[-1] != self.text_width:
        raise ValueError(f"AVGenModel: text_states must be [B, L, model.text_width="
                         f"{self.text_width}], got {text_states.shape}")
      text = text_states
    return self.dit(video, audio, t_video, t_audio, text, text_mask)


def build_model(config, rngs: nnx.Rngs) -> AVGenModel:
  return AVGenModel(config, rngs=rngs)


__all__ = ["AVDiT", "AVGenModel", "ByteTextEncoder", "DiTOutput", "TextEncoder",
           "build_frozen_text_encoder", "build_model", "build_text_encoder", "is_frozen"]
