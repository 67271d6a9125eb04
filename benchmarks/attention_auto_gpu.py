"""Checks `attention(impl="auto")` on a GPU: cuDNN where it accepts the shape, cuDNN on keys
padded to a multiple of 64 where it refuses only their length (the text cross-attention's 77),
a logged XLA fallback otherwise (also under jax.checkpoint + grad, where a refusal surfaces
late). Times auto's path against XLA attention on the same call.

  python benchmarks/attention_auto_gpu.py
"""

import logging
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, ".")
from avgen.kernels import attention  # noqa: E402
from avgen.kernels.attention import CUDNN_KEY_MULTIPLE, _cudnn_trace_refusal  # noqa: E402

logging.basicConfig(level=logging.WARNING)


def loss(q, k, v, lengths, impl="auto"):
  return jnp.sum(attention(q, k, v, kv_lengths=lengths, impl=impl).astype(jnp.float32))


def remat_grad_ms(q, k, v, lengths, impl):
  step = jax.jit(jax.grad(jax.checkpoint(lambda *a: loss(*a, impl=impl)), argnums=(0, 1, 2)))
  jax.block_until_ready(step(q, k, v, lengths))
  t0 = time.perf_counter()
  for _ in range(5):
    jax.block_until_ready(step(q, k, v, lengths))
  return (time.perf_counter() - t0) / 5 * 1e3


def main():
  print(jax.devices())
  for (b, lq, lk, h, d) in ((1, 16640, 77, 16, 128), (2, 4096, 4096, 16, 128)):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (b, lq, h, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, lk, h, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, lk, h, d), jnp.bfloat16)
    lengths = jnp.full((b,), lk - 3, jnp.int32)
    refusal = _cudnn_trace_refusal(q.shape, k.shape, q.dtype, True, None)
    path = "cuDNN"
    if refusal:
      padded = -(-lk // CUDNN_KEY_MULTIPLE) * CUDNN_KEY_MULTIPLE
      padded_refusal = _cudnn_trace_refusal(q.shape, (b, padded, h, d), q.dtype, True, None)
      path = f"cuDNN, keys padded to {padded}" if padded_refusal is None else "XLA"
    ms, xla_ms = remat_grad_ms(q, k, v, lengths, "auto"), remat_grad_ms(q, k, v, lengths, "xla")
    ref = attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                    kv_lengths=lengths, impl="xla")
    out = attention(q, k, v, kv_lengths=lengths).astype(jnp.float32)
    err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    print(f"q {lq} kv {lk}: cuDNN {'refused: ' + refusal[:80] if refusal else 'accepted'} | "
          f"auto runs {path}: remat fwd+bwd {ms:.2f} ms (XLA {xla_ms:.2f} ms) | "
          f"rel err vs f32 xla {err:.2e}")


if __name__ == "__main__":
  main()
