"""The loss and the one jitted train step.

L = diffusion * L_diffusion + align(step) * L_alignment + perceptual * L_perceptual
    + temporal * L_temporal

With a frozen pretrained text encoder (config.model.text_encoder "clip_text" / "t5_encoder") its
weights are a third argument of the jitted step, sharded over the mesh by their logical names
like the model's, and its states are computed inside the step from the (possibly dropped)
caption ids. They are not part of the TrainState: not trained, not in the optimizer, not in
checkpoints.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics as clu_metrics
from flax import nnx

from avgen.diffusion import losses, objectives, timesteps
from avgen.models import tokenizer
from avgen.parallel import sharding
from avgen.train import offload
from avgen.train.state import (TrainState, guarded_update, learning_rate_schedule,
                                optimizer_parts)

METRIC_NAMES = (
    "loss", "loss_diffusion", "loss_video", "loss_audio", "loss_align", "loss_perceptual",
    "loss_temporal", "align_accuracy", "align_weight", "grad_norm", "learning_rate",
    "update_applied", "skipped_records",
)
TrainMetrics = clu_metrics.Collection.create(
    **{name: clu_metrics.Average.from_output(name) for name in METRIC_NAMES})


def _drop_text(rng, ids, mask, drop_prob, empty_ids, empty_mask):
  """Replaces captions by the empty caption (empty_ids / empty_mask [L]) with probability
  drop_prob, for classifier-free guidance."""
  drop = jax.random.bernoulli(rng, drop_prob, (ids.shape[0],))[:, None]
  return (jnp.where(drop, jnp.asarray(empty_ids, ids.dtype)[None], ids),
          jnp.where(drop, jnp.asarray(empty_mask, mask.dtype)[None], mask))


def empty_caption(tokenizer_) -> tuple[np.ndarray, np.ndarray]:
  """(ids [L], mask [L]) of "" under `tokenizer_` (ByteTokenizer or a frozen encoder's)."""
  ids, mask = tokenizer_([""])
  return np.asarray(ids[0]), np.asarray(mask[0])


def compute_loss(model, batch, rng, step, config: ml_collections.ConfigDict, *, text_encoder=None,
                 text_params=None):
  """Returns (scalar loss, dict of scalar metrics) for one micro-batch.

  text_encoder / text_params: a frozen encoder (FrozenTextEncoder) and its weights, when
  config.model.text_encoder is not "byte"; the model then gets its states.
  """
  objective = objectives.build_objective(config.diffusion)
  df, lo = config.diffusion, config.loss
  k_text, k_t, k_nv, k_na = jax.random.split(rng, 4)
  x0_video = batch["video"].astype(jnp.float32)
  x0_audio = batch["audio"].astype(jnp.float32)
  b = x0_video.shape[0]
  if text_encoder is None:
    empty = empty_caption(tokenizer.ByteTokenizer(config.data.caption_max_len))
  else:
    empty = empty_caption(text_encoder.tokenizer)
  text_ids, text_mask = _drop_text(k_text, batch["text_ids"], batch["text_mask"],
                                   df.text_drop_prob, *empty)
  if text_encoder is None:
    text = dict(text_ids=text_ids, text_mask=text_mask)
  else:
    text = dict(text_mask=text_mask,
                text_states=text_encoder.apply(text_params, text_ids, text_mask))

  t_video, t_audio, video_mask, audio_mask = timesteps.sample_train_times(
      k_t, objective, b, share_t_prob=df.share_t_prob, audio_to_video_prob=df.audio_to_video_prob,
      video_to_audio_prob=df.video_to_audio_prob, modalities=tuple(config.data.modalities),
      joint=df.joint)
  noise_video = jax.random.normal(k_nv, x0_video.shape)
  noise_audio = jax.random.normal(k_na, x0_audio.shape)
  xt_video = objective.noisy(x0_video, noise_video, t_video)
  xt_audio = objective.noisy(x0_audio, noise_audio, t_audio)

  out = model(xt_video, xt_audio, t_video, t_audio, **text)
  video_out = out.video.astype(jnp.float32)
  audio_out = out.audio.astype(jnp.float32)

  loss_video = losses.diffusion_loss(objective.loss_output(xt_video, video_out, t_video),
                                     objective.target(x0_video, noise_video, t_video), video_mask)
  loss_audio = losses.diffusion_loss(objective.loss_output(xt_audio, audio_out, t_audio),
                                     objective.target(x0_audio, noise_audio, t_audio), audio_mask)
  loss_diffusion = lo.video_weight * loss_video + lo.audio_weight * loss_audio

  # x0 estimates are blurry at high noise; weighting the x0-space terms by (1 - t) keeps them
  # from fighting the diffusion term there.
  x0_hat_video = objective.x0_from_output(xt_video, video_out, t_video)
  x0_hat_audio = objective.x0_from_output(xt_audio, audio_out, t_audio)
  w_video = video_mask * (1.0 - t_video)
  w_audio = audio_mask * (1.0 - t_audio)
  loss_perceptual = (losses.video_perceptual_loss(x0_hat_video, x0_video, w_video)
                     + losses.audio_perceptual_loss(x0_hat_audio, x0_audio, w_audio))
  loss_temporal = losses.temporal_loss(x0_hat_video, x0_video, w_video)

  # Alignment needs both modalities to carry information about the clip.
  both = ((t_video < 1.0) & (t_audio < 1.0)).astype(jnp.float32)
  loss_align = losses.alignment_loss(out.align_video.astype(jnp.float32),
                                     out.align_audio.astype(jnp.float32), lo.align_temperature, both)
  align_accuracy = losses.alignment_accuracy(out.align_video.astype(jnp.float32),
                                             out.align_audio.astype(jnp.float32))
  align_weight = losses.align_weight(step, lo.align, lo.align_ramp_steps)

  loss = (lo.diffusion * loss_diffusion + align_weight * loss_align
          + lo.perceptual * loss_perceptual + lo.temporal * loss_temporal)
  metrics = dict(
      loss=loss, loss_diffusion=loss_diffusion, loss_video=loss_video, loss_audio=loss_audio,
      loss_align=loss_align, loss_perceptual=loss_perceptual, loss_temporal=loss_temporal,
      align_accuracy=align_accuracy, align_weight=jnp.asarray(align_weight, jnp.float32))
  return loss, metrics


def frozen_shardings(params, mesh, rules):
  """Shardings of a frozen encoder's weights: by their logical names, like the model's."""
  specs = nnx.get_partition_spec(params)
  return sharding.tree_shardings(specs, mesh, rules, shapes=params)


def place_frozen(params, shardings):
  """Puts a frozen encoder's weights (loaded on each host) onto the mesh, once."""
  if jax.process_count() == 1:
    return jax.device_put(params, shardings)

  def one(x, s):  # every host holds the same full copy; each contributes its devices' slices
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

  return jax.tree.map(one, params, shardings)


def make_train_step(config, graphdef, rest, tx: optax.GradientTransformation, mesh, rules,
                    state_shardings, batch_sharding, *, text_encoder=None):
  """Builds the jitted step: (state, batch) -> (state, metrics). The state is donated.

  text_encoder: the FrozenTextEncoder of a frozen config.model.text_encoder (None for "byte").
  Its weights are moved onto the mesh here (text_encoder.params is replaced by the placed copy,
  so the sampler shares it) and passed to the compiled step on every call as an argument.
  """
  if (text_encoder is None) != (config.model.text_encoder == "byte"):
    raise ValueError(f"make_train_step: config.model.text_encoder={config.model.text_encoder!r} "
                     f"{'needs' if text_encoder is None else 'takes no'} frozen text_encoder")
  accum = config.train.grad_accum
  schedule_fn = learning_rate_schedule(config.train)
  # An optimizer state in host memory (train.offload_optimizer) is updated by avgen.train.offload
  # with the two parts of build_optimizer's chain, rebuilt from the config.
  streamed = offload.offloaded(state_shardings)
  clip, adamw = optimizer_parts(config.train)

  def check_streamable(state):
    expected = jax.eval_shape(optax.chain(clip, adamw).init, state.params)
    if jax.tree.structure(state.opt_state) != jax.tree.structure(expected):
      raise ValueError("make_train_step: an optimizer state in host memory is updated by "
                       "state.build_optimizer(config.train)'s parts; tx is another optimizer")
  text_shardings = None
  if text_encoder is not None:
    text_shardings = frozen_shardings(text_encoder.params, mesh, rules)
    text_encoder.params = place_frozen(text_encoder.params, text_shardings)

  def grads_of(params, micro, rng, step, text_params):
    def loss_fn(p):
      model = nnx.merge(graphdef, p, rest)
      return compute_loss(model, micro, rng, step, config, text_encoder=text_encoder,
                          text_params=text_params)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, metrics

  def step_fn(state: TrainState, batch, text_params):
    rng = jax.random.wrap_key_data(state.rng)
    rng, step_rng = jax.random.split(rng)
    model_batch = {k: batch[k] for k in ("video", "audio", "text_ids", "text_mask")}
    if accum == 1:
      grads, metrics = grads_of(state.params, model_batch, step_rng, state.step, text_params)
    else:
      micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), model_batch)

      def body(carry, xs):
        g_sum, i = carry
        g, m = grads_of(state.params, xs, jax.random.fold_in(step_rng, i), state.step,
                        text_params)
        return (jax.tree.map(jnp.add, g_sum, g), i + 1), m

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, _), metrics = jax.lax.scan(body, (zeros, 0), micro)
      grads = jax.tree.map(lambda g: g / accum, grads)
      metrics = jax.tree.map(jnp.mean, metrics)

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    if streamed:
      # The optimizer state stays in host memory; the update brings it in a layer at a time.
      check_streamable(state)
      new_params, new_opt_state, new_ema = offload.update(
          clip, adamw, grads, finite, state, state_shardings, config.train.ema_decay)
    else:
      new_params, new_opt_state, new_ema = guarded_update(
          tx, grads, state.opt_state, state.params, state.ema_params, finite,
          config.train.ema_decay)
    streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
    new_state = state.replace(
        step=state.step + 1,
        params=new_params,
        opt_state=new_opt_state,
        ema_params=new_ema,
        rng=jax.random.key_data(rng),
        nonfinite_streak=streak,
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
    )
    metrics = dict(metrics, grad_norm=grad_norm, learning_rate=schedule_fn(state.step),
                   update_applied=finite.astype(jnp.float32),
                   skipped_records=jnp.sum(batch["skipped_records"]).astype(jnp.float32))
    return new_state, TrainMetrics.single_from_model_output(**metrics)

  if text_encoder is None:
    def traced(state, batch):
      with sharding.use_rules(mesh, rules):
        return step_fn(state, batch, None)

    return jax.jit(traced, in_shardings=(state_shardings, batch_sharding),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))

  def traced_frozen(state, batch, text_params):
    with sharding.use_rules(mesh, rules):
      return step_fn(state, batch, text_params)

  jitted = jax.jit(traced_frozen, in_shardings=(state_shardings, batch_sharding, text_shardings),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))

  def train_step(state, batch):
    # Read at each call: the weights stay an argument of one compiled program.
    return jitted(state, batch, text_encoder.params)

  train_step.jitted = jitted
  return train_step
