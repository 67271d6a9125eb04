"""Media I/O: mp4 (H.264 + AAC) and wav writing, decoding and probing through ffmpeg.

The ffmpeg binary comes from imageio-ffmpeg, so nothing outside pip is needed. ffmpeg runs as a
subprocess with an argument list (never a shell); a non-zero exit raises `MediaError` with the
tail of ffmpeg's log. Paths reach ffmpeg as `file:<absolute path>`, so names with spaces,
unicode, a leading dash or a colon are read as plain files.

Shapes follow docs/architecture.md: video uint8 [T, H, W, 3], audio float [S] in [-1, 1].

16-bit PCM, both ways: sample k <-> k / 32768, the convention of ffmpeg, soundfile and librosa,
so `read_wav` and `read_audio` give the same floats for one file. Writing clips to [-1, 1]
first; +1.0 becomes 32767 (the largest int16, never wrapping to -32768) and -1.0 becomes
-32768. Every k / 32768 survives write_wav -> read_wav exactly.
"""

from __future__ import annotations

import fractions
import os
import re
import subprocess
import tempfile
import wave
from typing import Any

import numpy as np

_STDERR_TAIL = 2000  # characters of ffmpeg's log kept in error messages


class MediaError(RuntimeError):
  """ffmpeg failed, or a file does not hold what was asked of it."""


def ffmpeg_exe() -> str:
  import imageio_ffmpeg  # pylint: disable=g-import-not-at-top  (only media code needs it)
  return imageio_ffmpeg.get_ffmpeg_exe()


def _file_arg(path: str | os.PathLike) -> str:
  return "file:" + os.path.abspath(os.fspath(path))


def _run_ffmpeg(args: list[str], *, what: str, stdin: bytes | None = None,
                stream: str | None = None) -> tuple[bytes, str]:
  """Runs ffmpeg with `args`; returns (stdout bytes, stderr text); raises MediaError on failure.

  `stream` ("video"/"audio") names the stream the args map, so a file without one gets a plain
  "has no audio stream" error instead of ffmpeg's log.
  """
  cmd = [ffmpeg_exe(), "-hide_banner", "-nostats", "-y", *args]
  if stdin is None:
    cmd.insert(1, "-nostdin")  # ffmpeg would otherwise read keystrokes from our terminal
  proc = subprocess.run(cmd, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        check=False)
  log = proc.stderr.decode("utf-8", errors="replace")
  if proc.returncode != 0 and stream is not None and "matches no streams" in log:
    raise MediaError(f"{what}: the file has no {stream} stream")
  if proc.returncode != 0:
    raise MediaError(f"{what}: ffmpeg exited with code {proc.returncode}; "
                     f"log tail:\n{log[-_STDERR_TAIL:]}")
  return proc.stdout, log


# ---------------------------------------------------------------------------------------------
# Validation


def _check_video(video: Any) -> np.ndarray:
  video = np.asarray(video)
  if video.dtype != np.uint8:
    raise ValueError(f"video: dtype must be uint8 (values 0..255), got {video.dtype}")
  if video.ndim != 4:
    raise ValueError(f"video: must have rank 4 [T, H, W, 3], got shape {video.shape}")
  if video.shape[-1] != 3:
    raise ValueError(f"video: last axis must be 3 RGB channels, got shape {video.shape}")
  if min(video.shape[:3]) < 1:
    raise ValueError(f"video: T, H and W must all be >= 1, got shape {video.shape}")
  return np.ascontiguousarray(video)


def _check_positive(name: str, value: Any) -> float:
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name}: must be a positive number, got {value!r}") from None
  if not np.isfinite(value) or value <= 0:
    raise ValueError(f"{name}: must be a positive finite number, got {value}")
  return value


def _check_sample_rate(sample_rate: Any) -> int:
  if isinstance(sample_rate, bool) or int(_check_positive("sample_rate", sample_rate)) != float(
      sample_rate):
    raise ValueError(f"sample_rate: must be a positive integer (Hz), got {sample_rate!r}")
  return int(sample_rate)


