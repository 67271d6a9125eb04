"""Feature extractors for the eval job, built from weights found by `avgen.metrics.weights`.

Each builder returns an object with `name` (what the report calls the embedding model) and the
embedding functions a metric needs; a missing weight file raises `MissingWeightsError` and a
missing port raises `ExtractorUnavailableError`, both before any clip is processed.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping

from avgen.metrics import weights as weights_lib


class ExtractorUnavailableError(RuntimeError):
  """The metric's feature extractor is not part of avgen (yet)."""


@dataclasses.dataclass
class Extractor:
  name: str
  embed: dict[str, Callable[..., Any]]
  model: Any = None
  batch_size: int = 1  # clips per `embed` call
  min_frames: int | None = None  # shorter videos are excluded (listed in the report)
  note: str | None = None  # written into the report entry of each metric that uses it


def vggish(given: Mapping[str, str], download: bool) -> Extractor:
  from avgen.metrics.nets import vggish as vggish_lib  # pylint: disable=g-import-not-at-top

  path = weights_lib.resolve("vggish", given, download=download, metric="fad")
  model = vggish_lib.load_vggish(path)

  def audio(audios, sample_rate_of):
    return vggish_lib.embed_audio(model, audios, sample_rate_of)

  name = ("VGGish (torchvggish 0.2 weights, Flax port): fc2 output without activation, 128-d, "
          "one embedding per 0.96 s of 16 kHz audio, no PCA")
  return Extractor(name, {"audio": audio}, model)


def lpips(given: Mapping[str, str], download: bool) -> Extractor | None:
  """LPIPS for temporal consistency, or None (then the labelled pixel fallback is used)."""
  del download  # LPIPS weights have no single published file to fetch
  from avgen.metrics.nets import lpips as lpips_lib  # pylint: disable=g-import-not-at-top

  try:
    path = weights_lib.resolve("lpips", given, metric="temporal")
  except weights_lib.MissingWeightsError:
    if given.get("lpips"):
      raise  # an explicit path that is wrong is an error, not a reason to fall back
    return None
  return Extractor("LPIPS v0.1, AlexNet trunk (Flax port)", {}, lpips_lib.load_lpips(path))


def clap(given: Mapping[str, str], download: bool) -> Extractor:
  from avgen.metrics.nets import clap as clap_lib  # pylint: disable=g-import-not-at-top

  folder = weights_lib.resolve("clap", given, download=download, metric="clap")
  encoders = clap_lib.ClapEncoders(folder)
  seconds = encoders.processor.feature_extractor.nb_max_samples / encoders.sample_rate
  checkpoint = os.path.basename(os.path.normpath(folder))
  if encoders.fused:
    longer = (f"longer clips: feature fusion of the whole clip shrunk to {seconds:g} s with 3 "
              f"{seconds:g} s chunks from its front, middle and back thirds, chunk starts drawn "
              f"with numpy seed {clap_lib.FUSION_SEED}")
  else:
    longer = f"longer clips: their first {seconds:g} s"
  name = (f"CLAP (Flax port of transformers ClapModel, {checkpoint}, "
          f"{'fused' if encoders.fused else 'unfused'}): HTS-AT audio + RoBERTa text, unit-norm "
          f"projections; audio at {encoders.sample_rate} Hz repeat-padded to {seconds:g} s "
          f"({longer})")
  return Extractor(name, {"audio": encoders.audio, "text": encoders.text}, encoders.model)


