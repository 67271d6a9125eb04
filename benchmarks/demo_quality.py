"""Scores a demo checkpoint's samples against what the synthetic data looks like.

  python benchmarks/demo_quality.py WORKDIR [WORKDIR ...] [--seeds 8] [--data-clips 64]
      [--steps N] [--sampler euler|heun] [--guidance G | --guidance-video G --guidance-audio G]
      [--raw-weights] [--checkpoint-step STEP] [--time-shift S]

For each of the demo config's sample prompts and each sampling seed, one clip from the latest
checkpoint; then the same scores for the first `--data-clips` training clips in WORKDIR/data,
so that "matches the data" has a number. Each frame is thresholded at brightness 96 and its
connected regions of >= 3 pixels are the objects seen. Prints per workdir:
  object_error      mean over frames of |regions - objects the prompt names| (the data's shapes
                    are 6-10 pixels across on black, so a sample that matches its prompt scores
                    near 0; the data itself is not 0 where two shapes touch)
  regions           mean regions per frame
  empty_frames      share of frames with no region (objects too faint to count)
  coherent          share of consecutive frame pairs that show the same objects moved a little:
                    the same non-zero region count, and every region's nearest region in the
                    other frame at most 8 pixels away (the fastest synthetic shape moves 6.4;
                    the demo's, 3.2)
  step_px           mean distance from a region to its nearest region in the next frame, over
                    pairs with equal non-zero counts (how far things move per frame)
  audio_active      share of 10 ms windows above 0.1 of the clip's peak RMS (short bursts: low),
                    over the clips that are not silent
  silent_clips      share of clips whose loudest 10 ms stays below RMS 0.01 (no burst at all;
                    before this was split off, such clips counted as active throughout)
For the data, audio_active is of the stored wave and audio_active_vocoded of the wave after the
demo's mel + Griffin-Lim round trip: the best a sample's audio can be.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

import numpy as np
from scipy import ndimage

sys.path.insert(0, ".")

from avgen.sample import api  # noqa: E402

PROMPT_OBJECTS = {"a red circle bounces": 1, "a blue square bounces": 1,
                  "a green triangle and a yellow circle bounce": 2}
# A region further than this from every region of the previous frame is a blob that appeared or
# jumped, not a shape that moved: the synthetic default's fastest shape moves 1.6 * 32 / 8 =
# 6.4 px a frame (the demo's 0.8 * 32 / 8 = 3.2); one threshold keeps runs on either comparable.
MAX_STEP_PX = 8.0
# A burst's loudest 10 ms has an RMS near 0.1 (data and samples); a clip that never reaches a
# tenth of that has no burst.
SILENT_RMS = 0.01


def region_centroids(frame: np.ndarray, threshold: int = 96, min_pixels: int = 3) -> np.ndarray:
  """[n, 2] (row, col) centroids of the frame's bright connected regions."""
  mask = frame.max(-1) > threshold
  labels, n = ndimage.label(mask)
  if n == 0:
    return np.zeros((0, 2))
  index = np.arange(1, n + 1)
  sizes = np.asarray(ndimage.sum(mask, labels, index))
  centres = np.asarray(ndimage.center_of_mass(mask, labels, index)).reshape(n, 2)
  return centres[sizes >= min_pixels]


def bright_regions(frame: np.ndarray, threshold: int = 96, min_pixels: int = 3) -> int:
  return len(region_centroids(frame, threshold, min_pixels))


def frame_steps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Distance from each region of either frame to the nearest region of the other."""
  d = np.linalg.norm(a[:, None] - b[None], axis=-1)
  return np.concatenate([d.min(1), d.min(0)])


def temporal_scores(video: np.ndarray) -> tuple[list[bool], list[float]]:
  """Per consecutive frame pair: whether it is coherent; and the steps of equal-count pairs."""
  return _pair_scores([region_centroids(frame) for frame in video])


def _pair_scores(centres: list[np.ndarray]) -> tuple[list[bool], list[float]]:
  """temporal_scores from each frame's region centroids."""
  coherent, steps = [], []
  for a, b in zip(centres[:-1], centres[1:]):
    if len(a) != len(b) or len(a) == 0:
      coherent.append(False)
      continue
    step = frame_steps(a, b)
    coherent.append(bool(step.max() <= MAX_STEP_PX))
    steps.extend(step.tolist())
  return coherent, steps


def active_fraction(audio: np.ndarray, sample_rate: int) -> float | None:
  """Share of 10 ms windows above 0.1 of the clip's peak RMS; None for a silent clip, whose
  faint noise floor would otherwise count as all active."""
  window = int(sample_rate * 0.01)
  n = len(audio) // window
  envelope = np.sqrt(np.mean(audio[:n * window].reshape(n, window) ** 2, 1))
  if envelope.max() < SILENT_RMS:
    return None
  return float(np.mean(envelope > 0.1 * envelope.max()))


