"""Context-parallel attention (ring, all-to-all) equals unsharded attention: values, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from avgen.kernels import masks as masks_lib
from avgen.kernels.attention import xla_attention
from avgen.parallel import context_parallel as cp
from avgen.parallel import sharding

AXES = ("data", "fsdp", "context", "tensor")


def _mesh(data, fsdp, context, tensor):
  n = data * fsdp * context * tensor
  return jax.make_mesh((data, fsdp, context, tensor), AXES, axis_types=(AxisType.Auto,) * 4,
                       devices=jax.devices()[:n])


def _qkv(b, l, h, d, seed=0, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(seed), 3)
  return tuple(jax.random.normal(k, (b, l, h, d), dtype) for k in keys)


def _joint_mask(num_video_frames, tokens_per_frame, num_audio, window, audio_sees_video=True):
  """An audio-video layout like the model's: video frames, then audio tokens over the same time
  span; a temporal window, and optionally audio queries blind to video keys."""
  video = masks_lib.video_token_times(num_video_frames, 1, tokens_per_frame)
  audio = (np.arange(num_audio) + 0.5) * num_video_frames / num_audio - 0.5
  layout = masks_lib.joint_layout(video, audio)
  mask = masks_lib.self_attention_window(layout, window)
  if not audio_sees_video:
    mask = mask & masks_lib.modality_mask(layout, layout, [[True, True], [False, True]])
  return mask


def _values_and_grads(fn, q, k, v):
  """fn's output and the gradients of a random projection of it (so every output entry counts)."""
  w = jax.random.normal(jax.random.key(7), q.shape, jnp.float32)

  def both(q, k, v):
    out, pullback = jax.vjp(fn, q, k, v)
    return out, pullback(w.astype(out.dtype))

  return jax.jit(both)(q, k, v)


def _assert_matches_reference(mesh, strategy, q, k, v, *, kv_lengths=None, mask=None, atol=2e-6,
                              impl="xla"):
  ours = _values_and_grads(
      lambda q, k, v: cp.context_parallel_attention(q, k, v, mesh=mesh, strategy=strategy,
                                                    kv_lengths=kv_lengths, mask=mask, impl=impl),
      q, k, v)
  ref = _values_and_grads(
      lambda q, k, v: xla_attention(q, k, v, kv_lengths=kv_lengths, mask=mask), q, k, v)
  np.testing.assert_allclose(ours[0], ref[0], atol=atol, rtol=0)
  for name, a, b in zip("qkv", ours[1], ref[1]):
    np.testing.assert_allclose(a, b, atol=atol, rtol=0, err_msg=f"d{name}")
  return ours, ref


def test_ring_equals_unsharded_attention_with_masks():
  q, k, v = _qkv(2, 30, 2, 8)  # 30 tokens over 4 devices: padded blocks, cut off again
  mask = _joint_mask(4, 6, 6, window=1.0, audio_sees_video=False)
  # Key padding inside a ring block, and a row that sees no key at all.
  _, ref = _assert_matches_reference(_mesh(2, 1, 4, 1), "ring", q, k, v,
                                     kv_lengths=jnp.array([27, 0]), mask=mask)
  # The masks are really in effect: the result differs from unmasked attention.
  assert not np.allclose(ref[0][0], xla_attention(q, k, v)[0], atol=1e-3)
  np.testing.assert_array_equal(ref[0][1], 0.0)


def _uses_pallas_kernels(mesh, q, k, v, **kw):
  """Whether the ring's forward and backward both run our flash kernels (not XLA einsums)."""
  loss = lambda q, k, v: jnp.sum(cp.context_parallel_attention(q, k, v, mesh=mesh, **kw))
  program = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))
  return all(name in program for name in ("avgen_flash_fwd", "avgen_flash_dq", "avgen_flash_dkv"))


def test_ring_with_pallas_blocks_equals_unsharded_attention_with_masks():
  # The flash kernel (interpret mode) per block pair: 30 tokens over 4 devices (the last block
  # padded), a window with audio queries blind to video keys, key padding inside a block, and a
  # batch row that sees no key at all.
  q, k, v = _qkv(2, 30, 2, 8, seed=8)
  mask = _joint_mask(4, 6, 6, window=1.0, audio_sees_video=False)
  mesh = _mesh(2, 1, 4, 1)
  lengths = jnp.array([27, 0])
  assert _uses_pallas_kernels(mesh, q, k, v, kv_lengths=lengths, mask=mask, impl="pallas")
  ours, _ = _assert_matches_reference(mesh, "ring", q, k, v, kv_lengths=lengths, mask=mask,
                                      impl="pallas", atol=1e-5)
  np.testing.assert_array_equal(ours[0][1], 0.0)
  for name, grad in zip("qkv", ours[1]):
    assert np.all(np.isfinite(grad)), f"d{name} not finite"
    np.testing.assert_array_equal(grad[1], 0.0, err_msg=f"d{name} of the row that sees no key")


def test_ring_with_pallas_blocks_equals_unsharded_attention_without_mask():
  q, k, v = _qkv(2, 30, 2, 8, seed=9)  # ragged: the ring's padding keys are the only mask
  mesh = _mesh(1, 2, 2, 2)
  assert _uses_pallas_kernels(mesh, q, k, v, impl="pallas")
  _assert_matches_reference(mesh, "ring", q, k, v, impl="pallas", atol=1e-5)


