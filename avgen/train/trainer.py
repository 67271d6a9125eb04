"""The trainer: one plain loop for every stage.

build mesh -> build (or restore) the sharded state -> loop {batch, step, metrics, checkpoint,
sample, evaluate} -> final checkpoint. Stages differ only by config.

A frozen pretrained text encoder (config.model.text_encoder "clip_text" / "t5_encoder") is built
once here, before any data is made, and shared by the train step and the sampler; its weights
are never part of the train state or the checkpoints.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

import jax
import ml_collections
import numpy as np
from clu import parameter_overview
from flax import nnx

from avgen import config as config_lib
from avgen.models import text_encoder as text_encoder_lib
from avgen.parallel import mesh as mesh_lib
from avgen.parallel import sharding
from avgen.train import checkpoints, metrics as metrics_lib, state as state_lib, step as step_lib
from data_pipeline import loader as loader_lib

_log = logging.getLogger("avgen.train")


class TrainingStopped(RuntimeError):
  """The run stopped before num_steps (non-finite losses); the message says why."""


def resolve_data(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """Shard paths from config.data.path, or a synthetic dataset made once in workdir/data."""
  if config.data.path:
    return loader_lib.resolve_paths(config.data.path)
  if config.data.synthetic_clips <= 0:
    raise ValueError("config.data.path is empty and config.data.synthetic_clips is 0: "
                     "give --config.data.path='/data/*.array_record' (ArrayRecord shards)")
  from data_pipeline import synthetic
  out = os.path.join(workdir, "data")
  done = os.path.join(out, "DONE")
  if jax.process_index() == 0 and not os.path.exists(done):
    d = config.data
    _log.info("making %d synthetic clips in %s", d.synthetic_clips, out)
    # The mel the loader computes (the vocoder's own analysis for bigvgan / hifigan), cached.
    from avgen.models.autoencoders import build_mel_analysis
    synthetic.make_dataset(out, d.synthetic_clips, seed=config.train.seed, samples_per_shard=256,
                           num_frames=d.num_frames, height=d.height, width=d.width, fps=d.fps,
                           sample_rate=d.sample_rate, max_objects=d.synthetic_max_objects,
                           size_range=tuple(d.synthetic_size_range),
                           speed_range=tuple(d.synthetic_speed_range),
                           mel_codec=build_mel_analysis(config))
    open(done, "w").close()
  while not os.path.exists(done):  # other hosts wait for process 0 (shared filesystem)
    time.sleep(1)
  return loader_lib.resolve_paths(os.path.join(out, "*.array_record"))


class _Preemption:
  """Turns SIGTERM into a flag that the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    _log.warning("SIGTERM received: saving a checkpoint and exiting")
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None
          ) -> state_lib.TrainState:
  """Trains to config.train.num_steps, resuming from workdir's latest checkpoint.

  `stop_at_step` ends this run early with a checkpoint, as a preemption would (time-boxed jobs,
  tests); the learning-rate schedule still follows num_steps.
  """
  config_lib.validate(config, jax.device_count())
  os.makedirs(workdir, exist_ok=True)
  primary = jax.process_index() == 0
  t = config.train
  # Before any data is made or anything compiled: a wrong width or source fails in seconds.
  text_encoder = (text_encoder_lib.build_frozen_text_encoder(config)
                  if text_encoder_lib.is_frozen(config) else None)
  eval_every = eval_interval(config)
  # Every host checks the path (one failing alone would leave the others waiting); only
  # process 0 evaluates, so only it loads the network.
  lpips_model = _load_lpips(config, load=primary) if eval_every else None

  paths = resolve_data(config, workdir)
  mesh = mesh_lib.build_mesh(config)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  tx = state_lib.build_optimizer(t)
  graphdef, rest, state, shardings = state_lib.create_sharded_state(config, tx, mesh, rules)
  if primary:
    # Means and stds need every value on this host; parameters sharded across hosts (fsdp over
    # hosts) are not, so multi-host runs list shapes and shardings instead.
    stats = True if jax.process_count() == 1 else "sharding"
    _log.info("mesh %s\n%s", dict(mesh.shape), parameter_overview.get_parameter_overview(
        nnx.to_pure_dict(state.params), include_stats=stats))

  # Hosts that hold the same batch rows (tensor/context axes across hosts) read the same data.
  slot, slots = mesh_lib.process_batch_slot(mesh)

  def make_loader(start_batch=0):
    return loader_lib.make_loader(config, paths, shard_index=slot, shard_count=slots,
                                  seed=config.data.shuffle_seed, start_batch=start_batch)

  data_iter = make_loader()
  ckpt = checkpoints.Checkpointer(workdir, keep=t.keep_checkpoints, data_slots=slots)
  latest = ckpt.latest_step()
  if latest is not None:
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    del state
    if ckpt.has_data_state(latest):
      state = ckpt.restore(latest, abstract, data_iter, config)
    else:
      # Another host count wrote it: one batch per step, and the batch order does not depend on
      # the host count, so the step says where the data stream stands.
      _log.warning("%s/%d holds no data state for %d process(es) reading %d share(s) of each "
                   "batch; the data restarts at global batch %d", ckpt.directory, latest,
                   jax.process_count(), slots, latest)
      data_iter.close()
      data_iter = make_loader(start_batch=latest)
      state = ckpt.restore(latest, abstract, None, config)
    _log.info("resumed from %s/%d", ckpt.directory, latest)

  train_step = step_lib.make_train_step(config, graphdef, rest, tx, mesh, rules, shardings,
                                        mesh_lib.batch_sharding(mesh), text_encoder=text_encoder)
  writer = metrics_lib.Writer(workdir, enabled=primary)
  generator = None
  step = int(state.step)
  progress = metrics_lib.Progress(t.num_steps, step)
  preemption = _Preemption()
  accumulated = None
  streak = int(state.nonfinite_streak)
  pending = None  # (step, metrics) of the step whose update flag is not read yet
  try:
    while step < t.num_steps:
      batch = mesh_lib.global_batch(next(data_iter), mesh)
      state, step_metrics = train_step(state, batch)
      accumulated = step_metrics if accumulated is None else accumulated.merge(step_metrics)
      step += 1
      # The previous step's flag is read only now, after this step is queued: reading it at once
      # would leave the cores idle while the host fetches and sends the next batch.
      if pending is not None:
        streak = _check_finite(*pending, streak, t.max_nonfinite)
      pending = (step, step_metrics)

      boundary = (step % t.log_every == 0 or step == t.num_steps or step % t.checkpoint_every == 0
                  or preemption.requested or step == stop_at_step
                  or (config.sample.every and step % config.sample.every == 0)
                  or (eval_every and step % eval_every == 0))
      if boundary:
        streak = _check_finite(*pending, streak, t.max_nonfinite)
        pending = None

      if step % t.log_every == 0 or step == t.num_steps:
        values = {k: float(v) for k, v in accumulated.compute().items()}
        values["nonfinite_total"] = float(state.nonfinite_total)
        accumulated = None
        values["steps_per_second"] = progress.steps_per_second()
        writer.scalars(step, values)
        if primary:
          shown = {k: values[k] for k in ("loss", "loss_video", "loss_audio", "loss_align")}
          print(progress.line(step, shown), flush=True)

      last = step == t.num_steps
      stopping = preemption.requested or step == stop_at_step
      if step % t.checkpoint_every == 0 or last or stopping:
        _save(ckpt, step, state, data_iter, config)
      want_samples = bool(config.sample.every) and (step % config.sample.every == 0 or last)
      want_eval = bool(eval_every) and (step % eval_every == 0 or last)
      if want_samples or want_eval:
        generator = generator or _make_generator(config, graphdef, rest, text_encoder)
        clips = sample_clips(generator, state, config)
        if want_samples:
          write_samples(generator, state, config, workdir, step, writer, clips=clips)
        if want_eval:
          evaluate_clips(clips, config, step, writer, lpips_model=lpips_model, primary=primary)
      if stopping:
        ckpt.wait()
        _log.warning("stopping at step %d before num_steps=%d", step, t.num_steps)
        break
  finally:
    preemption.restore()
    ckpt.close()
    writer.close()
  return state


