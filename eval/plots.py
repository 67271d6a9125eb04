"""Plots of an eval report: per-metric bars, per-clip distributions, best/worst clip sheets.

Charts use matplotlib when it is installed and fall back to plain PIL drawings otherwise (the
report's `job.plot_backend` says which). The clip sheets (frame strips and spectrograms of the
best and worst clips of a per-clip metric) are numpy images from `avgen.sample.visualize`.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from avgen.sample import visualize


def backend() -> str:
  import importlib.util  # pylint: disable=g-import-not-at-top
  return "matplotlib" if importlib.util.find_spec("matplotlib") else "pil"


def _per_clip_values(entry: dict[str, Any]) -> dict[str, float]:
  values = entry.get("per_clip")
  if not isinstance(values, dict):
    return {}
  return {k: float(v) for k, v in values.items() if v is not None}


# ---------------------------------------------------------------------------------------------
# PIL fallback charts


def _pil_bars(path: str, title: str, labels: Sequence[str], values: Sequence[float]) -> None:
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  width, row, left = 640, 22, 180
  img = Image.new("RGB", (width, 40 + row * len(labels)), "white")
  draw = ImageDraw.Draw(img)
  draw.text((10, 10), title, fill="black")
  top = max([abs(v) for v in values] + [1e-12])
  for i, (label, value) in enumerate(zip(labels, values)):
    y = 34 + i * row
    draw.text((10, y + 4), label[:26], fill="black")
    length = int((width - left - 80) * abs(value) / top)
    draw.rectangle([left, y + 3, left + length, y + row - 3], fill=(70, 110, 200))
    draw.text((left + length + 6, y + 4), f"{value:.4g}", fill="black")
  img.save(path)


def _pil_histogram(path: str, title: str, values: Sequence[float], bins: int = 20) -> None:
  counts, edges = np.histogram(values, bins=bins)
  labels = [f"{lo:.3g}..{hi:.3g}" for lo, hi in zip(edges[:-1], edges[1:])]
  _pil_bars(path, title + " (clips per bin)", labels, counts.astype(float))


# ---------------------------------------------------------------------------------------------


def bars(path: str, report: dict[str, Any], metrics: Sequence[str], use: str) -> bool:
  shown = [(m, report[m]) for m in metrics if isinstance(report.get(m), dict)
           and isinstance(report[m].get("score"), (int, float))]
  if not shown:
    return False
  if use == "pil":
    _pil_bars(path, "scores (each on its own scale)", [m for m, _ in shown],
              [float(e["score"]) for _, e in shown])
    return True
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(shown), figsize=(2.2 * len(shown) + 1, 3), squeeze=False)
  for ax, (name, entry) in zip(axes[0], shown):
    ax.bar([0], [entry["score"]], color="#4670c8")
    target = entry.get("spec_target")
    if target:
      ax.axhline(float(target.split()[1]), color="#c84646", linestyle="--",
                 label=f"target {target}")
      ax.legend(fontsize=7)
    ax.set_title(name, fontsize=9)
    ax.set_xticks([])
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def distributions(path: str, report: dict[str, Any], metrics: Sequence[str], use: str) -> bool:
  shown = [(m, _per_clip_values(report[m])) for m in metrics if isinstance(report.get(m), dict)]
  shown = [(m, v) for m, v in shown if len(v) >= 2]
  if not shown:
    return False
  if use == "pil":
    name, values = shown[0]
    _pil_histogram(path, f"{name} per clip", list(values.values()))
    for other, values in shown[1:]:
      _pil_histogram(path.replace(".png", f"_{other}.png"), f"{other} per clip",
                     list(values.values()))
    return True
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(shown), figsize=(3 * len(shown) + 1, 3), squeeze=False)
  for ax, (name, values) in zip(axes[0], shown):
    ax.hist(list(values.values()), bins=20, color="#4670c8")
    ax.set_title(f"{name} per clip", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def _label(text: str) -> np.ndarray:
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  img = Image.new("RGB", (8 + 7 * len(text), 16), "white")
  ImageDraw.Draw(img).text((4, 2), text, fill="black")
  return np.asarray(img)


def best_worst(path: str, entry: dict[str, Any], clips_by_name: dict[str, Any],
               higher_is_better: bool, count: int = 3) -> bool:
  """Frame strips (+ spectrograms) of the best and worst clips, best rows first."""
  values = {k: v for k, v in _per_clip_values(entry).items() if k in clips_by_name}
  if len(values) < 2:
    return False
  order = sorted(values, key=values.get, reverse=higher_is_better)
  picks = order[:count] + [n for n in order[-count:] if n not in order[:count]]
  rows = []
  for rank, name in enumerate(picks):
    clip = clips_by_name[name]
    which = "best" if rank < count else "worst"
    parts = [_label(f"{which}: {name}  score {values[name]:.4g}")]
    if clip.video is not None:
      step = max(1, clip.video.shape[1] // 64)  # big frames are shown at about 64 px
      frames = clip.video[:16, ::step, ::step]
      parts.append(visualize.frame_strip(frames, scale=max(1, 64 // frames.shape[1])))
    if clip.audio is not None:
      parts.append(visualize.waveform_spectrogram(clip.audio, clip.sample_rate))
    if len(parts) > 1:
      rows.append(visualize.stack_rows(parts))
  if not rows:
    return False
  visualize.save_png(path, visualize.stack_rows(rows))
  return True


def write_plots(out_dir: str, report: dict[str, Any], metrics: Sequence[str],
                clips_by_name: dict[str, Any], higher_is_better: dict[str, bool],
                use: str | None = None) -> list[str]:
  """Writes the plots into `out_dir` with backend `use` (default: `backend()`); returns paths."""
  os.makedirs(out_dir, exist_ok=True)
  use = use or backend()
  written = []
  path = os.path.join(out_dir, "scores.png")
  if bars(path, report, metrics, use):
    written.append(path)
  path = os.path.join(out_dir, "per_clip.png")
  if distributions(path, report, metrics, use):
    written += sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir)
                      if f.startswith("per_clip"))
  for metric in metrics:
    entry = report.get(metric)
    if isinstance(entry, dict):
      path = os.path.join(out_dir, f"best_worst_{metric}.png")
      if best_worst(path, entry, clips_by_name, higher_is_better[metric]):
        written.append(path)
  return written
