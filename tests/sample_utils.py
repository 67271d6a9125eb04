"""A tiny checkpoint for the sampling tests, written without training or compiling anything.

The weights are random, not the initial ones: a fresh model's zero-initialised output layers
would make every sample the same, so seed, prompt and guidance could not show in them.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from avgen.train import checkpoints, state as state_lib
from train_utils import tiny_config


def sample_config(**overrides):
  config = tiny_config(**overrides)
  config.sample.guidance_video = config.sample.guidance_audio = 2.0
  return config


def _random_params(abstract_params, rng: np.random.Generator, noise: float):
  """numpy weights for every parameter: norm scales near 1, matrices ~ N(0, 1/fan_in)."""
  def fill(path, leaf):
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    shape = leaf.shape
    if "scale" in names:
      return (1.0 + noise * rng.standard_normal(shape)).astype(leaf.dtype)
    std = 1.0 / np.sqrt(shape[0]) if len(shape) >= 2 else noise
    return (std * rng.standard_normal(shape)).astype(leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, abstract_params)


def random_params(config, *, seed: int = 0, noise: float = 0.05):
  """Random host weights (an nnx.State of numpy arrays) for the model of `config`."""
  tx = state_lib.build_optimizer(config.train)
  _, _, abstract = state_lib.abstract_state(config, tx)
  return _random_params(abstract.params, np.random.default_rng(seed), noise)


def stack_blocks(params, scanned_config):
  """`params` of a loop model rearranged for `scanned_config` (model.scan_layers: the DiT blocks
  stacked on a leading axis)."""
  pure = nnx.to_pure_dict(params)
  blocks = pure["dit"]["blocks"]
  pure["dit"]["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *[blocks[i] for i in sorted(blocks)])
  stacked = random_params(scanned_config)
  nnx.replace_by_pure_dict(stacked, pure)
  return stacked


def build_checkpoint(workdir, config=None, *, step: int = 1, seed: int = 0,
                     noise: float = 0.05, params=None) -> str:
  """Writes workdir/checkpoints/<step> with the state and config as the trainer saves them.

  Nothing is compiled: the state's structure comes from `jax.eval_shape` and every leaf is
  filled on the host (random weights unless `params` are given, zero optimizer moments).
  """
  config = config or sample_config()
  tx = state_lib.build_optimizer(config.train)
  _, _, abstract = state_lib.abstract_state(config, tx)
  if params is None:
    params = random_params(config, seed=seed, noise=noise)
  zeros = lambda tree: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), tree)
  state = abstract.replace(step=np.zeros((), np.int32), params=params,
                           opt_state=zeros(abstract.opt_state), ema_params=params,
                           rng=zeros(abstract.rng), nonfinite_streak=np.zeros((), np.int32),
                           nonfinite_total=np.zeros((), np.int32))
  manager = ocp.CheckpointManager(
      os.path.join(os.fspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "config": ocp.JsonCheckpointHandler()})
  record = {"config": json.loads(config.to_json_best_effort()),
            "shape_signature": checkpoints.shape_signature(config)}
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             config=ocp.args.JsonSave(record)))
  manager.wait_until_finished()
  manager.close()
  return os.fspath(workdir)


def tone(seconds: float, sample_rate: int, freq: float = 440.0) -> np.ndarray:
  t = np.arange(int(round(seconds * sample_rate))) / sample_rate
  return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def square_video(num_frames: int, height: int, width: int) -> np.ndarray:
  """A white square moving right on black, uint8 [T, H, W, 3]."""
  frames = np.zeros((num_frames, height, width, 3), np.uint8)
  size = max(1, height // 4)
  for f in range(num_frames):
    x = (f * max(1, width // num_frames)) % max(1, width - size)
    frames[f, height // 2 - size // 2:height // 2 + size // 2, x:x + size] = 255
  return frames


# XLA's CPU backend compiles about twice as fast without LLVM optimizations; the tests compile
# more than they run.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


_shared: dict[str, str] = {}


def shared_checkpoint(tmp_path_factory) -> str:
  """One tiny checkpoint for every sampling test module of this process (pass pytest's
  session-scoped tmp_path_factory). Modules that load it with `api.load_pipeline(path,
  compiler_options=FAST_COMPILE)` share one pipeline, and with it its compiled programs."""
  if "path" not in _shared:
    _shared["path"] = build_checkpoint(tmp_path_factory.mktemp("sample_ckpt"))
  return _shared["path"]
