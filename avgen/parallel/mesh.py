"""The device mesh from the config: axes (data, fsdp, context, tensor)."""

from __future__ import annotations

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


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over data and fsdp; the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles each host's share of the batch into global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
