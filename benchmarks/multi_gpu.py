"""Multi-device correctness: the same training run on one device and on several meshes.

  python benchmarks/multi_gpu.py --config=configs/stage2.py:B --steps=20 \
      --meshes='1:1,1,1,1 2:2,1,1,1 2:1,2,1,1 2:1,1,1,2 2:1,1,2,1'

Each mesh is `DEVICES:data,fsdp,context,tensor` over the first DEVICES devices. Every run starts
from the same initial weights (the seed's, independent of the sharding) and sees the same
synthetic batches, so the losses must agree step for step up to the compute dtype's rounding.
The first mesh is the reference. Prints one RESULT line of JSON (also $OUT/multi_gpu_TAG.json).
A suffix `/all_to_all` or `/ring` on a mesh picks model.context_parallel for it.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, ".")
sys.path.insert(0, os.path.dirname(__file__))

from common import synthetic_batch  # pylint: disable=wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", "configs/stage2.py:B", "Config file.")
_STEPS = flags.DEFINE_integer("steps", 20, "Training steps per mesh.")
_MESHES = flags.DEFINE_string("meshes", "1:1,1,1,1 2:2,1,1,1",
                               "Space-separated DEVICES:data,fsdp,context,tensor[/strategy]")
_TAG = flags.DEFINE_string("tag", "", "Suffix of the JSON file name.")


def parse_mesh(spec: str):
  spec, _, strategy = spec.partition("/")
  count, sizes = spec.split(":")
  sizes = [int(s) for s in sizes.split(",")]
  if len(sizes) != 4:
    raise ValueError(f"--meshes: {spec!r} needs 4 sizes (data,fsdp,context,tensor)")
  return int(count), dict(zip(("data", "fsdp", "context", "tensor"), sizes)), strategy or None


def train_losses(config, devices, steps: int):
  """Losses of `steps` training steps on a mesh of `devices`; (losses, compile_s, step_s)."""
  from avgen import config as config_lib
  from avgen.parallel import mesh as mesh_lib
  from avgen.train import state as state_lib, step as step_lib

  config_lib.validate(config, len(devices))
  shapes = config_lib.latent_shapes(config)
  mesh = mesh_lib.build_mesh(config, devices)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  tx = state_lib.build_optimizer(config.train)
  graphdef, rest, state, shardings = state_lib.create_sharded_state(config, tx, mesh, rules)
  train_step = step_lib.make_train_step(config, graphdef, rest, tx, mesh, rules, shardings,
                                        mesh_lib.batch_sharding(mesh))
  losses, times = [], []
  t_start = time.perf_counter()
  for i in range(steps):
    batch = jax.device_put(synthetic_batch(config, shapes, seed=i), mesh_lib.batch_sharding(mesh))
    t0 = time.perf_counter()
    state, metrics = train_step(state, batch)
    losses.append(float(metrics.compute()["loss"]))
    times.append(time.perf_counter() - t0)
    if i == 0:
      compile_s = time.perf_counter() - t_start
  peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in devices)
  return losses, compile_s, float(np.median(times[1:] or times)), peak / 2**30


def main(argv):
  del argv
  base = _CONFIG.value
  rows = []
  for spec in _MESHES.value.split():
    count, sizes, strategy = parse_mesh(spec)
    if count > jax.device_count():
      rows.append(dict(mesh=spec, error=f"needs {count} devices, have {jax.device_count()}"))
      continue
    config = base.copy_and_resolve_references()
    for axis, size in sizes.items():
      config.mesh[axis] = size
    if strategy:
      config.model.context_parallel = strategy
    try:
      losses, compile_s, step_s, peak = train_losses(config, jax.devices()[:count], _STEPS.value)
      rows.append(dict(mesh=spec, losses=losses, compile_s=round(compile_s, 1),
                       step_s=round(step_s, 4), peak_gib=round(peak, 2)))
    except Exception as e:  # a failing mesh is a result too; the others still run
      rows.append(dict(mesh=spec, error=f"{type(e).__name__}: {str(e)[:400]}"))
    print("MESH " + json.dumps(rows[-1]), flush=True)
  ref = next((r["losses"] for r in rows if "losses" in r), None)
  for r in rows:
    if "losses" in r and ref is not None:
      a, b = np.asarray(r["losses"]), np.asarray(ref)
      r["max_rel_diff_vs_first"] = float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-6)))
  result = dict(tag=_TAG.value, device=jax.devices()[0].device_kind, size=base.size,
                batch=base.data.batch_size, steps=_STEPS.value, dtype=base.model.dtype,
                jax=jax.__version__, runs=rows)
  print("RESULT " + json.dumps(result), flush=True)
  out_dir = os.environ.get("OUT")
  if out_dir:
    name = f"multi_gpu_{_TAG.value}.json" if _TAG.value else "multi_gpu.json"
    with open(os.path.join(out_dir, name), "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
