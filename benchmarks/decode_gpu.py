"""Decode speed on one GPU: our SD-VAE decoder and BigVGAN against the PyTorch originals.

  python benchmarks/decode_gpu.py [--out benchmarks/results/decode_gpu.json] [--reps 5]

Workloads (the issue's): SD-VAE decode of 16 frames at 512x512 (latents [16, 64, 64, 4]) and
BigVGAN vocoding 10 s of audio (862 mel frames at 22.05 kHz, hop 256). Both models are built at
the published checkpoints' sizes with random weights (nothing is downloaded): diffusers
AutoencoderKL with stabilityai/sd-vae-ft-mse's config, and bigvgan.BigVGAN with
nvidia/bigvgan_v2_22khz_80band_256x's config. The originals are saved as their libraries save
them and loaded with avgen.pretrained.load, so both sides hold the same weights; each timing
row also reports the relative error of our output against the original's float32 output.

Precision modes, applied to both frameworks:
  f32       float32 weights and activations, full-precision convs/matmuls (no TF32:
            jax_default_matmul_precision=highest; torch allow_tf32 off)
  f32_tf32  float32 with each framework's default GPU math (TF32 convs allowed)
  bf16      bfloat16 weights and activations (our norms/softmax stay float32)

Reported: milliseconds per call (median of --reps after one warm-up/compile call) and
milliseconds per second of output (video at --fps frames per second; audio at its sample rate).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import statistics
import sys
import tempfile
import time

# Both frameworks share the GPU: JAX must not reserve 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, ".")
from avgen import pretrained  # noqa: E402
from avgen.models.autoencoders.chunking import vocode_in_chunks  # noqa: E402

SD_VAE_CONFIG = dict(  # stabilityai/sd-vae-ft-mse/config.json
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
    layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=256,
    scaling_factor=0.18215, down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4)
BIGVGAN_CONFIG = dict(  # nvidia/bigvgan_v2_22khz_80band_256x/config.json (network + mel fields)
    resblock="1", num_mels=80, upsample_rates=[4, 4, 2, 2, 2, 2],
    upsample_kernel_sizes=[8, 8, 4, 4, 4, 4], upsample_initial_channel=1536,
    resblock_kernel_sizes=[3, 7, 11], resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    activation="snakebeta", snake_logscale=True, use_tanh_at_final=False,
    use_bias_at_final=False, sampling_rate=22050, n_fft=1024, hop_size=256, win_size=1024,
    fmin=0, fmax=None)
MODES = ("f32", "f32_tf32", "bf16")


def _median_ms(fn, reps: int) -> float:
  fn()  # compile / warm up
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times)


def _rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


@contextlib.contextmanager
def _torch_mode(torch, mode):
  conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
  torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = mode == "f32_tf32"
  try:
    yield
  finally:
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


def _jax_mode(mode):
  return jax.default_matmul_precision("highest" if mode == "f32" else "default")


def _jax_runner(module, method):
  graphdef, state = nnx.split(module)

  @jax.jit
  def run(state, x):
    return method(nnx.merge(graphdef, state), x)

  return lambda x: jax.block_until_ready(run(state, x))


def bench_sd_vae(torch, device, args, rows):
  import diffusers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  config = dict(SD_VAE_CONFIG, block_out_channels=[32, 32, 32, 32]) if args.smoke else SD_VAE_CONFIG
  original = diffusers.AutoencoderKL(**config).eval()
  with tempfile.TemporaryDirectory() as d:
    original.save_pretrained(d)
    ours = {"f32": pretrained.load("sd_vae", d, dtype=jnp.float32, cache=False),
            "bf16": pretrained.load("sd_vae", d, dtype=jnp.bfloat16, cache=False)}
  frames, scale, size = 16, SD_VAE_CONFIG["scaling_factor"], 8 if args.smoke else 64
  z = np.random.default_rng(0).normal(size=(frames, size, size, 4)).astype(np.float32)
  z_torch = torch.from_numpy(z.transpose(0, 3, 1, 2) / scale).to(device)
  seconds = frames / args.fps
  reference = None
  for mode in MODES:
    t_dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    model = original.to(device=device, dtype=t_dtype)
    with _torch_mode(torch, mode), torch.no_grad():
      def torch_decode():
        out = model.decode(z_torch.to(t_dtype)).sample
        args.sync()
        return out
      ms = _median_ms(torch_decode, args.reps)
      out = torch_decode().float().cpu().numpy().transpose(0, 2, 3, 1)
    args.free_torch()
    if mode == "f32":
      reference = out
    rows.append(dict(model="sd_vae", framework="torch", mode=mode, chunk=None, ms=ms,
                     ms_per_output_second=ms / seconds,
                     rel_err_vs_torch_f32=_rel_err(out, reference)))
    print(rows[-1], flush=True)
    vae = ours["bf16" if mode == "bf16" else "f32"]
    for chunk in (None, 4):
      with _jax_mode(mode):
        run = _jax_runner(vae, lambda m, x, c=chunk: m.decode(x, frames_per_chunk=c))
        ms = _median_ms(lambda: run(z), args.reps)
        out = np.asarray(run(z))
      rows.append(dict(model="sd_vae", framework="jax", mode=mode, chunk=chunk, ms=ms,
                       ms_per_output_second=ms / seconds,
                       rel_err_vs_torch_f32=_rel_err(out, reference)))
      print(rows[-1], flush=True)
  original.to("cpu")


def bench_bigvgan(torch, device, args, rows):
  import bigvgan  # pylint: disable=g-import-not-at-top
  from bigvgan.env import AttrDict  # pylint: disable=g-import-not-at-top

  from avgen.pretrained import bigvgan as loader  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  config = dict(BIGVGAN_CONFIG, upsample_initial_channel=64) if args.smoke else BIGVGAN_CONFIG
  original = bigvgan.BigVGAN(AttrDict(dict(config))).eval()
  with tempfile.TemporaryDirectory() as d:
    original.save_pretrained(d)  # bigvgan_generator.pt + config.json, as the package saves
    converted = loader.safetensors_from_pickle(d, pathlib.Path(d) / "safetensors")
    ours = {"f32": pretrained.load("bigvgan", converted, dtype=jnp.float32, cache=False),
            "bf16": pretrained.load("bigvgan", converted, dtype=jnp.bfloat16, cache=False)}
  original.remove_weight_norm()  # inference form; the same weights
  sr, hop = BIGVGAN_CONFIG["sampling_rate"], BIGVGAN_CONFIG["hop_size"]
  frames = math.ceil(args.audio_seconds * sr / hop)
  seconds = frames * hop / sr
  mel = np.random.default_rng(0).normal(-5.0, 2.0, size=(1, frames, 80)).astype(np.float32)
  mel_torch = torch.from_numpy(mel.transpose(0, 2, 1).copy()).to(device)
  reference = None
  for mode in MODES:
    t_dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    model = original.to(device=device, dtype=t_dtype)
    with _torch_mode(torch, mode), torch.inference_mode():
      def torch_vocode():
        out = model(mel_torch.to(t_dtype))
        args.sync()
        return out
      ms = _median_ms(torch_vocode, args.reps)
      out = torch_vocode().float().cpu().numpy()[:, 0]
    args.free_torch()
    if mode == "f32":
      reference = out
    rows.append(dict(model="bigvgan", framework="torch", mode=mode, chunk=None, ms=ms,
                     ms_per_output_second=ms / seconds,
                     rel_err_vs_torch_f32=_rel_err(out, reference)))
    print(rows[-1], flush=True)
    vocoder = ours["bf16" if mode == "bf16" else "f32"]
    context = vocoder.context_frames()
    for chunk in (None, 256):
      def method(m, x, c=chunk):
        if c is None:
          return m(x)
        return vocode_in_chunks(m, x, hop=hop, chunk_frames=c, context_frames=context)
      with _jax_mode(mode):
        run = _jax_runner(vocoder, method)
        ms = _median_ms(lambda: run(mel), args.reps)
        out = np.asarray(run(mel))
      rows.append(dict(model="bigvgan", framework="jax", mode=mode, chunk=chunk, ms=ms,
                       ms_per_output_second=ms / seconds,
                       rel_err_vs_torch_f32=_rel_err(out, reference)))
      print(rows[-1], flush=True)
  original.to("cpu")


def _markdown(rows, meta) -> str:
  lines = [f"# Decode on {meta['device']}" + (" (smoke: narrow models, tiny inputs)"
                                               if meta["smoke"] else ""), "",
           f"jax {meta['jax']}, torch {meta['torch']}, diffusers {meta['diffusers']}, "
           f"bigvgan {meta['bigvgan']}. SD-VAE: 16 frames 512x512 (one output second = "
           f"{meta['fps']} frames); BigVGAN: {meta['audio_seconds']} s at 22.05 kHz.", "",
           "| model | framework | mode | chunk | ms / call | ms / output second "
           "| rel err vs torch f32 |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['framework']} | {r['mode']} | {r['chunk'] or '-'} | "
                 f"{r['ms']:.1f} | {r['ms_per_output_second']:.1f} | "
                 f"{r['rel_err_vs_torch_f32']:.2e} |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results/decode_gpu.json")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--fps", type=float, default=8.0, help="video frames per output second")
  parser.add_argument("--audio_seconds", type=float, default=10.0)
  parser.add_argument("--only", choices=("sd_vae", "bigvgan"), default=None)
  parser.add_argument("--smoke", action="store_true",
                      help="narrow models, small inputs, CPU allowed: checks the script runs")
  args = parser.parse_args()

  import bigvgan  # pylint: disable=g-import-not-at-top
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
  if not gpu and not args.smoke:
    raise SystemExit(f"decode_gpu: needs a GPU for both frameworks (jax backend "
                     f"{jax.default_backend()}, torch cuda {torch.cuda.is_available()})")
  device = torch.device("cuda" if gpu else "cpu")
  args.sync = torch.cuda.synchronize if gpu else (lambda: None)
  args.free_torch = torch.cuda.empty_cache if gpu else (lambda: None)  # leave room for JAX
  if args.smoke:
    args.audio_seconds = min(args.audio_seconds, 0.1)
  meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, torch=torch.__version__,
              diffusers=diffusers.__version__, bigvgan=getattr(bigvgan, "__version__", "2.4.1"),
              fps=args.fps, audio_seconds=args.audio_seconds, reps=args.reps, smoke=args.smoke)
  print(meta, flush=True)
  rows = []
  if args.only in (None, "sd_vae"):
    bench_sd_vae(torch, device, args, rows)
  if args.only in (None, "bigvgan"):
    bench_bigvgan(torch, device, args, rows)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
  out.with_suffix(".md").write_text(_markdown(rows, meta))
  print(_markdown(rows, meta))


if __name__ == "__main__":
  main()
