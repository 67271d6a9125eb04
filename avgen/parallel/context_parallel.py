"""Context-parallel attention: the sequence split over the mesh's `context` axis.

Long clips (10 s at 512x512 is ~82k video tokens) do not fit one device's attention, so the
joint sequence is split into `n` contiguous blocks, one per device along `context`. Two ways to
attend over all of it, chosen by `strategy` (proposed config field `model.context_parallel`):

  ring        Each device keeps its query block; key/value blocks travel round the ring with
              `ppermute` (n - 1 hops). The next block's transfer is issued before this block's
              compute, which does not depend on it, so XLA's scheduler can overlap the two.
              Partial results merge exactly through their per-block logsumexp (online softmax).
              The backward pass runs the ring again; each block's dK/dV travel with it and arrive
              home after the last hop. Memory per device: O(l/n) keys; any head count. Each block
              pair runs `avgen.kernels.attention.attention_block_forward` / `_backward` (our
              flash kernels with impl "pallas", the default on GPUs; XLA with "xla").
  all_to_all  (Ulysses) An all-to-all trades the sequence split for a head split: each device
              gets the whole sequence for h/n heads, runs `avgen.kernels.attention` (any backend,
              block-sparse masks included), and a second all-to-all trades back. Needs the heads
              on a device divisible by n; its traffic per device does not grow with n, so it
              suits many heads and fast links; ring suits few heads or very long sequences.

Masks come as per-token data, never as an [lq, lk] array, so a device builds the mask of the
block pair it computes locally: key padding as `kv_lengths` [b] (keys at global index >= length
are invisible), and a `masks.BlockMask` rule (modality and shared-axis time per token; query i
sees key j iff allowed[m_i, m_j] and |t_i - t_j| <= window[m_i, m_j]). The token tables are
split along with the sequence, and a key block's table travels round the ring with it. A query
row that sees no key returns zeros, as `avgen.kernels.xla_attention` does.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from avgen import kernels
from avgen.kernels.attention import (BLOCK_IMPLS, IMPLS, TokenRule, attention_block_backward,
                                     attention_block_forward)
from avgen.kernels import masks as masks_lib
from avgen.parallel import sharding

STRATEGIES = ("ring", "all_to_all")


def attention(q, k, v, *, kv_lengths=None, mask: masks_lib.BlockMask | None = None,
              strategy: str = "ring", impl: str = "auto"):
  """Model-facing entry: context-parallel when the active mesh has a `context` axis > 1.

  Reads the mesh and logical rules that `sharding.use_rules` made active (the trainer's step);
  outside that context, or with context=1, this is `avgen.kernels.attention`.
  """
  active = getattr(sharding._context, "value", None)  # pylint: disable=protected-access
  if active is None or active[0].shape.get("context", 1) == 1:
    return kernels.attention(q, k, v, kv_lengths=kv_lengths, mask=mask, impl=impl)
  mesh, rules = active
  table = dict(rules)
  return context_parallel_attention(
      q, k, v, mesh=mesh, strategy=strategy, kv_lengths=kv_lengths, mask=mask, impl=impl,
      batch_axes=table.get("batch"), head_axes=table.get("act_heads"))


def query_split_attention(q, k, v, *, kv_lengths=None, impl: str = "auto"):
  """Attention whose queries may be split over `context` but whose keys are short and whole
  (cross-attention to the text, the audio head, the alignment module).

  Each device keeps its query block, sees all keys, and runs `avgen.kernels.attention` on its
  own shard inside `shard_map`: cuDNN's partitioner refuses a sequence axis split over the mesh,
  and no keys need to travel. Outside `sharding.use_rules` or with context=1 this is
  `avgen.kernels.attention`.
  """
  active = getattr(sharding._context, "value", None)  # pylint: disable=protected-access
  if active is None or active[0].shape.get("context", 1) == 1:
    return kernels.attention(q, k, v, kv_lengths=kv_lengths, impl=impl)
  mesh, rules = active
  table = dict(rules)
  n = mesh.shape["context"]
  b, lq, h, _ = q.shape
  batch_spec = _fitting(table.get("batch"), b, mesh, exclude="context")
  head_spec = _fitting(table.get("act_heads"), h, mesh, exclude="context")
  q = _pad_seq(q, -lq % n)
  split, whole = P(batch_spec, "context", head_spec, None), P(batch_spec, None, head_spec, None)
  if kv_lengths is None:
    body = lambda q, k, v: kernels.attention(q, k, v, impl=impl)
    specs, args = (split, whole, whole), (q, k, v)
  else:
    body = lambda q, k, v, lengths: kernels.attention(q, k, v, kv_lengths=lengths, impl=impl)
    specs, args = (split, whole, whole, P(batch_spec)), (q, k, v, kv_lengths)
  out = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=split, check_vma=False)(*args)
  return out[:, :lq]


def context_parallel_attention(q, k, v, *, mesh: Mesh, strategy: str = "ring", kv_lengths=None,
                               mask: masks_lib.BlockMask | None = None, impl: str = "auto",
                               axis: str = "context",
                               batch_axes: str | Sequence[str] | None = ("data", "fsdp"),
                               head_axes: str | Sequence[str] | None = "tensor"):
  """Attention [b, l, h, d] with the sequence split over `axis`; equals `kernels.attention`.

  Args:
    q: [b, lq, h, d]; k, v: [b, lk, h, d]. Lengths need not divide the axis size: the blocks are
      padded with invisible keys and the padded query rows are cut off again.
    mesh: the device mesh; `axis` names its sequence axis.
    strategy: one of STRATEGIES.
    kv_lengths: optional int [b]; keys at index >= length are padding.
    mask: optional `masks.BlockMask` over (lq, lk) tokens (a dense bool mask is refused: it
      would need the whole [lq, lk] array on every device).
    impl: kernel backend (see avgen.kernels.attention). The ring's blocks take "xla" or
      "pallas" (`attention_block_forward`); "auto" is pallas on GPUs and xla elsewhere, and
      "cudnn" (no logsumexp output) is treated as "auto".
    batch_axes, head_axes: mesh axes the batch and head dimensions are split over (dropped when
      they do not divide the dimension).
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"context_parallel_attention: unknown strategy {strategy!r}; "
                     f"expected one of {STRATEGIES}")
  if axis not in mesh.shape:
    raise ValueError(f"context_parallel_attention: mesh axes {tuple(mesh.shape)} lack {axis!r}")
  if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError("context_parallel_attention: want q [b,lq,h,d], k=v [b,lk,h,d]; got "
                     f"{q.shape}, {k.shape}, {v.shape}")
  if mask is not None and not isinstance(mask, masks_lib.BlockMask):
    raise ValueError("context_parallel_attention: mask must be a masks.BlockMask (per-token rule), "
                     f"not {type(mask).__name__}; a dense [lq, lk] mask cannot be split")
  b, lq, h, _ = q.shape
  lk = k.shape[1]
  if mask is not None and mask.shape != (lq, lk):
    raise ValueError(f"context_parallel_attention: mask covers (lq, lk)={mask.shape} but q, k "
                     f"have lengths {(lq, lk)}")
  n = mesh.shape[axis]
  batch_spec = _fitting(batch_axes, b, mesh, exclude=axis)
  head_spec = _fitting(head_axes, h, mesh, exclude=axis)
  if strategy == "all_to_all" and (h // _size(head_spec, mesh)) % n:
    raise ValueError(
        f"context_parallel_attention: strategy 'all_to_all' splits heads over {axis}={n}, but "
        f"each device holds {h // _size(head_spec, mesh)} head(s) ({h} heads over "
        f"{head_spec or 'no'} head axes); use strategy='ring' or a head count divisible by {n}")

  if kv_lengths is None:
    kv_lengths = jnp.full((b,), lk, jnp.int32)
  kv_lengths = jnp.minimum(jnp.asarray(kv_lengths, jnp.int32), lk)
  if kv_lengths.shape != (b,):
    raise ValueError(f"context_parallel_attention: kv_lengths must be [b]=[{b}], got "
                     f"{kv_lengths.shape}")
  lq_pad, lk_pad = lq + (-lq % n), lk + (-lk % n)
  q = _pad_seq(q, lq_pad - lq)
  k, v = _pad_seq(k, lk_pad - lk), _pad_seq(v, lk_pad - lk)
  tokens = P(batch_spec, axis, head_spec, None)
  specs = (tokens, tokens, tokens, P(batch_spec))
  args = (q, k, v, kv_lengths)

  if strategy == "ring":
    rule = None
    if mask is not None:
      # Padding tokens get modality -1, which no pair allows; their tables split like the tokens.
      args += tuple(jnp.asarray(t) for t in mask.token_arrays(lq_pad, lk_pad))
      specs += (P(axis),) * 4
      rule = (tuple(mask.pairs()), mask.num_modalities)
    body = functools.partial(_ring_shard, axis=axis, n=n, rule=rule, impl=_ring_impl(impl))
  else:
    body = functools.partial(_all_to_all_shard, axis=axis, mask=_padded(mask, lq_pad, lk_pad),
                             impl=impl)
  out = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=tokens, check_vma=False)(*args)
  return out[:, :lq]


