"""Exported inference: the sampler and the denoiser step as `jax.export` programs on disk.

  from avgen.sample import AudioVideoGenerationPipeline, export
  pipe = AudioVideoGenerationPipeline.from_pretrained("/tmp/demo")
  export.export_sampler(pipe, "/tmp/demo_export", batch_size=1, num_inference_steps=25,
                        quantize="int8")
  # elsewhere, with only jax installed:
  #   import sys; sys.path.insert(0, "/tmp/demo_export"); import avgen_exported
  #   video, audio = avgen_exported.load("/tmp/demo_export").sample(["a red circle"], seeds=[0])

The programs are StableHLO for fixed shapes (batch, clip shape, mode, steps): the folder holds
no Python model code, and `avgen_exported.py` (a copy of `exported_runtime.py`) runs them with
numpy and JAX. Weights are an argument, stored in weights.npz.

Frozen text encoders (config.model.text_encoder "clip_text" / "t5_encoder"): the encoder is
part of both programs (prompt and negative prompt are encoded inside them, once per call) and
its weights are in weights.npz beside the DiT's, so the folder needs neither avgen nor
transformers. Its tokenizer goes along as tokenizer.json, set to pad and cut to the model's
caption length; the runtime reads it with the `tokenizers` package. The export checks that this
file tokenizes a set of probe texts exactly as the pipeline does; where it cannot (a tokenizer
without a fast backend, or one that differs), it warns and the runtime takes token ids
(`sample_tokens`) instead.

int8 (weight-only, AQT-style): every floating weight with >= `min_size` elements is stored as
int8 with one float32 scale per channel of its last axis (symmetric, round to nearest); the
programs dequantize in the graph. Biases, norms and small tensors stay in their dtype. Saves
~4x on those weights on disk and in device memory between calls; see
benchmarks/results/quantize_cpu.md for what it costs in accuracy and time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from avgen.sample import exported_runtime

_log = logging.getLogger(__name__)

RUNTIME_NAME = "avgen_exported.py"
TOKENIZER_NAME = exported_runtime.TOKENIZER_NAME
QUANTIZE = (None, "int8")
load = exported_runtime.load
# Texts the exported tokenizer must tokenize as the pipeline does: empty (the unconditional
# input), case and punctuation, non-ASCII, and one longer than any caption length (truncation).
PROBE_TEXTS = ("", "a red circle bounces", "A Blue SQUARE, twice!  (loud)", "ünïcode ♪ café",
               "a very long prompt " * 40)


def _name(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def flatten_params(params) -> tuple[list[str], Any, dict[str, np.ndarray]]:
  """(names in tree order, treedef, {name: numpy array}) of a parameter pytree.

  The pipeline's weights are (DiT params, text-encoder params or None): names start "0/" and
  "1/" for the two.
  """
  with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  names = [_name(p) for p, _ in with_path]
  if len(set(names)) != len(names):
    raise ValueError("flatten_params: two parameters share a name")
  return names, treedef, {n: np.asarray(x) for n, (_, x) in zip(names, with_path)}


def quantize_int8(weights: dict[str, np.ndarray], *, min_size: int = 4096) -> dict[str, Any]:
  """Per-channel symmetric int8 for floating weights of >= min_size elements and rank >= 2.

  A quantized entry becomes {"q": int8 array, "scale": float32 [last axis]}, with
  w ~= q * scale and |w - q * scale| <= scale / 2.
  """
  out: dict[str, Any] = {}
  for name, w in weights.items():
    if not (np.issubdtype(w.dtype, np.floating) and w.ndim >= 2 and w.size >= min_size):
      out[name] = w
      continue
    w32 = np.asarray(w, np.float32)
    peak = np.max(np.abs(w32), axis=tuple(range(w.ndim - 1)))
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w32 / scale), -127, 127).astype(np.int8)
    out[name] = {"q": q, "scale": scale}
  return out


def _dequantize(entry, dtype):
  if isinstance(entry, dict):
    return (entry["q"].astype(jnp.float32) * entry["scale"]).astype(dtype)
  return entry


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


def export_tokenizer(pipe, directory: str) -> dict[str, Any]:
  """Writes what the runtime needs to tokenize prompts; returns meta.json's "tokenizer" entry.

  byte: nothing to write ({"kind": "byte"}). A frozen encoder's tokenizer: tokenizer.json
  ({"kind": "hf"}) if it reproduces the pipeline's ids and masks on PROBE_TEXTS, else nothing
  ({"kind": "external"}: the caller tokenizes and uses `sample_tokens`), with a warning.
  """
  config = pipe.config
  max_len = int(config.data.caption_max_len)
  path = os.path.join(directory, TOKENIZER_NAME)
  if os.path.exists(path):
    os.remove(path)  # a previous export's, which may not fit this model
  kind = config.model.text_encoder
  if kind == "byte":
    return {"kind": "byte", "max_len": max_len}
  external = {"kind": "external", "max_len": max_len, "text_encoder": kind}
  hf = getattr(pipe.tokenizer, "hf", None)
  backend = getattr(hf, "backend_tokenizer", None)
  if backend is None:
    _log.warning("export: the %s tokenizer has no fast (tokenizers) backend, so the export "
                 "holds no tokenizer; pass token ids to ExportedSampler.sample_tokens", kind)
    return external
  import tokenizers  # pylint: disable=g-import-not-at-top  (comes with transformers)
  tok = tokenizers.Tokenizer.from_str(backend.to_str())
  # The padding and truncation of TextTokenizer's call (transformers sets the same on the
  # backend for padding="max_length", truncation=True), stored in the file.
  tok.enable_truncation(max_len, strategy="longest_first", direction=hf.truncation_side)
  tok.enable_padding(length=max_len, direction=hf.padding_side, pad_id=hf.pad_token_id,
                     pad_type_id=hf.pad_token_type_id, pad_token=hf.pad_token)
  tok.save(path)
  ours = exported_runtime.hf_tokenize(tokenizers.Tokenizer.from_file(path), PROBE_TEXTS,
                                      max_len)
  theirs = pipe.tokenizer(list(PROBE_TEXTS))
  if not all(np.array_equal(a, np.asarray(b)) for a, b in zip(ours, theirs)):
    os.remove(path)
    _log.warning("export: the %s tokenizer's tokenizers backend does not reproduce the "
                 "pipeline's token ids, so the export holds no tokenizer; pass token ids to "
                 "ExportedSampler.sample_tokens", kind)
    return external
  return {"kind": "hf", "file": TOKENIZER_NAME, "max_len": max_len, "text_encoder": kind}


def export_sampler(pipe, directory: str, *, batch_size: int = 1,
                   mode: str = "text_to_audio_video", num_inference_steps: int | None = None,
                   sampler: str | None = None, strength: float | None = None,
                   quantize: str | None = None, min_size: int = 4096,
                   platforms: tuple[str, ...] | None = None) -> str:
  """Writes the exported sampler + denoiser of `pipe` for fixed shapes into `directory`.

  Args:
    pipe: an `AudioVideoGenerationPipeline` (its trained clip shape and dtype are exported).
    directory: created if missing; its sampler files are overwritten.
    batch_size: rows per call of the exported programs.
    mode, num_inference_steps, sampler, strength: as for the pipeline's __call__.
    quantize: None or "int8" (weight-only, see the module docstring).
    min_size: smallest weight (elements) that int8 quantizes.
    platforms: lowering platforms, e.g. ("cpu", "cuda"); default: the current backend.
  Returns:
    directory.
  """
  if quantize not in QUANTIZE:
    raise ValueError(f"quantize: must be one of {QUANTIZE}, got {quantize!r}")
  if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
  steps, sampler, times = pipe.resolve_options(mode, num_inference_steps, sampler, strength)
  variant = pipe._variant()  # pylint: disable=protected-access  (the trained shape)
  names, treedef, flat = flatten_params(pipe.weights)
  dtypes = {n: x.dtype for n, x in flat.items()}
  weights = quantize_int8(flat, min_size=min_size) if quantize == "int8" else flat

  def params_of(w):
    return jax.tree.unflatten(treedef, [_dequantize(w[n], dtypes[n]) for n in names])

  rows_fn = pipe.sampling_fn(mode, sampler, variant)
  step_fn = pipe.denoiser_fn(variant)

  def exported_sampler(w, text, negative, keys, video_x0, audio_x0, sv, sa, t):
    return rows_fn(params_of(w), text, negative, keys, video_x0, audio_x0, sv, sa, t)

  def exported_denoiser(w, text, negative, video_t, audio_t, t_video, t_audio, sv, sa):
    return step_fn(params_of(w), text, negative, video_t, audio_t, t_video, t_audio, sv, sa)

  b = int(batch_size)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  text = _abstract(pipe.text_inputs([""] * b))
  video = f32(b, *variant.video_shape)
  audio = f32(b, *variant.audio_shape)
  w = _abstract(weights)
  platforms = tuple(platforms) if platforms else None
  sampler_exp = jax.export.export(jax.jit(exported_sampler), platforms=platforms)(
      w, text, text, jax.ShapeDtypeStruct((b, 2), jnp.uint32),
      video if mode in ("video_to_audio", "edit") else None,
      audio if mode in ("audio_to_video", "edit") else None, f32(b), f32(b),
      f32(len(times)))
  denoiser_exp = jax.export.export(jax.jit(exported_denoiser), platforms=platforms)(
      w, text, text, video, audio, f32(b), f32(b), f32(b), f32(b))

  os.makedirs(directory, exist_ok=True)
  tokenizer = export_tokenizer(pipe, directory)
  with open(os.path.join(directory, "sampler.jaxexport"), "wb") as f:
    f.write(sampler_exp.serialize())
  with open(os.path.join(directory, "denoiser.jaxexport"), "wb") as f:
    f.write(denoiser_exp.serialize())
  arrays = {}
  for name, entry in weights.items():
    if isinstance(entry, dict):
      arrays[f"{name}#q"], arrays[f"{name}#scale"] = entry["q"], entry["scale"]
    else:
      arrays[name] = entry
  np.savez(os.path.join(directory, "weights.npz"), **arrays)
  config = pipe.config
  meta = dict(
      format_version=exported_runtime.FORMAT_VERSION, mode=mode, batch_size=b,
      num_inference_steps=steps, sampler=sampler, strength=strength,
      times=[float(t) for t in times], video_shape=list(variant.video_shape),
      audio_shape=list(variant.audio_shape), fps=config.data.fps,
      sample_rate=config.data.sample_rate,
      guidance_video=float(config.sample.guidance_video),
      guidance_audio=float(config.sample.guidance_audio),
      tokenizer=tokenizer, text_encoder=config.model.text_encoder,
      prng_impl=str(jax.config.jax_default_prng_impl), quantize=quantize,
      platforms=list(sampler_exp.platforms), jax_version=jax.__version__,
      weight_bytes=int(sum(a.nbytes for a in arrays.values())),
      config=json.loads(config.to_json_best_effort()))
  with open(os.path.join(directory, "meta.json"), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=1)
  shutil.copyfile(exported_runtime.__file__, os.path.join(directory, RUNTIME_NAME))
  return directory


def decode(sampler: exported_runtime.ExportedSampler, video: np.ndarray, audio: np.ndarray,
           prompts=None):
  """Clips from exported latents with avgen's codecs (built from the exported config)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from avgen.sample.generate import Clip  # pylint: disable=g-import-not-at-top
  from avgen.models import autoencoders  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(sampler.meta["config"])
  video_codec = autoencoders.build_video_codec(config)
  audio_codec = autoencoders.build_audio_codec(config)
  prompts = prompts or [""] * len(video)
  return [Clip(video=video_codec.decode(v), audio=audio_codec.decode(a), fps=config.data.fps,
               sample_rate=config.data.sample_rate, prompt=p)
          for v, a, p in zip(video, audio, prompts)]
