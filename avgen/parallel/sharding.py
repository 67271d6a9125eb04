"""Logical axis names -> mesh axes.

Three layers, as in DESIGN.md: the mesh (physical devices with axes `data`, `fsdp`, `context`,
`tensor`), the rules (config data mapping each logical name to mesh axes), and the names that
models put on parameters and activations (`embed`, `mlp`, `batch`, `length`, ...). Models only
ever use logical names; this module is the one place that turns them into `PartitionSpec`s.

Two XLA SPMD-partitioner faults (jax 0.10.2, Shardy and GSPMD alike; CPU, seen on 8 fake devices)
shape what the models constrain:
- A dot whose weight keeps its `fsdp` split, with a `tensor`-split contraction and an output
  split over `tensor` on the weight's fsdp dimension: the partitioner permutes the input's batch
  rows between devices and never permutes the result back (on a (data 2, fsdp 2, tensor 2) mesh
  the audio head's attention output for the middle two batch shards came out swapped). Weights
  pass through `param_for_compute` (gathered over the batch axes, i.e. FSDP's all-gather) first.
- The kernel gradient of a convolution whose input is split spatially (as the video head's is
  when the sequence is split over `context`) is summed over every device, also those holding
  replicas: on a context-8 mesh the video head's conv kernel gradients came out 4x too large.
  The convolutions keep their activations split over the batch only.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalNames = Sequence[str | None]
Rules = Sequence[tuple[str, str | Sequence[str] | None]]

_context = threading.local()


def logical_to_spec(names: LogicalNames | None, rules: Rules) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once per array."""
  if names is None:
    return PartitionSpec()
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name in names:
    target = table.get(name) if name is not None else None
    if target is None:
      spec.append(None)
      continue
    axes = (target,) if isinstance(target, str) else tuple(target)
    axes = tuple(a for a in axes if a not in used)
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return PartitionSpec(*spec)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Within this context, `constrain` shards activations over `mesh` by `rules`."""
  previous = getattr(_context, "value", None)
  _context.value = (mesh, tuple(rules))
  try:
    yield
  finally:
    _context.value = previous


def constrain(x: jax.Array, names: LogicalNames) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside `use_rules` (e.g. in unit tests)."""
  active = getattr(_context, "value", None)
  if active is None:
    return x
  mesh, rules = active
  if len(names) != x.ndim:
    raise ValueError(f"constrain: {len(names)} names {tuple(names)} for an array of rank {x.ndim}")
  spec = logical_to_spec(names, rules)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, _drop_indivisible(spec, x.shape, mesh)))


def param_for_compute(x: jax.Array, names: LogicalNames) -> jax.Array:
  """A parameter laid out for its matmul: gathered over the batch's mesh axes (ZeRO-3 style).

  Parameters rest sharded over `fsdp` (via `embed`) and are gathered for their matmul; saying so
  explicitly keeps only model-parallel axes (`tensor`) on the weight inside the dot, which
  avoids the partitioner's row swap described in this module's docstring. No-op outside
  `use_rules`.
  """
  active = getattr(_context, "value", None)
  if active is None:
    return x
  mesh, rules = active
  if len(names) != x.ndim:
    raise ValueError(f"param_for_compute: {len(names)} names {tuple(names)} for an array of rank "
                     f"{x.ndim}")
  batch = dict(rules).get("batch")
  batch_axes = set((batch,) if isinstance(batch, str) else (batch or ()))
  spec = []
  for axes in _drop_indivisible(logical_to_spec(names, rules), x.shape, mesh):
    group = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept = tuple(a for a in group if a not in batch_axes)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else kept)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))


def _drop_indivisible(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Leaves a dimension replicated when the mesh axes do not divide it (e.g. 77 text tokens)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    group = (axes,) if isinstance(axes, str) else tuple(axes)
    size = 1
    for a in group:
      size *= mesh.shape[a]
    out.append(axes if dim % size == 0 else None)
  return PartitionSpec(*out)


def tree_shardings(logical_specs, mesh: Mesh, rules: Rules, shapes=None):
  """NamedShardings for a pytree of logical PartitionSpecs (as `nnx.get_partition_spec` gives)."""

  def one(spec, shape=None):
    mesh_spec = logical_to_spec(tuple(spec), rules)
    if shape is not None:
      mesh_spec = _drop_indivisible(mesh_spec, shape, mesh)
    return NamedSharding(mesh, mesh_spec)

  is_spec = lambda x: isinstance(x, PartitionSpec)
  if shapes is None:
    return jax.tree.map(one, logical_specs, is_leaf=is_spec)
  return jax.tree.map(lambda s, a: one(s, a.shape), logical_specs, shapes, is_leaf=is_spec)
