"""TensorBoard events (tensorboardX: no TensorFlow needed) and the progress line."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
from tensorboardX import SummaryWriter
from tensorboardX.proto.summary_pb2 import Summary

_log = logging.getLogger(__name__)


class Writer:
  """Writes scalars, images, animated clips and audio; a no-op on processes other than 0."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard")) if enabled else None

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    for name, value in values.items():
      self._tb.add_scalar(name, float(value), step)

  def image(self, step: int, tag: str, image: np.ndarray) -> None:
    if self.enabled:
      self._tb.add_image(tag, np.asarray(image), step, dataformats="HWC")

  def clip(self, step: int, tag: str, gif: bytes, height: int, width: int) -> None:
    """An animated GIF in the images dashboard (TensorBoard plays GIFs there)."""
    if not self.enabled:
      return
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif)
    self._tb.file_writer.add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

  def audio(self, step: int, tag: str, wave: np.ndarray, sample_rate: int) -> None:
    if self.enabled:
      self._tb.add_audio(tag, np.clip(np.asarray(wave, np.float32), -1, 1), step, sample_rate=sample_rate)

  def text(self, step: int, tag: str, text: str) -> None:
    if self.enabled:
      self._tb.add_text(tag, text, step)

  def flush(self) -> None:
    if self.enabled:
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._tb.close()


class Progress:
  """'step 120/1200 (10%) | 3.1 steps/s | ETA 5m48s | loss 0.412' over a sliding window."""

  def __init__(self, total_steps: int, first_step: int):
    self.total = total_steps
    self._marks = [(time.perf_counter(), first_step)]

  def line(self, step: int, metrics: dict[str, float]) -> str:
    now = time.perf_counter()
    self._marks.append((now, step))
    self._marks = self._marks[-10:]
    (t0, s0), (t1, s1) = self._marks[0], self._marks[-1]
    rate = (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else 0.0
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    shown = " | ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    return (f"step {step}/{self.total} ({100 * step / self.total:.0f}%) | {rate:.2f} steps/s | "
            f"ETA {_duration(eta)} | {shown}")

  def steps_per_second(self) -> float:
    (t0, s0), (t1, s1) = self._marks[0], self._marks[-1]
    return (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0


def _duration(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
