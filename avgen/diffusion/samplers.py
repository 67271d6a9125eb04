"""Joint audio-video samplers: Euler and Heun (flow), DDIM and DPM-Solver++(2M) (DDPM).

All samplers integrate the probability-flow ODE from t = 1 (noise) to t = 0 over the times of
`objective.sample_times(num_steps)`, with the step loop in `jax.lax.fori_loop`, so `sample` jits
as a whole with `sampler` and `num_steps` static. A modality given as a clean condition
(`video_cond` / `audio_cond`) enters every model call as is, with t = 0, and comes back unchanged:
that is how audio -> video and video -> audio run with the joint model.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# Sampler -> the objective it integrates.
SAMPLERS = {"euler": "flow", "heun": "flow", "ddim": "ddpm", "dpm++2m": "ddpm"}

DenoiseFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def split_output(out) -> tuple[jax.Array, jax.Array]:
  """(video, audio) from a model result: a pair, or anything with `.video` and `.audio`."""
  if hasattr(out, "video") and hasattr(out, "audio"):
    return out.video, out.audio
  if isinstance(out, (tuple, list)) and len(out) == 2:
    return out[0], out[1]
  raise TypeError(f"denoise_fn must return (video_out, audio_out), got {type(out).__name__}")


def _start(name: str, noise, cond):
  """The initial state of one modality and a shape check against its condition."""
  if noise is None and cond is None:
    raise ValueError(f"sample: {name}_noise is required unless {name}_cond is given")
  if cond is None:
    return jnp.asarray(noise, jnp.float32)
  if noise is not None and tuple(noise.shape) != tuple(cond.shape):
    raise ValueError(f"sample: {name}_cond shape {tuple(cond.shape)} must equal {name}_noise "
                     f"shape {tuple(noise.shape)}")
  return cond


class _Joint:
  """Calls the model on both modalities, holding conditioned ones clean at t = 0."""

  def __init__(self, denoise_fn, objective, conds, batch):
    self.denoise_fn = denoise_fn
    self.objective = objective
    self.conds = conds
    self.batch = batch

  def inputs(self, xs):
    return tuple(x if c is None else c for x, c in zip(xs, self.conds))

  def __call__(self, xs, t):
    """Raw model outputs for states xs at scalar time t."""
    t_full = jnp.full((self.batch,), t, jnp.float32)
    zeros = jnp.zeros((self.batch,), jnp.float32)
    ts = tuple(t_full if c is None else zeros for c in self.conds)
    inputs = self.inputs(xs)
    outs = split_output(self.denoise_fn(*inputs, *ts))
    for name, x, o in zip(("video", "audio"), inputs, outs):
      if tuple(o.shape) != tuple(x.shape):
        raise ValueError(f"sample: denoise_fn's {name} output has shape {tuple(o.shape)}, "
                         f"expected the input's {tuple(x.shape)}")
    return outs

  def velocities(self, xs, t):
    """Flow velocities at scalar time t (the network may predict v or x0)."""
    return tuple(self.objective.velocity(x, o, t) for x, o in zip(xs, self(xs, t)))

  def update(self, fn, *args):
    """Applies fn per free modality; a conditioned modality keeps its clean value."""
    return tuple(c if c is not None else fn(*a) for c, *a in zip(self.conds, *args))


def _euler(model: _Joint, times, xs, n):
  def step(i, xs):
    t, t_next = times[i], times[i + 1]
    vs = model.velocities(xs, t)
    return model.update(lambda x, v: x + (t_next - t) * v, xs, vs)
  return jax.lax.fori_loop(0, n, step, xs)


def _heun(model: _Joint, times, xs, n):
  """Heun's method; the last step (to t = 0) is Euler, as the velocity there is undefined."""
  def step(i, xs):
    t, t_next = times[i], times[i + 1]
    dt = t_next - t
    vs = model.velocities(xs, t)
    guess = model.update(lambda x, v: x + dt * v, xs, vs)
    vs_next = model.velocities(guess, t_next)
    return model.update(lambda x, v, v2: x + dt * 0.5 * (v + v2), xs, vs, vs_next)
  xs = jax.lax.fori_loop(0, n - 1, step, xs)
  return _euler(model, times[n - 1:], xs, 1)