def _check_audio(audio: Any) -> np.ndarray:
  audio = np.asarray(audio)
  if audio.ndim != 1:
    raise ValueError(f"audio: must be mono with rank 1 [S], got shape {audio.shape}")
  if not np.issubdtype(audio.dtype, np.floating):
    raise ValueError(f"audio: dtype must be floating point with values in [-1, 1], "
                     f"got {audio.dtype}")
  if not np.all(np.isfinite(audio)):
    raise ValueError("audio: contains NaN or infinite samples")
  return audio


# ---------------------------------------------------------------------------------------------
# Writing


PCM_SCALE = 32768.0  # int16 sample k is the float k / PCM_SCALE (see the module docstring)


def to_pcm16(audio: np.ndarray) -> np.ndarray:
  """Float samples -> little-endian int16: clipped to [-1, 1], scaled by 32768, rounded to the
  nearest (ties to even), and +1.0 (32768) held at 32767."""
  scaled = np.round(np.clip(np.asarray(audio, np.float64), -1.0, 1.0) * PCM_SCALE)
  return np.clip(scaled, -32768, 32767).astype("<i2")


def write_wav(path: str | os.PathLike, audio: Any, sample_rate: int) -> None:
  """Writes mono float audio [S] (clipped to [-1, 1]) as 16-bit PCM wav (k / 32768 -> k)."""
  audio = _check_audio(audio)
  sample_rate = _check_sample_rate(sample_rate)
  pcm = to_pcm16(audio)
  with wave.open(os.fspath(path), "wb") as f:
    f.setnchannels(1)
    f.setsampwidth(2)
    f.setframerate(sample_rate)
    f.writeframes(pcm.tobytes())


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
  """Reads a 16-bit PCM wav -> (float32 [S] or [S, C] in [-1, 1), sample_rate); k -> k / 32768."""
  with wave.open(os.fspath(path), "rb") as f:
    if f.getsampwidth() != 2:
      raise MediaError(f"{path}: read_wav reads 16-bit PCM only, got {8 * f.getsampwidth()}-bit;"
                       " use read_audio for other formats")
    channels, rate = f.getnchannels(), f.getframerate()
    pcm = np.frombuffer(f.readframes(f.getnframes()), "<i2")
  audio = pcm.astype(np.float32) / np.float32(PCM_SCALE)
  return (audio if channels == 1 else audio.reshape(-1, channels)), rate


def _rate_arg(fps: float) -> str:
  """fps as an exact ffmpeg rational: 8 -> '8/1', 29.97 -> '2997/100'."""
  frac = fractions.Fraction(fps).limit_denominator(100_000)
  return f"{frac.numerator}/{frac.denominator}"


