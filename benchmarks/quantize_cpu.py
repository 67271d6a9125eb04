"""int8 weights for the exported sampler: what they save and cost, on this machine's CPU.

  python benchmarks/quantize_cpu.py --checkpoint=/tmp/demo [--steps 25] [--reps 5]
      [--out benchmarks/results/quantize_cpu.md]

Exports the checkpoint's sampler twice (float32 weights; int8 weights, see avgen/sample/
export.py) for one row of text -> audio + video, loads both with the exported runtime (no model
code) and reports:
  weights      bytes of weights.npz
  denoiser ms  one guided model call (2 rows: prompt and negative)
  sampler s    the whole --steps-step sampling call
               (medians of --reps, float32 and int8 calls alternating; wall time and this
               process's CPU time, which other processes' load does not inflate)
  quality      int8 against float32 over the config's prompts, seeds 0..: the denoiser output's
               relative error (max |d| / max |ref|) on random inputs at t = 0.5; the sampled
               video latent decoded to pixels, as PSNR in dB; the audio mel latent's RMSE (the
               latent is a normalized log-mel: 1.0 = 4 nats of mel magnitude)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, ".")
from avgen.sample import export, pipeline  # noqa: E402


def interleaved(fns: dict, reps: int) -> dict:
  """Median wall and CPU seconds per call of each fn, calls alternating so that load from other
  processes falls on all of them alike (CPU seconds count only this process's work)."""
  for fn in fns.values():
    fn()  # compile / warm up
  wall = {k: [] for k in fns}
  cpu = {k: [] for k in fns}
  for _ in range(reps):
    for k, fn in fns.items():
      w, c = time.perf_counter(), time.process_time()
      fn()
      wall[k].append(time.perf_counter() - w)
      cpu[k].append(time.process_time() - c)
  return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--steps", type=int, default=25)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--min_size", type=int, default=4096)
  p.add_argument("--out", default="benchmarks/results/quantize_cpu.md")
  args = p.parse_args()

  pipe = pipeline.AudioVideoGenerationPipeline.from_pretrained(
      args.checkpoint, devices=jax.devices()[:1])
  prompts = list(pipe.config.sample.prompts)
  rows, samplers = {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    for kind in ("float32", "int8"):
      directory = export.export_sampler(
          pipe, os.path.join(tmp, kind), num_inference_steps=args.steps,
          quantize="int8" if kind == "int8" else None, min_size=args.min_size)
      samplers[kind] = export.load(directory)
      rows[kind] = dict(weights_bytes=os.path.getsize(os.path.join(directory, "weights.npz")))
    rng = np.random.default_rng(0)
    meta = samplers["float32"].meta
    v = rng.normal(size=(1, *meta["video_shape"])).astype(np.float32)
    a = rng.normal(size=(1, *meta["audio_shape"])).astype(np.float32)
    text, negative = samplers["float32"].tokenize(prompts[:1]), samplers["float32"].tokenize([""])
    denoise = {k: (lambda s=s: s.denoise(text, negative, v, a, 0.5, 0.5, guidance_video=3.0,
                                         guidance_audio=3.0)) for k, s in samplers.items()}
    sample = {k: (lambda s=s: s.sample(prompts[:1], seeds=[0])) for k, s in samplers.items()}
    for name, fns, scale in (("denoiser_ms", denoise, 1e3), ("sampler_s", sample, 1.0)):
      for k, (wall, cpu) in interleaved(fns, args.reps).items():
        rows[k][name] = scale * wall
        rows[k][name.replace("_", "_cpu_", 1)] = scale * cpu
    for k, s in samplers.items():
      rows[k]["denoised"] = denoise[k]()
      rows[k]["samples"] = [s.sample([pr], seeds=[i]) for i, pr in enumerate(prompts)]
  ref, q = rows["float32"], rows["int8"]
  rel = max(np.abs(x - y).max() / np.abs(y).max() for x, y in zip(q["denoised"], ref["denoised"]))
  codec = pipe.generator.video_codec
  psnrs = [psnr(codec.decode(x[0][0]), codec.decode(y[0][0]))
           for x, y in zip(q["samples"], ref["samples"])]
  mel_rmse = [float(np.sqrt(np.mean((x[1] - y[1]) ** 2)))
              for x, y in zip(q["samples"], ref["samples"])]
  result = dict(
      checkpoint=args.checkpoint, steps=args.steps, min_size=args.min_size,
      device=jax.devices()[0].device_kind, cpu_count=os.cpu_count(),
      load_average=os.getloadavg(), jax=jax.__version__,
      float32={k: v for k, v in ref.items() if k not in ("denoised", "samples")},
      int8={k: v for k, v in q.items() if k not in ("denoised", "samples")},
      denoiser_rel_err=float(rel), video_psnr_db=psnrs, audio_mel_rmse=mel_rmse)
  table = (
      f"| weights | weights.npz | denoiser call: wall (CPU) | {args.steps}-step sampler: wall "
      "(CPU) |\n| --- | --- | --- | --- |\n"
      + "".join(f"| {k} | {rows[k]['weights_bytes'] / 2**20:.2f} MiB | "
                f"{rows[k]['denoiser_ms']:.1f} ms ({rows[k]['denoiser_cpu_ms']:.1f} ms) | "
                f"{rows[k]['sampler_s']:.2f} s ({rows[k]['sampler_cpu_s']:.2f} s) |\n"
                for k in ("float32", "int8"))
      + f"\nint8 vs float32: denoiser output relative error {rel:.2e}; sampled video "
      f"PSNR {', '.join(f'{x:.1f}' for x in psnrs)} dB; audio mel-latent RMSE "
      f"{', '.join(f'{x:.3f}' for x in mel_rmse)}\n")
  print(table)
  print(json.dumps(result, indent=1))
  with open(args.out, "w") as f:
    f.write("# int8 weights for the exported sampler (CPU)\n\n"
            f"`python benchmarks/quantize_cpu.py --checkpoint={args.checkpoint} "
            f"--steps={args.steps} --reps={args.reps}`\n\n" + table
            + "\n```json\n" + json.dumps(result, indent=1) + "\n```\n")


if __name__ == "__main__":
  main()