# ---- shapes, specs and masks

def _pad_seq(x: jax.Array, pad: int) -> jax.Array:
  if not pad:
    return x
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))


def _size(axes, mesh: Mesh) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def _fitting(axes, dim: int, mesh: Mesh, *, exclude: str):
  """The mesh axes (minus `exclude` and absent ones) if they divide `dim`, else None."""
  if axes is None:
    return None
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  axes = tuple(a for a in axes if a != exclude and a in mesh.shape)
  if not axes or dim % _size(axes, mesh):
    return None
  return axes[0] if len(axes) == 1 else axes


def _padded(mask: masks_lib.BlockMask | None, lq_pad: int, lk_pad: int):
  """The rule over padded lengths. Padding tokens take modality 0 at time 0: their keys are
  hidden by kv_lengths <= lk and their query rows are cut off, so what they see is moot."""
  if mask is None or mask.shape == (lq_pad, lk_pad):
    return mask

  def grow(layout, n):
    extra = n - len(layout)
    return masks_lib.TokenLayout(np.concatenate([layout.modality, np.zeros(extra, np.int32)]),
                                 np.concatenate([layout.time, np.zeros(extra, np.float32)]))

  return masks_lib.BlockMask(grow(mask.q, lq_pad), grow(mask.k, lk_pad), mask.allowed, mask.window)


