"""Checkpoints with orbax: the train state, the grain iterator state and the config, together.

Layout: workdir/checkpoints/<step>/{state, data, config}. Saves are async; `latest_step` is what
a restarted run resumes from. A checkpoint written for another model shape is refused with a
message listing what differs, before orbax would fail deep inside a restore.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from avgen.config import latent_shapes

_log = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
  """The workdir holds a checkpoint that does not fit the model being trained."""


def shape_signature(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config fields that decide parameter shapes; equal signatures mean restorable states."""
  m = config.model
  keys = ("width", "depth", "num_heads", "mlp_ratio", "video_patch", "audio_patch", "qk_norm",
          "shared_weights", "audio_head_depth", "video_head_depth", "video_head_channels",
          "align_width", "text_encoder", "text_width", "text_depth", "text_heads")
  sig = {f"model.{k}": _plain(m[k]) for k in keys if k in m}
  from avgen.models import text_encoder  # pylint: disable=g-import-not-at-top
  if m.get("text_encoder") in text_encoder.FROZEN:
    # The frozen encoder is not saved with the model, which learnt its states, not another's
    # of the same width ("" counts as the kind's default source).
    sig["model.text_encoder_source"] = text_encoder.frozen_sources(config)[0]
  shapes = latent_shapes(config)
  sig["latent.video_shape"] = list(shapes["video"])
  sig["latent.audio_shape"] = list(shapes["audio"])
  sig["data.caption_max_len"] = config.data.caption_max_len
  return sig


def _plain(v):
  return list(v) if isinstance(v, (tuple, list)) else v


class Checkpointer:

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True, data_slots: int = 1):
    """`data_slots`: how many distinct shares of each batch the hosts read (mesh.process_batch_slot)."""
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.data_slots = data_slots
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        })

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator, config: ml_collections.ConfigDict, *, force=False) -> bool:
    record = {"config": json.loads(config.to_json_best_effort()), "shape_signature": shape_signature(config),
              "data_slots": self.data_slots}
    return self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(record)),
        force=force)

  def check_compatible(self, step: int, config: ml_collections.ConfigDict) -> None:
    """Raises CheckpointMismatchError if the saved model shape differs from `config`'s."""
    saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    ours = json.loads(json.dumps(shape_signature(config)))
    theirs = saved.get("shape_signature", {})
    # Keys that later versions added to the signature are not in older checkpoints: those
    # compare only on the keys both know (model.text_encoder_source came after session 2).
    added_later = {"model.text_encoder_source"} - set(theirs)
    diffs = [f"{k}: checkpoint has {theirs.get(k)!r}, config has {ours.get(k)!r}"
             for k in sorted((set(ours) | set(theirs)) - added_later)
             if ours.get(k) != theirs.get(k)]
    if diffs:
      raise CheckpointMismatchError(
          f"{self.directory}/{step} was written for a different model shape; use another --workdir "
          "or the config it was trained with. Differences:\n  " + "\n  ".join(diffs))

  def has_data_state(self, step: int) -> bool:
    """Whether `step`'s data-iterator states fit this run (not after a host or data-slot change).

    Grain writes one state per process, named by process index and count; a state is a position
    in that host's share of the batches, so it is only valid for the same split of the batch.
    """
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not os.path.exists(os.path.join(self.directory, str(step), "data", name)):
      return False
    saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    return saved.get("data_slots", self.data_slots) == self.data_slots

  def restore(self, step: int, abstract_state, data_iterator, config: ml_collections.ConfigDict):
    """Restores the state into the shardings of `abstract_state` (any mesh or host count), and
    the data iterator in place unless `data_iterator` is None."""
    self.check_compatible(step, config)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except ValueError as e:
      if "shape" in str(e).lower():
        raise CheckpointMismatchError(
            f"{self.directory}/{step}: parameter shapes differ from the model being built: {e}") from e
      raise
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def all_finite(state) -> bool:
  """True if every floating leaf of the state is finite (checked before any save)."""
  leaves = [x for x in jax.tree.leaves(state) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)]
  return bool(jax.jit(lambda xs: jax.numpy.all(jax.numpy.stack(
      [jax.numpy.all(jax.numpy.isfinite(x)) for x in xs])))(leaves))
