"""Times the real train step of a config on this machine (the demo on a laptop CPU).

  python benchmarks/train_step_cpu.py --config=configs/stage2.py:demo [--config.x=y ...] --steps=20

Prints compile time, median s/step after warm-up, steps/s, CPU seconds per step (all threads;
comparable when other work shares the cores) and the process's peak RSS.
"""

from __future__ import annotations

import resource
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, ".")

_CONFIG = config_flags.DEFINE_config_file("config", "configs/stage2.py:demo", "Config file.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps after warm-up.")


def main(argv):
  del argv
  from avgen import config as config_lib
  from avgen.parallel import mesh as mesh_lib
  from avgen.train import state as state_lib, step as step_lib

  config = _CONFIG.value
  config_lib.validate(config, jax.device_count())
  shapes = config_lib.latent_shapes(config)
  b = config.data.batch_size
  rng = np.random.default_rng(0)
  batch = {
      "video": rng.uniform(-1, 1, (b,) + shapes["video"]).astype(np.float32),
      "audio": rng.normal(size=(b,) + shapes["audio"]).astype(np.float32),
      "text_ids": rng.integers(3, 200, (b, config.data.caption_max_len)).astype(np.int32),
      "text_mask": np.ones((b, config.data.caption_max_len), bool),
      "skipped_records": np.zeros((b,), np.int32),
  }
  mesh = mesh_lib.build_mesh(config)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  tx = state_lib.build_optimizer(config.train)
  graphdef, rest, state, shardings = state_lib.create_sharded_state(config, tx, mesh, rules)
  train_step = step_lib.make_train_step(config, graphdef, rest, tx, mesh, rules, shardings,
                                        mesh_lib.batch_sharding(mesh))
  gbatch = mesh_lib.global_batch(batch, mesh)
  t0 = time.perf_counter()
  state, m = train_step(state, gbatch)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - t0
  times = []
  cpu0 = _cpu_seconds()
  for _ in range(_STEPS.value):
    t0 = time.perf_counter()
    state, m = train_step(state, gbatch)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t0)
  med = float(np.median(times))
  # CPU seconds per step (all threads) stay comparable when other work shares the cores.
  cpu_per_step = (_cpu_seconds() - cpu0) / _STEPS.value
  peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f"devices {jax.device_count()} x {jax.devices()[0].platform} | compile+first step {compile_s:.1f} s | "
        f"median {med:.3f} s/step | {1 / med:.2f} steps/s | {cpu_per_step:.3f} CPU s/step | peak RSS {peak_gib:.2f} GiB")


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
  app.run(main)