# ---- ring

def _ring_impl(impl: str) -> str:
  if impl == "cudnn":
    _log_once("context-parallel ring: impl='cudnn' returns no logsumexp for the blocks' merge; "
              "the ring uses impl='auto' (pallas on GPUs, xla elsewhere)")
    return "auto"
  if impl not in BLOCK_IMPLS:
    raise ValueError(f"context_parallel_attention: unknown impl {impl!r}; expected one of "
                     f"{IMPLS}")
  return impl


@functools.cache
def _log_once(message: str) -> None:
  logging.getLogger(__name__).warning(message)


def _ring_shard(q, k, v, kv_lengths, *tables, axis, n, rule, impl):
  # (modality, time) of this device's query and key tokens; empty without a BlockMask.
  q_table, k_table = tuple(tables[:2]), tuple(tables[2:])
  return _ring_attention(q, k, v, kv_lengths, q_table, k_table, axis, n, rule, impl)


def _merge(out, lse, block_out, block_lse):
  """Exact softmax over the union of two key sets from their normalized outputs and lse."""
  new_lse = jnp.logaddexp(lse, block_lse)
  # Rows that have seen no key yet stay at -inf; exp(-inf - 0) = 0 keeps them NaN-free.
  safe = jnp.where(jnp.isfinite(new_lse), new_lse, 0.0)
  w_old = jnp.exp(lse - safe).transpose(0, 2, 1)[..., None]
  w_new = jnp.exp(block_lse - safe).transpose(0, 2, 1)[..., None]
  return out * w_old + block_out * w_new, new_lse


def _ring_perm(n):
  return [(j, (j + 1) % n) for j in range(n)]


