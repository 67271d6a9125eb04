"""The attention entry point: XLA reference vs a float64 numpy softmax, masks and padding."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avgen.kernels import attention


def _numpy_attention(q, k, v, visible):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(visible, logits, -np.inf)
  m = np.max(logits, -1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0)
  w = np.exp(logits - m)
  s = w.sum(-1, keepdims=True)
  p = w / np.where(s == 0, 1, s)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("lq, lk, d", [(37, 77, 64), (100, 100, 128), (5, 130, 32)])
def test_xla_matches_float64_reference_with_padding_and_mask(lq, lk, d):
  rng = np.random.default_rng(lq + lk)
  q, k, v = (rng.normal(size=(2, n, 3, d)).astype(np.float32) for n in (lq, lk, lk))
  lengths = np.array([lk, lk // 3])
  mask = rng.random((2, 1, lq, lk)) > 0.3
  out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), kv_lengths=jnp.asarray(lengths),
                  mask=jnp.asarray(mask), impl="xla")
  visible = (np.arange(lk)[None, :] < lengths[:, None])[:, None, None, :] & mask
  ref = _numpy_attention(q, k, v, visible)
  err = np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref)
  assert err < 1e-5


def test_fully_masked_rows_are_zero_and_gradients_finite():
  q = jax.random.normal(jax.random.key(0), (2, 4, 2, 16))
  k = jax.random.normal(jax.random.key(1), (2, 6, 2, 16))
  lengths = jnp.array([0, 3])
  out = attention(q, k, k, kv_lengths=lengths, impl="xla")
  assert jnp.all(out[0] == 0) and jnp.all(jnp.isfinite(out))
  grads = jax.grad(lambda q, k: jnp.sum(attention(q, k, k, kv_lengths=lengths, impl="xla") ** 2),
                   argnums=(0, 1))(q, k)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_padding_keys_do_not_matter():
  q = jax.random.normal(jax.random.key(0), (1, 4, 2, 16))
  k = jax.random.normal(jax.random.key(1), (1, 6, 2, 16))
  k2 = k.at[:, 3:].set(100.0)
  a = attention(q, k, k, kv_lengths=jnp.array([3]), impl="xla")
  b = attention(q, k2, k2, kv_lengths=jnp.array([3]), impl="xla")
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_auto_on_cpu_uses_xla_and_bad_calls_are_named():
  q = jax.random.normal(jax.random.key(0), (1, 4, 2, 16))
  np.testing.assert_array_equal(np.asarray(attention(q, q, q)), np.asarray(attention(q, q, q, impl="xla")))
  with pytest.raises(ValueError, match="unknown impl 'flash9'"):
    attention(q, q, q, impl="flash9")
  with pytest.raises(ValueError, match="impl='cudnn' cannot run here"):
    attention(q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), impl="cudnn")
  with pytest.raises(ValueError, match="want q"):
    attention(q, q[:, :, :1], q[:, :, :1])


def test_auto_pads_keys_cudnn_refuses_and_masks_the_padding(monkeypatch):
  """Where cuDNN refuses a key length (77 text tokens) but takes it padded to a multiple of 64,
  `auto` pads keys and values and hides the padding with kv_lengths: same values and gradients
  as unpadded attention. cuDNN is stood in for by XLA attention behind a refusal rule."""
  module = importlib.import_module("avgen.kernels.attention")
  calls = []

  def fake_cudnn(q, k, v, *, kv_lengths=None, mask=None):
    calls.append((k.shape[1], kv_lengths))
    return module.xla_attention(q, k, v, kv_lengths=kv_lengths, mask=mask)

  monkeypatch.setattr(module, "_cudnn_refusal", lambda q, k: None)
  monkeypatch.setattr(module, "_cudnn_trace_refusal",
                      lambda q_shape, k_shape, *_: None if k_shape[1] % 64 == 0 else "odd length")
  monkeypatch.setattr(module, "cudnn_attention", fake_cudnn)
  rng = np.random.default_rng(7)
  q, k, v = (jnp.asarray(rng.normal(size=(2, n, 2, 32)), jnp.float32) for n in (50, 77, 77))
  for lengths in (None, jnp.array([77, 20])):
    def loss(q, k, v, impl, lengths=lengths):
      return jnp.sum(jnp.sin(attention(q, k, v, kv_lengths=lengths, impl=impl)))
    calls.clear()
    got, got_grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, "auto")
    assert calls and calls[0][0] == 128 and calls[0][1] is not None
    want, want_grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, "xla")
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
      assert g.shape == w.shape
      assert float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w)) < 1e-5
