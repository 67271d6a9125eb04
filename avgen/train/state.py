"""Training state: parameters, optimizer, EMA, RNG, and how it is created sharded.

With `config.train.offload_optimizer` the optimizer state lives in pinned host memory between
steps (its shardings carry memory_kind="pinned_host"); the step's update brings it to the device
one scanned layer at a time (avgen.train.offload), so the device never holds all of it.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from avgen import models
from avgen.parallel import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # training steps taken (skipped non-finite updates included)
  params: Any  # nnx.State of the model's Params (logical names in the metadata)
  opt_state: Any
  ema_params: Any
  rng: jax.Array  # raw uint32 key data, so that checkpoints hold plain arrays
  nonfinite_streak: jax.Array  # consecutive steps whose update was not applied
  nonfinite_total: jax.Array


def learning_rate_schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to the peak, then cosine decay to `end_lr_fraction` of it."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.learning_rate, warmup_steps=max(t.warmup_steps, 1),
      decay_steps=max(t.num_steps, t.warmup_steps + 1), end_value=t.learning_rate * t.end_lr_fraction)


def optimizer_parts(t: ml_collections.ConfigDict):
  """(global-norm clipping, AdamW): build_optimizer chains them.

  The offloaded step (avgen.train.offload) applies them apart: the clipping needs every
  gradient, AdamW is elementwise, so it runs on any split of the leaves (lists of them: a
  weight-decay mask, none today, would have to accept those).
  """
  # The first moment tolerates bf16 (an average of gradients, themselves bf16-computed); the
  # second moment stays f32: its small values set each parameter's step size.
  mu_dtype = t.get("adam_mu_dtype", "float32")  # absent in older configs
  return (optax.clip_by_global_norm(t.clip_norm),
          optax.adamw(learning_rate_schedule(t), b1=t.adam_b1, b2=t.adam_b2,
                      weight_decay=t.weight_decay, mu_dtype=jnp.dtype(mu_dtype)))


def build_optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return optax.chain(*optimizer_parts(t))


def split_model(model: nnx.Module):
  """(graphdef, params, rest): rest holds any non-trainable state the model keeps."""
  return nnx.split(model, nnx.Param, ...)


def init_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation, seed_key: jax.Array):
  """Builds the model and returns (graphdef, rest, TrainState); traceable under jit/eval_shape."""
  init_key, train_key = jax.random.split(seed_key)
  model = models.build_model(config, nnx.Rngs(params=init_key))
  graphdef, params, rest = split_model(model)
  state = TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      ema_params=jax.tree.map(jnp.copy, params),
      rng=jax.random.key_data(train_key),
      nonfinite_streak=jnp.zeros((), jnp.int32),
      nonfinite_total=jnp.zeros((), jnp.int32),
  )
  return graphdef, rest, state


OFFLOAD_MEMORY = "pinned_host"


def check_offload_supported(devices=None) -> None:
  """Raises if the devices have no pinned host memory to hold an offloaded optimizer state."""
  devices = list(jax.devices() if devices is None else devices)
  kinds = sorted({m.kind for m in devices[0].addressable_memories()})
  if OFFLOAD_MEMORY not in kinds:
    raise ValueError(
        f"config.train.offload_optimizer=True needs {OFFLOAD_MEMORY!r} memory, but "
        f"{devices[0].platform} devices offer {kinds}; set config.train.offload_optimizer=False")


def state_shardings(abstract_state: TrainState, mesh: Mesh, rules, *,
                    offload_optimizer: bool = False) -> TrainState:
  """NamedShardings for every leaf, from the logical names on the parameters (replicated else).

  offload_optimizer: the optimizer state's shardings say pinned host memory (same layout).
  """
  specs = nnx.get_partition_spec(abstract_state)
  shardings = sharding.tree_shardings(specs, mesh, rules, shapes=abstract_state)
  if offload_optimizer:
    check_offload_supported(mesh.devices.flat)
    shardings = shardings.replace(opt_state=jax.tree.map(
        lambda s: s.with_memory_kind(OFFLOAD_MEMORY), shardings.opt_state))
  return shardings


def create_sharded_state(config: ml_collections.ConfigDict, tx, mesh: Mesh, rules):
  """Initialises the state directly into its sharded layout (no full copy on one device).

  Returns (graphdef, rest, state, shardings).
  """
  seed_key = jax.random.key(config.train.seed)
  graphdef, rest, abstract = _abstract(config, tx, seed_key)
  shardings = state_shardings(abstract, mesh, rules,
                              offload_optimizer=bool(config.train.get("offload_optimizer", False)))

  def init(key):
    return init_state(config, tx, key)[2]

  with sharding.use_rules(mesh, rules):
    state = jax.jit(init, out_shardings=shardings)(seed_key)
  return graphdef, rest, state, shardings


def _abstract(config, tx, seed_key):
  captured = {}

  def f(key):
    graphdef, rest, state = init_state(config, tx, key)
    captured["graphdef"], captured["rest"] = graphdef, rest
    return state

  abstract = jax.eval_shape(f, seed_key)
  return captured["graphdef"], captured["rest"], abstract


def abstract_state(config, tx):
  """(graphdef, rest, abstract TrainState) without allocating anything."""
  return _abstract(config, tx, jax.random.key(config.train.seed))


def ema_update(ema, params, decay: float):
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def guarded_update(tx, grads, opt_state, params, ema_params, finite, ema_decay: float):
  """(params, opt_state, ema_params) after tx's update and the EMA; each is left as it was
  unless `finite`, so a non-finite loss or gradient changes nothing."""
  updates, new_opt_state = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  new_ema = ema_update(ema_params, new_params, ema_decay)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  return keep(new_params, params), keep(new_opt_state, opt_state), keep(new_ema, ema_params)
