"""Times avgen's real train step (full model: text encoder, DiT, alignment, heads, AdamW, EMA).

  python benchmarks/train_step.py --config=configs/stage2.py:2B [--config.x=y ...] \
      [--devices=N] [--steps=10] [--profile] [--tag=NAME]

The batch is synthetic and lives on the device, so the numbers are the step's alone. Prints and
writes ($OUT/train_step_TAG.json):
  compile_s          lowering + XLA compilation of the step
  step_s             median seconds per step after warm-up
  peak_gib           peak device memory (largest over the devices used)
  peer_tflops        model TFLOP/s per device by the peer script's formula (its token linears,
                     self- and cross-attention; ../shared/bench/torch_dit_peer.py) at our shapes
  xla_tflops         TFLOP/s per device by XLA's cost analysis of the compiled step: every op the
                     program runs, heads, remat recomputation and the optimizer included
With --profile, three steps are traced and the GPU kernels are summed by kind (attention, matmul,
collective, other fusions) and by name (top 15) into the same JSON. Each kernel is also traced
back to the JAX operation it was fused from (the `op_name` of its fusion in the compiled HLO),
and the "other" kernels are summed by that source (`other_by_source`), which says which line of
the model the elementwise time belongs to.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, ".")
sys.path.insert(0, os.path.dirname(__file__))

from common import synthetic_batch  # pylint: disable=wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", "configs/stage2.py:demo", "Config file.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps after warm-up.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_DEVICES = flags.DEFINE_integer("devices", 0, "Use the first N devices (0: all).")
_PROFILE = flags.DEFINE_bool("profile", False, "Trace 3 steps; summarize kernels by kind.")
_TAG = flags.DEFINE_string("tag", "", "Suffix of the JSON file name.")
_MEMORY_ONLY = flags.DEFINE_bool(
    "memory_only", False,
    "Compile only (nothing allocated, so several sizes can compile at once) and report XLA's "
    "memory analysis: the peak a device needs for this step.")
_PARAMS_OVER_CONTEXT = flags.DEFINE_bool(
    "params_over_context", False,
    "Shard parameters and optimizer state over the context axis too (ZeRO over fsdp x context).")


def peer_flops(config, num_video: int, num_audio: int) -> float:
  """FLOPs of one step by ../shared/bench/torch_dit_peer.py's formula at our shapes.

  Per DiT block and token: qkv, out, cross q, cross out and the MLP (14 D^2 multiply-adds);
  self-attention 4 S^2 D; cross-attention 4 S T D and its key/value projection of the text;
  backward = 2x forward. The heads, the text encoder and the alignment module are not counted.
  """
  m = config.model
  d, depth = m.width, m.depth
  s, t, dt = num_video + num_audio, config.data.caption_max_len, m.text_width
  per_token = 14 * d * d
  forward = depth * (2 * per_token * s + 4 * s * s * d + 4 * s * t * d + 2 * t * dt * 2 * d)
  return 3.0 * forward * config.data.batch_size


_HLO_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?op_name="([^"]*)"(?:.*?stack_frame_id=(\d+))?')


def _stack_tables(hlo_text: str) -> dict[str, dict[int, str]]:
  """The module's FileNames / FunctionNames / FileLocations / StackFrames tables: id -> text."""
  tables, current = {}, None
  for line in hlo_text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      current = tables.setdefault(line, {})
    elif current is not None and re.match(r"^\d+ ", line):
      key, value = line.split(" ", 1)
      current[int(key)] = value.strip('"')
    else:
      current = None
  return tables


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """Instruction name (as GPU kernels are named: '.' and '-' become '_') -> where it came from:
  the JAX op_name of its metadata plus the Python line that made it ('  @ dit.py:171 fn')."""
  tables = _stack_tables(hlo_text)
  field = lambda text, name: int(re.search(name + r"=(\d+)", text).group(1))

  def location(frame: str) -> str:
    loc = tables["FileLocations"][field(frame, "file_location_id")]
    path = tables["FileNames"][field(loc, "file_name_id")]
    function = tables["FunctionNames"][field(loc, "function_name_id")]
    return f"{os.path.basename(path)}:{field(loc, 'line')} {function.split('.')[-1]}"

  def where(frame_id: int) -> str:
    """The innermost Python line (the table's parent links are not the callers; left out)."""
    try:
      return "  @ " + location(tables["StackFrames"][frame_id])
    except (KeyError, AttributeError):
      return ""

  names = {}
  for line in hlo_text.splitlines():
    match = _HLO_INSTRUCTION.match(line)
    if match:
      frame = where(int(match.group(3))) if match.group(3) else ""
      names[re.sub(r"[.\-]", "_", match.group(1))] = match.group(2) + frame
  return names


