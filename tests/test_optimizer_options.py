"""Optimizer memory options keep the loss curve: AdamW's first moment in bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np

import train_utils
from avgen.parallel import mesh as mesh_lib
from avgen.train import state as state_lib, step as step_lib
from data_pipeline import loader as loader_lib


def _losses(config, batch, steps):
  devices = jax.devices()[:1]
  mesh = mesh_lib.build_mesh(config, devices)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  tx = state_lib.build_optimizer(config.train)
  graphdef, rest, state, shardings = state_lib.create_sharded_state(config, tx, mesh, rules)
  step = step_lib.make_train_step(config, graphdef, rest, tx, mesh, rules, shardings,
                                  mesh_lib.batch_sharding(mesh))
  losses = []
  for _ in range(steps):
    state, m = step(state, mesh_lib.global_batch(batch, mesh))
    losses.append(float(m.compute()["loss"]))
  return losses, state


def test_bf16_first_moment_halves_its_memory_and_keeps_the_loss_curve(tmp_path):
  config = train_utils.tiny_config(train__learning_rate=3e-3, train__warmup_steps=2)
  config.mesh.data = 1
  paths = train_utils.make_shards(tmp_path / "data", config)
  batch = next(loader_lib.make_loader(config, paths, seed=0))
  ref, ref_state = _losses(config, batch, 8)
  config.train.adam_mu_dtype = "bfloat16"
  ours, state = _losses(config, batch, 8)

  def moment_bytes(s, name):
    adam = s.opt_state[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState first
    return sum(x.nbytes for x in jax.tree.leaves(getattr(adam, name)))

  assert moment_bytes(state, "mu") * 2 == moment_bytes(ref_state, "mu")
  assert moment_bytes(state, "nu") == moment_bytes(ref_state, "nu")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.opt_state[1][0].mu))
  # Training moves the loss (so the comparison means something) and bf16 rounding of the
  # first moment stays within a few percent of the float32 curve.
  assert abs(ref[-1] - ref[0]) > 0.05 * abs(ref[0]), ref
  np.testing.assert_allclose(ours, ref, rtol=0.03)