class Tally:
  """Accumulates the per-frame, per-pair and per-clip numbers behind the printed scores."""

  def __init__(self):
    self.errors, self.regions, self.coherent, self.steps = [], [], [], []
    self.audio = {}

  def add_video(self, video: np.ndarray, objects: int) -> None:
    centres = [region_centroids(frame) for frame in video]
    for frame_centres in centres:
      self.regions.append(len(frame_centres))
      self.errors.append(abs(self.regions[-1] - objects))
    coherent, steps = _pair_scores(centres)
    self.coherent += coherent
    self.steps += steps

  def add_audio(self, name: str, audio: np.ndarray, sample_rate: int) -> None:
    self.audio.setdefault(name, []).append(
        active_fraction(np.asarray(audio, np.float32).reshape(-1), sample_rate))

  def summary(self) -> dict:
    out = dict(object_error=round(float(np.mean(self.errors)), 2),
               regions=round(float(np.mean(self.regions)), 2),
               empty_frames=round(float(np.mean(np.asarray(self.regions) == 0)), 2),
               coherent=round(float(np.mean(self.coherent)), 2),
               step_px=round(float(np.mean(self.steps)), 1) if self.steps else None)
    for name, values in self.audio.items():
      sounding = [v for v in values if v is not None]
      out[name] = round(float(np.mean(sounding)), 3) if sounding else None
    first = next(iter(self.audio.values()))
    out["silent_clips"] = round(sum(v is None for v in first) / len(first), 2)
    out["clips"] = len(first)
    return out


def score_samples(pipe, seeds: int, **options) -> dict:
  tally = Tally()
  for prompt, objects in PROMPT_OBJECTS.items():
    for seed in range(seeds):
      clip = pipe(prompt, seed=seed, **options)
      tally.add_video(np.asarray(clip.video), objects)
      tally.add_audio("audio_active", clip.audio, pipe.config.data.sample_rate)
  return tally.summary()


def score_data(workdir: str, config, num_clips: int) -> dict:
  # pylint: disable-next=g-import-not-at-top
  from avgen.models.autoencoders import build_audio_codec
  from data_pipeline import schema  # pylint: disable=g-import-not-at-top
  codec = build_audio_codec(config)
  tally = Tally()
  records = []
  for path in sorted(glob.glob(os.path.join(workdir, "data", "*.array_record"))):
    records += schema.read_records(path, 0, num_clips - len(records))
    if len(records) >= num_clips:
      break
  for record in records:
    ex = schema.decode_example(record)
    tally.add_video(ex["video"], len(ex["meta"]["objects"]))
    tally.add_audio("audio_active", ex["audio"], ex["sample_rate"])
    wave = codec.decode(codec.encode(ex["audio"]), num_samples=len(ex["audio"]))
    tally.add_audio("audio_active_vocoded", wave, ex["sample_rate"])
  return tally.summary()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--seeds", type=int, default=8)
  parser.add_argument("--data-clips", type=int, default=64, help="0: skip the data")
  # Sampling settings other than the checkpoint config's, to compare them on one checkpoint.
  parser.add_argument("--steps", type=int, default=None, help="sampler steps")
  parser.add_argument("--guidance", type=float, default=None, help="both modalities")
  parser.add_argument("--guidance-video", type=float, default=None, help="video alone")
  parser.add_argument("--guidance-audio", type=float, default=None, help="audio alone")
  parser.add_argument("--sampler", default=None, help="euler | heun (flow)")
  parser.add_argument("--raw-weights", action="store_true", help="not the EMA weights")
  parser.add_argument("--checkpoint-step", type=int, default=None, help="default: the latest")
  parser.add_argument("--time-shift", type=float, default=None,
                      help="flow sampling times' shift alone (training's stays as trained)")
  args = parser.parse_args()
  options = {k: v for k, v in (("num_inference_steps", args.steps),
                               ("guidance_scale", args.guidance),
                               ("guidance_scale_video", args.guidance_video),
                               ("guidance_scale_audio", args.guidance_audio),
                               ("sampler", args.sampler)) if v is not None}
  for workdir in args.workdirs:
    pipe = api.load_pipeline(workdir, step=args.checkpoint_step, use_ema=not args.raw_weights)
    if args.time_shift is not None:
      pipe.objective.shift = args.time_shift  # read by sample_times for every call's schedule
    print(workdir, "samples", score_samples(pipe, args.seeds, **options), flush=True)
    if args.data_clips > 0:
      print(workdir, "data", score_data(workdir, pipe.config, args.data_clips), flush=True)


if __name__ == "__main__":
  main()
