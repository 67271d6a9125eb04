"""Objectives, training times, samplers and guidance.

The samplers are checked on a Gaussian toy: with data x0 ~ N(mu, sd^2) per dimension the
optimal denoiser E[x0 | x_t] is analytic, so the exact model output of every parametrization
is known, and the probability-flow ODE maps standard noise to N(mu, sd^2) exactly (up to the
tiny signal DDPM leaves at t = 1, which the reference accounts for).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avgen.diffusion import guidance, objectives, samplers, timesteps
from configs.base import get_base_config

B = 256
VIDEO_SHAPE = (2, 2, 2, 1)
AUDIO_SHAPE = (4, 3)

_rng = np.random.default_rng(0)
MU_V = _rng.normal(size=VIDEO_SHAPE).astype(np.float32)
SD_V = _rng.uniform(0.2, 1.5, VIDEO_SHAPE).astype(np.float32)
MU_A = _rng.normal(size=AUDIO_SHAPE).astype(np.float32)
SD_A = _rng.uniform(0.2, 1.5, AUDIO_SHAPE).astype(np.float32)

FLOW = objectives.RectifiedFlow()
FLOW_SHIFTED = objectives.RectifiedFlow(time_shift=3.0)
FLOW_X0 = objectives.RectifiedFlow(prediction="x0")
DDPM_V = objectives.DDPM("cosine", "v", 1000)
DDPM_EPS = objectives.DDPM("cosine", "eps", 1000)
DDPM_LINEAR = objectives.DDPM("linear", "eps", 1000)
ALL_OBJECTIVES = [FLOW, FLOW_SHIFTED, DDPM_V, DDPM_EPS, DDPM_LINEAR]


def exact_output(obj, mu, sd):
  """The optimal model output for Gaussian data, in obj's parametrization."""
  def fn(x, t):
    a, s = obj.alpha_sigma(objectives._expand(t, x))
    var = a * a * sd * sd + s * s
    ex0 = mu + a * sd * sd / var * (x - a * mu)
    eeps = s / var * (x - a * mu)
    if obj.name == "flow":
      return ex0 if obj.prediction == "x0" else eeps - ex0
    return eeps if obj.prediction == "eps" else a * eeps - s * ex0
  return fn


def toy_denoiser(obj, violation_weight=0.0, video_cond=None):
  """Exact denoiser; optionally corrupts the audio output when the video is not held clean."""
  fv, fa = exact_output(obj, MU_V, SD_V), exact_output(obj, MU_A, SD_A)

  def denoise(video_t, audio_t, t_video, t_audio):
    audio_out = fa(audio_t, t_audio)
    if video_cond is not None:
      violation = jnp.mean(jnp.abs(video_t - video_cond)) + jnp.mean(jnp.abs(t_video))
      audio_out = audio_out + violation_weight * violation
    return fv(video_t, t_video), audio_out
  return denoise


def standard_noise(shape, seed):
  """Noise standardized per dimension over the batch, so moment errors come from the sampler."""
  z = np.asarray(jax.random.normal(jax.random.key(seed), shape))
  return jnp.asarray((z - z.mean(0)) / z.std(0))


def reference_moments(obj, mu, sd):
  """Mean and std of the exact ODE map applied to standard noise at t = 1."""
  a, s = (np.asarray(v) for v in obj.alpha_sigma(1.0))
  root = np.sqrt(a * a * sd * sd + s * s)
  return mu - sd * a * mu / root, sd / root


def moment_error(obj, video, audio):
  err = 0.0
  for x, mu, sd in ((video, MU_V, SD_V), (audio, MU_A, SD_A)):
    ref_mean, ref_std = reference_moments(obj, mu, sd)
    x = np.asarray(x)
    err = max(err, np.abs(x.mean(0) - ref_mean).max(), np.abs(x.std(0) - ref_std).max())
  return err


NOISE_V = standard_noise((B,) + VIDEO_SHAPE, 1)
NOISE_A = standard_noise((B,) + AUDIO_SHAPE, 2)


