"""Remat policies by name, and the optimizer state kept in pinned host memory between steps."""

import contextlib
import inspect
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import train_utils
from avgen import config as config_lib
from avgen.models import build_model, dit
from avgen.models.tokenizer import ByteTokenizer
from avgen.parallel import mesh as mesh_lib
from avgen.train import state as state_lib, step as step_lib
from configs.base import get_base_config


def _tiny(remat="none"):
  c = get_base_config("demo")
  c.data.num_frames, c.data.fps, c.data.audio_seconds = 4, 8, 0.5
  c.data.height = c.data.width = 16
  c.data.caption_max_len = 16
  m = c.model
  m.width, m.depth, m.num_heads = 32, 1, 2
  m.audio_head_depth, m.video_head_depth, m.video_head_channels = 1, 1, 8
  m.align_width = 16
  m.text_width, m.text_depth, m.text_heads = 32, 1, 2
  m.remat = remat
  c.mel.n_mels = 16
  return c


def _trunk_inputs(config, batch=2):
  rng = np.random.default_rng(0)
  video = rng.normal(size=(batch, 4, 16, 16, 3)).astype(np.float32)
  audio = rng.normal(size=(batch, 32, 16)).astype(np.float32)
  t = np.array([0.3, 0.8], np.float32)[:batch]
  text = rng.normal(size=(batch, 16, config.model.text_width)).astype(np.float32)
  _, mask = ByteTokenizer(16)(["a red circle bounces", "beep"][:batch])
  return tuple(map(jnp.asarray, (video, audio, t, t[::-1].copy(), text, mask)))


