"""Generation from a trained model: jitted sampling loop + decoding to frames and waveforms.

`Generator` compiles one sampling program per (batch size, mode, steps, sampler) and reuses it:
calling it again with the same shapes does not recompile.

Text goes in as token ids of the config's tokenizer. With a frozen pretrained text encoder
(config.model.text_encoder "clip_text" / "t5_encoder") its weights are an argument of the
sampling program, which encodes prompt and negative prompt once before the denoising loop.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from avgen.config import latent_shapes
from avgen.diffusion import guidance, objectives, samplers
from avgen.models import autoencoders
from avgen.models import text_encoder as text_encoder_lib
from avgen.models import tokenizer as tokenizer_lib


@dataclasses.dataclass
class Clip:
  """One generated clip: uint8 frames [T, H, W, 3] at `fps` and a mono waveform at `sample_rate`."""
  video: np.ndarray
  audio: np.ndarray
  fps: float
  sample_rate: int
  prompt: str = ""

  def save(self, path: str, *, scale: int = 1) -> None:
    """Writes `path` (.mp4: H.264 + AAC; .wav: audio only)."""
    from avgen.sample import media
    if str(path).endswith(".wav"):
      media.write_wav(path, self.audio, self.sample_rate)
    else:
      media.write_mp4(path, self.video, self.fps, self.audio, self.sample_rate, scale=scale)


class Generator:
  """Samples clips from a model's parameters.

  Args:
    config: the model's config.
    graphdef, rest: the model's nnx graph and non-parameter state (`state.split_model`).
    text_encoder: the FrozenTextEncoder of a frozen config.model.text_encoder; built from the
      config (model.text_encoder_source) when not given. Ignored for "byte".
  """

  def __init__(self, config: ml_collections.ConfigDict, graphdef, rest, *, text_encoder=None):
    self.config = config
    self.graphdef, self.rest = graphdef, rest
    self.objective = objectives.build_objective(config.diffusion)
    if text_encoder_lib.is_frozen(config):
      self.text_encoder = text_encoder or text_encoder_lib.build_frozen_text_encoder(config)
      self.tokenizer = self.text_encoder.tokenizer
    else:
      self.text_encoder = None
      self.tokenizer = tokenizer_lib.ByteTokenizer(config.data.caption_max_len)
    self.shapes = latent_shapes(config)
    self.video_codec = autoencoders.build_video_codec(config)
    self.audio_codec = autoencoders.build_audio_codec(config)
    self._sample = jax.jit(self._sample_latents, static_argnames=("num_steps", "sampler"))

  def _sample_latents(self, params, text_params, text, negative_text, key, video_cond, audio_cond,
                      guidance_video, guidance_audio, *, num_steps, sampler):
    model = nnx.merge(self.graphdef, params, self.rest)
    b = text[0].shape[0]
    ids, mask = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), text, negative_text)
    # Encoded once, outside the loop: the states do not change between steps.
    doubled = self.text_inputs(text_params, ids, mask)

    def model_fn(video_t, audio_t, t_video, t_audio, text_cond):
      out = model(video_t, audio_t, t_video, t_audio, **text_cond)
      return out.video, out.audio

    denoise = guidance.guided(model_fn, guidance_video, guidance_audio, doubled)
    k_video, k_audio = jax.random.split(key)
    video_noise = jax.random.normal(k_video, (b,) + self.shapes["video"])
    audio_noise = jax.random.normal(k_audio, (b,) + self.shapes["audio"])
    return samplers.sample(denoise, self.objective, video_noise, audio_noise, sampler=sampler,
                           num_steps=num_steps, video_cond=video_cond, audio_cond=audio_cond)

  @property
  def text_params(self):
    """The frozen text encoder's weights (None for the byte encoder, which is in `params`)."""
    return None if self.text_encoder is None else self.text_encoder.params

  def text_inputs(self, text_params, ids, mask) -> dict:
    """The model's text keyword arguments for token ids [B, L] and mask [B, L] (jittable).

    {text_ids, text_mask} for the byte encoder; {text_states, text_mask} for a frozen one, whose
    weights `text_params` (`self.text_params`) should be an argument of the caller's jit.
    """
    if self.text_encoder is None:
      return dict(text_ids=ids, text_mask=mask)
    return dict(text_mask=mask, text_states=self.text_encoder.apply(text_params, ids, mask))

  def latents(self, params, prompts: Sequence[str], *, seed: int = 0, negative_prompt: str | None = None,
              num_steps: int | None = None, sampler: str | None = None,
              guidance_video: float | None = None, guidance_audio: float | None = None,
              video_cond: np.ndarray | None = None, audio_cond: np.ndarray | None = None):
    """Samples latents [B, T, h, w, C] and [B, N, n_mels] for `prompts`."""
    s = self.config.sample
    prompts = list(prompts)
    negative = s.negative_prompt if negative_prompt is None else negative_prompt
    text = self.tokenizer(prompts)
    negative_text = self.tokenizer([negative] * len(prompts))
    video, audio = self._sample(
        params, self.text_params, text, negative_text, jax.random.key(seed),
        None if video_cond is None else jnp.asarray(video_cond, jnp.float32),
        None if audio_cond is None else jnp.asarray(audio_cond, jnp.float32),
        jnp.float32(s.guidance_video if guidance_video is None else guidance_video),
        jnp.float32(s.guidance_audio if guidance_audio is None else guidance_audio),
        num_steps=int(num_steps or s.num_steps), sampler=sampler or s.sampler)
    return np.asarray(video), np.asarray(audio)

  def decode(self, video_latent: np.ndarray, audio_latent: np.ndarray, prompts=None) -> list[Clip]:
    d = self.config.data
    prompts = prompts or [""] * len(video_latent)
    return [Clip(video=self.video_codec.decode(v), audio=self.audio_codec.decode(a), fps=d.fps,
                 sample_rate=d.sample_rate, prompt=p)
            for v, a, p in zip(video_latent, audio_latent, prompts)]

  def __call__(self, params, prompts: Sequence[str], **kwargs) -> list[Clip]:
    video, audio = self.latents(params, prompts, **kwargs)
    return self.decode(video, audio, list(prompts))