@functools.cache
def toy_samples(obj, sampler, num_steps):
  fn = jax.jit(lambda v, a: samplers.sample(toy_denoiser(obj), obj, v, a, sampler=sampler,
                                            num_steps=num_steps))
  return fn(NOISE_V, NOISE_A)


def run_toy(obj, sampler, num_steps):
  return moment_error(obj, *toy_samples(obj, sampler, num_steps))


# ---------------------------------------------------------------- objectives


def test_build_objective_from_config():
  config = get_base_config("demo").diffusion
  flow = objectives.build_objective(config)
  assert isinstance(flow, objectives.RectifiedFlow)
  config.objective = "ddpm"
  config.ddpm_prediction = "eps"
  ddpm = objectives.build_objective(config)
  assert isinstance(ddpm, objectives.DDPM) and ddpm.prediction == "eps"
  assert ddpm.num_steps == config.ddpm_steps
  config.objective = "edm"
  with pytest.raises(ValueError, match="diffusion.objective"):
    objectives.build_objective(config)
  with pytest.raises(ValueError, match="ddpm_prediction"):
    objectives.DDPM("cosine", "x0")
  with pytest.raises(ValueError, match="time_shift"):
    objectives.RectifiedFlow(time_shift=0.0)


@pytest.mark.parametrize(
    "obj", ALL_OBJECTIVES, ids=["flow", "flow-shift", "ddpm-v", "ddpm-eps", "ddpm-linear-eps"])