def _ddim(model: _Joint, times, xs, n):
  obj = model.objective

  def step(i, xs):
    t, t_next = times[i], times[i + 1]
    outs = model(xs, t)
    alpha_next, sigma_next = obj.alpha_sigma(t_next)
    def one(x, out):
      x0 = obj.x0_from_output(x, out, t)
      eps = obj.eps_from_output(x, out, t)
      return alpha_next * x0 + sigma_next * eps
    return model.update(one, xs, outs)
  return jax.lax.fori_loop(0, n, step, xs)


def _dpmpp_2m(model: _Joint, times, xs, n):
  """DPM-Solver++(2M) in data (x0) prediction, log-SNR steps lambda = log(alpha / sigma).

  x_next = (sigma_next / sigma) x - alpha_next * expm1(-h) * D, with D = x0 on the first and
  the last step (first order) and D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev otherwise, where
  h = lambda_next - lambda and r = h_prev / h.
  """
  obj = model.objective
  tiny = jnp.float32(1e-30)

  def log_snr(t):
    alpha, sigma = obj.alpha_sigma(t)
    return jnp.log(alpha) - jnp.log(jnp.maximum(sigma, tiny)), alpha, sigma

  def step(i, carry):
    xs, x0s_prev, h_prev = carry
    t, t_next = times[i], times[i + 1]
    lam, _, sigma = log_snr(t)
    lam_next, alpha_next, sigma_next = log_snr(t_next)
    h = lam_next - lam
    second_order = (i > 0) & (sigma_next > 0)
    # 1/(2r) only where second order applies; elsewhere r may be 0 or inf.
    c = jnp.where(second_order, h / jnp.where(second_order, 2.0 * h_prev, 1.0), 0.0)
    outs = model(xs, t)
    x0s = tuple(obj.x0_from_output(x, o, t).astype(jnp.float32) for x, o in zip(xs, outs))
    def one(x, x0, x0_prev):
      d = (1.0 + c) * x0 - c * x0_prev
      return (sigma_next / sigma) * x - alpha_next * jnp.expm1(-h) * d
    xs = model.update(one, xs, x0s, x0s_prev)
    return xs, x0s, h

  x0s = tuple(jnp.zeros(x.shape, jnp.float32) for x in xs)
  xs, _, _ = jax.lax.fori_loop(0, n, step, (xs, x0s, jnp.float32(1.0)))
  return xs


_LOOPS = {"euler": _euler, "heun": _heun, "ddim": _ddim, "dpm++2m": _dpmpp_2m}


def sample(denoise_fn: DenoiseFn, objective, video_noise: jax.Array | None,
           audio_noise: jax.Array | None, *, sampler: str, num_steps: int,
           video_cond: jax.Array | None = None,
           audio_cond: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Integrates from noise to clean (video, audio) samples.

  Args:
    denoise_fn: `(video_t, audio_t, t_video, t_audio) -> (video_out, audio_out)`, raw model
      outputs in the objective's parametrization (velocity for flow, eps or v for DDPM); t_* are
      float32 [B]. Wrap a text-conditioned model with `guidance.guided`.
    objective: a `RectifiedFlow` or `DDPM`.
    video_noise, audio_noise: starting noise [B, ...] per modality (may be None for a modality
      whose condition is given).
    sampler: "euler" or "heun" (flow), "ddim" or "dpm++2m" (DDPM).
    num_steps: model steps (Heun calls the model twice per step but once on the last).
    video_cond, audio_cond: a clean latent to condition on; returned unchanged (the same array).

  Returns:
    (video, audio) clean samples (float32 for sampled modalities).
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"sample: unknown sampler {sampler!r}; known: {sorted(SAMPLERS)}")
  kind = getattr(objective, "name", None)
  if SAMPLERS[sampler] != kind:
    fits = [s for s, k in SAMPLERS.items() if k == kind]
    raise ValueError(f"sample: sampler {sampler!r} is for the {SAMPLERS[sampler]!r} objective, "
                     f"not {kind!r}; use one of {fits}")
  times = objective.sample_times(num_steps)  # checks num_steps
  conds = (video_cond, audio_cond)
  xs = (_start("video", video_noise, video_cond), _start("audio", audio_noise, audio_cond))
  if xs[0].shape[0] != xs[1].shape[0]:
    raise ValueError(f"sample: video and audio batch sizes differ: {xs[0].shape[0]} vs "
                     f"{xs[1].shape[0]}")
  if video_cond is not None and audio_cond is not None:
    return video_cond, audio_cond
  model = _Joint(denoise_fn, objective, conds, xs[0].shape[0])
  out = _LOOPS[sampler](model, times, xs, num_steps)
  return tuple(c if c is not None else x for x, c in zip(out, conds))