def _block_mask(axis, n, step, block, kv_lengths, rule, q_table, k_table):
  """Key lengths and TokenRule of this device's queries against the key block it holds after
  `step` hops. The block came from device i - step, so its keys start at global index
  (i - step) * block: the global key lengths shift by that much."""
  source = (jax.lax.axis_index(axis) - step) % n
  lengths = jnp.clip(kv_lengths - source * block, 0, block)
  if rule is None:
    return lengths, None
  pairs, num_modalities = rule
  return lengths, TokenRule(*q_table, *k_table, pairs, num_modalities)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _ring_attention(q, k, v, kv_lengths, q_table, k_table, axis, n, rule, impl):
  return _ring_forward(q, k, v, kv_lengths, q_table, k_table, axis, n, rule, impl)[0]


def _ring_forward(q, k, v, kv_lengths, q_table, k_table, axis, n, rule, impl):
  block = k.shape[1]
  out = jnp.zeros(q.shape, jnp.float32)
  lse = jnp.full((q.shape[0], q.shape[2], q.shape[1]), -jnp.inf, jnp.float32)
  kb, vb, tb = k, v, k_table
  for step in range(n):
    if step < n - 1:  # issued first: the transfer does not wait for this block's compute
      incoming = jax.lax.ppermute((kb, vb, tb), axis, _ring_perm(n))
    lengths, block_rule = _block_mask(axis, n, step, block, kv_lengths, rule, q_table, tb)
    out, lse = _merge(out, lse, *attention_block_forward(
        q, kb, vb, kv_lengths=lengths, mask=block_rule, impl=impl))
    if step < n - 1:
      kb, vb, tb = incoming
  return out.astype(q.dtype), lse


def _ring_fwd(q, k, v, kv_lengths, q_table, k_table, axis, n, rule, impl):
  out, lse = _ring_forward(q, k, v, kv_lengths, q_table, k_table, axis, n, rule, impl)
  return out, (q, k, v, kv_lengths, q_table, k_table, out, lse)


def _ring_bwd(axis, n, rule, impl, residuals, d_out):
  q, k, v, kv_lengths, q_table, k_table, out, lse = residuals
  block = k.shape[1]
  dq = jnp.zeros(q.shape, jnp.float32)
  kb, vb, tb = k, v, k_table
  dk_in = dv_in = None
  for step in range(n):
    if step < n - 1:
      incoming = jax.lax.ppermute((kb, vb, tb), axis, _ring_perm(n))
    lengths, block_rule = _block_mask(axis, n, step, block, kv_lengths, rule, q_table, tb)
    # With the merged out and lse every block's share of the gradients is exact.
    dq_b, dk, dv = attention_block_backward(
        q, kb, vb, out, lse, d_out, kv_lengths=lengths, mask=block_rule, impl=impl)
    dq = dq + dq_b
    if dk_in is not None:
      dk, dv = dk + dk_in, dv + dv_in
    # The block's gradient follows the block (in float32); after n hops it is back home.
    dk_in, dv_in = jax.lax.ppermute((dk, dv), axis, _ring_perm(n))
    if step < n - 1:
      kb, vb, tb = incoming
  zeros = lambda table: tuple(jnp.zeros_like(t) if jnp.issubdtype(t.dtype, jnp.floating) else None
                              for t in table)
  return (dq.astype(q.dtype), dk_in.astype(k.dtype), dv_in.astype(v.dtype), None,
          zeros(q_table), zeros(k_table))


_ring_attention.defvjp(_ring_fwd, _ring_bwd)


# ---- all-to-all (Ulysses)

def _all_to_all_shard(q, k, v, kv_lengths, *, axis, mask, impl):
  # [b, l/n, h, d] -> [b, l, h/n, d]: the whole sequence, a slice of the heads.
  seq_to_heads = lambda x: jax.lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)
  q, k, v = seq_to_heads(q), seq_to_heads(k), seq_to_heads(v)
  out = kernels.attention(q, k, v, kv_lengths=kv_lengths, mask=mask, impl=impl)
  return jax.lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)
