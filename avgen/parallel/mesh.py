"""The device mesh from the config: axes (data, fsdp, context, tensor), optionally hybrid.

A hybrid mesh spans several slices (TPU multislice) or hosts (GPU nodes) joined by a slower
data-center network (DCN): `config.mesh.dcn_<axis>` says how many slices an axis spans, and
`config.mesh.<axis>` is then its size inside one slice (ICI). Along such an axis the slice index
is the major part of the position, so neighbours inside a slice stay on the fast links and only
that axis's collectives cross the DCN.
"""

from __future__ import annotations

import collections
import functools
import math
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from avgen.config import MESH_AXES, ConfigError, dcn_shape, ici_shape, mesh_shape


def build_mesh(config: ml_collections.ConfigDict, devices=None, *,
               granule_of: Callable[[Any], Any] | None = None) -> Mesh:
  """The mesh for `devices` (default: all); with DCN sizes > 1, a hybrid mesh over granules.

  granule_of: device -> the slice/host it belongs to, for hybrid meshes (default:
    `default_granules`).
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_shape(config, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  # Auto axes: XLA propagates shardings from the parameters' layouts and our logical
  # constraints (explicit-sharding mode would make every gather/einsum spell out its output).
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  dcn = dcn_shape(config)
  if math.prod(dcn.values()) > 1:
    ici = ici_shape(config, len(devices))
    grid = hybrid_device_grid([ici[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES], devices,
                              granule_of=granule_of)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)
  if len(devices) == jax.device_count():
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def default_granules(devices: Sequence[Any], count: int) -> Callable[[Any], Any]:
  """device -> granule: its TPU slice where devices carry several `slice_index` values, else a
  block of consecutive processes (one per GPU node whether a node runs one process or one per
  GPU, as long as the scheduler numbers a node's processes consecutively, as SLURM's block
  distribution and our launchers do)."""
  slices = [getattr(d, "slice_index", None) for d in devices]
  if None not in slices and len(set(slices)) > 1:
    return lambda d: d.slice_index
  processes = sorted({d.process_index for d in devices})
  if len(processes) % count:
    raise ConfigError(f"config.mesh.dcn_*: DCN sizes multiply to {count}, which does not divide "
                      f"the {len(processes)} processes into equal hosts/slices")
  per_granule = len(processes) // count
  rank = {p: i // per_granule for i, p in enumerate(processes)}
  return lambda d: rank[d.process_index]


def hybrid_device_grid(ici: Sequence[int], dcn: Sequence[int], devices: Sequence[Any], *,
                       granule_of: Callable[[Any], Any] | None = None) -> np.ndarray:
  """Devices arranged as ici[i] * dcn[i] along each axis, one ici-shaped block per granule.

  What `mesh_utils.create_hybrid_device_mesh` does (it also lays each slice out by
  `mesh_utils.create_device_mesh`, which follows TPU topology), with the granule of a device
  given as a function, so that the layout is testable with fake CPU devices of one process, and
  with errors that name the config fields.
  """
  granule_of = granule_of or default_granules(devices, math.prod(dcn))
  groups = collections.defaultdict(list)
  for device in devices:
    groups[granule_of(device)].append(device)
  keys = sorted(groups)
  granules = [groups[k] for k in keys]
  if len(granules) != math.prod(dcn):
    raise ConfigError(
        f"config.mesh.dcn_*: DCN sizes {dict(zip(MESH_AXES, dcn))} multiply to {math.prod(dcn)}, "
        f"but the {len(devices)} devices form {len(granules)} slices/hosts")
  per_granule = math.prod(ici)
  for key, group in zip(keys, granules):
    if len(group) != per_granule:
      raise ConfigError(
          f"config.mesh: per-slice sizes {dict(zip(MESH_AXES, ici))} need {per_granule} devices in "
          f"each slice/host, but {key} has {len(group)}")
  blocks = [mesh_utils.create_device_mesh(ici, group) for group in granules]
  # Block j of the DCN grid goes to granule j; np.block tiles them, DCN index major per axis.
  order = np.arange(len(granules)).reshape(dcn)
  tiled = np.vectorize(lambda j: blocks[j], otypes=[object])(order)
  return np.block(tiled.tolist())


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