def source_of(op_name: str) -> str:
  """An op_name without the transforms' wrappers, and whether it runs in the backward pass:
  'jit(step)/transpose(jvp())/while/body/closed_call/mul  @ dit.py:171 f' -> 'bwd: mul  @ dit.py:171 f'."""
  name, _, frame = op_name.partition("  @ ")
  backward = "transpose(" in name
  parts = [p for p in name.split("/")
           if not re.match(r"^(jit|jvp|transpose|vmap|pjit|remat|checkpoint|while|body|cond|"
                           r"branch_\d+_fun|rematted_computation|closed_call|core_call)\b", p)]
  return (("bwd: " if backward else "") + "/".join(parts[-3:])
          + (f"  @ {frame}" if frame else ""))


def kernel_summary(trace_dir: str, op_names: dict[str, str] | None = None) -> dict:
  """Sums device kernel time of a jax.profiler trace by kind and by name (and, given the
  compiled HLO's op names, the "other" kernels by the JAX operation they came from)."""
  paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not paths:
    return {"error": f"no perfetto trace under {trace_dir}"}
  with gzip.open(paths[0]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  # Device streams are the processes whose name mentions the GPU; host threads are not kernels.
  device_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                 and "/device:" in str(e.get("args", {}).get("name", ""))}
  by_name = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in device_pids and "dur" in e:
      by_name[e["name"]] += e["dur"]
  kinds = collections.Counter()
  for name, us in by_name.items():
    kinds[_kernel_kind(name)] += us
  total = sum(by_name.values()) or 1
  op_names = op_names or {}
  by_source = collections.Counter()
  for name, us in by_name.items():
    if _kernel_kind(name).startswith("other"):
      by_source[source_of(op_names.get(name, "?" + name))] += us
  return {
      "device_ms_per_step": total / 3 / 1e3,
      "by_kind_pct": {k: round(100 * v / total, 1) for k, v in kinds.most_common()},
      "top": [(n[:90], round(us / 3 / 1e3, 2)) for n, us in by_name.most_common(15)],
      "top_other": [(n[:90], round(us / 3 / 1e3, 2)) for n, us in by_name.most_common()
                    if _kernel_kind(n).startswith("other")][:15],
      "other_by_source": [(k[:120], round(us / 3 / 1e3, 2)) for k, us in
                          by_source.most_common(30)],
      "kernels_traced_to_hlo": round(sum(us for n, us in by_name.items() if n in op_names)
                                     / total, 3),
      "kernels": [(n[:90], round(us / 3 / 1e3, 3), op_names.get(n, ""))
                  for n, us in by_name.most_common(300)],
  }


def _kernel_kind(name: str) -> str:
  n = name.lower()
  if any(k in n for k in ("nccl", "all-gather", "all_gather", "reduce-scatter", "reduce_scatter",
                          "all-reduce", "allreduce", "collective", "ppermute", "all-to-all")):
    return "collective"
  if any(k in n for k in ("fmha", "flash", "cudnn", "attention", "mosaic", "sdpa")):
    return "attention"
  if any(k in n for k in ("gemm", "cutlass", "nvjet", "matmul", "dot", "xmma", "cublas", "wgmma")):
    return "matmul"
  if "memcpy" in n or "memset" in n:
    return "copy"
  return "other (fusions, elementwise, reductions)"


def memory_only(config, tx, mesh, rules):
  """Compiles the step on abstract inputs and prints XLA's memory analysis as a RESULT line."""
  from avgen import config as config_lib  # noqa: PLC0415
  from avgen.parallel import mesh as mesh_lib  # noqa: PLC0415
  from avgen.train import state as state_lib, step as step_lib  # noqa: PLC0415

  graphdef, rest, abstract = state_lib.abstract_state(config, tx)
  offload = bool(config.train.get("offload_optimizer", False))
  shardings = state_lib.state_shardings(abstract, mesh, rules, offload_optimizer=offload)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                       shardings)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding),
                       synthetic_batch(config, config_lib.latent_shapes(config)))
  step = step_lib.make_train_step(config, graphdef, rest, tx, mesh, rules, shardings, batch_sharding)
  jitted = getattr(step, "jitted", step)
  args = (state, batch) if jitted is step else (state, batch, None)
  t0 = time.perf_counter()
  mem = jitted.lower(*args).compile().memory_analysis()
  # Donated state aliases the updated state, so arguments + outputs - aliased + temporaries.
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes)
  host = lambda name: (getattr(mem, f"host_{name}_size_in_bytes", 0) or 0) / 2**30
  result = dict(tag=_TAG.value, device=jax.devices()[0].device_kind, width=config.model.width,
                depth=config.model.depth, remat=config.model.remat, adaln=config.model.adaln,
                offload_optimizer=offload, compile_s=round(time.perf_counter() - t0, 1),
                params_m=round(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params)) / 1e6, 1),
                device_peak_gib=round(peak / 2**30, 2), temp_gib=round(mem.temp_size_in_bytes / 2**30, 2),
                host_argument_gib=round(host("argument"), 2), host_temp_gib=round(host("temp"), 2))
  print("RESULT " + json.dumps(result), flush=True)