def _check_finite(step: int, step_metrics, streak: int, max_nonfinite: int) -> int:
  """Updates the host's count of consecutive skipped updates; stops the run at max_nonfinite."""
  if float(step_metrics.update_applied.compute()) > 0:
    return 0
  streak += 1
  _log.warning("step %d: non-finite loss or gradient; update not applied (%d in a row)", step, streak)
  if streak >= max_nonfinite:
    raise TrainingStopped(
        f"{streak} consecutive steps had a non-finite loss or gradient (config.train.max_nonfinite="
        f"{max_nonfinite}); stopped at step {step}. The last checkpoint holds the last finite state.")
  return streak


def _save(ckpt, step, state, data_iter, config):
  if not checkpoints.all_finite(state):
    _log.error("step %d: the state holds non-finite values; checkpoint NOT saved", step)
    return
  ckpt.save(step, state, data_iter, config, force=True)


def _make_generator(config, graphdef, rest, text_encoder=None):
  from avgen.sample.generate import Generator
  return Generator(config, graphdef, rest, text_encoder=text_encoder)


def sample_clips(generator, state, config) -> list:
  """The config's prompts sampled from the EMA (or raw) parameters; every process takes part."""
  params = state.ema_params if config.sample.use_ema else state.params
  return generator(params, list(config.sample.prompts), seed=config.train.seed)


