"""Test media made by ffmpeg from its lavfi sources: small, short, with known defects.

Video: `testsrc2` (sharp, moving); `blur` adds a box blur; `cut_every` inverts the picture every
that many seconds (hard cuts: hue, saturation and lightness all jump); `vfr` drops two of every
three frames in the second half, so frame durations vary. Audio: `events` (a 660 Hz beep of
0.35 s every 0.5 s at 0.3 amplitude: sound that comes and goes), `tone` (steady 440 Hz),
`sparse` (one beep of 0.2 s per second: mostly digital silence), `silence` or None (no audio
stream); `noise` adds white noise at that amplitude (SNR control); `clip_gain` amplifies by that
factor and saturates at full scale (hard clipping); `audio_seconds` makes the sound end early.
"""

from __future__ import annotations

import os
import subprocess

import numpy as np

from avgen.sample import media

# lavfi's sine has amplitude 1/8: volume 2.4 makes it 0.3.
_EVENTS = "sine=frequency=660:sample_rate={sr},volume=2.4*lt(mod(t\\,0.5)\\,0.35):eval=frame"
_SPARSE = "sine=frequency=660:sample_rate={sr},volume=2.4*lt(mod(t\\,1)\\,0.2):eval=frame"
_TONE = "sine=frequency=440:sample_rate={sr},volume=2.4"
_SILENCE = "anullsrc=channel_layout=mono:sample_rate={sr}"
_LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}


def ffmpeg(args: list[str]) -> None:
  cmd = [media.ffmpeg_exe(), "-hide_banner", "-nostdin", "-nostats", "-v", "error", "-y", *args]
  proc = subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  if proc.returncode:
    raise RuntimeError(f"ffmpeg {args}: {proc.stderr.decode(errors='replace')[-1500:]}")


def make_video(path, *, seconds: float = 2.0, size: tuple[int, int] = (64, 48), fps: float = 24,
               blur: int = 0, cut_every: float | None = None, vfr: bool = False,
               audio: str | None = "events", noise: float = 0.0, clip_gain: float = 0.0,
               sample_rate: int = 16000, channels: int = 1, video: bool = True,
               audio_seconds: float | None = None,
               metadata: dict[str, str] | None = None, container: str = "mp4") -> str:
  """Writes a clip to `path` (H.264 + AAC unless `container` says otherwise); returns path."""
  path = os.fspath(path)
  inputs, filters, maps = [], [], []
  if video:
    w, h = size
    chain = f"testsrc2=size={w}x{h}:rate={fps}:duration={seconds}"
    if blur:
      chain += f",boxblur={blur}:2"
    if cut_every:
      chain += f",negate=enable='lt(mod(t\\,{2 * cut_every})\\,{cut_every})'"
    if vfr:
      chain += f",select='lt(t\\,{seconds / 2})+not(mod(n\\,3))'"
    inputs += ["-f", "lavfi", "-i", chain]
    maps += ["-map", "0:v"]
  if audio is not None:
    source = {"events": _EVENTS, "tone": _TONE, "sparse": _SPARSE,
              "silence": _SILENCE}[audio].format(sr=sample_rate)
    inputs += ["-f", "lavfi", "-i", f"{source},atrim=duration={audio_seconds or seconds}"]
    a = inputs.count("-i") - 1
    chain = f"[{a}:a]"
    if noise:
      inputs += ["-f", "lavfi", "-i", f"anoisesrc=color=white:amplitude={noise}:seed=7:"
                 f"sample_rate={sample_rate}:duration={seconds}"]
      chain += f"[{a + 1}:a]amix=inputs=2:normalize=0:duration=first,"
    if clip_gain:
      # Through 16-bit samples, which saturate at full scale.
      chain += f"volume={clip_gain},aformat=sample_fmts=s16,aformat=sample_fmts=fltp,"
    if channels > 1:
      chain += f"pan={_LAYOUTS[channels]}|" + "|".join(f"c{i}=c0" for i in range(channels)) + ","
    chain += "anull[aout]"
    filters.append(chain)
    maps += ["-map", "[aout]"]
  args = [*inputs]
  if filters:
    args += ["-filter_complex", ";".join(filters)]
  args += maps
  if video:
    args += ["-c:v", "libx264", "-preset", "ultrafast", "-crf", "18", "-pix_fmt", "yuv420p"]
    args += ["-fps_mode", "vfr"] if vfr else []
  if audio is not None:
    args += ["-c:a", "aac", "-b:a", "96k"] if container in ("mp4", "m4a") else ["-c:a",
                                                                               "pcm_s16le"]
  for key, value in (metadata or {}).items():
    args += ["-metadata", f"{key}={value}"]
  if container in ("mp4", "m4a"):
    args += ["-movflags", "+faststart"]  # the index first, as web videos have it
  args += ["-t", str(seconds), "-f", {"m4a": "mp4"}.get(container, container),
           "file:" + os.path.abspath(path)]
  ffmpeg(args)
  return path


def make_image(path, size: tuple[int, int] = (64, 48)) -> str:
  """A PNG picture (to be saved under a video's name)."""
  ffmpeg(["-f", "lavfi", "-i", f"testsrc2=size={size[0]}x{size[1]}", "-frames:v", "1",
          "-f", "image2", "-c:v", "png", "file:" + os.path.abspath(os.fspath(path))])
  return os.fspath(path)


def write_frames(path, video: np.ndarray, fps: float, audio: np.ndarray | None = None,
                 sample_rate: int = 16000) -> str:
  """Exact frames and samples, for timing tests (media.write_mp4: H.264 + AAC)."""
  media.write_mp4(path, video, fps, audio, sample_rate if audio is not None else None)
  return os.fspath(path)


def die_on_crash_names(task):
  """A stand-in for the ingest worker: dies (as a decoder crash would) on names with 'crash'."""
  rel = task[1]
  if "crash" in rel:
    os._exit(3)  # pylint: disable=protected-access
  return {"path": rel, "status": "accepted"}
