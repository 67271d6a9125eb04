"""Attention on a GPU: correctness of our kernels, then a timing table against cuDNN and XLA.

  python benchmarks/attention.py            # check + bench, prints the tables last
  python benchmarks/attention.py --jobs check:mosaic,bench:mosaic,bench:cudnn

Every job runs in its own process with a time limit, so a kernel that hangs costs one job,
not the whole device call. Inputs are bf16 random normals (fresh per check); FLOPs count
4*B*H*Lq*Lk*D for the forward and 3.5x that for forward+backward (the issue's convention);
masked cases report time and the ratio to cuDNN's *dense* time on the same shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DENSE_SHAPES = [(2, 4096, 16, 128), (1, 16384, 16, 128), (1, 32768, 16, 128), (4, 4096, 16, 64)]
# A 2B-size joint sequence (64 latent frames of 16x16 video tokens + 256 audio tokens = 16,640)
# with a temporal window chosen to keep about a quarter of the 128x128 tiles.
MASKED = {"frames": 64, "per_frame": 256, "audio": 256, "heads": 16, "head_dim": 128,
          "target_fraction": 0.25}
JOB_TIMEOUT_S = {"check": 180, "bench": 300}


def _result(**kw):
  print("RESULT " + json.dumps(kw), flush=True)


def _impl_fn(name):
  from avgen.kernels import flash_mosaic_gpu, flash_pallas  # noqa: PLC0415
  from avgen.kernels.attention import cudnn_attention, xla_attention  # noqa: PLC0415
  if name.startswith("mosaic"):
    # "mosaic@dq_block_k=128+stages=3": Config overrides on top of the per-head_dim default.
    overrides = {}
    if "@" in name:
      for item in name.split("@", 1)[1].split("+"):
        key, value = item.split("=")
        overrides[key] = int(value)

    def run(q, k, v, **kw):
      cfg = dataclasses.replace(flash_mosaic_gpu.default_config(q.shape[-1]), **overrides)
      return flash_mosaic_gpu.flash_attention(q, k, v, config=cfg, **kw)

    return run
  if name == "triton":
    return lambda q, k, v, **kw: flash_pallas.flash_attention(q, k, v, interpret=False, **kw)
  if name == "cudnn":
    return cudnn_attention
  if name == "xla":
    return xla_attention
  if name == "tokamax":
    import tokamax  # noqa: PLC0415
    return lambda q, k, v, **kw: tokamax.dot_product_attention(q, k, v)
  raise ValueError(name)


def _av_layout():
  from avgen.kernels import masks  # noqa: PLC0415
  m = MASKED
  video = masks.video_token_times(m["frames"], 1, m["per_frame"])
  # audio tokens spread evenly over the same frames (centres on the shared time axis)
  audio = (np.arange(m["audio"]) + 0.5) * m["frames"] / m["audio"] - 0.5
  return masks.joint_layout(video, audio.astype(np.float32))


def _av_mask():
  from avgen.kernels import masks  # noqa: PLC0415
  layout = _av_layout()
  w = masks.window_for_fraction(layout, MASKED["target_fraction"], 128, 128)
  mask = masks.self_attention_window(layout, w)
  return mask, w, mask.visible_tile_fraction(128, 128)


import numpy as np  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Correctness on the GPU (bf16 inputs vs XLA float32 on the same values).

def job_check(impl):
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from avgen.kernels import masks  # noqa: PLC0415
  from avgen.kernels.attention import xla_attention  # noqa: PLC0415
  fn = _impl_fn(impl)
  video = masks.video_token_times(6, 2, 200)
  audio = masks.audio_token_times(150, 4, 160, 16000, 25.0) * 0.5
  layout = masks.joint_layout(video, audio)
  window = masks.self_attention_window(layout, 2.0) & masks.modality_mask(
      layout, layout, [[True, True], [False, True]])
  n = len(layout)
  cases = [
      ("ragged1000_d128_kvlen", 2, 1000, 1000, 2, 128, [1000, 517], None),
      ("ragged4097_d64", 1, 4097, 4097, 2, 64, None, None),
      ("lq300_lk777_d128_emptyrow", 2, 300, 777, 2, 128, [777, 0], None),
      ("av_window_modality_d128", 1, n, n, 2, 128, None, window),
      ("av_window_kvlen_d64", 2, n, n, 2, 64, [n, n - 333], window),
      ("av_pure_window_kvlen_d128", 2, n, n, 2, 128, [n - 50, n - 700],
       masks.self_attention_window(layout, 3.0)),
      ("dense_d256", 1, 640, 640, 2, 256, [600], None),
  ]
  only = os.environ.get("AVGEN_CHECK_CASES")
  if only:
    cases = [c for c in cases if c[0] in only.split(",")]
  seed = int(time.time()) % 10000
  for name, b, lq, lk, h, d, lengths, mask in cases:
    ks = jax.random.split(jax.random.key(seed), 4)
    seed += 1
    q = jax.random.normal(ks[0], (b, lq, h, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, lk, h, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, lk, h, d), jnp.bfloat16)
    ct = jax.random.normal(ks[3], (b, lq, h, d), jnp.float32)
    kvl = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    try:
      def loss(f, q, k, v):
        return jnp.sum(f(q, k, v, kv_lengths=kvl, mask=mask).astype(jnp.float32) * ct)
      got_out = jax.jit(lambda q, k, v: fn(q, k, v, kv_lengths=kvl, mask=mask))(q, k, v)
      got = jax.jit(jax.grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2)))(q, k, v)
      f32 = [x.astype(jnp.float32) for x in (q, k, v)]
      ref_out = xla_attention(*f32, kv_lengths=kvl, mask=mask)
      ref = jax.grad(lambda *a: loss(xla_attention, *a), argnums=(0, 1, 2))(*f32)
      errs = {}
      for label, a, r in zip(("out", "dq", "dk", "dv"), (got_out, *got), (ref_out, *ref)):
        a = np.asarray(a, np.float64)
        r = np.asarray(r, np.float64)
        finite = bool(np.all(np.isfinite(a)))
        errs[label] = float(np.linalg.norm(a - r) / max(np.linalg.norm(r), 1e-30)) if finite \
            else float("nan")
      empty_ok = True
      if lengths is not None and min(lengths) == 0:
        empty_ok = bool(np.all(np.asarray(got_out)[list(lengths).index(0)] == 0))
      ok = all(e < 2e-2 for e in errs.values()) and empty_ok
      _result(kind="check", impl=impl, case=name, ok=ok, empty_rows_zero=empty_ok, **errs)
    except Exception as e:  # noqa: BLE001 - report and go on with the next case
      _result(kind="check", impl=impl, case=name, ok=False, error=f"{type(e).__name__}: "
              f"{str(e).splitlines()[0][:300] if str(e) else ''}")


# ---------------------------------------------------------------------------------------------
# Timing.

def _time(f, args_sets, iters=10, reps=5):
  import jax  # noqa: PLC0415
  jax.block_until_ready(f(*args_sets[0]))
  jax.block_until_ready(f(*args_sets[-1]))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    for i in range(iters):
      out = f(*args_sets[i % len(args_sets)])
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / iters)
  return statistics.median(times), min(times), max(times)


def job_bench(impl):
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  fn = _impl_fn(impl)
  cases = [(f"{b},{s},{h},{d}", b, s, h, d, None) for b, s, h, d in DENSE_SHAPES]
  if impl.split("@")[0] in ("mosaic", "triton", "cudnn"):
    mask, w, frac = _av_mask()
    n = mask.shape[0]
    cases.append((f"1,{n},16,128 dense", 1, n, 16, 128, None))
    if impl != "cudnn":
      cases.append((f"1,{n},16,128 window {w:.2f} ({frac:.0%} tiles)", 1, n, 16, 128, mask))
    else:
      cases.append((f"1,{n},16,128 window {w:.2f} as dense mask", 1, n, 16, 128, "dense"))
  for name, b, s, h, d, mask in cases:
    if impl == "xla" and s > 4096:
      _result(kind="bench", impl=impl, case=name, skipped="XLA materializes [B,H,S,S] logits")
      continue
    try:
      # A dense mask travels as an argument: as a closed-over constant it would be baked into
      # the executable (277 MB at S=16,640).
      dense = jnp.asarray(_av_mask()[0].dense()) if isinstance(mask, str) else None
      sets = []
      for seed in range(2):
        ks = jax.random.split(jax.random.key(seed), 4)
        q, k, v, do = (jax.random.normal(kk, (b, s, h, d), jnp.bfloat16) for kk in ks)
        sets.append((q, k, v, do, dense))

      def call(q, k, v, m):
        return fn(q, k, v, mask=m if dense is not None else mask)

      fwd = jax.jit(lambda q, k, v, do, m: call(q, k, v, m))

      def fwd_bwd(q, k, v, do, m):
        out, vjp = jax.vjp(lambda q, k, v: call(q, k, v, m), q, k, v)
        return vjp(do)

      fb = jax.jit(fwd_bwd)
      flops = 4 * b * h * s * s * d
      t_f, lo_f, hi_f = _time(fwd, sets)
      t_b, lo_b, hi_b = _time(fb, sets)
      _result(kind="bench", impl=impl, case=name, fwd_ms=t_f * 1e3, fwd_spread=[lo_f * 1e3,
              hi_f * 1e3], fb_ms=t_b * 1e3, fb_spread=[lo_b * 1e3, hi_b * 1e3],
              fwd_tflops=flops / t_f / 1e12, fb_tflops=3.5 * flops / t_b / 1e12)
    except Exception as e:  # noqa: BLE001
      _result(kind="bench", impl=impl, case=name, error=f"{type(e).__name__}: "
              f"{str(e).splitlines()[0][:300] if str(e) else ''}")


# ---------------------------------------------------------------------------------------------
# Orchestration.

def run_jobs(jobs, log):
  results = []
  hung = set()
  for job in jobs:
    kind, impl = job.split(":")
    if impl in hung:
      print(f"{job}: skipped, check:{impl} timed out", flush=True)
      continue
    t0 = time.time()
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", job]
    env = dict(os.environ)
    if job == "check:mosaic":
      env["MOSAIC_GPU_DUMP_PTXAS"] = "1"  # ptxas -v: registers and spills per kernel
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=JOB_TIMEOUT_S[kind],
                            env=env)
      out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
      out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
      rc = "timeout"
      if kind == "check":
        hung.add(impl)
    log.write(f"==== {job} rc={rc} {time.time() - t0:.0f}s\n{out}\n")
    log.flush()
    got = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    results += got
    print(f"{job}: rc={rc}, {len(got)} results, {time.time() - t0:.0f}s", flush=True)
    ptxas = sorted({line.strip() for line in out.splitlines()
                    if "registers" in line or "spill" in line})
    for line in ptxas[:12]:
      print(f"  ptxas: {line[:200]}", flush=True)
    if rc != 0:
      tail = "\n".join(out.splitlines()[-6:])
      print(f"  tail: {tail[-1500:]}", flush=True)
  return results


def print_tables(results, out):
  lines = []
  checks = [r for r in results if r["kind"] == "check"]
  if checks:
    lines.append("| impl | case | ok | out | dq | dk | dv |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in checks:
      errs = " | ".join(f"{r[x]:.1e}" if x in r else "-" for x in ("out", "dq", "dk", "dv"))
      lines.append(f"| {r['impl']} | {r['case']} | {'yes' if r['ok'] else 'NO'} | {errs} |"
                   + (f" {r['error']}" if "error" in r else ""))
  bench = [r for r in results if r["kind"] == "bench"]
  if bench:
    # The baseline of every row is cuDNN *dense* on the same (B,S,H,D), also for masked rows.
    cudnn = {}
    for r in bench:
      if r["impl"] == "cudnn" and "fwd_ms" in r and "window" not in r["case"]:
        cudnn[r["case"].split(" ")[0]] = r
    lines.append("")
    lines.append("| impl | case (B,S,H,D) | fwd ms | fwd TFLOP/s | fwd time / cuDNN | fwd+bwd ms | "
                 "fwd+bwd TFLOP/s | fwd+bwd time / cuDNN |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in bench:
      if "fwd_ms" not in r:
        lines.append(f"| {r['impl']} | {r['case']} | {r.get('skipped') or r.get('error')} "
                     "| | | | | |")
        continue
      base = cudnn.get(r["case"].split(" ")[0])
      rf = f"{r['fwd_ms'] / base['fwd_ms']:.3f}" if base else "-"
      rb = f"{r['fb_ms'] / base['fb_ms']:.3f}" if base else "-"
      lines.append(f"| {r['impl']} | {r['case']} | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.0f} | "
                   f"{rf} | {r['fb_ms']:.3f} | {r['fb_tflops']:.0f} | {rb} |")
    lines.append("(time / cuDNN: our time over cuDNN's dense time on the same (B,S,H,D) in the "
                 "same run, so < 1 is faster than cuDNN; TFLOP/s of masked rows count the dense "
                 "FLOPs.)")
  text = "\n".join(lines)
  print(text)
  if out:
    with open(out, "w") as f:
      f.write(text + "\n")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--worker")
  parser.add_argument("--jobs", default="check:mosaic,bench:cudnn,bench:mosaic,check:triton,"
                      "bench:triton,bench:xla,bench:tokamax")
  parser.add_argument("--out", default=os.environ.get("OUT", "."))
  args = parser.parse_args()
  if args.worker:
    kind, impl = args.worker.split(":")
    if impl == "tokamax":
      try:
        import tokamax  # noqa: F401, PLC0415
      except ImportError:
        _result(kind=kind, impl=impl, case="all", skipped="tokamax not installed")
        return
    {"check": job_check, "bench": job_bench}[kind](impl)
    return
  # The parent must not start a JAX backend: it would take the GPU memory the jobs need.
  from importlib import metadata  # noqa: PLC0415
  gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm",
                        "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
  info = {"gpu": gpu, "jax": metadata.version("jax"),
          "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                   text=True).stdout.strip() or "unknown",
          "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
  print(json.dumps(info), flush=True)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "attention_log.txt"), "w") as log:
    log.write(json.dumps(info) + "\n")
    results = run_jobs(args.jobs.split(","), log)
  with open(os.path.join(args.out, "attention_results.json"), "w") as f:
    json.dump({"info": info, "results": results}, f, indent=1)
  print_tables(results, os.path.join(args.out, "attention_table.md"))


if __name__ == "__main__":
  main()
