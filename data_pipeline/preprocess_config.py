"""Settings of the real-video ingestion: target clip format, filter thresholds, ffmpeg threads.

A run reads them from a JSON file (`--config FILE`, an object holding any subset of the fields
below; a field it leaves out keeps its default) and saves the full set as
`OUT/preprocess_config.json`, so a later run on the same OUT must use the same values.

JSON rather than an ml_collections Python file: the settings are plain numbers, travel to Beam
workers as data, and the copy saved beside the manifest is the exact record of how the data was
made. Set a threshold to its permissive end (e.g. `min_blur: 0`) to switch a filter off.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from data_pipeline import storage

CONFIG_FILE = "preprocess_config.json"


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """All settings of a run. The defaults are the original spec's (512x512 @ 8 fps, 16 kHz)."""
  # ---- target clip format (what the loader's config.data must match)
  num_frames: int = 16  # frames per clip; clip length = num_frames / fps seconds
  fps: float = 8.0
  height: int = 512
  width: int = 512
  sample_rate: int = 16000  # mono
  max_clips_per_input: int = 0  # 0: every whole clip; N: the first N clips (long inputs)

  # ---- input rules (read from the header, before decoding)
  min_resolution: int = 480  # the shorter side of the coded frame, in pixels ("480p")
  min_fps: float = 24.0  # the stream's nominal (average) frame rate

  # ---- clip rules (measured on each normalized clip; each score is stored with the clip)
  min_blur: float = 100.0  # variance of the Laplacian of luma (0..255), median over frames
  max_scene_cuts: int = 0  # cuts inside a clip
  scene_threshold: float = 27.0  # scenedetect ContentDetector threshold (HSV change, 0..255)
  min_snr_db: float = 10.0  # a clip passes with SNR > min_snr_db
  max_silence_ratio: float = 0.5  # a clip passes with a silent share < max_silence_ratio
  silence_db: float = -50.0  # a 20 ms frame below this RMS level (dBFS) is silent
  max_clipping_ratio: float = 0.01  # share of samples at or above clipping_level
  # |sample| that counts as clipped (full scale = 1). Below 1 because lossy codecs move plateaus:
  # audio hard-clipped at full scale decodes from AAC as a plateau near 0.95 with ringing above.
  clipping_level: float = 0.94
  max_decode_errors: int = 0  # ffmpeg error lines while decoding (corrupt or truncated data)

  # ---- execution
  ffmpeg_threads: int = 1  # per ffmpeg process; parallelism comes from --num-workers
  # Limits on the ffmpeg processes of one input, in wall-clock seconds: an input that hangs
  # ffmpeg (a playlist naming a FIFO or a stalled network file) is killed at the limit and
  # rejected with rule `timeout`. The header probe gets probe_timeout_s; the decode (both
  # ffmpeg processes, and the scoring of the clips in between, from start to end) gets
  # decode_timeout_s + decode_timeout_per_second x the seconds of media to decode (the header's
  # duration, at most max_clips_per_input clips; 0 when the header has no duration).
  probe_timeout_s: float = 60.0
  decode_timeout_s: float = 120.0
  decode_timeout_per_second: float = 4.0  # allows decoding 4x slower than real time

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      kind = int if field.type == "int" else float
      if isinstance(value, bool) or not isinstance(value, (int, float)) or (
          kind is int and not isinstance(value, int)):
        raise ValueError(f"preprocess config: {field.name} must be {kind.__name__}, got {value!r}")
      if not math.isfinite(value):
        raise ValueError(f"preprocess config: {field.name} must be finite, got {value!r}")
    positive = ("num_frames", "fps", "height", "width", "sample_rate", "ffmpeg_threads",
                "probe_timeout_s", "decode_timeout_s")
    for name in positive:
      if getattr(self, name) <= 0:
        raise ValueError(f"preprocess config: {name} must be > 0, got {getattr(self, name)!r}")
    non_negative = ("max_clips_per_input", "min_resolution", "min_fps", "min_blur",
                    "max_scene_cuts", "scene_threshold", "max_decode_errors",
                    "decode_timeout_per_second")
    for name in non_negative:
      if getattr(self, name) < 0:
        raise ValueError(f"preprocess config: {name} must be >= 0, got {getattr(self, name)!r}")
    for name in ("max_silence_ratio", "max_clipping_ratio"):
      if not 0 <= getattr(self, name) <= 1:
        raise ValueError(f"preprocess config: {name} must be in [0, 1], got "
                         f"{getattr(self, name)!r}")
    if not 0 < self.clipping_level <= 1:
      raise ValueError(f"preprocess config: clipping_level must be in (0, 1], got "
                       f"{self.clipping_level!r}")
    if self.silence_db >= 0:
      raise ValueError(f"preprocess config: silence_db must be < 0 dBFS, got {self.silence_db!r}")
    if self.height % 2 or self.width % 2:
      raise ValueError(f"preprocess config: height and width must be even (H.264 4:2:0 sources "
                       f"crop and scale on even sizes), got {self.height}x{self.width}")
    samples = self.num_frames * self.sample_rate / self.fps
    if abs(samples - round(samples)) > 1e-6:
      raise ValueError(
          f"preprocess config: a clip of num_frames / fps = {self.num_frames} / {self.fps} s must "
          f"hold a whole number of samples at {self.sample_rate} Hz, got {samples}")

  @property
  def clip_seconds(self) -> float:
    return self.num_frames / self.fps

  @property
  def samples_per_clip(self) -> int:
    return int(round(self.num_frames * self.sample_rate / self.fps))

  def decode_seconds(self, duration: float | None) -> float:
    """Seconds of media a decode covers, by the header's `duration` (None: unknown, 0)."""
    seconds = max(duration or 0.0, 0.0)
    if self.max_clips_per_input:
      seconds = min(seconds, self.max_clips_per_input * self.clip_seconds)
    return seconds

  def decode_timeout(self, duration: float | None) -> float:
    """Seconds allowed to decode and judge an input whose header claims `duration` seconds."""
    return self.decode_timeout_s + self.decode_timeout_per_second * self.decode_seconds(duration)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: dict[str, Any], *, where: str = "preprocess config"
                ) -> "PreprocessConfig":
    if not isinstance(values, dict):
      raise ValueError(f"{where}: must be a JSON object of settings, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"{where}: unknown setting(s) {unknown}; known: {sorted(known)}")
    try:
      return cls(**values)
    except ValueError as e:
      raise ValueError(f"{where}: {e}") from None

  @classmethod
  def from_json(cls, path: str) -> "PreprocessConfig":
    try:
      with open(path, encoding="utf-8") as f:
        values = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"--config {path!r}: cannot read it as JSON: {e}") from None
    return cls.from_dict(values, where=f"--config {path!r}")


def check_saved_config(output_dir: str, config: PreprocessConfig) -> None:
  """Saves `config` in `output_dir`, or checks that it equals the one saved by an earlier run.

  Mixing settings in one output would make the manifest's decisions disagree with each other.
  A setting missing from the saved file (one added to the pipeline after that run) counts as
  its default. `output_dir` may be a URL (`storage`).
  """
  path = storage.join(output_dir, CONFIG_FILE)
  if storage.exists(path):
    saved = json.loads(storage.read_bytes(path))
    current = config.to_dict()
    defaults = PreprocessConfig().to_dict()
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    changed.update({k: (v, None) for k, v in saved.items() if k not in current})
    if changed:
      detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
      raise ValueError(
          f"output dir {output_dir!r} was made with other settings ({detail}); use a new "
          f"--output-dir, or the saved {CONFIG_FILE} as --config")
    return
  storage.makedirs(output_dir)
  storage.write_bytes(path, (json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
                             ).encode())
