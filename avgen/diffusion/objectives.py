"""Diffusion objectives: rectified flow and DDPM on one time convention.

Time t lies in [0, 1]: 0 is clean data, 1 is pure noise, and the model always receives this
continuous t. Both objectives write the noisy input as x_t = alpha(t) * x0 + sigma(t) * eps:

  flow  alpha = 1 - t, sigma = t; the model predicts the velocity v = eps - x0.
  ddpm  alpha^2 = alpha_bar(t) from a discrete beta schedule of `ddpm_steps` steps (step k has
        t = k / ddpm_steps); the model predicts eps, or v = alpha * eps - sigma * x0.

A `t` array has shape [B] (or any prefix of x's shape, or a scalar) and broadcasts over the
trailing axes of x.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

OBJECTIVES = ("flow", "ddpm")
DDPM_SCHEDULES = ("cosine", "linear")
DDPM_PREDICTIONS = ("eps", "v")


def _expand(t, x: jax.Array) -> jax.Array:
  """Reshapes t ([B], a prefix of x.shape, or a scalar) to broadcast over x's trailing axes."""
  t = jnp.asarray(t, jnp.float32)
  if t.ndim > x.ndim or t.shape != tuple(x.shape[: t.ndim]):
    raise ValueError(f"t with shape {t.shape} must be a scalar or match the leading axes of x "
                     f"with shape {tuple(x.shape)}")
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def _check_num_steps(num_steps) -> None:
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f"num_steps must be a Python int >= 1, got {num_steps!r}")


class RectifiedFlow:
  """Straight path x_t = (1 - t) x0 + t eps; target velocity v = eps - x0.

  The network predicts v (`prediction="v"`) or the clean sample (`"x0"`); either way the loss is
  on the velocity. x0-prediction suits pixel-space models whose patches hold more values than
  the width can carry: at high noise a v-predicting network must copy the noise through, while
  an x0-predicting one only outputs the (low-dimensional) clean image. Velocity from an x0 output
  divides by t, clamped at `t_min`.

  Training times are logit-normal (t = sigmoid(u), u ~ N(mean, std^2)) and then shifted by
  t -> s t / (1 + (s - 1) t) with s = `time_shift`; s > 1 spends more time near noise, which
  large inputs need. Sampling times get the same shift.
  """

  name = "flow"

  def __init__(self, logit_normal_mean: float = 0.0, logit_normal_std: float = 1.0,
               time_shift: float = 1.0, prediction: str = "v", t_min: float = 0.05):
    if not logit_normal_std > 0:
      raise ValueError(f"diffusion.logit_normal_std must be > 0, got {logit_normal_std}")
    if not time_shift > 0:
      raise ValueError(f"diffusion.time_shift must be > 0, got {time_shift}")
    if prediction not in ("v", "x0"):
      raise ValueError(f"diffusion.flow_prediction must be 'v' or 'x0', got {prediction!r}")
    self.mean = float(logit_normal_mean)
    self.std = float(logit_normal_std)
    self.shift = float(time_shift)
    self.prediction = prediction
    self.t_min = float(t_min)

  def shift_t(self, t):
    s = self.shift
    return s * t / (1.0 + (s - 1.0) * t)

  def sample_t(self, rng: jax.Array, shape) -> jax.Array:
    u = self.mean + self.std * jax.random.normal(rng, shape, jnp.float32)
    return self.shift_t(jax.nn.sigmoid(u))

  def alpha_sigma(self, t):
    t = jnp.asarray(t, jnp.float32)
    return 1.0 - t, t

  def noisy(self, x0, noise, t):
    t = _expand(t, x0)
    return (1.0 - t) * x0 + t * noise

  def target(self, x0, noise, t):
    """The velocity eps - x0; for x0-prediction scaled by t / max(t, t_min) (see loss_output)."""
    if self.prediction == "v":
      return noise - x0
    t = _expand(t, x0)
    return t / jnp.maximum(t, self.t_min) * (noise - x0)

  def velocity(self, xt, out, t):
    """The velocity the network's output stands for (what the flow samplers integrate)."""
    if self.prediction == "v":
      return out
    return (xt - out) / jnp.maximum(_expand(t, xt), 1e-6)

  def loss_output(self, xt, out, t):
    """The output compared with `target` in the loss.

    For x0-prediction, (x_t - x0_hat) / max(t, t_min): the velocity for t >= t_min, and below it
    an x0 error weighted 1 / t_min^2 instead of 1 / t^2, which would blow up near clean data.
    """
    if self.prediction == "v":
      return out
    return (xt - out) / jnp.maximum(_expand(t, xt), self.t_min)

  def x0_from_output(self, xt, out, t):
    if self.prediction == "x0":
      return out
    return xt - _expand(t, xt) * out

  def eps_from_output(self, xt, out, t):
    if self.prediction == "x0":
      return (xt - (1.0 - _expand(t, xt)) * out) / jnp.maximum(_expand(t, xt), 1e-6)
    return xt + (1.0 - _expand(t, xt)) * out

  def sample_times(self, num_steps: int) -> jax.Array:
    """num_steps + 1 descending times from 1 to 0 (uniform, then shifted)."""
    _check_num_steps(num_steps)
    t = np.linspace(1.0, 0.0, num_steps + 1, dtype=np.float64)
    return jnp.asarray(self.shift_t(t), jnp.float32)