def write_mp4(path: str | os.PathLike, video: Any, fps: float, audio: Any | None = None,
              sample_rate: int | None = None, *, scale: int = 1, crf: int = 14,
              audio_bitrate: str = "128k") -> None:
  """Writes an H.264 (+ AAC) mp4 whose streams both last T / fps seconds.

  Args:
    path: output file; written to a temporary name next to it and renamed when complete.
    video: uint8 [T, H, W, 3] RGB frames.
    fps: frames per second (> 0).
    audio: mono float [S] in [-1, 1] (clipped), or None for a video-only file. It is cut or
      zero-padded to round(T / fps * sample_rate) samples so both streams end together.
    sample_rate: audio sample rate in Hz; required with audio.
    scale: integer nearest-neighbour upscale, so that a 32x32 sample is watchable (8 -> 256x256).
      An odd scaled size gets one black row/column (H.264 4:2:0 needs even sizes), which
      read_video then returns too.
    crf: x264 quality (lower is better); the low default keeps tiny frames from smearing.
    audio_bitrate: AAC bitrate.
  """
  video = _check_video(video)
  fps = _check_positive("fps", fps)
  if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
    raise ValueError(f"scale: must be an integer >= 1, got {scale!r}")
  if audio is not None:
    audio = _check_audio(audio)
    if sample_rate is None:
      raise ValueError("sample_rate: required when audio is given")
    sample_rate = _check_sample_rate(sample_rate)
    num_samples = int(round(video.shape[0] / fps * sample_rate))
    audio = np.pad(audio[:num_samples], (0, max(0, num_samples - len(audio))))

  _, height, width, _ = video.shape
  filters = []
  if scale > 1:
    filters.append(f"scale=iw*{scale}:ih*{scale}:flags=neighbor")
  if (height * scale) % 2 or (width * scale) % 2:
    # yuv420p needs even sizes: one black column/row on the right/bottom.
    filters.append("pad=ceil(iw/2)*2:ceil(ih/2)*2")
  # Convert and tag as BT.709 (limited range), which players assume for web video, so colours
  # look the same in a browser as in our own decoder.
  filters += ["scale=out_color_matrix=bt709:out_range=tv", "format=yuv420p",
              "setparams=colorspace=bt709:color_primaries=bt709:color_trc=bt709:range=tv"]

  path = os.path.abspath(os.fspath(path))
  directory = os.path.dirname(path)
  with tempfile.TemporaryDirectory(prefix=".avgen_media_", dir=directory) as tmp:
    args = ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}",
            "-framerate", _rate_arg(fps), "-i", "pipe:0"]
    if audio is not None:
      wav_path = os.path.join(tmp, "audio.wav")
      write_wav(wav_path, audio, sample_rate)
      args += ["-i", _file_arg(wav_path)]
    args += ["-map", "0:v:0", "-vf", ",".join(filters), "-c:v", "libx264", "-preset", "medium",
             "-crf", str(int(crf)), "-pix_fmt", "yuv420p", "-fps_mode", "passthrough"]
    if audio is not None:
      args += ["-map", "1:a:0", "-c:a", "aac", "-b:a", audio_bitrate]
    tmp_out = os.path.join(tmp, "out.mp4")
    args += ["-movflags", "+faststart", "-f", "mp4", _file_arg(tmp_out)]
    _run_ffmpeg(args, what=f"write_mp4 {path}", stdin=video.tobytes())
    os.replace(tmp_out, path)


# ---------------------------------------------------------------------------------------------
# Reading and probing

_STREAM_RE = re.compile(r"^\s*Stream #(\d+):(\d+)[^:]*: (Video|Audio): (.*)$", re.MULTILINE)


def _section(log: str, header: str) -> str:
  """The part of an ffmpeg log that describes `Input #0` or `Output #0`."""
  start = log.find(header)
  if start < 0:
    return ""
  ends = [i for i in (log.find(m, start + 1) for m in ("Input #", "Output #", "Stream mapping:"))
          if i > 0]
  return log[start:min(ends, default=len(log))]


def _streams(section: str) -> dict[str, str]:
  """First video and audio stream descriptions ('h264 (High) ..., 256x256, ...') of a section."""
  found = {}
  for match in _STREAM_RE.finditer(section):
    found.setdefault(match.group(3).lower(), match.group(4))
  return found


def _codec(desc: str) -> str:
  return desc.split()[0].rstrip(",")


def _size(desc: str) -> tuple[int, int]:
  match = re.search(r", (\d+)x(\d+)(?=[ ,\[]|$)", desc)
  if not match:
    raise MediaError(f"cannot read the frame size from ffmpeg's stream line: {desc!r}")
  return int(match.group(1)), int(match.group(2))


def _nominal_fps(desc: str) -> float | None:
  for unit in ("fps", "tbr"):
    match = re.search(rf"([\d.]+)(k?) {unit}\b", desc)
    if match:
      return float(match.group(1)) * (1000 if match.group(2) else 1)
  return None


def _sample_rate(desc: str) -> int:
  match = re.search(r"(\d+) Hz", desc)
  if not match:
    raise MediaError(f"cannot read the sample rate from ffmpeg's stream line: {desc!r}")
  return int(match.group(1))


def _channels(desc: str) -> int:
  """Channel count from ffmpeg's layout name: mono, stereo, '5.1(side)', '3 channels', ..."""
  fields = [f.strip() for f in desc.split(",")]
  named = {"mono": 1, "stereo": 2, "downmix": 2, "quad": 4, "hexagonal": 6, "octagonal": 8,
           "hexadecagonal": 16, "binaural": 2, "cube": 8}
  for field in fields[2:]:
    layout = field.split("(")[0].strip()
    if layout in named:
      return named[layout]
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?", layout)
    if match:
      return sum(int(g) for g in match.groups() if g)
    match = re.fullmatch(r"(\d+) channels", layout)
    if match:
      return int(match.group(1))
  raise MediaError(f"cannot read the channel count from ffmpeg's stream line: {desc!r}")


