"""Text encoders: (ids, mask) -> states [B, L, text_width] for the DiT's cross-attention.

`config.model.text_encoder` picks one:
  byte        a small transformer over `ByteTokenizer` ids, trained with the DiT (nothing to
              download); it lives inside the model and its parameters are checkpointed.
  clip_text   frozen pretrained encoders (`avgen.models.encoders`), weights from
  t5_encoder  `model.text_encoder_source`. They are held outside the model: the trainer and the
              Generator build one with `build_frozen_text_encoder(config)` and pass its weights
              into their jitted programs as an argument, so they are neither compiled in as
              constants nor trained, nor written into checkpoints. The model then takes the
              states (`AVGenModel(..., text_states=...)`) instead of token ids.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx

from avgen.models import tokenizer
from avgen.models.layers import ACT, MLP, Attention, LayerNorm, param
from avgen.parallel.sharding import constrain

ENCODERS = ("byte",)  # trained inside the model
FROZEN = ("clip_text", "t5_encoder")  # pretrained, held outside the model
KNOWN = ENCODERS + FROZEN


@runtime_checkable
class TextEncoder(Protocol):
  """What the DiT needs from a text encoder."""

  width: int  # last dim of the states

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """ids int [B, L], mask bool [B, L] (a prefix of True) -> states [B, L, width]."""
    ...


class TextLayer(nnx.Module):
  """Pre-LN transformer layer; padded keys are masked by length."""

  def __init__(self, width: int, num_heads: int, mlp_ratio: float, *, rngs: nnx.Rngs, impl: str,
               dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm1 = LayerNorm(width, rngs=rngs, param_dtype=param_dtype)
    self.attn = Attention(width, num_heads, qk_norm=False, impl=impl, **kw)
    self.norm2 = LayerNorm(width, rngs=rngs, param_dtype=param_dtype)
    self.mlp = MLP(width, int(width * mlp_ratio), **kw)

  def __call__(self, x: jax.Array, lengths: jax.Array) -> jax.Array:
    x = x + self.attn(self.norm1(x), kv_lengths=lengths)
    x = x + self.mlp(self.norm2(x))
    return constrain(x, ACT)


class ByteTextEncoder(nnx.Module):
  """Token + learned position embeddings, `depth` pre-LN layers, final LayerNorm."""

  def __init__(self, width: int, depth: int, num_heads: int, max_len: int, *, rngs: nnx.Rngs,
               mlp_ratio: float = 4.0, impl: str = "auto", dtype=jnp.float32, param_dtype=jnp.float32):
    self.width, self.max_len = width, max_len
    self.token_embed = param(rngs, nnx.initializers.normal(0.02), (tokenizer.VOCAB_SIZE, width),
                             ("vocab", "embed"), param_dtype)
    self.pos_embed = param(rngs, nnx.initializers.normal(0.02), (max_len, width), (None, "embed"),
                           param_dtype)
    self.layers = nnx.List([
        TextLayer(width, num_heads, mlp_ratio, rngs=rngs, impl=impl, dtype=dtype, param_dtype=param_dtype)
        for _ in range(depth)])
    self.norm = LayerNorm(width, rngs=rngs, param_dtype=param_dtype)

  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    if ids.ndim != 2 or mask.shape != ids.shape:
      raise ValueError(f"ByteTextEncoder: ids and mask must both be [B, L]; got {ids.shape}, {mask.shape}")
    if ids.shape[1] > self.max_len:
      raise ValueError(f"ByteTextEncoder: text length {ids.shape[1]} > caption_max_len {self.max_len}")
    lengths = jnp.sum(mask, -1).astype(jnp.int32)
    x = jnp.take(self.token_embed[...], ids, axis=0) + self.pos_embed[: ids.shape[1]]
    x = constrain(x, ACT)  # float32 residual stream; the layers' matmuls run in dtype
    for layer in self.layers:
      x = layer(x, lengths)
    return self.norm(x)


def is_frozen(config) -> bool:
  """True when config.model.text_encoder is a pretrained encoder held outside the model."""
  return config.model.text_encoder in FROZEN


def build_text_encoder(config, rngs: nnx.Rngs) -> ByteTextEncoder | None:
  """The model's own (trainable) encoder; None for a frozen kind, which the model does not hold."""
  m = config.model
  if m.text_encoder == "byte":
    return ByteTextEncoder(m.text_width, m.text_depth, m.text_heads, config.data.caption_max_len,
                           rngs=rngs, mlp_ratio=m.mlp_ratio, impl=m.attention_impl,
                           dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype))
  if m.text_encoder in FROZEN:
    return None
  raise ValueError(f"config.model.text_encoder: unknown encoder {m.text_encoder!r}; known: {KNOWN}")


def frozen_sources(config) -> tuple[str, str]:
  """(weights source, tokenizer source) of a frozen kind: model.text_encoder_source, default the
  kind's DEFAULT_SOURCE; model.text_tokenizer_source, default the weights source."""
  from avgen import pretrained  # pylint: disable=g-import-not-at-top  (pretrained imports models)
  m = config.model
  if m.text_encoder not in FROZEN:
    raise ValueError(f"config.model.text_encoder={m.text_encoder!r} is not a frozen pretrained "
                     f"encoder; those are {FROZEN}")
  source = str(m.get("text_encoder_source", "") or pretrained.kind_module(m.text_encoder)
               .DEFAULT_SOURCE)
  return source, str(m.get("text_tokenizer_source", "") or source)


def check_frozen_checkpoint(config, *, cache_dir=None) -> None:
  """Checks the config against the frozen encoder's config.json before any weight is read.

  Rules: model.text_width equals the encoder's width; data.caption_max_len fits the encoder's
  positions (CLIP text towers have 77; T5's relative positions have no limit).
  """
  import pathlib  # pylint: disable=g-import-not-at-top

  from avgen import pretrained  # pylint: disable=g-import-not-at-top
  from avgen.pretrained import hub  # pylint: disable=g-import-not-at-top

  m, kind = config.model, config.model.text_encoder
  source, _ = frozen_sources(config)
  mod = pretrained.kind_module(kind)
  root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else hub.default_cache_dir()
  path = hub.resolve(source, what=f"config.model.text_encoder_source ({kind})", cache_dir=root,
                     patterns=getattr(mod, "HUB_PATTERNS", hub.DEFAULT_PATTERNS))
  abstract = nnx.eval_shape(lambda: mod.build(path, jnp.dtype(m.dtype)))
  if abstract.width != m.text_width:
    raise ValueError(f"config.model.text_width={m.text_width} but the {kind} encoder from "
                     f"{source!r} gives states of width {abstract.width}; set "
                     f"--config.model.text_width={abstract.width}")
  positions = getattr(abstract.config, "max_position_embeddings", None)
  max_len = int(config.data.caption_max_len)
  if positions is not None and max_len > positions:
    raise ValueError(f"config.data.caption_max_len={max_len} is more than the {positions} token "
                     f"positions of the {kind} encoder from {source!r}; set "
                     f"--config.data.caption_max_len={positions} or less")


def build_frozen_text_encoder(config, *, cache_dir=None):
  """The frozen encoder of config.model.text_encoder with its tokenizer (a FrozenTextEncoder).

  The config is checked against the checkpoint's config.json first, so a wrong text_width or
  caption_max_len fails before gigabytes of weights are converted.
  """
  from avgen.models import encoders  # pylint: disable=g-import-not-at-top

  check_frozen_checkpoint(config, cache_dir=cache_dir)
  return encoders.build_text_encoder(config, cache_dir=cache_dir)
