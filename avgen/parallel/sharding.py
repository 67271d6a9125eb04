"""Logical axis names -> mesh axes.

Three layers, as in DESIGN.md: the mesh (physical devices with axes `data`, `fsdp`, `context`,
`tensor`), the rules (config data mapping each logical name to mesh axes), and the names that
models put on parameters and activations (`embed`, `mlp`, `batch`, `length`, ...). Models only
ever use logical names; this module is the one place that turns them into `PartitionSpec`s.
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
