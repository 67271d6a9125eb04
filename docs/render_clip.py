"""Renders clips as a picture for the docs: frame strips above log-mel spectrograms.

  python docs/render_clip.py OUT.png CLIP.mp4 [CLIP.mp4 ...] [--sample-rate 16000]

Reads each clip back with ffmpeg (what a player gets), so the picture shows the file, not the
arrays that produced it. The spectrogram's time axis is stretched to the strip's width, so an
audio onset sits under the frame it belongs to.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

sys.path.insert(0, ".")

from avgen.sample import media, visualize  # noqa: E402


def render(paths, sample_rate: int, frame_scale: int = 4):
  rows = []
  for path in paths:
    frames, _ = media.read_video(path)
    if frames.shape[1] > 64:  # undo the display upscale of samples
      step = frames.shape[1] // 32
      frames = frames[:, ::step, ::step]
    strip = visualize.frame_strip(frames, scale=frame_scale)
    audio = media.read_audio(path, sample_rate=sample_rate)
    spec = visualize.waveform_spectrogram(audio, sample_rate, n_mels=64, hop_length=sample_rate // 64)
    idx = np.linspace(0, spec.shape[1] - 1, strip.shape[1]).astype(int)
    rows.append(visualize.stack_rows([strip, spec[:, idx]], gap=2))
  return visualize.stack_rows(rows, gap=8)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("out")
  parser.add_argument("clips", nargs="+")
  parser.add_argument("--sample-rate", type=int, default=16000)
  args = parser.parse_args()
  visualize.save_png(args.out, render(args.clips, args.sample_rate))
  print("wrote", args.out)


if __name__ == "__main__":
  main()