def test_all_to_all_equals_unsharded_attention_with_masks():
  q, k, v = _qkv(2, 30, 8, 8, seed=1)  # 30 tokens over 4 devices, 8 heads over tensor x context
  mask = _joint_mask(4, 6, 6, window=1.0)
  _assert_matches_reference(_mesh(1, 1, 4, 2), "all_to_all", q, k, v,
                            kv_lengths=jnp.array([30, 13]), mask=mask)


@pytest.mark.parametrize("strategy,mesh_shape",
                         [("ring", (1, 2, 2, 2)), ("all_to_all", (2, 1, 4, 1))])
def test_equals_unsharded_attention_without_mask(strategy, mesh_shape):
  q, k, v = _qkv(2, 32, 4, 8, seed=2)
  _assert_matches_reference(_mesh(*mesh_shape), strategy, q, k, v)


def test_ring_in_bfloat16_stays_close_to_float32():
  q, k, v = _qkv(2, 32, 2, 16, seed=3)
  mesh = _mesh(1, 1, 4, 1)
  out = jax.jit(lambda *a: cp.context_parallel_attention(*a, mesh=mesh))(
      *(x.astype(jnp.bfloat16) for x in (q, k, v)))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), xla_attention(q, k, v), atol=3e-2)


def test_ring_moves_key_blocks_and_never_gathers_the_sequence():
  mesh = _mesh(1, 1, 4, 1)
  spec = NamedSharding(mesh, P(None, "context", None, None))
  q, k, v = (jax.device_put(x, spec) for x in _qkv(1, 32, 2, 8))
  mask = _joint_mask(4, 6, 8, window=1.0)
  loss = lambda q, k, v: jnp.sum(cp.context_parallel_attention(q, k, v, mesh=mesh, mask=mask) ** 2)
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
  assert "collective-permute" in hlo
  assert "all-gather" not in hlo and "all-reduce" not in hlo


def test_model_entry_uses_the_active_mesh():
  q, k, v = _qkv(2, 32, 4, 8, seed=4)
  mask = _joint_mask(4, 6, 8, window=1.0)
  rules = (("batch", ("data", "fsdp")), ("act_heads", "tensor"))
  expected = xla_attention(q, k, v, mask=mask)
  for shape in ((8, 1, 1, 1), (2, 1, 2, 2)):
    mesh = _mesh(*shape)

    def f(q, k, v):
      with sharding.use_rules(mesh, rules):
        return cp.attention(q, k, v, mask=mask, impl="xla")

    compiled = jax.jit(f).lower(q, k, v).compile()
    # context > 1 goes through the ring's collective permutes; context = 1 needs none.
    assert ("collective-permute" in compiled.as_text()) == (shape[2] > 1)
    np.testing.assert_allclose(compiled(q, k, v), expected, atol=2e-6)


def test_query_split_attention_keeps_queries_on_their_devices():
  # Cross-attention to 7 text tokens from 30 queries split over context=4 (padded to 32), with
  # key padding: each device attends with its own queries; no query block is gathered.
  q = _qkv(2, 30, 4, 8, seed=5)[0]
  k, v = _qkv(2, 7, 4, 8, seed=6)[1:]
  lengths = jnp.array([5, 7])
  rules = (("batch", ("data", "fsdp")), ("length", "context"), ("act_heads", "tensor"))
  mesh = _mesh(1, 1, 4, 2)

  def ours(q, k, v):
    with sharding.use_rules(mesh, rules):
      return cp.query_split_attention(q, k, v, kv_lengths=lengths, impl="xla")

  got = _values_and_grads(ours, q, k, v)
  ref = _values_and_grads(lambda q, k, v: xla_attention(q, k, v, kv_lengths=lengths), q, k, v)
  for a, b in zip((got[0],) + tuple(got[1]), (ref[0],) + tuple(ref[1])):
    np.testing.assert_allclose(a, b, atol=2e-6, rtol=0)
  spec = NamedSharding(mesh, P(None, "context", "tensor", None))
  hlo = jax.jit(ours).lower(jax.device_put(jnp.pad(q, [(0, 0), (0, 2), (0, 0), (0, 0)]), spec),
                            k, v).compile().as_text()
  assert "all-gather" not in hlo and "all-to-all" not in hlo


def test_bad_inputs_are_named():
  q, k, v = _qkv(2, 32, 2, 8)
  mesh = _mesh(1, 1, 4, 1)
  with pytest.raises(ValueError, match="all_to_all.*2 head"):
    cp.context_parallel_attention(q, k, v, mesh=mesh, strategy="all_to_all")
  with pytest.raises(ValueError, match="unknown strategy 'ulysses'"):
    cp.context_parallel_attention(q, k, v, mesh=mesh, strategy="ulysses")
  with pytest.raises(ValueError, match="must be a masks.BlockMask"):
    cp.context_parallel_attention(q, k, v, mesh=mesh, mask=jnp.ones((1, 1, 32, 32), bool))
  with pytest.raises(ValueError, match=r"covers \(lq, lk\)=\(30, 30\)"):
    cp.context_parallel_attention(q, k, v, mesh=mesh, mask=_joint_mask(4, 6, 6, window=1.0))
