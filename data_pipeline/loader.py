"""Grain input pipeline: ArrayRecord shards -> batches of diffusion latents, checkpointable.

Order of operations (each host builds the same pipeline with its own `shard_index`):

  ArrayRecordDataSource(all shards) -> global shuffle (seed; reshuffled every epoch)
  -> repeat(num_epochs) -> this host's rows of each global batch (see below)
  -> decode + check against the config + encode latents + tokenize (reader threads)
  -> batch (dropping corrupt records, counting them; remainder dropped)
  -> prefetch (a thread, or `data.num_workers` processes)

Global batch s is records [s*B, (s+1)*B) of the shuffled stream, in that order, whatever the
number of hosts: host `shard_index` of `shard_count` reads its rows
[s*B + shard_index*b, s*B + (shard_index+1)*b), b = B / shard_count. So a run restored onto
another host count (or started at `start_batch`) sees the same batches in the same order
(with num_workers=0 and no corrupt records, which shift a host's stream).

A record that fails to decode (`schema.SchemaError`) is corrupt: it is skipped and counted in the
`skipped_records` field of the next example, so `batch["skipped_records"].sum()` is the number of
corrupt records skipped for that batch (the end of a finite stream logs what is left). With worker
processes each worker batches its own slice, so the batch order differs from num_workers=0.
A record that decodes but disagrees with the config
(frames, size, fps, sample rate, cached latent shapes) is a configuration mistake and raises.

Cached latents (written by `data_pipeline.precompute` or the synthetic set) carry the settings
they were made with in `meta` (`video_latent_config`, `audio_mel_config`); a cache is used only
when those equal this config's (`video_latent_settings`, the mel analysis' `settings()`). A
stale mel or pixel latent is recomputed; a stale SD-VAE latent raises (the loader does not run
the VAE). A cache without recorded settings is used as stored, after a shape check.
Captions are tokenized with the tokenizer of config.model.text_encoder (`build_tokenizer`).
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Any, Sequence

from absl import flags
import grain
import numpy as np

from avgen.models.autoencoders import build_mel_analysis
from avgen.models.autoencoders.pixels import PixelCodec
from avgen.models.tokenizer import build_tokenizer
from data_pipeline import schema

_CORRUPT = "_corrupt_record"
# Elements decoded ahead per host by the reader threads; batches ahead come from `data.prefetch`.
_READ_THREADS = 4


def resolve_paths(pattern_or_list: str | Sequence[str]) -> list[str]:
  """Globs, directories (-> their *.array_record files) and file paths -> sorted list of files.

  Raises ValueError naming the input when it is empty, a glob matches nothing, or a file is missing.
  """
  if isinstance(pattern_or_list, (str, os.PathLike)):
    items = [os.fspath(pattern_or_list)]
  else:
    items = [os.fspath(p) for p in pattern_or_list]
  if not items or any(not p for p in items):
    raise ValueError(f"data paths: got no path ({pattern_or_list!r}); set config.data.path")
  out: list[str] = []
  for item in items:
    if glob.has_magic(item):
      matches = sorted(p for p in glob.glob(item) if os.path.isfile(p))
      if not matches:
        raise ValueError(f"data paths: glob {item!r} matches no file")
      out.extend(matches)
    elif os.path.isdir(item):
      matches = sorted(glob.glob(os.path.join(item, "*" + schema.SHARD_SUFFIX)))
      if not matches:
        raise ValueError(f"data paths: directory {item!r} holds no *{schema.SHARD_SUFFIX} file")
      out.extend(matches)
    elif os.path.isfile(item):
      out.append(item)
    else:
      raise ValueError(f"data paths: file {item!r} does not exist")
  return out


def video_latent_settings(config) -> dict[str, Any]:
  """Everything in the config that decides a video latent's values; a cached `video_latent`
  whose `meta["video_latent_config"]` equals this is valid for `config`."""
  kind = config.latent.video
  if kind == "pixels":
    return {"kind": "pixels"}
  if kind == "sd_vae":
    from avgen.pretrained import sd_vae  # pylint: disable=g-import-not-at-top
    latent = config.latent
    source = latent.get("video_source", None) or sd_vae.DEFAULT_SOURCE
    return {"kind": "sd_vae", "source": str(source),
            "dtype": str(latent.get("codec_dtype", None) or "float32"),
            "downsample": int(latent.video_downsample), "channels": int(latent.video_channels)}
  raise ValueError(f"config.latent.video={kind!r} is not a known video latent space")


def settings_difference(stored: dict[str, Any], wanted: dict[str, Any]) -> str:
  """'key: stored X, config Y; ...' for the keys that differ (for error messages)."""
  keys = sorted(set(stored) | set(wanted))
  return "; ".join(f"{k}: stored {stored.get(k)!r}, config {wanted.get(k)!r}" for k in keys
                   if stored.get(k) != wanted.get(k))


class ExampleTransform:
  """Record bytes -> model inputs for one example, or a corrupt-record marker.

  Holds only plain values, numpy arrays and a picklable tokenizer, so that grain can pickle it
  into worker processes.
  """

  def __init__(self, config, *, tokenize: bool = True):
    d = config.data
    self.num_frames, self.height, self.width = int(d.num_frames), int(d.height), int(d.width)
    self.fps, self.sample_rate = float(d.fps), int(d.sample_rate)
    self.num_samples = schema.expected_num_samples(self.num_frames, self.fps, self.sample_rate)
    self.video_kind = config.latent.video
    if config.latent.audio != "mel":
      raise ValueError(f"loader: config.latent.audio must be 'mel', got {config.latent.audio!r}")
    factor = int(config.latent.video_downsample)
    self.latent_shape = (self.num_frames, self.height // factor, self.width // factor,
                         int(config.latent.video_channels))
    self.video_settings = video_latent_settings(config)
    self.pixels = PixelCodec()
    # The vocoder's own mel analysis (MelCodec for griffin_lim): what the vocoder inverts.
    self.mel = build_mel_analysis(config)
    self.mel_shape = (self.mel.num_frames(self.num_samples), self.mel.n_mels)
    self.mel_settings = self.mel.settings()
    # tokenize=False: only the record checks are wanted (the precompute job).
    self.tokenizer = build_tokenizer(config) if tokenize else None

  def __call__(self, record: bytes) -> dict[str, np.ndarray]:
    try:
      ex = schema.decode_example(record)
    except schema.SchemaError as e:
      logging.warning("loader: skipping corrupt record: %s", e)
      return {_CORRUPT: np.int32(1)}
    self.check(ex)
    video = self.cached_video_latent(ex)
    if video is None:  # pixels: encoding is cheap and exact
      video = self.pixels.encode(ex["video"])
    video = video.astype(np.float32)
    mel = ex.get("audio_mel")
    # A cached mel that records its settings is used only if they are this config's (a stale
    # cache after a config change would otherwise be trained on silently); one without settings
    # is the producer's word (its shape is still checked).
    made_with = ex["meta"].get("audio_mel_config")
    if mel is None or (made_with is not None and made_with != self.mel_settings):
      mel = self.mel.encode(ex["audio"])
    mel = mel.astype(np.float32)
    ids, mask = self.tokenizer([ex["caption"]])
    return {"video": video, "audio": mel, "text_ids": ids[0], "text_mask": mask[0]}

  def cached_video_latent(self, ex: dict[str, Any]) -> np.ndarray | None:
    """The record's `video_latent` if valid for this config; None where pixels are to be encoded.

    Raises for an SD-VAE config when the record has no latent or one made with other settings.
    """
    latent = ex.get("video_latent")
    made_with = ex["meta"].get("video_latent_config")
    if self.video_kind == "pixels":
      return latent if latent is not None and made_with == self.video_settings else None
    if latent is None:
      raise ValueError(
          f"loader: config.latent.video={self.video_kind!r} reads the precomputed field "
          "'video_latent', which this record lacks; precompute latents into the shards "
          "(python -m data_pipeline.precompute) or use latent.video='pixels'")
    if made_with is not None and made_with != self.video_settings:
      raise ValueError(
          "loader: record field 'video_latent' was made with other settings than the config's ("
          f"{settings_difference(made_with, self.video_settings)}); re-run "
          "python -m data_pipeline.precompute with this config, or set config.latent to match")
    return latent

  def check(self, ex: dict[str, Any]) -> None:
    """Raises ValueError when a decoded record disagrees with the config."""
    def fail(field, got, rule):
      raise ValueError(f"loader: record field {field!r} is {got} but {rule}; the data does not "
                       "match the config")

    t, h, w, _ = ex["video"].shape
    if (t, h, w) != (self.num_frames, self.height, self.width):
      fail("video", f"[T={t}, H={h}, W={w}]", f"config.data has num_frames={self.num_frames}, "
           f"height={self.height}, width={self.width}")
    if abs(ex["fps"] - self.fps) > 1e-6:
      fail("fps", ex["fps"], f"config.data.fps={self.fps}")
    if ex["sample_rate"] != self.sample_rate:
      fail("sample_rate", ex["sample_rate"], f"config.data.sample_rate={self.sample_rate}")
    mel_settings = ex["meta"].get("audio_mel_config")
    if (ex.get("audio_mel") is not None and ex["audio_mel"].shape != self.mel_shape
        and mel_settings in (None, self.mel_settings)):
      fail("audio_mel", f"shape {ex['audio_mel'].shape}",
           f"config.mel (hop_length, n_mels) gives {self.mel_shape}")
    latent_settings = ex["meta"].get("video_latent_config")
    if (ex.get("video_latent") is not None and ex["video_latent"].shape != self.latent_shape
        and (latent_settings == self.video_settings
             or (latent_settings is None and self.video_kind != "pixels"))):
      fail("video_latent", f"shape {ex['video_latent'].shape}",
           f"config.latent (video_downsample, video_channels) gives {self.latent_shape}")

  _check = check  # the name older callers use


class _HostRows(grain.MapDataset):
  """Host `slot`'s rows of each global batch: element i is parent[(i // b) * B + slot * b + i % b]."""

  def __init__(self, parent: grain.MapDataset, global_batch: int, slot: int, slots: int):
    super().__init__(parent)
    self._global, self._slot = global_batch, slot
    self._local = global_batch // slots
    self._length = (len(parent) // global_batch) * self._local

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    step, row = divmod(index, self._local)
    return self._parent[step * self._global + self._slot * self._local + row]

  def __str__(self) -> str:
    return f"HostRows(global_batch={self._global}, slot={self._slot}, rows={self._local})"


class _BatchIterator(grain.DatasetIterator):
  """Batches examples, dropping corrupt-record markers and counting them into `skipped_records`.

  Each example's count is the number of corrupt records met since the previous example. At the
  end of a finite stream the examples that do not fill a batch, and the corrupt records after
  the last full batch, are logged rather than dropped silently.
  """

  def __init__(self, parent: grain.DatasetIterator, batch_size: int):
    super().__init__(parent)
    self._batch_size = batch_size
    self._pending = 0  # corrupt records met since the last example (0 between batches)

  def __next__(self) -> dict[str, np.ndarray]:
    examples = []
    while len(examples) < self._batch_size:
      try:
        element = next(self._parent)
      except StopIteration:
        skipped = self._pending + sum(int(e["skipped_records"]) for e in examples)
        if examples or skipped:
          logging.warning(
              "loader: end of data: %d example(s) too few for a batch of %d are dropped; %d "
              "corrupt record(s) were skipped after the last full batch", len(examples),
              self._batch_size, skipped)
        self._pending = 0
        raise
      if _CORRUPT in element:
        self._pending += 1
        continue
      element["skipped_records"] = np.int32(self._pending)
      self._pending = 0
      examples.append(element)
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "pending": self._pending}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._pending = int(state["pending"])


