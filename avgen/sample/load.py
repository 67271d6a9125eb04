"""Loading a trained model for generation from a training workdir (orbax checkpoint + config)."""

from __future__ import annotations

import os

import jax
import ml_collections
import orbax.checkpoint as ocp

from avgen import config as config_lib
from avgen.sample.generate import Generator
from avgen.train import state as state_lib


def load_config(checkpoint_dir: str, step: int) -> ml_collections.ConfigDict:
  manager = ocp.CheckpointManager(checkpoint_dir, item_handlers={"config": ocp.JsonCheckpointHandler()})
  record = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  manager.close()
  return ml_collections.ConfigDict(record["config"])


def load_generator(workdir: str, *, step: int | None = None, use_ema: bool = True,
                   text_encoder=None):
  """Returns (config, Generator, params) from the latest (or given) checkpoint in `workdir`.

  A frozen text encoder is not in the checkpoint: the Generator loads it from the saved config's
  model.text_encoder_source, unless `text_encoder` (a FrozenTextEncoder) is given.
  """
  checkpoint_dir = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if not os.path.isdir(checkpoint_dir):
    raise FileNotFoundError(f"--workdir {workdir!r}: no checkpoints/ folder (train first with avgen.main)")
  steps = ocp.utils.checkpoint_steps(checkpoint_dir)
  if not steps:
    raise FileNotFoundError(f"--workdir {workdir!r}: checkpoints/ holds no finished checkpoint")
  step = max(steps) if step is None else step
  if step not in steps:
    raise FileNotFoundError(f"--workdir {workdir!r}: no checkpoint for step {step}; have {sorted(steps)}")
  config = load_config(checkpoint_dir, step)
  config_lib.validate(config)
  tx = state_lib.build_optimizer(config.train)
  graphdef, rest, abstract = state_lib.abstract_state(config, tx)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
  manager = ocp.CheckpointManager(checkpoint_dir, item_handlers={"state": ocp.StandardCheckpointHandler()})
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
  manager.close()
  params = restored.ema_params if use_ema else restored.params
  return config, Generator(config, graphdef, rest, text_encoder=text_encoder), params
