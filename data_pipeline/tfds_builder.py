"""A TFDS dataset (array_record format) made from the shards, so `tfds.data_source` reads them.

tensorflow-datasets builds and reads array_record datasets without TensorFlow installed. TFDS
stores examples as its own serialized `tf.train.Example` records, not our msgpack records, so the
builder copies the clips (a second copy on disk) rather than pointing TFDS at our files:

  from data_pipeline.tfds_builder import AvgenClips
  AvgenClips(shards="OUT/shards", data_dir="TFDS_DIR").download_and_prepare()
  source = tfds.data_source("avgen_clips", data_dir="TFDS_DIR", split="train")
  source[i]  # {'video': uint8 [T, H, W, 3], 'audio': float32 [S], 'caption': bytes,
             #  'fps', 'sample_rate', 'meta': bytes (JSON)}

Every clip goes to the split `train`. TFDS orders records by a hash of their keys, so index i is
not the i-th clip of our shards; `meta` (source, start) tells which clip it is. Cached latents
(`video_latent`, `audio_mel`) are not carried over.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from data_pipeline import schema


class AvgenClips(tfds.core.GeneratorBasedBuilder):
  """Clips of `python -m data_pipeline.preprocess` (or the synthetic set) as a TFDS dataset."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Clips copied from data_pipeline ArrayRecord shards."}

  def __init__(self, *, shards: str | None = None, **kwargs):
    """`shards`: a shard directory, glob or file (only needed to prepare the dataset)."""
    self._shards = shards
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Audio-video clips: uint8 frames, mono waveform, caption, JSON metadata.",
        features=tfds.features.FeaturesDict({
            "video": tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8,
                                          encoding=tfds.features.Encoding.ZLIB),
            "audio": tfds.features.Tensor(shape=(None,), dtype=np.float32),
            "caption": tfds.features.Text(),
            "fps": tfds.features.Scalar(dtype=np.float32),
            "sample_rate": tfds.features.Scalar(dtype=np.int32),
            "meta": tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing is downloaded
    if not self._shards:
      raise ValueError("AvgenClips: pass shards=<directory, glob or file of ArrayRecord shards> "
                       "to prepare the dataset")
    from data_pipeline.loader import resolve_paths  # pylint: disable=g-import-not-at-top
    return {"train": self._generate_examples(resolve_paths(self._shards))}

  def _generate_examples(self, files: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    for path in files:
      name = os.path.basename(path)
      for i, record in enumerate(schema.read_records(path)):
        ex = schema.decode_example(record)
        yield f"{name}:{i}", {
            "video": ex["video"], "audio": ex["audio"], "caption": ex["caption"],
            "fps": np.float32(ex["fps"]), "sample_rate": np.int32(ex["sample_rate"]),
            "meta": json.dumps(ex["meta"], sort_keys=True),
        }
