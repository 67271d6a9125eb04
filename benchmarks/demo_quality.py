"""Scores a demo checkpoint's samples against what the synthetic data looks like.

  python benchmarks/demo_quality.py WORKDIR [WORKDIR ...] [--seeds 8]

For each of the demo config's sample prompts and each sampling seed, one clip from the latest
checkpoint. Prints per workdir:
  object_error      mean over frames of |bright regions - objects the prompt names|: each frame
                    thresholded at brightness 96, connected regions of >= 3 pixels counted (the
                    data's shapes are 6-10 pixels across on black, so a sample that matches its
                    prompt scores near 0)
  regions           mean bright regions per frame
  empty_frames      share of frames with no region (objects too faint to count)
  audio_active      share of 10 ms windows above 0.1 of the clip's peak RMS (the synthetic
                    clips' short bursts: about 0.12)
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from scipy import ndimage

sys.path.insert(0, ".")

from avgen.sample import api  # noqa: E402

PROMPT_OBJECTS = {"a red circle bounces": 1, "a blue square bounces": 1,
                  "a green triangle and a yellow circle bounce": 2}


def bright_regions(frame: np.ndarray, threshold: int = 96, min_pixels: int = 3) -> int:
  mask = frame.max(-1) > threshold
  labels, n = ndimage.label(mask)
  if n == 0:
    return 0
  sizes = ndimage.sum(mask, labels, range(1, n + 1))
  return int(np.sum(np.asarray(sizes) >= min_pixels))


def active_fraction(audio: np.ndarray, sample_rate: int) -> float:
  window = int(sample_rate * 0.01)
  n = len(audio) // window
  envelope = np.sqrt(np.mean(audio[:n * window].reshape(n, window) ** 2, 1))
  return float(np.mean(envelope > 0.1 * envelope.max())) if envelope.max() > 0 else 0.0


def score(workdir: str, seeds: int) -> dict:
  pipe = api.load_pipeline(workdir)
  errors, regions, audio = [], [], []
  for prompt, objects in PROMPT_OBJECTS.items():
    for seed in range(seeds):
      clip = pipe(prompt, seed=seed)
      for frame in np.asarray(clip.video):
        regions.append(bright_regions(frame))
        errors.append(abs(regions[-1] - objects))
      audio.append(active_fraction(np.asarray(clip.audio, np.float32).reshape(-1),
                                   pipe.config.data.sample_rate))
  return dict(object_error=round(float(np.mean(errors)), 2),
              regions=round(float(np.mean(regions)), 2),
              empty_frames=round(float(np.mean(np.asarray(regions) == 0)), 2),
              audio_active=round(float(np.mean(audio)), 3), clips=len(audio))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--seeds", type=int, default=8)
  args = parser.parse_args()
  for workdir in args.workdirs:
    print(workdir, score(workdir, args.seeds), flush=True)


if __name__ == "__main__":
  main()
