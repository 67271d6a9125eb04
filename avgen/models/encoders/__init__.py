"""Pretrained encoders, ported from their PyTorch originals and loaded by `avgen.pretrained.load`.

  clip       CLIPTextEncoder / CLIPVisionEncoder (+ projections: CLIP score)
  t5         T5Encoder (v1.1 / Flan gated-GELU, original ReLU)
  wav2vec2   Wav2Vec2Encoder (group- or layer-norm feature encoder; post-LN or stable pre-LN)
  videomae   VideoMAEEncoder

`build_text_encoder(config)` gives the frozen text encoder named by `config.model.text_encoder`
("clip_text" / "t5_encoder", weights from `config.model.text_encoder_source`) with its tokenizer.
It is held outside the trained parameters: `FrozenTextEncoder.apply(params, ids, mask)` is a pure
function, so a train step can take the frozen weights as an argument instead of baking them into
the compiled program as constants.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from avgen.models.encoders.clip import CLIPTextEncoder, CLIPVisionEncoder
from avgen.models.encoders.t5 import T5Encoder
from avgen.models.encoders.videomae import VideoMAEEncoder
from avgen.models.encoders.wav2vec2 import Wav2Vec2Encoder

FROZEN_TEXT_ENCODERS = ("clip_text", "t5_encoder")


class FrozenTextEncoder:
  """A pretrained text encoder and its tokenizer: (ids, mask) -> states [B, L, width].

  Padded positions of the states are set to zero: the DiT masks them in cross-attention, and
  zeros keep pooled or logged statistics from depending on what the encoder wrote there.
  """

  def __init__(self, kind: str, module: nnx.Module, tokenizer):
    self.kind, self.tokenizer = kind, tokenizer
    self.width = module.width
    self.graphdef, self.params = nnx.split(module)
    self._jitted = jax.jit(self.apply)

  def apply(self, params, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """Pure: states [B, L, width] from `params` (this encoder's nnx.State); no gradient flows."""
    if ids.ndim != 2 or mask.shape != ids.shape:
      raise ValueError(f"{self.kind}: ids and mask must both be [B, L]; got {ids.shape}, "
                       f"{mask.shape}")
    module = nnx.merge(self.graphdef, jax.lax.stop_gradient(params))
    states = module(ids, mask.astype(bool)).last_hidden_state
    return jnp.where(mask.astype(bool)[..., None], states, 0).astype(states.dtype)

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    return self._jitted(self.params, ids, mask)

  def encode(self, texts: list[str]) -> tuple[jax.Array, jax.Array]:
    """Captions -> (states [B, max_len, width], mask [B, max_len])."""
    ids, mask = self.tokenizer(texts)
    return self(jnp.asarray(ids), jnp.asarray(mask)), jnp.asarray(mask)


def build_text_encoder(config, *, cache_dir=None) -> FrozenTextEncoder:
  """The frozen encoder named by config.model.text_encoder (not 'byte', which the model trains).

  Reads config.model.text_encoder_source (local dir or hub id; default: the kind's
  DEFAULT_SOURCE), config.model.text_tokenizer_source (default: the same; diffusers pipeline
  repos keep the tokenizer in a sibling folder, e.g. 'owner/pipeline/tokenizer'),
  config.model.dtype and config.data.caption_max_len (the token count).
  """
  from avgen import pretrained  # pylint: disable=g-import-not-at-top  (pretrained imports models)
  from avgen.pretrained.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  m = config.model
  kind = m.text_encoder
  if kind not in FROZEN_TEXT_ENCODERS:
    raise ValueError(f"build_text_encoder: config.model.text_encoder={kind!r} is not a pretrained "
                     f"encoder; those are {FROZEN_TEXT_ENCODERS} ('byte' is built by the model)")
  source = m.get("text_encoder_source") or pretrained.kind_module(kind).DEFAULT_SOURCE
  max_len = int(config.data.caption_max_len)
  module = pretrained.load(kind, source, dtype=jnp.dtype(m.dtype), cache_dir=cache_dir)
  if kind == "clip_text" and max_len > module.config.max_position_embeddings:
    raise ValueError(f"config.data.caption_max_len={max_len} > the CLIP text tower's "
                     f"{module.config.max_position_embeddings} positions")
  if module.width != m.text_width:
    raise ValueError(f"config.model.text_width={m.text_width} but {kind} from {source!r} gives "
                     f"states of width {module.width}; set "
                     f"--config.model.text_width={module.width}")
  tokenizer_source = m.get("text_tokenizer_source") or source
  tokenizer = load_tokenizer(tokenizer_source, max_len, cache_dir=cache_dir)
  return FrozenTextEncoder(kind, module, tokenizer)


__all__ = ["CLIPTextEncoder", "CLIPVisionEncoder", "FROZEN_TEXT_ENCODERS", "FrozenTextEncoder",
           "T5Encoder", "VideoMAEEncoder", "Wav2Vec2Encoder", "build_text_encoder"]
