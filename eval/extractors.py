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
  name = (f"CLAP (Flax port of transformers ClapModel, {checkpoint}): HTS-AT audio + RoBERTa "
          f"text, unit-norm projections; audio at {encoders.sample_rate} Hz "
          f"repeat-padded to {seconds:g} s (longer clips: their first {seconds:g} s)")
  return Extractor(name, {"audio": encoders.audio, "text": encoders.text}, encoders.model)


def clip(given: Mapping[str, str], download: bool) -> Extractor:
  del given, download
  raise ExtractorUnavailableError(
      "metric 'clip': the CLIP image and text encoders (avgen/models/encoders/clip.py, issue 5) "
      "are not connected to the eval job yet; avgen.metrics.similarity.clip_score takes them as "
      "callables once they are")


def i3d(given: Mapping[str, str], download: bool) -> Extractor:
  del given, download
  raise ExtractorUnavailableError(
      "metrics 'fvd'/'kvd': need I3D (Kinetics-400) video features, and avgen has no I3D port "
      "yet; see docs/evaluation.md")

