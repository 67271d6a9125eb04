"""Runs an avgen sampler exported by `avgen.sample.export`: numpy and JAX only, no avgen.

`export_sampler` copies this file into the export folder as `avgen_exported.py`, so the folder
runs on a machine with only `jax` installed:

  import avgen_exported
  sampler = avgen_exported.load("/path/to/export")
  video, audio = sampler.sample(["a red circle bounces"], seeds=[0])   # latents, numpy

Folder: sampler.jaxexport (the whole sampling loop with guidance, for the exported batch size,
mode and steps), denoiser.jaxexport (one guided model evaluation), weights.npz (the parameters
by name; int8 ones as `name#q` + `name#scale`), meta.json (shapes, mode, steps, the times, the
tokenizer, the config). The programs take the weights as an argument, so they hold no weights.

A model with a frozen pretrained text encoder (CLIP / T5) has it inside the programs and its
weights in weights.npz; its tokenizer is tokenizer.json, read with the `tokenizers` package
(`pip install tokenizers`; nothing else). Without that file, tokenize with the encoder's own
tokenizer (padded and cut to meta["tokenizer"]["max_len"]) and call `sample_tokens`.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

FORMAT_VERSION = 1
TOKENIZER_NAME = "tokenizer.json"


def load_weights(path: str) -> dict:
  """weights.npz -> {name: array or {"q": int8, "scale": float32}}."""
  weights: dict = {}
  with np.load(path) as data:
    for key in data.files:
      name, _, part = key.partition("#")
      if part:
        weights.setdefault(name, {})[part] = data[key]
      else:
        weights[name] = data[key]
  return weights


def byte_tokenize(texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """avgen's byte tokenizer (avgen.models.tokenizer.ByteTokenizer; a test keeps them equal)."""
  ids = np.zeros((len(texts), max_len), np.int32)
  for i, text in enumerate(texts):
    body = np.frombuffer(text.encode("utf-8"), np.uint8)[: max_len - 2].astype(np.int32)
    row = np.concatenate([[1], body + 3, [2]])
    ids[i, : len(row)] = row
  return ids, ids != 0


