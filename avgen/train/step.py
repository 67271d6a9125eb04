"""The loss and the one jitted train step.

L = diffusion * L_diffusion + align(step) * L_alignment + perceptual * L_perceptual
    + temporal * L_temporal
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import metrics as clu_metrics
from flax import nnx

from avgen.diffusion import losses, objectives, timesteps
from avgen.models import tokenizer
from avgen.parallel import sharding
from avgen.train.state import TrainState, ema_update, learning_rate_schedule

METRIC_NAMES = (
    "loss", "loss_diffusion", "loss_video", "loss_audio", "loss_align", "loss_perceptual",
    "loss_temporal", "align_accuracy", "align_weight", "grad_norm", "learning_rate",
    "update_applied", "skipped_records",
)
TrainMetrics = clu_metrics.Collection.create(
    **{name: clu_metrics.Average.from_output(name) for name in METRIC_NAMES})


def _drop_text(rng, ids, mask, drop_prob):
  """Replaces captions by the empty caption [BOS, EOS] with probability drop_prob (for CFG)."""
  drop = jax.random.bernoulli(rng, drop_prob, (ids.shape[0],))[:, None]
  empty = jnp.zeros_like(ids).at[:, 0].set(tokenizer.BOS).at[:, 1].set(tokenizer.EOS)
  return jnp.where(drop, empty, ids), jnp.where(drop, empty != tokenizer.PAD, mask)


def compute_loss(model, batch, rng, step, config: ml_collections.ConfigDict):
  """Returns (scalar loss, dict of scalar metrics) for one micro-batch."""
  objective = objectives.build_objective(config.diffusion)
  df, lo = config.diffusion, config.loss
  k_text, k_t, k_nv, k_na = jax.random.split(rng, 4)
  x0_video = batch["video"].astype(jnp.float32)
  x0_audio = batch["audio"].astype(jnp.float32)
  b = x0_video.shape[0]
  text_ids, text_mask = _drop_text(k_text, batch["text_ids"], batch["text_mask"], df.text_drop_prob)

  t_video, t_audio, video_mask, audio_mask = timesteps.sample_train_times(
      k_t, objective, b, share_t_prob=df.share_t_prob, audio_to_video_prob=df.audio_to_video_prob,
      video_to_audio_prob=df.video_to_audio_prob, modalities=tuple(config.data.modalities),
      joint=df.joint)
  noise_video = jax.random.normal(k_nv, x0_video.shape)
  noise_audio = jax.random.normal(k_na, x0_audio.shape)
  xt_video = objective.noisy(x0_video, noise_video, t_video)
  xt_audio = objective.noisy(x0_audio, noise_audio, t_audio)

  out = model(xt_video, xt_audio, t_video, t_audio, text_ids, text_mask)
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


def make_train_step(config, graphdef, rest, tx: optax.GradientTransformation, mesh, rules,
                    state_shardings, batch_sharding):
  """Builds the jitted step: (state, batch) -> (state, metrics). The state is donated."""
  accum = config.train.grad_accum
  schedule_fn = learning_rate_schedule(config.train)

  def grads_of(params, micro, rng, step):
    def loss_fn(p):
      model = nnx.merge(graphdef, p, rest)
      return compute_loss(model, micro, rng, step, config)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return grads, metrics

  def step_fn(state: TrainState, batch):
    rng = jax.random.wrap_key_data(state.rng)
    rng, step_rng = jax.random.split(rng)
    model_batch = {k: batch[k] for k in ("video", "audio", "text_ids", "text_mask")}
    if accum == 1:
      grads, metrics = grads_of(state.params, model_batch, step_rng, state.step)
    else:
      micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), model_batch)

      def body(carry, xs):
        g_sum, i = carry
        g, m = grads_of(state.params, xs, jax.random.fold_in(step_rng, i), state.step)
        return (jax.tree.map(jnp.add, g_sum, g), i + 1), m

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, _), metrics = jax.lax.scan(body, (zeros, 0), micro)
      grads = jax.tree.map(lambda g: g / accum, grads)
      metrics = jax.tree.map(jnp.mean, metrics)

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    new_ema = ema_update(state.ema_params, new_params, config.train.ema_decay)
    # A non-finite loss or gradient leaves parameters, optimizer and EMA untouched.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    streak = jnp.where(finite, 0, state.nonfinite_streak + 1)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(new_params, state.params),
        opt_state=keep(new_opt_state, state.opt_state),
        ema_params=keep(new_ema, state.ema_params),
        rng=jax.random.key_data(rng),
        nonfinite_streak=streak,
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
    )
    metrics = dict(metrics, grad_norm=grad_norm, learning_rate=schedule_fn(state.step),
                   update_applied=finite.astype(jnp.float32),
                   skipped_records=jnp.sum(batch["skipped_records"]).astype(jnp.float32))
    return new_state, TrainMetrics.single_from_model_output(**metrics)

  def traced(state, batch):
    with sharding.use_rules(mesh, rules):
      return step_fn(state, batch)

  return jax.jit(traced, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, None), donate_argnums=(0,))