def _perturbed_params(model, seed=1):
  """Every parameter moved off its init, so zero-initialised gates and outputs carry gradient."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype),
                      nnx.state(model, nnx.Param))


def _trunk_loss(graphdef, rest, args):
  def loss(params):
    xv, xa, _, _ = nnx.merge(graphdef, params, rest).trunk(*args)
    return jnp.mean(jnp.square(xv)) + jnp.mean(jnp.sin(xa))
  return loss


@pytest.fixture(scope="module")
def results():
  """Trunk loss and gradients under every policy, from one compile (one program per policy
  would cost ~8x the compile time), at parameters moved off their init."""
  params, losses = None, []
  for policy in config_lib.REMAT:
    config = _tiny(policy)
    model = build_model(config, nnx.Rngs(0)).dit
    params = _perturbed_params(model) if params is None else params
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    losses.append(jax.value_and_grad(_trunk_loss(graphdef, rest, _trunk_inputs(config))))
  out = jax.jit(lambda p: [f(p) for f in losses])(params)
  return params, dict(zip(config_lib.REMAT, out))


@pytest.mark.parametrize("policy", [p for p in config_lib.REMAT if p != "none"])
def test_remat_policy_gives_the_same_loss_and_gradients(results, policy):
  _, by_policy = results
  (ref_loss, ref_grads), (loss, grads) = by_policy["none"], by_policy[policy]
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref_grads)) > 0
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads,
               ref_grads)


def _saved(policy, params, args, attention_impl="auto") -> list[str]:
  """What the backward pass keeps from the forward pass, one line per array (jax's listing)."""
  config = _tiny(policy)
  config.model.attention_impl = attention_impl
  model = build_model(config, nnx.Rngs(0)).dit
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  listing = io.StringIO()
  with contextlib.redirect_stdout(listing):
    jax.ad_checkpoint.print_saved_residuals(_trunk_loss(graphdef, rest, args), params)
  return listing.getvalue().splitlines()


def test_policies_keep_what_they_name(results):
  """The names are wired: the attention output is kept by save_attention_out, not by full."""
  params, _ = results
  args = _trunk_inputs(_tiny())
  named = lambda lines: [l for l in lines if f"named '{dit.ATTENTION_OUT}'" in l]
  assert named(_saved("save_attention_out", params, args))
  assert not named(_saved("full", params, args))
  assert len(_saved("full", params, args)) < len(_saved("none", params, args))


def test_dots_attention_keeps_the_kernels_output_and_statistics(results, monkeypatch):
  """With a flash kernel (Pallas, interpreted here) "dots_attention" keeps both outputs of each
  attention forward (output [b,l,h,d] and logsumexp [b,h,l]), so the backward pass does not
  rerun it; "dots" keeps neither; nor does "dots_attention" for attentions over few keys."""
  params, _ = results
  args = _trunk_inputs(_tiny())
  kernel = lambda lines: [l.split()[0] for l in lines if "output of pallas_call" in l]
  assert not kernel(_saved("dots", params, args, attention_impl="pallas"))
  # The kernel pads both the 40 joint tokens and the 16 text tokens to one 128-key block.
  monkeypatch.setattr(dit, "SAVE_ATTENTION_MIN_KEYS", 128)
  kept = kernel(_saved("dots_attention", params, args, attention_impl="pallas"))
  # Self-attention over 128 tokens and cross-attention from them to the text, 2 heads of 16.
  assert sorted(kept) == sorted(["f32[2,128,2,16]", "f32[2,2,128]"] * 2), kept
  monkeypatch.setattr(dit, "SAVE_ATTENTION_MIN_KEYS", 129)
  assert not kernel(_saved("dots_attention", params, args, attention_impl="pallas"))


def test_dots_attention_reruns_short_key_attention_at_2b_shapes():
  """At the 2B's shapes cuDNN's forward over the 16,640 joint tokens is kept and the text
  cross-attention's (77 keys padded to 128) is rerun: it costs little and its output would hold
  1.5 GiB over 24 blocks. Operands as jax binds them: q, k, v [b, l, h, d], then lengths."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # noqa: PLC0415
  prim = cudnn._dot_product_attention_fwd_p_wrapper  # pylint: disable=protected-access
  policy = dit._remat_policy("dots_attention")  # pylint: disable=protected-access
  arr = lambda *shape: jax.core.ShapedArray(shape, jnp.bfloat16)
  lengths = jax.core.ShapedArray((1,), jnp.int32)
  q = arr(1, 16640, 16, 128)
  assert policy(prim, q, q, q, lengths, lengths)
  short = arr(1, 128, 16, 128)
  assert not policy(prim, q, short, short, lengths, lengths)


def test_dots_attention_names_the_primitive_jax_binds_for_cudnn():
  """cuDNN's forward cannot be traced on the CPU, so check the name the policy matches against
  the primitive jax's cuDNN attention binds (a renamed primitive would silently recompute)."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # noqa: PLC0415
  assert cudnn._dot_product_attention_fwd_p_wrapper.name in dit.ATTENTION_PRIMITIVES  # pylint: disable=protected-access
  assert "_dot_product_attention_fwd_p_wrapper.bind" in inspect.getsource(cudnn._dot_product_attention_fwd)  # pylint: disable=protected-access


def test_unknown_remat_is_named():
  c = _tiny("dotz")
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.remat='dotz'.*offload_dots"):
    config_lib.validate(c, num_devices=1)
  with pytest.raises(ValueError, match="model.remat"):
    build_model(c, nnx.Rngs(0))


def test_offload_option_is_validated():
  c = train_utils.tiny_config()
  del c.train["offload_optimizer"]  # the field is typed; a config from JSON need not be
  c.train.offload_optimizer = "yes"
  with pytest.raises(config_lib.ConfigError, match=r"config\.train\.offload_optimizer"):
    config_lib.validate(c, num_devices=1)


def test_offload_fails_clearly_without_pinned_host_memory():
  class NoHostMemory:
    platform = "fakeaccel"

    def addressable_memories(self):
      return [type("Memory", (), {"kind": "device"})()]

  with pytest.raises(ValueError, match=r"offload_optimizer=True needs 'pinned_host'.*fakeaccel"):
    state_lib.check_offload_supported([NoHostMemory()])


def test_offloaded_optimizer_shardings_say_pinned_host():
  """Same layout as without offload, in host memory; parameters stay on the device. (Training
  with it: tests/test_mesh_matrix.py runs its (2, 4, 1, 1) mesh with the offload on.)"""
  config = train_utils.tiny_config()
  config.mesh.data, config.mesh.fsdp = 1, 2
  mesh = mesh_lib.build_mesh(config, jax.devices()[:2])
  rules = tuple(tuple(r) for r in config.mesh.rules)
  _, _, abstract = state_lib.abstract_state(config, state_lib.build_optimizer(config.train))
  plain = state_lib.state_shardings(abstract, mesh, rules)
  offloaded = state_lib.state_shardings(abstract, mesh, rules, offload_optimizer=True)
  for p, o in zip(jax.tree.leaves(plain.opt_state), jax.tree.leaves(offloaded.opt_state)):
    assert (p.memory_kind, o.memory_kind) == ("device", "pinned_host")
    assert p.spec == o.spec
  assert any("fsdp" in str(o.spec) for o in jax.tree.leaves(offloaded.opt_state))
  assert jax.tree.leaves(plain.params) == jax.tree.leaves(offloaded.params)


def _train(config, offload, batches):
  """(initial params, state, metrics per step) of training from the config's seed on an fsdp=2
  mesh, the optimizer state offloaded or not."""
  config = config.copy_and_resolve_references()
  config.train.offload_optimizer = offload
  mesh = mesh_lib.build_mesh(config, jax.devices()[:2])
  rules = tuple(tuple(r) for r in config.mesh.rules)
  tx = state_lib.build_optimizer(config.train)
  graphdef, rest, state, shardings = state_lib.create_sharded_state(config, tx, mesh, rules)
  initial = jax.device_get(state.params)
  step = step_lib.make_train_step(config, graphdef, rest, tx, mesh, rules, shardings,
                                  mesh_lib.batch_sharding(mesh))
  metrics = []
  for batch in batches:
    state, m = step(state, mesh_lib.global_batch(batch, mesh))
    metrics.append({k: float(v) for k, v in m.compute().items()})
  return initial, state, metrics


def test_streamed_offloaded_update_equals_the_plain_one():
  """With the optimizer state in host memory the update runs one scanned layer at a time
  (avgen.train.offload); parameters, moments, EMA and losses are the plain step's, a non-finite
  step is skipped by both, and the moments stay in pinned host memory between steps.

  Not checked here: that the device holds one layer's moments at a time. The CPU's compiled
  memory_analysis() has no host/device split (its host_* sizes are 0, "pinned_host" is ordinary
  memory); on a GPU, `benchmarks/train_step.py --memory_only` reports it.
  """
  config = train_utils.tiny_config(model__scan_layers=True, model__depth=2,
                                   train__weight_decay=0.01, train__adam_mu_dtype="bfloat16",
                                   train__learning_rate=3e-3, train__warmup_steps=1)
  config.mesh.data, config.mesh.fsdp = 1, 2
  shapes = config_lib.latent_shapes(config)
  rng = np.random.default_rng(0)
  b, lt = config.data.batch_size, config.data.caption_max_len

  def batch(scale=1.0):
    return {"video": scale * rng.standard_normal((b,) + shapes["video"]).astype(np.float32),
            "audio": rng.standard_normal((b,) + shapes["audio"]).astype(np.float32),
            "text_ids": rng.integers(3, 200, (b, lt)).astype(np.int32),
            "text_mask": np.ones((b, lt), bool), "skipped_records": np.zeros((b,), np.int32)}

  batches = [batch(), batch(), batch(np.nan), batch()]  # the first step's learning rate is 0
  _, plain, plain_metrics = _train(config, False, batches)
  initial, streamed, streamed_metrics = _train(config, True, batches)

  assert [m["update_applied"] for m in streamed_metrics] == [1.0, 1.0, 0.0, 1.0]
  for ours, ref in zip(streamed_metrics, plain_metrics):
    np.testing.assert_allclose([ours[k] for k in ("loss", "grad_norm")],
                               [ref[k] for k in ("loss", "grad_norm")], rtol=1e-6)
  f32 = lambda tree: [np.asarray(x, np.float32) for x in jax.tree.leaves(jax.device_get(tree))]
  for name in ("params", "opt_state", "ema_params", "step", "nonfinite_total"):
    for ours, ref in zip(f32(getattr(streamed, name)), f32(getattr(plain, name))):
      np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-8, err_msg=name)
  # The comparison means something: the scanned blocks' weights (stacked over 2 layers) moved.
  q_kernel = lambda params: np.asarray(params["dit"]["blocks"]["attn"][0]["q"]["kernel"][...])
  assert q_kernel(initial).shape[0] == 2
  assert not np.allclose(q_kernel(streamed.params), q_kernel(initial))
  assert {x.sharding.memory_kind for x in jax.tree.leaves(streamed.opt_state)} == {"pinned_host"}
  assert {x.sharding.memory_kind for x in jax.tree.leaves(streamed.params)} == {"device"}
