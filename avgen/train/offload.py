"""The update of an optimizer state kept in host memory, streamed one scanned layer at a time.

With `config.train.offload_optimizer` AdamW's moments (mu, nu: 6 bytes per parameter with a
bf16 mu) live in pinned host memory between steps. Brought to the device whole for the update,
they sit there next to the f32 gradients, the parameters and the EMA, which is the step's
peak: offloading then saved nothing (XLA's memory analysis, 3072 x 32 on an H200: 18 bytes per
parameter with and without). So the leaves stacked over the scanned DiT blocks (a leading
`layers` axis; with model.scan_layers most of the parameters) are updated in a loop over that
axis which brings one layer's moments in, updates that layer's parameters, moments and EMA in
place, and writes its moments back to host memory: the device holds one layer's moments at a
time. The other leaves are small and are updated at once, their moments moved in whole.

The numbers are those of build_optimizer's `tx.update`: its global-norm clipping runs first on
all the gradients, and its AdamW part is elementwise (one step count, one learning rate), so it
gives the same result on any split of the leaves.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from avgen.train.state import OFFLOAD_MEMORY, guarded_update


def offloaded(shardings) -> bool:
  """Whether a TrainState's shardings keep the optimizer state in host memory."""
  return any(getattr(s, "memory_kind", None) == OFFLOAD_MEMORY
             for s in jax.tree.leaves(shardings.opt_state))


def moments(adamw, adam_state) -> list:
  """The parameter-shaped trees inside an AdamW state (mu and nu), in order."""
  found = []
  optax.tree_utils.tree_map_params(adamw, found.append, adam_state, is_leaf=lambda _: True)
  return found


def with_moments(adamw, adam_state, trees):
  """adam_state with its parameter-shaped trees replaced by `trees` (in moments' order)."""
  trees = iter(trees)
  return optax.tree_utils.tree_map_params(adamw, lambda _: next(trees), adam_state,
                                          is_leaf=lambda _: True)


def _streamed(spec: PartitionSpec, sharding: NamedSharding) -> bool:
  """A leaf stacked over the scanned blocks whose layer axis is not split over devices."""
  return len(spec) > 0 and spec[0] == "layers" and (len(sharding.spec) == 0
                                                      or sharding.spec[0] is None)


def update(clip, adamw, grads, finite, state, shardings, ema_decay: float):
  """(params, opt_state, ema_params) after one update, each left as it was unless `finite`.

  clip, adamw: state.optimizer_parts (the state's optimizer is their chain); grads: the
  averaged f32 gradients; state: the TrainState with its optimizer state in host memory;
  shardings: the TrainState's shardings.
  """
  clip_state, adam_state = state.opt_state
  grads, clip_state = clip.update(grads, clip_state)
  # The step counts (scalars) come to the device whole, the moments below by parts. (Computing
  # on host-memory arrays would run on the host, GPU: slowly, with a warning, or fail.)
  replicated = NamedSharding(jax.tree.leaves(shardings.params)[0].mesh, PartitionSpec(),
                             memory_kind="device")
  adam_state = optax.tree_utils.tree_map_params(
      adamw, lambda tree: tree, adam_state, is_leaf=lambda _: True,
      transform_non_params=lambda x: jax.device_put(x, replicated))

  # Everything below works on lists of leaves, in the parameters' order (mu, nu, grads and EMA
  # share the parameters' tree).
  treedef = jax.tree.structure(state.params)
  flat = treedef.flatten_up_to
  params, ema, grads = flat(state.params), flat(state.ema_params), flat(grads)
  host_moments = [flat(m) for m in moments(adamw, adam_state)]
  param_shardings = flat(shardings.params)
  stacked = [i for i, (spec, s) in enumerate(zip(flat(nnx.get_partition_spec(state.params)),
                                                 param_shardings)) if _streamed(spec, s)]
  rest = sorted(set(range(len(params))) - set(stacked))
  pick = lambda leaves, indices: [leaves[i] for i in indices]

  def adamw_step(g, p, e, m):
    """AdamW, EMA and the non-finite guard on lists of leaves, m: [mu leaves, nu leaves] on the
    device -> (params, EMA, AdamW state)."""
    new_p, after, new_e = guarded_update(adamw, g, with_moments(adamw, adam_state, m), p, e,
                                         finite, ema_decay)
    return new_p, new_e, after

  to_device = lambda x, s: jax.device_put(x, s.with_memory_kind("device"))
  to_host = lambda x, s: jax.device_put(x, s.with_memory_kind(OFFLOAD_MEMORY))

  # The other leaves at once (2B-style 3072 x 32: 1.4 B of 5.8 B parameters, the largest leaf
  # 57 M). Their moments go back to host memory as soon as they are updated, so that XLA need not
  # keep them on the device until the step ends. Their new state also gives the step count (the
  # loop's is the same).
  rest_shardings = pick(param_shardings, rest)
  device_moments = [[to_device(x, s) for x, s in zip(pick(m, rest), rest_shardings)]
                    for m in host_moments]
  rest_p, rest_e, rest_state = adamw_step(pick(grads, rest), pick(params, rest),
                                          pick(ema, rest), device_moments)
  rest_moments = [[to_host(x, s) for x, s in zip(m, rest_shardings)]
                  for m in moments(adamw, rest_state)]

  # The stacked leaves one layer at a time. The loop carries the host arrays and updates them
  # in place (dynamic-update-slice; the state is donated); the gradients stay on the device.
  layer_shardings = [NamedSharding(s.mesh, PartitionSpec(*s.spec[1:]))
                     for s in pick(param_shardings, stacked)]
  stacked_grads = pick(grads, stacked)

  def layer(i, carry):
    p, e, m = carry
    at = lambda leaves: [jax.lax.dynamic_index_in_dim(x, i, keepdims=False) for x in leaves]
    put = lambda leaves, new: [jax.lax.dynamic_update_index_in_dim(x, y, i, 0)
                               for x, y in zip(leaves, new)]
    m_i = [[to_device(x, s) for x, s in zip(at(mm), layer_shardings)] for mm in m]
    new_p, new_e, after = adamw_step(at(stacked_grads), at(p), at(e), m_i)
    new_m = [[to_host(x, s) for x, s in zip(mm, layer_shardings)] for mm in moments(adamw, after)]
    return put(p, new_p), put(e, new_e), [put(mm, nm) for mm, nm in zip(m, new_m)]

  stacked_p, stacked_e = pick(params, stacked), pick(ema, stacked)
  stacked_moments = [pick(m, stacked) for m in host_moments]
  if stacked:
    depth = params[stacked[0]].shape[0]
    stacked_p, stacked_e, stacked_moments = jax.lax.fori_loop(
        0, depth, layer, (stacked_p, stacked_e, stacked_moments))

  def merge(rest_leaves, stacked_leaves):
    leaves = [None] * len(params)
    for i, x in zip(rest + stacked, rest_leaves + stacked_leaves):
      leaves[i] = x
    return treedef.unflatten(leaves)

  new_adam_state = with_moments(adamw, rest_state, [
      merge(r, s) for r, s in zip(rest_moments, stacked_moments)])
  return (merge(rest_p, stacked_p), (clip_state, new_adam_state), merge(rest_e, stacked_e))