def clip(given: Mapping[str, str], download: bool, *, batch_size: int = 16) -> Extractor:
  """CLIP image and text embeddings (projected) from a CLIPModel folder, through avgen's ports.

  Frames and captions are encoded `batch_size` at a time (the last batch padded, so each side
  compiles once per clip shape).
  """
  # pylint: disable=g-import-not-at-top  (JAX models only when the metric is asked for)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from avgen import pretrained
  from avgen.models.encoders.clip import preprocess_images
  from avgen.pretrained.tokenizer import load_tokenizer

  folder = weights_lib.resolve("clip", given, download=download, metric="clip")
  vision = pretrained.load("clip_vision", folder)
  text = pretrained.load("clip_text", folder)
  if vision.visual_projection is None or text.text_projection is None:
    raise ValueError(f"metric 'clip': {folder} lacks the image or text projection into CLIP's "
                     "joint space; give a full CLIPModel checkpoint")
  dims = (vision.config.projection_dim, text.config.projection_dim)
  if dims[0] != dims[1]:
    raise ValueError(f"metric 'clip': {folder} projects images to {dims[0]} and text to "
                     f"{dims[1]} dimensions; they must agree")
  size, max_len = vision.config.image_size, text.config.max_position_embeddings
  tokenizer = load_tokenizer(folder, max_len)
  vision_def, vision_state = nnx.split(vision)
  text_def, text_state = nnx.split(text)
  image_fn = jax.jit(lambda s, x: nnx.merge(vision_def, s)(preprocess_images(x, size)).image_embeds)
  text_fn = jax.jit(lambda s, ids, mask: nnx.merge(text_def, s)(ids, mask).text_embeds)

  def batched(fn, *arrays):
    out, n = [], len(arrays[0])
    for start in range(0, n, batch_size):
      chunk = [a[start:start + batch_size] for a in arrays]
      pad = batch_size - len(chunk[0])
      chunk = [np.concatenate([c, np.repeat(c[-1:], pad, 0)]) if pad else c for c in chunk]
      out.append(np.asarray(fn(*map(jnp.asarray, chunk)), np.float32)[:batch_size - pad])
    return np.concatenate(out)

  def image(frames):
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
      raise ValueError(f"clip image encoder: frames must be uint8 [N, H, W, 3], got "
                       f"{frames.dtype} {frames.shape}")
    return batched(lambda x: image_fn(vision_state, x), frames)

  def caption(texts):
    ids, mask = tokenizer(list(texts))
    return batched(lambda i, m: text_fn(text_state, i, m), ids, mask)

  checkpoint = os.path.basename(os.path.normpath(given.get("clip") or str(folder)))
  name = (f"CLIP (Flax port of transformers CLIPModel, {checkpoint}): projected image embedding "
          f"of every frame (shorter side resized to {size} px, antialiased bicubic, centre crop, "
          f"CLIP normalisation; close to but not bit-identical with CLIPImageProcessor) against "
          f"the projected caption embedding (captions cut to {max_len} tokens)")
  return Extractor(name, {"image": image, "text": caption}, {"vision": vision, "text": text})


I3D_OUTPUTS = {
    "logits": ("400-d Kinetics logits averaged over time (TF-Hub i3d-kinetics-400 'Mean:0', the "
               "reference FVD embedding)"),
    "features": ("1024-d pre-logits (average-pooled Mixed_5c, averaged over time): not the "
                 "standard FVD embedding"),
}


def i3d(given: Mapping[str, str], download: bool, *, output: str = "logits",
        num_frames: int = 16, batch_size: int = 4) -> Extractor:
  """I3D video embeddings of the first `num_frames` frames, as the reference FVD computes them."""
  from avgen.metrics.nets import i3d as i3d_lib  # pylint: disable=g-import-not-at-top

  if output not in I3D_OUTPUTS:
    raise ValueError(f"--i3d-output: must be one of {sorted(I3D_OUTPUTS)}, got {output!r}")
  if num_frames < i3d_lib.MIN_FRAMES:
    raise ValueError(f"--fvd-frames: I3D needs >= {i3d_lib.MIN_FRAMES} frames, got {num_frames}")
  path = weights_lib.resolve("i3d", given, download=download, metric="fvd/kvd")
  model = i3d_lib.load_i3d(path)
  if output == "logits" and model.settings.num_classes != 400:
    raise ValueError(f"metrics 'fvd'/'kvd': {path} has {model.settings.num_classes} classes; FVD "
                     "uses the Kinetics-400 logits (or pass --i3d-output features)")

  def video(videos):
    return i3d_lib.embed_videos(model, videos, output=output, num_frames=num_frames,
                                batch_size=batch_size)

  name = (f"I3D (Kinetics-400 Inception-v1, Flax port, weights {os.path.basename(path)}): "
          f"{I3D_OUTPUTS[output]}, of each clip's first {num_frames} frames resized to "
          f"{i3d_lib.FVD_SIZE}x{i3d_lib.FVD_SIZE} (TF1 bilinear) in [-1, 1]")
  note = ("comparable with published FVD only with TF-Hub's i3d-kinetics-400 weights (e.g. "
          "i3d_pretrained_400.pt), 16 frames and the logits; published numbers also differ in "
          "clip sampling, frame rate and the number of clips")
  return Extractor(name, {"video": video}, model, batch_size=batch_size, min_frames=num_frames,
                   note=note)