def test_output_round_trip(obj):
  """x0 and eps come back from (x_t, target) for both objectives and predictions."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x0 = jax.random.normal(k1, (64, 3, 5))
  eps = jax.random.normal(k2, (64, 3, 5))
  t = jnp.concatenate([obj.sample_t(k3, (61,)), jnp.array([0.0, 0.5, 1.0])])
  if getattr(obj, "prediction", None) == "eps":
    t = jnp.minimum(t, 0.98)  # x0 = (x_t - sigma eps) / alpha loses precision as alpha -> 0
  xt = obj.noisy(x0, eps, t)
  out = obj.target(x0, eps, t)
  np.testing.assert_allclose(obj.x0_from_output(xt, out, t), x0, atol=2e-4)
  np.testing.assert_allclose(obj.eps_from_output(xt, out, t), eps, atol=2e-4)
  # t = 0 is clean data.
  np.testing.assert_allclose(obj.noisy(x0, eps, jnp.zeros(64)), x0, atol=1e-6)


def test_flow_equations():
  x0, eps = jnp.full((2, 3), 2.0), jnp.full((2, 3), -1.0)
  t = jnp.array([0.25, 1.0])
  np.testing.assert_allclose(FLOW.noisy(x0, eps, t), [[1.25] * 3, [-1.0] * 3])
  np.testing.assert_allclose(FLOW.target(x0, eps, t), jnp.full((2, 3), -3.0))


def test_ddpm_schedule():
  for obj in (DDPM_V, DDPM_LINEAR):
    abar = obj.alpha_bar_table
    assert abar[0] == 1.0 and abar[-1] < 1e-3
    assert np.all(np.diff(abar) < 0)
  x0, eps = jnp.ones((1, 4)), jnp.zeros((1, 4))
  a, s = DDPM_V.alpha_sigma(0.3)
  np.testing.assert_allclose(a ** 2 + s ** 2, 1.0, rtol=1e-6)
  np.testing.assert_allclose(DDPM_V.target(x0, eps, jnp.array([0.3])), -s * x0, rtol=1e-6)


def test_t_shape_error():
  with pytest.raises(ValueError, match="leading axes"):
    FLOW.noisy(jnp.ones((4, 3)), jnp.ones((4, 3)), jnp.ones((3,)))


def test_flow_sample_t_logit_normal():
  obj = objectives.RectifiedFlow(logit_normal_mean=0.5, logit_normal_std=0.8)
  t = np.asarray(obj.sample_t(jax.random.key(1), (50_000,)))
  assert t.min() > 0 and t.max() < 1
  logit = np.log(t / (1 - t))
  assert abs(logit.mean() - 0.5) < 0.02 and abs(logit.std() - 0.8) < 0.02


def test_flow_time_shift():
  t = np.asarray(FLOW_SHIFTED.sample_t(jax.random.key(2), (50_000,)))
  assert t.min() > 0 and t.max() < 1
  # The median of sigmoid(N(0, 1)) is 0.5; shift 3 maps it to 3*0.5 / (1 + 2*0.5) = 0.75.
  assert abs(np.median(t) - 0.75) < 0.01
  times = np.asarray(FLOW_SHIFTED.sample_times(4))
  np.testing.assert_allclose(times, [1.0, 0.9, 0.75, 0.5, 0.0], atol=1e-6)
  np.testing.assert_allclose(FLOW.sample_times(4), [1.0, 0.75, 0.5, 0.25, 0.0])


def test_ddpm_sample_t_uniform_steps():
  obj = objectives.DDPM("cosine", "v", 10)
  t = np.asarray(obj.sample_t(jax.random.key(3), (20_000,)))
  steps = t * 10
  np.testing.assert_allclose(steps, np.round(steps), atol=1e-5)
  counts = np.bincount(np.round(steps).astype(int), minlength=11)
  assert counts[0] == 0  # step 0 is clean data and never trained
  assert np.all(np.abs(counts[1:] / 20_000 - 0.1) < 0.01)
  times = np.asarray(obj.sample_times(4))
  assert times[0] == 1.0 and times[-1] == 0.0 and np.all(np.diff(times) < 0)
  np.testing.assert_allclose(times * 10, np.round(times * 10), atol=1e-6)
  with pytest.raises(ValueError, match="exceeds"):
    obj.sample_times(11)


# ---------------------------------------------------------------- samplers


@pytest.mark.parametrize("obj,sampler,num_steps,tol", [
    (FLOW, "euler", 200, 0.015),
    (FLOW, "heun", 25, 0.005),
    (FLOW_X0, "euler", 200, 0.015),
    (FLOW_X0, "heun", 25, 0.005),
    (FLOW_SHIFTED, "heun", 50, 0.012),
    (DDPM_V, "ddim", 200, 0.015),
    (DDPM_V, "dpm++2m", 50, 0.005),
    (DDPM_EPS, "dpm++2m", 50, 0.005),
    (DDPM_LINEAR, "ddim", 400, 0.01),
    (DDPM_LINEAR, "dpm++2m", 100, 0.004),
])
def test_sampler_recovers_gaussian(obj, sampler, num_steps, tol):
  assert run_toy(obj, sampler, num_steps) < tol


@pytest.mark.parametrize("obj,first,second", [
    (FLOW, "euler", "heun"), (DDPM_V, "ddim", "dpm++2m")])
def test_second_order_beats_first_order(obj, first, second):
  for steps in (8, 16):
    assert run_toy(obj, second, steps) < 0.5 * run_toy(obj, first, steps)
  # Doubling the steps cuts a first-order error about in half, a second-order one by more.
  assert run_toy(obj, first, 16) < 0.7 * run_toy(obj, first, 8)
  assert run_toy(obj, second, 16) < 0.4 * run_toy(obj, second, 8)


@pytest.mark.parametrize("obj,sampler,num_steps", [
    (FLOW, "euler", 200), (FLOW, "heun", 25), (DDPM_V, "ddim", 200), (DDPM_EPS, "dpm++2m", 50)])
def test_conditioning_held_clean(obj, sampler, num_steps):
  """A given video is the input of every call at t = 0 and comes back bit-exact."""
  cond = jax.random.normal(jax.random.key(5), (B,) + VIDEO_SHAPE).astype(jnp.bfloat16)
  den = toy_denoiser(obj, violation_weight=100.0, video_cond=cond)
  fn = jax.jit(lambda v, a, c: samplers.sample(den, obj, v, a, sampler=sampler,
                                               num_steps=num_steps, video_cond=c))
  video, audio = fn(NOISE_V, NOISE_A, cond)
  assert video.dtype == cond.dtype
  np.testing.assert_array_equal(np.asarray(video), np.asarray(cond))
  # Any call that saw a noisy video or t_video != 0 would have shifted the audio by >= 1e-2;
  # held clean, the audio is what an unconditioned run makes of the same noise.
  _, free_audio = toy_samples(obj, sampler, num_steps)
  np.testing.assert_allclose(audio, free_audio, atol=1e-4)


def test_audio_conditioning_without_audio_noise():
  cond = jax.random.normal(jax.random.key(8), (B,) + AUDIO_SHAPE)
  noise_v = standard_noise((B,) + VIDEO_SHAPE, 9)
  video, audio = samplers.sample(toy_denoiser(FLOW), FLOW, noise_v, None, sampler="heun",
                                 num_steps=20, audio_cond=cond)
  assert audio is cond
  np.testing.assert_allclose(np.asarray(video).mean(0), MU_V, atol=0.01)
  np.testing.assert_allclose(np.asarray(video).std(0), SD_V, atol=0.01)


def test_sampler_errors():
  den = toy_denoiser(FLOW)
  v, a = jnp.zeros((2,) + VIDEO_SHAPE), jnp.zeros((2,) + AUDIO_SHAPE)
  with pytest.raises(ValueError, match="'ddim' is for the 'ddpm' objective"):
    samplers.sample(den, FLOW, v, a, sampler="ddim", num_steps=4)
  with pytest.raises(ValueError, match="'heun' is for the 'flow' objective"):
    samplers.sample(den, DDPM_V, v, a, sampler="heun", num_steps=4)
  with pytest.raises(ValueError, match="unknown sampler"):
    samplers.sample(den, FLOW, v, a, sampler="rk4", num_steps=4)
  with pytest.raises(ValueError, match="num_steps"):
    samplers.sample(den, FLOW, v, a, sampler="euler", num_steps=0)
  with pytest.raises(ValueError, match="video_cond shape"):
    samplers.sample(den, FLOW, v, a, sampler="euler", num_steps=4, video_cond=v[:, :1])
  with pytest.raises(ValueError, match="batch sizes differ"):
    samplers.sample(den, FLOW, v, a[:1], sampler="euler", num_steps=4)
  with pytest.raises(ValueError, match="audio_noise is required"):
    samplers.sample(den, FLOW, v, None, sampler="euler", num_steps=4)
  bad = lambda vt, at, tv, ta: (vt, at[:, :1])
  with pytest.raises(ValueError, match="audio output has shape"):
    samplers.sample(bad, FLOW, v, a, sampler="euler", num_steps=4)


def test_model_call_counts():
  """Heun: 2 calls a step, 1 on the last; the others: 1 a step (counted at run time)."""
  calls = []

  def den(vt, at, tv, ta):
    jax.debug.callback(lambda: calls.append(1))
    return toy_denoiser(FLOW)(vt, at, tv, ta)

  v, a = jnp.zeros((2,) + VIDEO_SHAPE), jnp.zeros((2,) + AUDIO_SHAPE)
  for sampler, expected in (("euler", 6), ("heun", 11)):
    calls.clear()
    jax.block_until_ready(samplers.sample(den, FLOW, v, a, sampler=sampler, num_steps=6))
    jax.effects_barrier()
    assert len(calls) == expected, sampler


# ---------------------------------------------------------------- guidance


def _text_model(counter):
  """A toy text-conditioned model: outputs depend on inputs, times and the prompt rows."""
  def model_fn(video_t, audio_t, t_video, t_audio, text_cond):
    counter.append(video_t.shape[0])
    ids, mask = text_cond
    code = jnp.sum(ids * mask, axis=1).astype(jnp.float32)  # [batch]
    out_v = jnp.sin(video_t) * code[:, None, None, None, None] + t_video[:, None, None, None, None]
    out_a = jnp.cos(audio_t) + code[:, None, None] * t_audio[:, None, None]
    return out_v, out_a
  return model_fn


def _guidance_inputs(b=3):
  keys = jax.random.split(jax.random.key(11), 4)
  video = jax.random.normal(keys[0], (b, 2, 4, 4, 3))
  audio = jax.random.normal(keys[1], (b, 8, 5))
  t_v = jax.random.uniform(keys[2], (b,))
  t_a = jax.random.uniform(keys[3], (b,))
  ids = jnp.concatenate([jnp.arange(b * 6).reshape(b, 6) + 1, jnp.zeros((b, 6), jnp.int32)])
  mask = jnp.concatenate([jnp.ones((b, 6), bool), jnp.zeros((b, 6), bool).at[:, 0].set(True)])
  return video, audio, t_v, t_a, (ids, mask)


def test_guidance_formula_one_call():
  video, audio, t_v, t_a, text = _guidance_inputs()
  calls = []
  model_fn = _text_model(calls)
  den = guidance.guided(model_fn, 4.0, jnp.array([0.0, 2.5, 1.0]), text_cond=text)
  out_v, out_a = jax.jit(den)(video, audio, t_v, t_a)
  assert calls == [6]  # one call (traced once), on the doubled batch
  two = lambda x: jnp.concatenate([x, x])
  ref_v, ref_a = jax.jit(model_fn)(two(video), two(audio), two(t_v), two(t_a), text)
  np.testing.assert_allclose(out_v, ref_v[3:] + 4.0 * (ref_v[:3] - ref_v[3:]), rtol=1e-5, atol=1e-5)
  s = jnp.array([0.0, 2.5, 1.0])[:, None, None]
  np.testing.assert_allclose(out_a, ref_a[3:] + s * (ref_a[:3] - ref_a[3:]), rtol=1e-5, atol=1e-5)
  assert not np.allclose(ref_v[:3], ref_v[3:])  # the prompt matters, so the check has teeth


def test_guidance_scale_one_is_conditional():
  video, audio, t_v, t_a, (ids, mask) = _guidance_inputs()
  calls = []
  model_fn = _text_model(calls)
  cond_v, cond_a = model_fn(video, audio, t_v, t_a, (ids[:3], mask[:3]))
  calls.clear()
  out_v, out_a = guidance.guided(model_fn, 1.0, 1, (ids, mask))(video, audio, t_v, t_a)
  assert len(calls) == 1
  np.testing.assert_array_equal(out_v, cond_v)
  np.testing.assert_array_equal(out_a, cond_a)
  # One modality guided: still one call; the unguided one is exactly conditional.
  calls.clear()
  out_v, out_a = guidance.guided(model_fn, 1.0, 3.0, text_cond=(ids, mask))(video, audio, t_v, t_a)
  assert calls == [6]
  np.testing.assert_array_equal(out_v, cond_v)
  assert not np.allclose(out_a, cond_a)


def test_guidance_inside_jitted_sampler():
  video, audio, _, _, text = _guidance_inputs()
  calls = []
  den = guidance.guided(_text_model(calls), 2.0, 2.0, text_cond=text)
  fn = jax.jit(lambda v, a: samplers.sample(den, FLOW, v, a, sampler="heun", num_steps=3))
  out_v, out_a = fn(video * 0.1, audio * 0.1)
  assert out_v.shape == video.shape and out_a.shape == audio.shape
  assert np.all(np.isfinite(out_v)) and np.all(np.isfinite(out_a))


def test_guidance_errors():
  video, audio, t_v, t_a, (ids, mask) = _guidance_inputs()
  model_fn = _text_model([])
  with pytest.raises(ValueError, match="same even leading size"):
    guidance.guided(model_fn, 2.0, 2.0, text_cond=(ids[:5], mask[:5]))
  den = guidance.guided(model_fn, 2.0, 2.0, text_cond=(ids, mask))
  with pytest.raises(ValueError, match="B must be 3"):
    den(video[:2], audio[:2], t_v[:2], t_a[:2])


# ---------------------------------------------------------------- training times


def _train_times(n=40_000, **kw):
  args = dict(share_t_prob=0.5, audio_to_video_prob=0.1, video_to_audio_prob=0.2)
  args.update(kw)
  fn = jax.jit(lambda key: timesteps.sample_train_times(key, FLOW, n, **args))
  return [np.asarray(x) for x in fn(jax.random.key(21))]


def test_train_times_joint_probabilities():
  t_v, t_a, m_v, m_a = _train_times()
  assert all(x.shape == (40_000,) and x.dtype == np.float32 for x in (t_v, t_a, m_v, m_a))
  audio_clean = m_a == 0
  video_clean = m_v == 0
  assert not np.any(audio_clean & video_clean)  # exclusive
  assert abs(audio_clean.mean() - 0.1) < 0.01 and abs(video_clean.mean() - 0.2) < 0.01
  assert np.all(t_a[audio_clean] == 0) and np.all(t_v[video_clean] == 0)
  assert np.all(t_a[~audio_clean] > 0) and np.all(t_v[~video_clean] > 0)
  free = ~audio_clean & ~video_clean
  assert abs((t_v[free] == t_a[free]).mean() - 0.5) < 0.015
  # Unshared times are independent draws of the objective.
  unshared = free & (t_v != t_a)
  assert abs(np.corrcoef(t_v[unshared], t_a[unshared])[0, 1]) < 0.03
  assert abs(np.median(t_v[free]) - 0.5) < 0.02


def test_train_times_missing_modality():
  t_v, t_a, m_v, m_a = _train_times(modalities=("video",))
  assert np.all(t_a == 1.0) and np.all(m_a == 0) and np.all(m_v == 1)
  assert np.all((t_v > 0) & (t_v < 1))
  t_v, t_a, m_v, m_a = _train_times(modalities=("audio",))
  assert np.all(t_v == 1.0) and np.all(m_v == 0) and np.all(m_a == 1)


def test_train_times_one_modality_per_example():
  t_v, t_a, m_v, m_a = _train_times(joint=False)
  np.testing.assert_array_equal(m_v + m_a, 1.0)
  assert abs(m_v.mean() - 0.5) < 0.015
  assert np.all(t_a[m_v == 1] == 1.0) and np.all(t_v[m_a == 1] == 1.0)
  assert np.all(t_v[m_v == 1] < 1.0) and np.all(t_a[m_a == 1] < 1.0)
  t_v, t_a, m_v, m_a = _train_times(joint=False, modalities=("audio",))
  assert np.all(m_a == 1) and np.all(m_v == 0) and np.all(t_v == 1.0)


def test_train_times_errors():
  key = jax.random.key(0)
  kw = dict(share_t_prob=0.5, audio_to_video_prob=0.6, video_to_audio_prob=0.6)
  with pytest.raises(ValueError, match="must be <= 1"):
    timesteps.sample_train_times(key, FLOW, 4, **kw)
  kw["video_to_audio_prob"] = 0.1
  with pytest.raises(ValueError, match="subset"):
    timesteps.sample_train_times(key, FLOW, 4, modalities=("video", "text"), **kw)
  with pytest.raises(ValueError, match="share_t_prob"):
    timesteps.sample_train_times(key, FLOW, 4, **{**kw, "share_t_prob": 1.5})


def test_flow_x0_prediction_loss_is_the_velocity_loss_above_t_min():
  x0 = jax.random.normal(jax.random.key(11), (4, 6))
  eps = jax.random.normal(jax.random.key(12), (4, 6))
  out = jax.random.normal(jax.random.key(13), (4, 6))
  t = jnp.array([0.01, 0.04, 0.3, 0.9])
  xt = FLOW_X0.noisy(x0, eps, t)
  # A perfect x0 output gives zero loss at every t, also below t_min.
  np.testing.assert_allclose(FLOW_X0.loss_output(xt, x0, t), FLOW_X0.target(x0, eps, t), atol=1e-5)
  # Above t_min the loss equals the v-prediction loss of the equivalent velocity.
  v_out = FLOW_X0.velocity(xt, out, t)
  big = t >= FLOW_X0.t_min
  np.testing.assert_allclose(FLOW_X0.loss_output(xt, out, t)[big], v_out[big], rtol=1e-5)
  np.testing.assert_allclose(FLOW.target(x0, eps, t)[big], FLOW_X0.target(x0, eps, t)[big], rtol=1e-6)
  np.testing.assert_allclose(FLOW_X0.x0_from_output(xt, out, t), out)
