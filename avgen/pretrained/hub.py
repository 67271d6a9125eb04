"""Where a pretrained `source` lives: a local directory, or a Hugging Face hub id to download."""

from __future__ import annotations

import os
import pathlib
import re
from typing import Sequence

# owner/name, an optional subfolder path, an optional @revision.
_HUB_ID = re.compile(r"([\w.-]+)/([\w.-]+)((?:/[\w.-]+)*)(?:@([\w./-]+))?")

# Everything a converter or a tokenizer may read; never pickles, TF or Flax msgpack files.
DEFAULT_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model")
# A tokenizer alone: its vocabulary, merges, sentencepiece model and configs, never weights.
TOKENIZER_PATTERNS = ("*.json", "*.txt", "*.model")


def default_cache_dir() -> pathlib.Path:
  env = os.environ.get("AVGEN_PRETRAINED_CACHE")
  return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "avgen" / "pretrained"


def parse_hub_id(source: str) -> tuple[str, str | None, str | None] | None:
  """'owner/name[/sub/folder][@rev]' -> (repo_id, subfolder or None, revision or None)."""
  m = _HUB_ID.fullmatch(source)
  if not m:
    return None
  owner, name, sub, rev = m.groups()
  return f"{owner}/{name}", (sub.strip("/") or None), rev


def resolve(source: str | os.PathLike, *, what: str, cache_dir: pathlib.Path | None = None,
            patterns: Sequence[str] = DEFAULT_PATTERNS, weights_only_pickle: bool = False,
            require_weights: bool = True) -> pathlib.Path:
  """A local directory holding `source`'s files; hub ids are downloaded (config/weights only).

  weights_only_pickle: the kind converts a pickle with torch's weights-only unpickler, so a hub
  folder without safetensors is accepted (the registry converts it before loading).
  require_weights: False for files that are not weights (a tokenizer): a hub folder without
  *.safetensors is then fine.
  """
  path = pathlib.Path(source).expanduser()
  if path.is_dir():
    return path
  if path.exists():
    raise ValueError(f"{what}: source {str(source)!r} is a file; give its directory (the one "
                     "holding config.json and the *.safetensors weights)")
  hub = parse_hub_id(str(source))
  if hub is None:
    raise ValueError(f"{what}: source {str(source)!r} is neither an existing directory nor a hub "
                     "id of the form 'owner/name[/subfolder][@revision]'")
  repo_id, subfolder, revision = hub
  allow = [f"{subfolder}/{p}" for p in patterns] if subfolder else list(patterns)
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    root = huggingface_hub.snapshot_download(
        repo_id, revision=revision, allow_patterns=allow,
        cache_dir=str(cache_dir / "hub") if cache_dir is not None else None)
  except Exception as e:  # network, auth, missing repo: all end here with the same advice.
    raise RuntimeError(
        f"{what}: {str(source)!r} is not a local directory, and downloading it as hub repo "
        f"{repo_id!r} (revision {revision or 'main'}) failed: {type(e).__name__}: {e}. On a "
        "machine without network, download it elsewhere with `python -m avgen.pretrained "
        "convert` or `huggingface-cli download`, then pass the local directory.") from e
  out = pathlib.Path(root) / subfolder if subfolder else pathlib.Path(root)
  if not out.is_dir():
    raise RuntimeError(f"{what}: hub repo {repo_id!r} has no folder {subfolder!r}")
  if require_weights and not any(out.glob("*.safetensors")) and not weights_only_pickle:
    raise RuntimeError(
        f"{what}: hub repo {repo_id!r}{'/' + subfolder if subfolder else ''} (revision "
        f"{revision or 'main'}) has no *.safetensors weights; avgen refuses pickle checkpoints "
        "(*.bin/*.pt/*.ckpt). Try a revision with safetensors (often `@refs/pr/N` from the "
        "safetensors conversion bot) or convert it yourself with PyTorch.")
  return out
