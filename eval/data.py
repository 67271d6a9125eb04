"""Reading the clips to evaluate: a folder of .mp4/.wav files, or ArrayRecord shards.

Folder layout: `NAME.mp4` (video, and audio if it has an audio stream), `NAME.wav` (audio; used
instead of the mp4's AAC when both exist, as the AV-Align recipe does), `NAME.txt` (caption).
A name may have any of the three; the trainer's `samples/` folder is such a folder.
Shards: a folder holding `*.array_record`, one shard file, or a glob; examples follow
`data_pipeline.schema` (captions and, for synthetic clips, ground-truth events in `meta`).

Nothing is dropped silently: a file or record that cannot be read is listed under `skipped` with
the reason, and the report carries that list.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import sys
from typing import Any

import numpy as np

from data_pipeline import schema


@dataclasses.dataclass
class Clip:
  name: str
  video: np.ndarray | None = None  # uint8 [T, H, W, 3]
  fps: float | None = None
  audio: np.ndarray | None = None  # float32 [S], mono
  sample_rate: int | None = None
  caption: str | None = None
  meta: dict[str, Any] | None = None
  # Embeddings already computed, by extractor name (FVD and KVD share one I3D pass).
  features: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)


@dataclasses.dataclass
class ClipSet:
  source: str
  kind: str  # "folder" or "shards"
  clips: list[Clip]
  skipped: list[dict[str, str]]

  def describe(self) -> dict[str, Any]:
    return {"source": self.source, "kind": self.kind, "num_clips": len(self.clips),
            "with_video": sum(c.video is not None for c in self.clips),
            "with_audio": sum(c.audio is not None for c in self.clips),
            "with_caption": sum(bool(c.caption) for c in self.clips),
            "skipped": self.skipped}


def _progress(iterable, desc: str, total: int, enabled: bool):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(iterable, desc=desc, total=total, disable=not enabled, file=sys.stderr,
              dynamic_ncols=True)


def shard_paths(source: str) -> list[str] | None:
  """The shard files `source` names, or None when it is a media folder."""
  if glob.has_magic(source):
    paths = sorted(p for p in glob.glob(source) if os.path.isfile(p))
    if not paths:
      raise ValueError(f"{source!r}: the glob matches no file")
    return paths
  if os.path.isfile(source):
    if not source.endswith(schema.SHARD_SUFFIX):
      raise ValueError(f"{source!r}: a single file must be an ArrayRecord shard "
                       f"(*{schema.SHARD_SUFFIX}); give media files as a folder")
    return [source]
  if not os.path.isdir(source):
    raise ValueError(f"{source!r}: no such file or folder")
  paths = sorted(glob.glob(os.path.join(source, "*" + schema.SHARD_SUFFIX)))
  return paths or None


def read_wav_like_librosa(path: str) -> tuple[np.ndarray, int]:
  """Mono float32 audio as `librosa.load(path, sr=None)` reads it (soundfile, channel mean)."""
  import soundfile  # pylint: disable=g-import-not-at-top
  audio, rate = soundfile.read(path, dtype="float32", always_2d=True)
  return audio.mean(axis=1, dtype=np.float32), int(rate)


def _reason(error: Exception) -> str:
  # ffmpeg logs name its contexts by memory address ("[in#0 @ 0x55d0...]"), which would make
  # two runs' reports differ.
  return re.sub(r" @ 0x[0-9a-f]+", "", f"{type(error).__name__}: {error}")


def _media_names(folder: str) -> list[str]:
  names = set()
  for entry in os.listdir(folder):
    stem, ext = os.path.splitext(entry)
    if ext.lower() in (".mp4", ".wav"):
      names.add(stem)
  return sorted(names)


def _read_media_clip(folder: str, name: str) -> Clip:
  from avgen.sample import media  # pylint: disable=g-import-not-at-top

  clip = Clip(name=name)
  mp4, wav, txt = (os.path.join(folder, name + ext) for ext in (".mp4", ".wav", ".txt"))
  info = media.probe(mp4) if os.path.isfile(mp4) else None
  if info is not None and info["has_video"]:
    clip.video, clip.fps = media.read_video(mp4)
  if os.path.isfile(wav):
    clip.audio, clip.sample_rate = read_wav_like_librosa(wav)
  elif info is not None and info["has_audio"]:
    clip.sample_rate = int(info["sample_rate"])
    clip.audio = media.read_audio(mp4, sample_rate=clip.sample_rate)
  if os.path.isfile(txt):
    with open(txt, encoding="utf-8") as f:
      clip.caption = f.read().strip()
  if clip.video is None and clip.audio is None:
    raise ValueError("holds neither a video nor an audio stream")
  return clip


def load_clip_set(source: str, *, max_clips: int | None = None, progress: bool = True,
                  label: str = "clips") -> ClipSet:
  """Reads every clip of `source` (the first `max_clips` in name order when given)."""
  if max_clips is not None and max_clips < 1:
    raise ValueError(f"max_clips: must be >= 1, got {max_clips}")
  paths = shard_paths(source)
  clips, skipped = [], []
  if paths is None:
    names = _media_names(source)
    if not names:
      raise ValueError(f"{source!r}: the folder holds no .mp4, .wav or *{schema.SHARD_SUFFIX} file")
    names = names[:max_clips]
    for name in _progress(names, f"reading {label}", len(names), progress):
      try:
        clips.append(_read_media_clip(source, name))
      except Exception as e:  # a broken file is reported, and the others are still read
        skipped.append({"name": name, "reason": _reason(e)})
    return ClipSet(source, "folder", clips, skipped)

  import grain  # pylint: disable=g-import-not-at-top
  index = [(p, i) for p in paths for i in range(len(grain.sources.ArrayRecordDataSource([p])))]
  index = index[:max_clips]
  sources = {p: grain.sources.ArrayRecordDataSource([p]) for p in paths}
  for path, i in _progress(index, f"reading {label}", len(index), progress):
    name = f"{os.path.basename(path)}#{i}"
    try:
      ex = schema.decode_example(sources[path][i])
    except schema.SchemaError as e:
      skipped.append({"name": name, "reason": f"SchemaError: {e}"})
      continue
    clips.append(Clip(name=name, video=ex["video"], fps=float(ex["fps"]), audio=ex["audio"],
                      sample_rate=int(ex["sample_rate"]), caption=ex["caption"], meta=ex["meta"]))
  return ClipSet(source, "shards", clips, skipped)
