"""Decodes an input into consecutive normalized clips, streaming (memory holds one clip).

Two ffmpeg processes read the file, one per stream, each writing raw samples to a pipe:

- video: pixel aspect ratio made square (when the header says it is not), then resampled to a
  constant `fps`: frame n is the source frame on screen at time (n + 0.5) / fps, the middle of
  the interval it stands for (the convention of docs/architecture.md), with the grid anchored at
  the file's start so that video and audio share time 0; then centre-cropped to the target
  aspect ratio (the largest centred window: nothing is squeezed, no bars are added) and scaled
  to height x width (area averaging when shrinking, bicubic when enlarging). Rotated phone
  videos are turned upright first (ffmpeg applies the display matrix).
- audio: every source channel resampled to `sample_rate`, with silence padded in where the
  stream starts late or has gaps (`aresample=async=1:first_pts=0`), so sample s is at time
  s / sample_rate.

Clip k covers [k * L, (k + 1) * L) seconds with L = num_frames / fps; a last part shorter than L
is not a clip (its length is reported). ffmpeg logs at the error level to a file; every line
there counts as a decode error (corrupt or truncated data).

Each ffmpeg runs in a process group of its own, and is ended by signalling that group: with
`timeout_s`, a watchdog kills both (SIGKILL) once that many seconds have passed since they
started, whatever they are doing; the reads then end and `timed_out` is set. SIGKILL, because an
ffmpeg blocked opening a FIFO ignores SIGTERM (its handler restarts the call).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import signal
import subprocess
import tempfile
import threading
from typing import Any, Iterator

import numpy as np

from avgen.sample import media
from data_pipeline.preprocess_config import PreprocessConfig

# How long a stopped ffmpeg (SIGTERM) gets to exit before it is killed, and how long a killed one
# gets to be reaped (a process stuck in uninterruptible I/O cannot be; it is left behind, logged).
_TERM_GRACE_S = 5.0
_KILL_GRACE_S = 5.0


@dataclasses.dataclass
class Clip:
  index: int
  start: float  # seconds from the start of the file
  video: np.ndarray  # uint8 [T, H, W, 3]
  channels: np.ndarray  # float32 [S, C], all source channels at the target rate


def video_filter(header_video: dict[str, Any], config: PreprocessConfig) -> str:
  """The ffmpeg filter graph that normalizes the video stream (see the module docstring)."""
  w, h = config.width, config.height
  filters = []
  sar = header_video.get("sar", 1.0)
  if abs(sar - 1.0) > 1e-3:
    filters += ["scale=trunc(iw*sar/2)*2:ih", "setsar=1"]
  fps = media._rate_arg(config.fps)  # pylint: disable=protected-access
  filters += [
      # The fps filter keeps, for output frame n, the last source frame that starts before
      # (n + 0.5) / fps: the frame on screen in the middle of the interval frame n stands for.
      f"fps=fps={fps}:start_time=0",
      # Centre crop to the target aspect ratio (cheaper before scaling than after).
      f"crop=w='min(iw,ih*{w}/{h})':h='min(ih,iw*{h}/{w})'",
  ]
  display_w, display_h = header_video["width"] * sar, header_video["height"]
  if round(header_video.get("rotation", 0.0)) % 180:
    display_w, display_h = display_h, display_w
  shrinking = min(display_h, display_w * h / w) >= h  # the crop is at least the target size
  filters.append(f"scale={w}:{h}:flags={'area' if shrinking else 'bicubic'}")
  return ",".join(filters)


class ClipDecoder:
  """Iterates over an input's clips; `close()` (or the `with` block) stops ffmpeg and sets
  `errors` (decode error lines), `video_seconds` and `audio_seconds` (decoded, at the target
  rates) and `stopped_early` (True when decoding stopped before the file's end: at the clip
  limit, or when one stream ended while the other went on). With `timeout_s`, ffmpeg is killed
  that many seconds after the start and `timed_out` is True (the clips then end early).
  """

  def __init__(self, path: str, header: dict[str, Any], config: PreprocessConfig,
               timeout_s: float | None = None):
    self._config = config
    self.timeout_s = timeout_s
    self.timed_out = False
    self._lock = threading.Lock()
    self._closing = False
    self._timer: threading.Timer | None = None
    self._frames_read = 0
    self._samples_read = 0
    self._ended = False  # both streams read to their end
    self._stopped = False  # decoding stopped by us (a non-zero exit is then no error)
    self._log_limits: dict[str, int] = {}
    self.errors: list[str] = []
    self.video_seconds = 0.0
    self.audio_seconds = 0.0
    self.stopped_early = False
    self._frame_bytes = config.height * config.width * 3
    self._channels = header["audio"]["channels"]
    self._tmp = tempfile.TemporaryDirectory(prefix="avgen_decode_")
    threads = str(config.ffmpeg_threads)
    common = [media.ffmpeg_exe(), "-hide_banner", "-nostdin", "-nostats", "-v", "error",
              "-filter_threads", threads]
    src = media._file_arg(path)  # pylint: disable=protected-access
    video_cmd = [*common, "-threads", threads, "-i", src,
                 "-map", f"0:v:{header['video']['index']}", "-an", "-sn", "-dn",
                 "-vf", video_filter(header["video"], config), "-threads", threads,
                 "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
    audio_cmd = [*common, "-threads", threads, "-i", src,
                 "-map", f"0:a:{header['audio']['index']}", "-vn", "-sn", "-dn",
                 "-af", f"aresample={config.sample_rate}:async=1:first_pts=0",
                 "-ac", str(self._channels), "-f", "f32le", "-c:a", "pcm_f32le", "pipe:1"]
    self._procs: dict[str, subprocess.Popen] = {}
    self._logs: dict[str, Any] = {}
    try:
      for name, cmd in (("video", video_cmd), ("audio", audio_cmd)):
        self._logs[name] = open(os.path.join(self._tmp.name, f"{name}.log"), "w+b")
        self._procs[name] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                             stdout=subprocess.PIPE, stderr=self._logs[name],
                                             start_new_session=True)
      if timeout_s is not None:
        self._timer = threading.Timer(timeout_s, self._expire)
        self._timer.daemon = True
        self._timer.start()
    except BaseException:
      self.close()
      raise

  def __enter__(self) -> "ClipDecoder":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __iter__(self) -> Iterator[Clip]:
    c = self._config
    video_bytes = c.num_frames * self._frame_bytes
    audio_bytes = c.samples_per_clip * self._channels * 4
    index = 0
    while not c.max_clips_per_input or index < c.max_clips_per_input:
      video = self._read("video", video_bytes)
      audio = self._read("audio", audio_bytes)
      self._frames_read += len(video) // self._frame_bytes
      self._samples_read += len(audio) // (4 * self._channels)
      if len(video) < video_bytes or len(audio) < audio_bytes:
        if len(video) == video_bytes or len(audio) == audio_bytes:
          # One stream ended, the other goes on (audio much shorter than the video, say):
          # decoding the rest would make no clip.
          self.stopped_early = True
          self._stop()
        else:
          self._drain()
          self._ended = True
        return
      yield Clip(
          index=index,
          start=index * c.clip_seconds,
          video=np.frombuffer(video, np.uint8).reshape(c.num_frames, c.height, c.width, 3),
          channels=np.frombuffer(audio, "<f4").reshape(-1, self._channels).astype(np.float32),
      )
      index += 1
    # The clip limit is reached: whether more follows is one read away.
    more = self._read("video", 1) and self._read("audio", 1)
    self.stopped_early = bool(more)
    if more:
      self._stop()
    else:
      self._drain()
      self._ended = True

  def _read(self, name: str, size: int) -> bytes:
    stream = self._procs[name].stdout
    chunks, got = [], 0
    while got < size:
      chunk = stream.read(size - got)
      if not chunk:
        break
      chunks.append(chunk)
      got += len(chunk)
    return b"".join(chunks)

  def _drain(self) -> None:
    """Reads both streams to their end, counting what a partial last clip held."""
    for name, unit in (("video", self._frame_bytes), ("audio", 4 * self._channels)):
      rest = 0
      while True:
        chunk = self._procs[name].stdout.read(1 << 20)
        if not chunk:
          break
        rest += len(chunk)
      if name == "video":
        self._frames_read += rest // unit
      else:
        self._samples_read += rest // unit

  def _expire(self) -> None:
    """The watchdog: the time is up while decoding."""
    with self._lock:
      if self._closing or self._ended:
        return
      self.timed_out = True
      for proc in self._procs.values():
        _signal_group(proc, signal.SIGKILL)

  def _stop(self) -> None:
    if self._stopped:
      return
    self._stopped = True
    # What ffmpeg logs from here on is about being stopped (broken pipes), not about the data.
    self._log_limits = {name: os.fstat(log.fileno()).st_size for name, log in self._logs.items()}
    for proc in self._procs.values():
      _signal_group(proc, signal.SIGTERM)

  def close(self) -> None:
    with self._lock:
      self._closing = True
    if self._timer is not None:
      self._timer.cancel()
    if not self._procs and not self._logs:
      self._tmp.cleanup()
      return
    if not self._ended:
      self._stop()  # closed early (the clip limit, or an error upstream): decoding stops here
    for name, proc in self._procs.items():
      if proc.stdout is not None:
        proc.stdout.close()
      code = _reap(proc)
      if code is None:
        self.errors.append(f"{name} decoder: ffmpeg did not exit when killed")
      elif code != 0 and not self._stopped and not self.timed_out:
        self.errors.append(f"{name} decoder: ffmpeg exited with code {code}")
    for name, log in self._logs.items():
      log.seek(0)
      text = log.read(self._log_limits.get(name, -1)).decode("utf-8", errors="replace")
      for line in text.splitlines():
        if line.strip():
          self.errors.append(f"{name} decoder: {_strip_address(line.strip())}")
      log.close()
    self._procs, self._logs = {}, {}
    self._tmp.cleanup()
    self.video_seconds = self._frames_read / self._config.fps
    self.audio_seconds = self._samples_read / self._config.sample_rate


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
  """Signals the process group of `proc` (started with start_new_session=True).

  Not once `proc` is reaped: its group id could then name another process's group.
  """
  if proc.poll() is None:
    try:
      os.killpg(proc.pid, sig)
    except ProcessLookupError:
      pass


def _reap(proc: subprocess.Popen) -> int | None:
  """Waits for a signalled ffmpeg, killing its group if it outlives the grace period."""
  try:
    return proc.wait(timeout=_TERM_GRACE_S)
  except subprocess.TimeoutExpired:
    _signal_group(proc, signal.SIGKILL)
  try:
    return proc.wait(timeout=_KILL_GRACE_S)
  except subprocess.TimeoutExpired:
    logging.error("ffmpeg (pid %d) survived SIGKILL (uninterruptible I/O?); left behind",
                  proc.pid)
    return None


def _strip_address(line: str) -> str:
  """'[h264 @ 0x55d...] msg' -> '[h264] msg': the same file gives the same messages every run."""
  return re.sub(r" @ 0x[0-9a-f]+", "", line)