def main(argv):
  del argv
  from avgen import config as config_lib
  from avgen.parallel import mesh as mesh_lib
  from avgen.train import state as state_lib, step as step_lib

  config = _CONFIG.value
  devices = jax.devices()[:_DEVICES.value] if _DEVICES.value else jax.devices()
  config_lib.validate(config, len(devices))
  shapes = config_lib.latent_shapes(config)
  mesh = mesh_lib.build_mesh(config, devices)
  if _PARAMS_OVER_CONTEXT.value:
    config.mesh.rules = tuple((n, ("fsdp", "context")) if n == "embed" else (n, a)
                              for n, a in config.mesh.rules)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  tx = state_lib.build_optimizer(config.train)
  if _MEMORY_ONLY.value:
    return memory_only(config, tx, mesh, rules)
  graphdef, rest, state, shardings = state_lib.create_sharded_state(config, tx, mesh, rules)
  train_step = step_lib.make_train_step(config, graphdef, rest, tx, mesh, rules, shardings,
                                        mesh_lib.batch_sharding(mesh))
  batch = jax.device_put(synthetic_batch(config, shapes), mesh_lib.batch_sharding(mesh))
  jitted = getattr(train_step, "jitted", train_step)
  args = (state, batch) if jitted is train_step else (state, batch, None)

  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  print(f"compiled in {compile_s:.1f} s", flush=True)  # progress, for runs cut off by a limit
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla_flops = float((cost or {}).get("flops", 0.0))
  if jitted is not train_step:  # a frozen text encoder: its weights are the third argument
    run = lambda s: train_step(s, batch)
  else:
    run = lambda s: compiled(s, batch)

  for i in range(max(_WARMUP.value, 1)):
    t0 = time.perf_counter()
    state, metrics = run(state)
    jax.block_until_ready(state)
    print(f"warm-up step {i}: {time.perf_counter() - t0:.2f} s", flush=True)
  times = []
  for _ in range(_STEPS.value):
    t0 = time.perf_counter()
    state, metrics = run(state)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  loss = float(metrics.compute()["loss"])

  profile = None
  if _PROFILE.value:
    trace_dir = tempfile.mkdtemp(prefix="avgen_trace_")
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(3):
      state, metrics = run(state)
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    hlo = compiled.as_text()
    profile = kernel_summary(trace_dir, hlo_op_names(hlo))
    if os.environ.get("OUT"):
      with gzip.open(os.path.join(os.environ["OUT"], f"hlo_{_TAG.value or 'step'}.txt.gz"), "wt") as f:
        f.write(hlo)

  peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in devices)
  n = len(devices)
  num_video = int(np.prod([s // p for s, p in zip(shapes["video"][:3], config.model.video_patch)]))
  num_audio = shapes["audio"][0] // config.model.audio_patch
  result = dict(
      tag=_TAG.value, device=devices[0].device_kind, num_devices=n, mesh=dict(mesh.shape),
      size=config.size, width=config.model.width, depth=config.model.depth,
      batch=config.data.batch_size, video_tokens=num_video, audio_tokens=num_audio,
      text_tokens=config.data.caption_max_len, attention=config.model.attention_impl,
      remat=config.model.remat, scan_layers=bool(config.model.get("scan_layers", False)),
      dtype=config.model.dtype, compile_s=round(compile_s, 1), step_s=round(step_s, 4),
      steps_timed=len(times), peak_gib=round(peak / 2**30, 2),
      peer_tflops=round(peer_flops(config, num_video, num_audio) / step_s / n / 1e12, 1),
      xla_tflops=round(xla_flops / step_s / 1e12, 1),  # cost analysis is per device program
      loss=loss, jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""), profile=profile,
      params_m=round(sum(x.size for x in jax.tree.leaves(state.params)) / 1e6, 1))
  print("RESULT " + json.dumps(result), flush=True)
  out_dir = os.environ.get("OUT")
  if out_dir:
    name = f"train_step_{_TAG.value}.json" if _TAG.value else "train_step.json"
    with open(os.path.join(out_dir, name), "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