def write_samples(generator, state, config, workdir: str, step: int, writer, *,
                  clips=None) -> list[str]:
  """Samples the config's prompts (unless `clips` are given); writes samples/step_XXXXXX_i.mp4
  (+ .wav) and TensorBoard media."""
  from avgen.sample import visualize
  prompts = list(config.sample.prompts)
  clips = sample_clips(generator, state, config) if clips is None else clips
  if jax.process_index() != 0:
    return []
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  written = []
  strips = []
  for i, clip in enumerate(clips):
    base = os.path.join(out_dir, f"step_{step:06d}_{i}")
    clip.save(base + ".mp4", scale=max(1, 256 // clip.video.shape[2]))
    clip.save(base + ".wav")
    written.append(base + ".mp4")
    writer.clip(step, f"samples/{i}", visualize.gif_bytes(clip.video, clip.fps, scale=4),
                clip.video.shape[1] * 4, clip.video.shape[2] * 4)
    writer.audio(step, f"samples/{i}", clip.audio, clip.sample_rate)
    strips.append(visualize.frame_strip(clip.video))
  writer.image(step, "samples/frames", visualize.stack_rows(strips))
  writer.text(step, "samples/prompts", "\n".join(f"{i}: {p}" for i, p in enumerate(prompts)))
  writer.flush()
  return written


def eval_interval(config) -> int:
  """config.eval.every, or 0 for configs written before the eval section existed."""
  ev = config.get("eval")
  return int(ev.every) if ev is not None else 0


def _load_lpips(config, *, load: bool = True):
  """The LPIPS model named by config.eval.lpips_weights, or None (pixel fallback, or not `load`:
  then the path is only checked)."""
  ev = config.eval
  path = ev.get("lpips_weights", "")
  if not path or "temporal" not in ev.metrics:
    return None
  if not os.path.isfile(path):
    raise ValueError(f"config.eval.lpips_weights={path!r} is not a file (an LPIPS state dict, "
                     "see docs/evaluation.md); give one or '' for the pixel fallback")
  if not load:
    return None
  from avgen.metrics.nets import lpips  # pylint: disable=g-import-not-at-top
  return lpips.load_lpips(path)


def evaluate_clips(clips, config, step: int, writer, *, lpips_model=None,
                   primary: bool | None = None) -> dict[str, float]:
  """Scores sampled clips with config.eval.metrics and logs the scalars (process 0 only).

  Returns what was logged. A failing metric is logged as an error and training goes on: the
  evaluation watches the run and must not end it.
  """
  from avgen.metrics import in_training  # pylint: disable=g-import-not-at-top
  if not (jax.process_index() == 0 if primary is None else primary):
    return {}
  d = config.data
  try:
    values = in_training.evaluate_samples(
        [c.video for c in clips], [c.audio for c in clips],
        {"fps": d.fps, "sample_rate": d.sample_rate}, metrics=tuple(config.eval.metrics),
        lpips_model=lpips_model)
  except Exception:  # pylint: disable=broad-except
    _log.exception("step %d: in-training evaluation failed; training continues", step)
    return {}
  if not values:
    _log.info("step %d: eval %s gave no defined value for these samples", step,
              tuple(config.eval.metrics))
  writer.scalars(step, values)
  writer.flush()
  print(f"eval step {step} | " + " | ".join(f"{k} {v:.4g}" for k, v in values.items()), flush=True)
  return values
