"""Procedural audio-visual clips: bright shapes bounce on black and every wall impact sounds.

Each clip holds 1-3 objects (circle, square, triangle; distinct colours) moving at constant
velocity and reflecting off the frame's walls. Every impact starts a short decaying tone at the
exact (sub-frame) impact time: the colour sets the pitch and the shape sets the timbre (circle:
pure sine; square: odd harmonics; triangle: a bright mix), so sound tells which object hit.

Timing: frame f stands for the interval [f / fps, (f + 1) / fps) and is rendered at its middle,
(f + 0.5) / fps; an impact at time t is recorded with frame = floor(t * fps). This matches the
shared RoPE time axis, where audio centred on frame f's interval has time f.

CLI: `python -m data_pipeline.synthetic --output-dir D --num-clips N`.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np

from data_pipeline import schema

SHAPES = ("circle", "square", "triangle")
# name -> (RGB, tone pitch in Hz). Pitches are a few semitones apart so mel bins separate them.
COLORS = {
    "red": ((255, 40, 40), 330.0),
    "yellow": ((255, 230, 40), 440.0),
    "green": ((40, 220, 60), 587.0),
    "cyan": ((40, 230, 230), 740.0),
    "blue": ((60, 100, 255), 880.0),
    "magenta": ((240, 60, 240), 1175.0),
}
# shape -> relative amplitudes of harmonics 1, 2, 3, ...
TIMBRES = {
    "circle": (1.0,),
    "square": (1.0, 0.0, 0.33, 0.0, 0.2),
    "triangle": (1.0, 0.5, 0.25),
}
TONE_SECONDS = 0.06
TONE_DECAY_SECONDS = 0.012  # exponential time constant; e^-5 left at the tone's end
TONE_AMPLITUDE = 0.3
SIZE_RANGE = (0.09, 0.16)  # half-size as a fraction of min(H, W): 6-10 px objects at 32x32
SPEED_RANGE = (0.8, 1.6)  # frame sizes per second


def make_clip(
    rng: np.random.Generator,
    *,
    num_frames: int,
    height: int,
    width: int,
    fps: float,
    sample_rate: int,
    max_objects: int = 3,
    size_range: tuple[float, float] = SIZE_RANGE,
    speed_range: tuple[float, float] = SPEED_RANGE,
) -> dict[str, Any]:
  """One random clip with 1..max_objects shapes, as a schema example (see `data_pipeline.schema`).

  `size_range` bounds an object's half-size as a fraction of min(H, W); `speed_range` its speed in
  frame sizes per second.
  """
  _check_dims(num_frames=num_frames, height=height, width=width, fps=fps, sample_rate=sample_rate)
  if not 1 <= max_objects <= len(COLORS):
    raise ValueError(f"make_clip: max_objects must be in [1, {len(COLORS)}], got {max_objects}")
  _check_range("size_range", size_range, upper=0.5)
  _check_range("speed_range", speed_range)
  duration = num_frames / fps
  num_objects = int(rng.integers(1, max_objects + 1))
  shapes = rng.choice(SHAPES, size=num_objects)
  colors = rng.choice(list(COLORS), size=num_objects, replace=False)
  side = min(height, width)

  objects, events = [], []
  frame_times = (np.arange(num_frames) + 0.5) / fps
  video = np.zeros((num_frames, height, width, 3), np.uint8)
  ys, xs = np.mgrid[0:height, 0:width] + 0.5  # pixel centres
  for i, (shape, color) in enumerate(zip(shapes, colors)):
    half = float(rng.uniform(*size_range)) * side
    speed = float(rng.uniform(*speed_range)) * side
    # Diagonal-ish headings so both axes move and bounce.
    quadrant = math.pi / 2 * int(rng.integers(4))
    angle = float(rng.uniform(math.radians(20), math.radians(70))) + quadrant
    velocity = (speed * math.cos(angle), speed * math.sin(angle))  # (x, y) in px / s
    start = (float(rng.uniform(half, width - half)), float(rng.uniform(half, height - half)))
    cx, x_hits = _bounce(start[0], velocity[0], half, width - half, frame_times, duration)
    cy, y_hits = _bounce(start[1], velocity[1], half, height - half, frame_times, duration)
    for t, wall in [(t, "left" if lo else "right") for t, lo in x_hits] + [
        (t, "top" if lo else "bottom") for t, lo in y_hits]:
      frame = min(int(math.floor(t * fps)), num_frames - 1)
      events.append({"frame": frame, "time": t, "object": i, "wall": wall})
    mask = _shape_mask(shape, cx[:, None, None], cy[:, None, None], half, xs, ys)
    video[mask] = COLORS[color][0]
    objects.append({
        "shape": str(shape), "color": str(color), "pitch_hz": COLORS[color][1],
        "half_size": half, "start": list(start), "velocity": list(velocity)})
  events.sort(key=lambda e: (e["time"], e["object"]))

  num_samples = schema.expected_num_samples(num_frames, fps, sample_rate)
  audio = np.zeros(num_samples, np.float64)
  for event in events:
    obj = objects[event["object"]]
    _add_tone(audio, event["time"], obj["pitch_hz"], TIMBRES[obj["shape"]], sample_rate)
  audio = np.clip(audio, -1.0, 1.0).astype(np.float32)

  return {
      "video": video,
      "audio": audio,
      "caption": caption_for(objects),
      "fps": float(fps),
      "sample_rate": int(sample_rate),
      "meta": {"source": "synthetic", "start": 0.0, "objects": objects, "events": events},
  }


def caption_for(objects: list[dict[str, Any]]) -> str:
  names = [f"a {o['color']} {o['shape']}" for o in objects]
  if len(names) == 1:
    return f"{names[0]} bounces"
  return f"{', '.join(names[:-1])} and {names[-1]} bounce"


def make_dataset(
    output_dir: str,
    num_clips: int,
    *,
    seed: int = 0,
    samples_per_shard: int = 128,
    num_frames: int = 8,
    height: int = 32,
    width: int = 32,
    fps: float = 8.0,
    sample_rate: int = 16000,
    prefix: str = "synthetic",
    max_objects: int = 3,
    size_range: tuple[float, float] = SIZE_RANGE,
    speed_range: tuple[float, float] = SPEED_RANGE,
    mel_codec=None,
) -> list[str]:
  """Writes `num_clips` clips to ArrayRecord shards in `output_dir`; returns the shard paths.

  Clip i depends only on (seed, i), so a larger dataset starts with the clips of a smaller one.
  With `mel_codec` each record also caches its normalized log-mel (`audio_mel`) and the codec's
  settings (`meta["audio_mel_config"]`), so the loader can skip the STFT when they match.
  """
  if isinstance(num_clips, bool) or not isinstance(num_clips, int) or num_clips < 1:
    raise ValueError(f"make_dataset: num_clips must be an int >= 1, got {num_clips!r}")
  _check_dims(num_frames=num_frames, height=height, width=width, fps=fps, sample_rate=sample_rate)
  def clip(i):
    ex = make_clip(np.random.default_rng([seed, i]), num_frames=num_frames, height=height,
                   width=width, fps=fps, sample_rate=sample_rate, max_objects=max_objects,
                   size_range=size_range, speed_range=speed_range)
    if mel_codec is not None:
      ex["audio_mel"] = mel_codec.encode(ex["audio"])
      ex["meta"]["audio_mel_config"] = mel_codec.settings()
    return ex

  return schema.write_shards((clip(i) for i in range(num_clips)), output_dir, samples_per_shard, prefix)


def _bounce(p0: float, v: float, lo: float, hi: float, times: np.ndarray, duration: float):
  """Positions at `times` of a point reflecting inside [lo, hi], and its (time, hit_lo) impacts."""
  span = hi - lo
  if span <= 0:
    return np.full(times.shape, (lo + hi) / 2), []
  # Unfold the reflections: u moves freely; position is u folded into [0, span].
  u = (p0 - lo) + v * times
  m = np.mod(u, 2 * span)
  pos = lo + np.where(m <= span, m, 2 * span - m)
  hits = []
  if v != 0:
    u0, u1 = p0 - lo, p0 - lo + v * duration
    k_first = math.floor(min(u0, u1) / span) + 1
    k_last = math.ceil(max(u0, u1) / span) - 1
    for k in range(k_first, k_last + 1):
      t = (k * span - u0) / v
      if 0 < t < duration:
        # Even multiples of span are the low wall, odd ones the high wall.
        hits.append((t, k % 2 == 0))
  return pos, hits


def _shape_mask(shape: str, cx, cy, half: float, xs, ys) -> np.ndarray:
  dx, dy = xs - cx, ys - cy
  if shape == "circle":
    return dx**2 + dy**2 <= half**2
  if shape == "square":
    return (np.abs(dx) <= half) & (np.abs(dy) <= half)
  # Upright triangle: apex at the top, base on the bottom edge of the bounding box.
  depth = (dy + half) / (2 * half)  # 0 at the apex, 1 at the base
  return (depth >= 0) & (depth <= 1) & (np.abs(dx) <= depth * half)


def _add_tone(audio: np.ndarray, time: float, pitch: float, harmonics, sample_rate: int) -> None:
  first = math.ceil(time * sample_rate)
  last = min(len(audio), first + int(round(TONE_SECONDS * sample_rate)))
  if first >= last:
    return
  t = np.arange(first, last) / sample_rate - time  # seconds since the impact, >= 0
  wave = sum(a * np.sin(2 * np.pi * pitch * (h + 1) * t) for h, a in enumerate(harmonics) if a)
  wave = wave / sum(harmonics)
  audio[first:last] += TONE_AMPLITUDE * np.exp(-t / TONE_DECAY_SECONDS) * wave


def _check_range(name: str, value, upper: float | None = None) -> None:
  lo, hi = (float(v) for v in value)
  if not 0 < lo <= hi or (upper is not None and hi >= upper):
    bound = f" and high < {upper}" if upper is not None else ""
    raise ValueError(f"synthetic: {name} must be (low, high) with 0 < low <= high{bound}, got {tuple(value)}")


def _check_dims(**dims) -> None:
  for name, value in dims.items():
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
      raise ValueError(f"synthetic: {name} must be a positive number, got {value!r}")
  for name in ("num_frames", "height", "width", "sample_rate"):
    if not isinstance(dims[name], int):
      raise ValueError(f"synthetic: {name} must be an int, got {dims[name]!r}")
  if min(dims["height"], dims["width"]) < 8:
    raise ValueError(
        f"synthetic: height and width must be >= 8, got {dims['height']}x{dims['width']}")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--output-dir", required=True)
  parser.add_argument("--num-clips", type=int, required=True)
  parser.add_argument("--num-frames", type=int, default=8)
  parser.add_argument("--height", type=int, default=32)
  parser.add_argument("--width", type=int, default=32)
  parser.add_argument("--fps", type=float, default=8.0)
  parser.add_argument("--sample-rate", type=int, default=16000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--samples-per-shard", type=int, default=128)
  args = parser.parse_args(argv)
  paths = make_dataset(
      args.output_dir, args.num_clips, seed=args.seed, samples_per_shard=args.samples_per_shard,
      num_frames=args.num_frames, height=args.height, width=args.width, fps=args.fps,
      sample_rate=args.sample_rate)
  print(f"wrote {args.num_clips} clips to {len(paths)} shard(s) in {args.output_dir}")


def run() -> None:
  """Console-script entry (`avgen-synthetic`)."""
  main()


if __name__ == "__main__":
  main()