def _cosine_alpha_bar(num_steps: int) -> np.ndarray:
  """Nichol & Dhariwal cosine schedule; betas clipped at 0.999 so that late steps stay sane."""
  s = 0.008
  f = lambda k: math.cos((k / num_steps + s) / (1 + s) * math.pi / 2) ** 2
  betas = np.array([min(1.0 - f(k + 1) / f(k), 0.999) for k in range(num_steps)])
  return np.cumprod(1.0 - betas)


def _linear_alpha_bar(num_steps: int) -> np.ndarray:
  """Ho et al. linear betas 1e-4 .. 0.02 for 1000 steps, scaled to keep alpha_bar(1) for others."""
  scale = 1000.0 / num_steps
  betas = np.linspace(1e-4 * scale, 0.02 * scale, num_steps)
  if betas[-1] >= 1.0:
    raise ValueError(f"diffusion.ddpm_steps={num_steps} is too small for the linear schedule "
                     "(its largest beta would reach 1); use >= 21 steps or the cosine schedule")
  return np.cumprod(1.0 - betas)


class DDPM:
  """Discrete variance-preserving diffusion; step k in 0..N has t = k / N (k = 0 is clean).

  alpha_bar between grid points is interpolated linearly, so any t in [0, 1] is accepted, but
  training and the samplers use grid times only.
  """

  name = "ddpm"

  def __init__(self, schedule: str = "cosine", prediction: str = "v", num_steps: int = 1000):
    if schedule not in DDPM_SCHEDULES:
      raise ValueError(f"diffusion.ddpm_schedule must be one of {DDPM_SCHEDULES}, got {schedule!r}")
    if prediction not in DDPM_PREDICTIONS:
      raise ValueError(f"diffusion.ddpm_prediction must be one of {DDPM_PREDICTIONS}, "
                       f"got {prediction!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
      raise ValueError(f"diffusion.ddpm_steps must be an int >= 1, got {num_steps!r}")
    self.schedule = schedule
    self.prediction = prediction
    self.num_steps = int(num_steps)
    table = _cosine_alpha_bar(num_steps) if schedule == "cosine" else _linear_alpha_bar(num_steps)
    # Index k of the table is step k; step 0 is clean data.
    self.alpha_bar_table = np.concatenate([[1.0], table]).astype(np.float32)

  def alpha_bar(self, t) -> jax.Array:
    t = jnp.asarray(t, jnp.float32)
    grid = jnp.arange(self.num_steps + 1, dtype=jnp.float32)
    return jnp.interp(t * self.num_steps, grid, jnp.asarray(self.alpha_bar_table))

  def alpha_sigma(self, t):
    abar = self.alpha_bar(t)
    return jnp.sqrt(abar), jnp.sqrt(jnp.maximum(1.0 - abar, 0.0))

  def _coeffs(self, t, x):
    alpha, sigma = self.alpha_sigma(_expand(t, x))
    return alpha, sigma

  def sample_t(self, rng: jax.Array, shape) -> jax.Array:
    step = jax.random.randint(rng, shape, 1, self.num_steps + 1)
    return step.astype(jnp.float32) / self.num_steps

  def noisy(self, x0, noise, t):
    alpha, sigma = self._coeffs(t, x0)
    return alpha * x0 + sigma * noise

  def target(self, x0, noise, t):
    if self.prediction == "eps":
      return noise
    alpha, sigma = self._coeffs(t, x0)
    return alpha * noise - sigma * x0

  def loss_output(self, xt, out, t):
    """The output compared with `target` in the loss: the raw output (eps or v)."""
    del xt, t
    return out

  def x0_from_output(self, xt, out, t):
    alpha, sigma = self._coeffs(t, xt)
    if self.prediction == "eps":
      return (xt - sigma * out) / alpha
    return alpha * xt - sigma * out

  def eps_from_output(self, xt, out, t):
    if self.prediction == "eps":
      return out
    alpha, sigma = self._coeffs(t, xt)
    return sigma * xt + alpha * out

  def sample_times(self, num_steps: int) -> jax.Array:
    """num_steps + 1 descending grid times from 1 to 0 (evenly spaced steps, rounded)."""
    _check_num_steps(num_steps)
    if num_steps > self.num_steps:
      raise ValueError(f"num_steps={num_steps} exceeds the DDPM's {self.num_steps} discrete steps")
    steps = np.round(np.linspace(self.num_steps, 0, num_steps + 1))
    return jnp.asarray(steps / self.num_steps, jnp.float32)


Objective = RectifiedFlow | DDPM


def build_objective(config) -> Objective:
  """Builds the objective named by `config.objective` from a `config.diffusion` ConfigDict."""
  kind = config.objective
  if kind == "flow":
    return RectifiedFlow(config.logit_normal_mean, config.logit_normal_std, config.time_shift,
                         config.get("flow_prediction", "v"))
  if kind == "ddpm":
    return DDPM(config.ddpm_schedule, config.ddpm_prediction, config.ddpm_steps)
  raise ValueError(f"diffusion.objective must be one of {OBJECTIVES}, got {kind!r}")