def _container_duration(log: str) -> float | None:
  match = re.search(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?)", log)
  if not match:
    return None
  h, m, s = match.groups()
  return int(h) * 3600 + int(m) * 60 + float(s)


def probe(path: str | os.PathLike) -> dict[str, Any]:
  """Measures what a media file really holds by decoding all of its first video/audio stream.

  Frame and sample counts, timestamps and sizes come from ffmpeg's decoded output (one line per
  decoded frame), not from header fields, so a file whose header claims more than it holds is
  caught. Audio counts are after the decoder drops AAC priming (as players do).

  Returns a dict with: has_video, num_frames, fps (num_frames / video_duration), nominal_fps
  (from the header), video_duration (seconds from the first frame's start to the last's end),
  width, height, video_codec, pix_fmt; has_audio, audio_codec, sample_rate, audio_channels,
  num_samples (decoded, per channel), audio_duration (num_samples / sample_rate); and duration
  (the container's). Keys of a missing stream are None.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"probe: no such file: {os.fspath(path)!r}")
  args = ["-i", _file_arg(path), "-map", "0:v:0?", "-map", "0:a:0?", "-fps_mode", "passthrough",
          "-pix_fmt", "gray", "-ac", "1", "-f", "framecrc", "pipe:1"]
  out, log = _run_ffmpeg(args, what=f"probe {path}")
  streams = _streams(_section(log, "Input #0"))
  info: dict[str, Any] = {
      "has_video": "video" in streams, "has_audio": "audio" in streams,
      "duration": _container_duration(log),
      "num_frames": None, "fps": None, "nominal_fps": None, "video_duration": None,
      "width": None, "height": None, "video_codec": None, "pix_fmt": None,
      "audio_codec": None, "sample_rate": None, "audio_channels": None, "num_samples": None,
      "audio_duration": None,
  }
  if not streams:
    raise MediaError(f"probe {path}: no video or audio stream found")

  # framecrc: '#tb 0: 1/8', '#media_type 0: video', then 'stream, dts, pts, duration, size, crc'.
  text = out.decode("ascii", errors="replace")
  kinds = dict(re.findall(r"^#media_type (\d+): (\w+)", text, re.MULTILINE))
  time_bases = {k: fractions.Fraction(int(n), int(d))
                for k, n, d in re.findall(r"^#tb (\d+): (\d+)/(\d+)", text, re.MULTILINE)}
  rows: dict[str, list[tuple[int, int, int]]] = {k: [] for k in kinds}
  for line in text.splitlines():
    if line and not line.startswith("#"):
      stream, _, pts, duration, size, _ = (p.strip() for p in line.split(","))
      rows[stream].append((int(pts), int(duration), int(size)))

  for stream, kind in kinds.items():
    frames = rows[stream]
    if kind == "video":
      desc = streams["video"]
      info["video_codec"] = _codec(desc)
      info["pix_fmt"] = desc.split(",")[1].split("(")[0].strip() if "," in desc else None
      info["width"], info["height"] = _size(desc)
      info["nominal_fps"] = _nominal_fps(desc)
      info["num_frames"] = len(frames)
      if frames:
        start = min(p for p, _, _ in frames)
        end = max(p + d for p, d, _ in frames)
        info["video_duration"] = float((end - start) * time_bases[stream])
        if info["video_duration"] > 0:
          info["fps"] = len(frames) / info["video_duration"]
    elif kind == "audio":
      desc = streams["audio"]
      info["audio_codec"] = _codec(desc)
      info["sample_rate"] = _sample_rate(desc)
      info["audio_channels"] = _channels(desc)
      info["num_samples"] = sum(size for _, _, size in frames) // 2  # mono s16
      info["audio_duration"] = info["num_samples"] / info["sample_rate"]
  return info


_HEADER_TIMEOUT_S = 60.0


def probe_header(path: str | os.PathLike, *, timeout: float = _HEADER_TIMEOUT_S) -> dict[str, Any]:
  """What a file's header says, read without decoding (fast; `probe` decodes to measure).

  imageio-ffmpeg ships ffmpeg but not ffprobe, so this parses the summary that `ffmpeg -i`
  prints. Header values may be wrong (a truncated file keeps its claimed duration); decoding
  tells the truth.

  Returns a dict with `container` (ffmpeg's format names), `duration` (seconds, or None),
  `tags` (format-level metadata: lower-case keys, multi-line values joined by newlines) and
  `video` / `audio`: the first stream of each kind, or None. Cover art (an attached picture) is
  not taken for video. `video`: index (among the file's video streams, for `-map 0:v:N`), codec,
  width, height (as coded), fps (nominal, or None), sar (pixel aspect ratio as a float),
  rotation (degrees from the display matrix). `audio`: index, codec, sample_rate, channels.

  Raises MediaError when ffmpeg cannot read the file as media (or takes over `timeout` seconds).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"probe_header: no such file: {os.fspath(path)!r}")
  cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", _file_arg(path)]
  try:
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    raise MediaError(f"probe_header {path}: ffmpeg took over {timeout} s to read the header"
                     ) from None
  log = proc.stderr.decode("utf-8", errors="replace")
  section = _section(log, "Input #0")
  if not section:
    # ffmpeg exits 1 even on success here (no output given), so its log decides.
    # Object addresses ('[in#0 @ 0x55...]') change from run to run; they are dropped so the
    # same file always gives the same message.
    errors = [re.sub(r" @ 0x[0-9a-f]+", "", line.strip()) for line in log.splitlines()
              if line.strip()]
    raise MediaError(f"probe_header {path}: ffmpeg cannot read it as media: "
                     f"{' / '.join(errors)[:_STDERR_TAIL]}")
  header = section.splitlines()[0]
  match = re.match(r"Input #0, (.*), from ", header)
  info: dict[str, Any] = {
      "container": match.group(1) if match else None,
      "duration": _container_duration(section),
      "tags": _format_tags(section),
      "video": None,
      "audio": None,
  }
  video_ordinal = audio_ordinal = 0
  for kind, desc, block in _stream_blocks(section):
    if kind == "video":
      if info["video"] is None and "(attached pic)" not in desc:
        width, height = _size(desc)
        sar = re.search(r"\[SAR (\d+):(\d+) ", desc)
        rotation = re.search(r"rotation of (-?[\d.]+) degrees", block)
        info["video"] = {
            "index": video_ordinal, "codec": _codec(desc), "width": width, "height": height,
            "fps": _nominal_fps(desc),
            "sar": (int(sar.group(1)) / int(sar.group(2))
                    if sar and int(sar.group(1)) and int(sar.group(2)) else 1.0),
            "rotation": float(rotation.group(1)) if rotation else 0.0,
        }
      video_ordinal += 1
    else:
      if info["audio"] is None:
        info["audio"] = {"index": audio_ordinal, "codec": _codec(desc),
                         "sample_rate": _sample_rate(desc), "channels": _channels(desc)}
      audio_ordinal += 1
  return info


def _stream_blocks(section: str) -> list[tuple[str, str, str]]:
  """(kind, stream line description, the stream's indented block) for video/audio streams."""
  matches = list(_STREAM_RE.finditer(section))
  blocks = []
  for i, match in enumerate(matches):
    end = matches[i + 1].start() if i + 1 < len(matches) else len(section)
    blocks.append((match.group(3).lower(), match.group(4), section[match.end():end]))
  return blocks


def _format_tags(section: str) -> dict[str, str]:
  """The container's `Metadata:` block (the one before `Duration:`), as {key: value}."""
  lines = section.splitlines()
  tags: dict[str, str] = {}
  in_block, last = False, None
  for line in lines[1:]:
    if line.startswith("  Duration:") or line.lstrip().startswith("Stream #"):
      break
    if line.strip() == "Metadata:" and line.startswith("  ") and not line.startswith("   "):
      in_block = True
      continue
    if not in_block:
      continue
    key, sep, value = line.partition(":")
    if not sep:
      continue
    key = key.strip().lower()
    if key:
      tags[key] = value.strip()
      last = key
    elif last is not None:  # ffmpeg prints each further line of a value as '   : text'
      tags[last] += "\n" + value.strip()
  return tags


def _window_args(start: float, duration: float | None) -> list[str]:
  args = []
  if start:
    if start < 0:
      raise ValueError(f"start: must be >= 0 seconds, got {start}")
    args += ["-ss", repr(float(start))]
  if duration is not None:
    args += ["-t", repr(_check_positive("duration", duration))]
  return args


def read_video(path: str | os.PathLike, *, fps: float | None = None,
               size: tuple[int, int] | None = None, crop: bool = False, start: float = 0.0,
               duration: float | None = None) -> tuple[np.ndarray, float]:
  """Decodes the first video stream -> (uint8 [T, H, W, 3] RGB, fps).

  Args:
    path: any file ffmpeg reads.
    fps: resample to this constant frame rate (frames are dropped or repeated); None keeps the
      file's frames as they are and returns its nominal rate.
    size: (height, width) to resize to (area filter). The aspect ratio is not kept unless `crop`.
    crop: with size, first scale so that the frame covers (height, width), then centre-crop.
    start: seconds to skip from the beginning.
    duration: seconds to read (None: to the end).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"read_video: no such file: {os.fspath(path)!r}")
  filters = []
  if fps is not None:
    fps = _check_positive("fps", fps)
    filters.append(f"fps={_rate_arg(fps)}")
  if size is not None:
    if len(size) != 2 or min(int(s) for s in size) < 1:
      raise ValueError(f"size: must be (height, width) with both >= 1, got {size!r}")
    h, w = (int(s) for s in size)
    if crop:
      filters += [f"scale={w}:{h}:force_original_aspect_ratio=increase:flags=area",
                  f"crop={w}:{h}"]
    else:
      filters.append(f"scale={w}:{h}:flags=area")
  elif crop:
    raise ValueError("crop: needs size=(height, width)")
  args = [*_window_args(start, None), "-i", _file_arg(path), *_window_args(0.0, duration),
          "-map", "0:v:0"]
  if filters:
    args += ["-vf", ",".join(filters)]
  if fps is None:
    args += ["-fps_mode", "passthrough"]
  args += ["-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
  out, log = _run_ffmpeg(args, what=f"read_video {path}", stream="video")
  width, height = _size(_streams(_section(log, "Output #0"))["video"])
  frames = np.frombuffer(out, np.uint8)
  if frames.size % (height * width * 3):
    raise MediaError(f"read_video {path}: decoded {frames.size} bytes, not a whole number of "
                     f"{width}x{height} RGB frames")
  if fps is None:
    fps = _nominal_fps(_streams(_section(log, "Input #0"))["video"])
  return frames.reshape(-1, height, width, 3), fps


def read_audio(path: str | os.PathLike, *, sample_rate: int, mono: bool = True,
               start: float = 0.0, duration: float | None = None) -> np.ndarray:
  """Decodes the first audio stream, resampled by ffmpeg to `sample_rate`.

  Returns float32 [S] (mono=True: the mean of the channels) or [S, C] (mono=False).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"read_audio: no such file: {os.fspath(path)!r}")
  sample_rate = _check_sample_rate(sample_rate)
  args = [*_window_args(start, None), "-i", _file_arg(path), *_window_args(0.0, duration),
          "-map", "0:a:0", "-ar", str(sample_rate), "-f", "f32le", "-c:a", "pcm_f32le", "pipe:1"]
  out, log = _run_ffmpeg(args, what=f"read_audio {path}", stream="audio")
  channels = _channels(_streams(_section(log, "Output #0"))["audio"])
  audio = np.frombuffer(out, "<f4").reshape(-1, channels)
  # A plain mean, not ffmpeg's -ac 1 downmix, which scales each channel by 1/sqrt(2) and so
  # makes stereo louder than its channels.
  return audio.mean(axis=1, dtype=np.float32) if mono else audio.astype(np.float32)
