"""Ingestion throughput on this CPU: clips per second per core, against a bare ffmpeg decode.

  python benchmarks/preprocess_cpu.py [--num-files 4] [--seconds 10] [--size 854x480]

Makes `num-files` test videos (lavfi testsrc2 at --size and 24 fps, H.264; 48 kHz stereo AAC
beeps), then times, one file after another on one worker:
  decode     ffmpeg decodes both streams and throws them away (`-f null`): the floor;
  normalize  ffmpeg alone with the pipeline's filters (fps, crop, scale to RGB; resample audio);
  convert    the whole per-input work (ingest.process_input): normalize, score every clip
             (blur, scene cuts, SNR, silence, clipping), write the passing clips' records;
  shard      packing the clip files into shards (copying records).
"Per core" divides by CPU seconds (user + system, this process and its ffmpeg children), so the
figure holds on a machine shared with other jobs, where wall time would not.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from avgen.sample import media
from data_pipeline import clips as clips_lib
from data_pipeline import ingest
from data_pipeline import sharding
from data_pipeline.preprocess_config import PreprocessConfig


def make_inputs(directory: str, num_files: int, seconds: float, size: str) -> list[str]:
  paths = []
  for i in range(num_files):
    path = os.path.join(directory, f"input_{i}.mp4")
    audio = ("sine=frequency=660:sample_rate=48000,volume=2.4*lt(mod(t\\,0.5)\\,0.35)"
             f":eval=frame,atrim=duration={seconds},pan=stereo|c0=c0|c1=c0")
    cmd = [media.ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y",
           "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=24:duration={seconds}",
           "-f", "lavfi", "-i", audio, "-map", "0:v", "-map", "1:a",
           "-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-pix_fmt", "yuv420p",
           "-c:a", "aac", "-b:a", "128k", "-movflags", "+faststart", path]
    subprocess.run(cmd, check=True)
    paths.append(path)
  return paths


class Timer:
  """Wall and CPU seconds (this process + waited-for children) of a block."""

  def __enter__(self):
    self._wall, self._cpu = time.perf_counter(), self._cpu_now()
    return self

  def __exit__(self, *exc):
    self.wall = time.perf_counter() - self._wall
    self.cpu = self._cpu_now() - self._cpu

  @staticmethod
  def _cpu_now() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_ffmpeg(args: list[str]) -> None:
  subprocess.run([media.ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", *args],
                 check=True, stdout=subprocess.DEVNULL)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num-files", type=int, default=4)
  parser.add_argument("--seconds", type=float, default=10.0)
  parser.add_argument("--size", default="854x480", help="source WxH")
  parser.add_argument("--target", type=int, default=512, help="target height = width")
  args = parser.parse_args()
  config = PreprocessConfig(height=args.target, width=args.target)
  with tempfile.TemporaryDirectory(prefix="avgen_bench_") as tmp:
    in_dir, out_dir = os.path.join(tmp, "in"), os.path.join(tmp, "out")
    os.makedirs(in_dir)
    paths = make_inputs(in_dir, args.num_files, args.seconds, args.size)
    clips_expected = args.num_files * int(args.seconds // config.clip_seconds)
    rows = []

    with Timer() as t:
      for path in paths:
        run_ffmpeg(["-threads", "1", "-i", path, "-map", "0:v", "-map", "0:a", "-f", "null", "-"])
    rows.append(("decode (ffmpeg -f null, both streams)", t))

    with Timer() as t:
      for path in paths:
        header = media.probe_header(path)
        run_ffmpeg(["-filter_threads", "1", "-threads", "1", "-i", path, "-map", "0:v",
                    "-vf", clips_lib.video_filter(header["video"], config), "-threads", "1",
                    "-f", "rawvideo", "-pix_fmt", "rgb24", "-y", "/dev/null"])
        run_ffmpeg(["-threads", "1", "-i", path, "-map", "0:a", "-af",
                    f"aresample={config.sample_rate}:async=1:first_pts=0", "-f", "f32le",
                    "-y", "/dev/null"])
    rows.append(("normalize (ffmpeg: fps, crop, scale, RGB; resample)", t))

    records = []
    with Timer() as t:
      for path in paths:
        records.append(ingest.process_input(path, os.path.basename(path), config, out_dir))
    rows.append(("convert (normalize + score + write clip records)", t))
    clips = sum(r["clips"] for r in records)
    statuses = {r["path"]: (r["status"], r["reason"]) for r in records}

    with Timer() as t:
      for shard in sharding.plan_shards(records, 1000):
        sharding.write_shard(out_dir, shard)
    rows.append(("shard (copy records into shards)", t))

  print(f"{args.num_files} files x {args.seconds} s, source {args.size} @ 24 fps, 48 kHz stereo"
        f" AAC -> {args.target}x{args.target} @ {config.fps} fps, {config.sample_rate} Hz mono; "
        f"{clips} of {clips_expected} clips of {config.clip_seconds} s kept")
  if clips != clips_expected:
    print(f"WARNING: not every clip passed: {statuses}")
  print()
  print("| step | wall s | CPU s | clips/s (wall) | clips/s/core (CPU) |")
  print("| --- | --- | --- | --- | --- |")
  for name, t in rows:
    print(f"| {name} | {t.wall:.2f} | {t.cpu:.2f} | {clips_expected / t.wall:.2f} | "
          f"{clips_expected / t.cpu:.2f} |")


if __name__ == "__main__":
  main()