def hf_tokenize(tokenizer, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """ids int32 [B, max_len] and mask bool [B, max_len] from a `tokenizers.Tokenizer` whose
  padding and truncation are set to max_len (as the exported tokenizer.json is)."""
  encodings = tokenizer.encode_batch(list(texts))
  ids = np.array([e.ids for e in encodings], np.int32).reshape(len(encodings), -1)
  mask = np.array([e.attention_mask for e in encodings], bool).reshape(len(encodings), -1)
  if ids.shape != (len(texts), max_len):
    raise ValueError(f"tokenizer: gave ids of shape {ids.shape}, the model takes "
                     f"{(len(texts), max_len)}")
  return ids, mask


class ExportedSampler:
  """An exported sampler and its weights, loaded from a folder.

  Each program compiles on its first call (`compiler_options` go to XLA, e.g.
  {"xla_backend_optimization_level": 0} to compile faster on a CPU) and is reused after.
  """

  def __init__(self, directory: str, compiler_options: dict | None = None):
    self.directory = directory
    self.compiler_options = dict(compiler_options or {})
    self._compiled: dict[str, object] = {}
    with open(os.path.join(directory, "meta.json"), encoding="utf-8") as f:
      self.meta = json.load(f)
    if self.meta.get("format_version") != FORMAT_VERSION:
      raise ValueError(f"{directory}: export format {self.meta.get('format_version')!r}, this "
                       f"runtime reads {FORMAT_VERSION}")
    with open(os.path.join(directory, "sampler.jaxexport"), "rb") as f:
      self.sampler = jax.export.deserialize(bytearray(f.read()))
    with open(os.path.join(directory, "denoiser.jaxexport"), "rb") as f:
      self.denoiser = jax.export.deserialize(bytearray(f.read()))
    self.weights = jax.device_put(load_weights(os.path.join(directory, "weights.npz")))
    self.batch_size = int(self.meta["batch_size"])
    self.mode = self.meta["mode"]
    self._hf_tokenizer = None

  def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and mask [B, max_len] of the exported model's tokenizer."""
    if isinstance(texts, str):
      raise TypeError("tokenize: expects a list of strings, got one str")
    tok = self.meta["tokenizer"]
    max_len = int(tok["max_len"])
    if tok["kind"] == "byte":
      return byte_tokenize(list(texts), max_len)
    if tok["kind"] == "hf":
      if self._hf_tokenizer is None:
        try:
          import tokenizers  # pylint: disable=g-import-not-at-top
        except ImportError as e:
          raise ImportError("this export's text encoder needs the `tokenizers` package for its "
                            "tokenizer.json: pip install tokenizers") from e
        self._hf_tokenizer = tokenizers.Tokenizer.from_file(
            os.path.join(self.directory, tok["file"]))
      return hf_tokenize(self._hf_tokenizer, texts, max_len)
    raise ValueError(f"tokenizer {tok['kind']!r}: this export holds no tokenizer; pass token "
                     f"ids and masks [B, {max_len}] of the {tok.get('text_encoder', 'model')}'s "
                     "tokenizer to sample_tokens")

  def keys(self, seeds: Sequence[int]) -> np.ndarray:
    impl = self.meta["prng_impl"]
    return np.stack([np.asarray(jax.random.key_data(jax.random.key(int(s), impl=impl)),
                                np.uint32) for s in seeds])

  def _call(self, name: str, *args):
    if name not in self._compiled:
      exported = getattr(self, name)
      lowered = jax.jit(exported.call).lower(*args)
      self._compiled[name] = lowered.compile(self.compiler_options or None)
    return self._compiled[name](*args)

  def _rows(self, name: str, value, rows: int) -> np.ndarray:
    value = np.asarray(value, np.float32)
    if value.ndim == 0:
      value = np.full((rows,), value, np.float32)
    if value.shape != (rows,):
      raise ValueError(f"{name}: one value or {rows}, got shape {value.shape}")
    return value

  def sample_tokens(self, text, negative_text, keys, *, guidance_video, guidance_audio,
                    video_x0=None, audio_x0=None):
    """Latents (video, audio) as numpy for token arrays, key data [B, 2] and clean inputs."""
    b = self.batch_size
    if np.asarray(keys).shape[0] != b:
      raise ValueError(f"this export runs batches of {b} rows, got {np.asarray(keys).shape[0]}")
    needs_video = self.mode in ("video_to_audio", "edit")
    needs_audio = self.mode in ("audio_to_video", "edit")
    if needs_video != (video_x0 is not None) or needs_audio != (audio_x0 is not None):
      raise ValueError(f"mode {self.mode!r} takes video_x0: {needs_video}, audio_x0: "
                       f"{needs_audio}")
    times = np.asarray(self.meta["times"], np.float32)
    cast = lambda x: None if x is None else np.asarray(x, np.float32)
    video, audio = self._call(
        "sampler", self.weights, tuple(text), tuple(negative_text), np.asarray(keys, np.uint32),
        cast(video_x0), cast(audio_x0), self._rows("guidance_video", guidance_video, b),
        self._rows("guidance_audio", guidance_audio, b), times)
    return np.asarray(video), np.asarray(audio)

  def sample(self, prompts: Sequence[str], *, seeds: Sequence[int],
             negative_prompt: str | None = None, guidance_video: float | None = None,
             guidance_audio: float | None = None, video_x0=None, audio_x0=None):
    """Latents for prompts (the exported tokenizer).

    negative_prompt and the guidance scales default to the exported config's, as in the
    pipeline.
    """
    if isinstance(prompts, str):
      raise TypeError("sample: prompts must be a list of strings, got one str")
    if len(prompts) != len(seeds):
      raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if negative_prompt is None:
      negative_prompt = self.meta["config"]["sample"].get("negative_prompt", "")
    gv = self.meta["guidance_video"] if guidance_video is None else guidance_video
    ga = self.meta["guidance_audio"] if guidance_audio is None else guidance_audio
    negative = self.tokenize([negative_prompt] * len(prompts))
    return self.sample_tokens(self.tokenize(prompts), negative, self.keys(seeds),
                              guidance_video=gv, guidance_audio=ga, video_x0=video_x0,
                              audio_x0=audio_x0)

  def denoise(self, text, negative_text, video_t, audio_t, t_video, t_audio, *, guidance_video,
              guidance_audio):
    """One guided model evaluation: raw outputs (the objective's parametrization)."""
    b = self.batch_size
    out = self._call("denoiser", self.weights, tuple(text), tuple(negative_text),
                     jnp.asarray(video_t, jnp.float32), jnp.asarray(audio_t, jnp.float32),
                     self._rows("t_video", t_video, b), self._rows("t_audio", t_audio, b),
                     self._rows("guidance_video", guidance_video, b),
                     self._rows("guidance_audio", guidance_audio, b))
    return np.asarray(out[0]), np.asarray(out[1])


def load(directory: str, compiler_options: dict | None = None) -> ExportedSampler:
  return ExportedSampler(directory, compiler_options)
