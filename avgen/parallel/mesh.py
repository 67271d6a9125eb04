"""The device mesh from the config: axes (data, fsdp, context, tensor)."""

from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from avgen.config import MESH_AXES, mesh_shape


def build_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(config, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  # Auto axes: XLA propagates shardings from the parameters' layouts and our logical
  # constraints (explicit-sharding mode would make every gather/einsum spell out its output).
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if len(devices) == jax.device_count():
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


BATCH_AXES = ("data", "fsdp")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data and fsdp; the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def process_batch_slot(mesh: Mesh, process_index: int | None = None) -> tuple[int, int]:
  """(slot, slots): this process feeds rows [slot, slot + 1) * B / slots of each global batch.

  Processes whose devices hold the same batch rows (a tensor or context axis across hosts) get
  the same slot and must read the same data; `jax.process_index()` would give them different
  records. Raises if a process's rows are not one contiguous run (the local array could not
  be assembled).
  """
  return _batch_slot(mesh, jax.process_index() if process_index is None else process_index)


@functools.lru_cache(maxsize=16)
def _batch_slot(mesh: Mesh, process_index: int) -> tuple[int, int]:
  devices = np.moveaxis(mesh.devices, [mesh.axis_names.index(a) for a in BATCH_AXES],
                        range(len(BATCH_AXES)))
  num_blocks = int(np.prod(devices.shape[:len(BATCH_AXES)]))
  blocks = devices.reshape(num_blocks, -1)  # row block b is held by the devices blocks[b]
  held: dict[int, set[int]] = {}
  for b, group in enumerate(blocks):
    for device in group:
      held.setdefault(device.process_index, set()).add(b)
  runs = {}
  for p, bs in held.items():
    lo, hi = min(bs), max(bs) + 1
    if len(bs) != hi - lo:
      raise ValueError(f"mesh {dict(mesh.shape)}: process {p} holds batch row blocks {sorted(bs)}, "
                       "not one contiguous run; order the mesh so data/fsdp neighbours share a host")
    runs[p] = (lo, hi)
  distinct = sorted(set(runs.values()))
  width = distinct[0][1] - distinct[0][0]
  if any(hi - lo != width for lo, hi in distinct) or [lo for lo, _ in distinct] != list(
      range(0, num_blocks, width)):
    raise ValueError(f"mesh {dict(mesh.shape)}: processes hold overlapping or uneven batch rows "
                     f"{distinct}; each must hold the same number of whole blocks")
  return distinct.index(runs[process_index]), len(distinct)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles each host's share of the batch into global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  _, slots = process_batch_slot(mesh)
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * slots,) + v.shape[1:])
  return out