class _BatchIterDataset(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, batch_size: int):
    super().__init__(parent)
    self._batch_size = batch_size

  def __iter__(self) -> _BatchIterator:
    return _BatchIterator(self._parent.__iter__(), self._batch_size)

  def __str__(self) -> str:
    return f"BatchSkippingCorruptIterDataset(batch_size={self._batch_size})"


def make_loader(
    config,
    paths: str | Sequence[str],
    *,
    shard_index: int = 0,
    shard_count: int = 1,
    seed: int | None = None,
    num_epochs: int | None = None,
    start_batch: int = 0,
) -> grain.DatasetIterator:
  """A checkpointable iterator of this host's batches (see the module docstring).

  Each batch: `video` float32 [b, T, h, w, C], `audio` float32 [b, N, n_mels], `text_ids` int32
  [b, L], `text_mask` bool [b, L], `skipped_records` int32 [b], with b = data.batch_size /
  shard_count. `seed` defaults to data.shuffle_seed; `num_epochs=None` repeats forever;
  `start_batch` skips that many global batches (a restore without a saved iterator state).
  """
  files = resolve_paths(paths)
  d = config.data
  if not (isinstance(shard_count, int) and shard_count >= 1):
    raise ValueError(f"make_loader: shard_count must be an int >= 1, got {shard_count!r}")
  if not (isinstance(shard_index, int) and 0 <= shard_index < shard_count):
    raise ValueError(
        f"make_loader: need 0 <= shard_index < shard_count={shard_count}, got {shard_index!r}")
  if d.batch_size % shard_count:
    raise ValueError(f"make_loader: config.data.batch_size={d.batch_size} is not divisible by "
                     f"shard_count={shard_count} (hosts)")
  per_host_batch = d.batch_size // shard_count
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"make_loader: num_epochs must be None (forever) or >= 1, got {num_epochs}")
  if not (isinstance(start_batch, int) and start_batch >= 0):
    raise ValueError(f"make_loader: start_batch must be an int >= 0, got {start_batch!r}")
  seed = d.shuffle_seed if seed is None else seed
  transform = ExampleTransform(config)  # validates the latent config before any reading

  source = grain.sources.ArrayRecordDataSource(files)
  num_records = len(source)
  if num_records == 0:
    raise ValueError(f"make_loader: the {len(files)} file(s) ({files[0]}, ...) hold no records")
  # Mix the seed so that seed s + 1 is not seed s shifted by one epoch (grain adds the epoch).
  shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
  ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat(num_epochs)
  if shard_count > 1:
    # Every host makes the same number of steps: the same global batches, its rows of each.
    left = (num_records * num_epochs) % d.batch_size if num_epochs is not None else 0
    if left:
      logging.warning("loader: %d records x %d epoch(s) leave %d record(s) short of a last global "
                      "batch of %d; no host reads them", num_records, num_epochs, left,
                      d.batch_size)
    ds = _HostRows(ds, d.batch_size, shard_index, shard_count)
  if start_batch:
    ds = ds[start_batch * per_host_batch:]
  ds = ds.map(transform)
  read_options = grain.ReadOptions(
      num_threads=_READ_THREADS, prefetch_buffer_size=max(1, d.prefetch) * per_host_batch)
  it_ds = _BatchIterDataset(ds.to_iter_dataset(read_options), per_host_batch)
  if d.num_workers > 0:
    # Grain's worker processes read absl flags; outside an absl app (tests, notebooks) they would
    # fail on unparsed flags, so take the defaults there.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=d.num_workers, per_worker_buffer_size=max(1, d.prefetch)))
  elif d.prefetch > 0:
    it_ds = grain.experimental.ThreadPrefetchIterDataset(it_ds, prefetch_buffer_size=d.prefetch)
  return iter(it_ds)
