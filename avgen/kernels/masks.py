"""Block-structured attention masks: one description, a dense form and per-tile maps.

Layout. A mask is a rule over tokens, not a [lq, lk] array. Every token carries a modality id
(int; video=0, audio=1 by convention of `joint_layout`) and a time on the shared time axis
(float, in video-frame units, see docs/architecture.md "Shapes"). Query token i may attend key
token j iff

    allowed[m_q[i], m_k[j]]  and  |t_q[i] - t_k[j]| <= window[m_q[i], m_k[j]]

with `allowed` a bool [M, M] matrix and `window` a float [M, M] matrix (inf: no window). Key
padding is not part of the rule: it comes per call as `kv_lengths` (keys at index >= length are
invisible). The rule form is closed under intersection (`a & b`), so modality blocks and a
temporal window combine into one `BlockMask`.

Forms:
  * `BlockMask.dense()`: bool [1, 1, lq, lk] for the XLA reference (and cuDNN).
  * `BlockMask.tile_classes(block_q, block_k)`: int8 [nq, nk] with SKIP (no visible pair: the
    kernel never loads the tile), FULL (every pair visible: no mask arithmetic) and PARTIAL
    (the kernel evaluates the rule per element). nq = ceil(lq / block_q), nk likewise; keys
    past lk count as invisible, queries past lq are ignored.
  * `key_padding_classes(kv_lengths, lk, block_k)`: the same classes for key padding, [b, nk].
  * `tile_schedule(classes)`: per tile row, the visited column indices, FULL ones first, as
    int32 [..., rows, 2 + cols] = [n_full, n_partial, idx_0, idx_1, ...]; kernels loop over
    idx[:n_full] without masks and over idx[n_full:n_full + n_partial] with masks.

Token tables for kernels (`BlockMask.token_arrays(lq_pad, lk_pad)`): int32 modality and float32
time per token, padded tokens get modality -1 (never allowed).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

SKIP, PARTIAL, FULL = 0, 1, 2

VIDEO, AUDIO = 0, 1


@dataclasses.dataclass(frozen=True, eq=False)
class TokenLayout:
  """Modality id (int32 [L]) and shared-axis time (float32 [L]) of each token of a sequence."""
  modality: np.ndarray
  time: np.ndarray

  def __post_init__(self):
    modality = np.asarray(self.modality, np.int32)
    time = np.asarray(self.time, np.float32)
    if modality.ndim != 1 or modality.shape != time.shape:
      raise ValueError(f"TokenLayout: modality and time must be 1-D of one length, got "
                       f"{modality.shape} and {time.shape}")
    if modality.size and modality.min() < 0:
      raise ValueError("TokenLayout: modality ids must be >= 0 (-1 is reserved for padding)")
    if not np.all(np.isfinite(time)):
      raise ValueError("TokenLayout: times must be finite")
    object.__setattr__(self, "modality", modality)
    object.__setattr__(self, "time", time)

  def __len__(self) -> int:
    return int(self.modality.shape[0])


def video_token_times(num_temporal_patches: int, patch_t: int, tokens_per_frame: int) -> np.ndarray:
  """Times of video tokens in (t, h, w) order: temporal patch i sits at i*pt + (pt-1)/2."""
  per_patch = np.arange(num_temporal_patches, dtype=np.float64) * patch_t + (patch_t - 1) / 2
  return np.repeat(per_patch, tokens_per_frame).astype(np.float32)


def audio_token_times(num_tokens: int, audio_patch: int, hop: int, sample_rate: int,
                      fps: float) -> np.ndarray:
  """Times of audio tokens: the centre of mel frames [k*p, (k+1)*p) in frames, minus 0.5."""
  centre = np.arange(num_tokens, dtype=np.float64) * audio_patch + audio_patch / 2
  return (centre * hop / sample_rate * fps - 0.5).astype(np.float32)


def joint_layout(video_times: np.ndarray, audio_times: np.ndarray) -> TokenLayout:
  """The model's joint sequence [video tokens; audio tokens]."""
  video_times, audio_times = np.asarray(video_times), np.asarray(audio_times)
  modality = np.concatenate([np.full(video_times.shape, VIDEO), np.full(audio_times.shape, AUDIO)])
  return TokenLayout(modality, np.concatenate([video_times, audio_times]))


@dataclasses.dataclass(frozen=True, eq=False)
class BlockMask:
  """The rule `allowed[m_q, m_k] and |t_q - t_k| <= window[m_q, m_k]` (see module doc)."""
  q: TokenLayout
  k: TokenLayout
  allowed: np.ndarray  # bool [M, M]
  window: np.ndarray   # float32 [M, M], inf = unlimited

  def __post_init__(self):
    allowed = np.asarray(self.allowed, bool)
    window = np.asarray(self.window, np.float32)
    num = max(int(self.q.modality.max(initial=0)), int(self.k.modality.max(initial=0))) + 1
    if allowed.ndim != 2 or allowed.shape[0] != allowed.shape[1] or allowed.shape != window.shape:
      raise ValueError(f"BlockMask: allowed and window must be square [M, M] of one shape, got "
                       f"{allowed.shape} and {window.shape}")
    if allowed.shape[0] < num:
      raise ValueError(f"BlockMask: tokens use modality ids up to {num - 1} but allowed is "
                       f"{allowed.shape}")
    if np.any(np.isnan(window)) or np.any(window < 0):
      raise ValueError("BlockMask: window entries must be >= 0 (inf for no window)")
    object.__setattr__(self, "allowed", allowed)
    object.__setattr__(self, "window", window)

  @property
  def shape(self) -> tuple[int, int]:
    return len(self.q), len(self.k)

  @property
  def num_modalities(self) -> int:
    return self.allowed.shape[0]

  def __and__(self, other: BlockMask) -> BlockMask:
    if not _same_layout(self.q, other.q) or not _same_layout(self.k, other.k):
      raise ValueError("BlockMask: can only intersect masks over the same token layouts")
    m = max(self.num_modalities, other.num_modalities)
    a1, w1 = _grow(self, m)
    a2, w2 = _grow(other, m)
    return BlockMask(self.q, self.k, a1 & a2, np.minimum(w1, w2))

  def pairs(self) -> list[tuple[int, int, float]]:
    """Allowed (m_q, m_k, window) triples; kernels unroll the rule over these."""
    return [(a, b, float(self.window[a, b])) for a in range(self.num_modalities)
            for b in range(self.num_modalities) if self.allowed[a, b]]

  def dense(self) -> np.ndarray:
    """bool [1, 1, lq, lk]: True where the query may attend the key."""
    return _rule(self, self.q.modality[:, None], self.q.time[:, None],
                 self.k.modality[None, :], self.k.time[None, :])[None, None]

  def token_arrays(self, lq_pad: int, lk_pad: int):
    """(q_mod int32 [lq_pad], q_time f32, k_mod, k_time) with padding tokens at modality -1."""
    def pad(layout, n):
      extra = n - len(layout)
      if extra < 0:
        raise ValueError(f"BlockMask: padded length {n} is shorter than the layout ({len(layout)})")
      mod = np.concatenate([layout.modality, np.full(extra, -1, np.int32)])
      time = np.concatenate([layout.time, np.zeros(extra, np.float32)])
      return mod, time
    return (*pad(self.q, lq_pad), *pad(self.k, lk_pad))

  def tile_classes(self, block_q: int, block_k: int) -> np.ndarray:
    """int8 [ceil(lq/bq), ceil(lk/bk)] of SKIP / PARTIAL / FULL, without a dense [lq, lk]."""
    lq, lk = self.shape
    m = self.num_modalities
    qlo, qhi, qhas = _tile_ranges(self.q, block_q, m)   # [nq, M]
    klo, khi, khas = _tile_ranges(self.k, block_k, m)   # [nk, M]
    nk = klo.shape[0]
    k_complete = (np.arange(nk) + 1) * block_k <= lk    # tiles without padding keys
    # [nq, nk, Mq, Mk]: the nearest pair's distance (exact, over the tokens) and the farthest
    # (the ends of the tiles' time ranges) per modality pair.
    gap = _nearest_gaps(self.q, self.k, block_q, block_k, m)
    qlo, qhi, qhas = (x[:, None, :, None] for x in (qlo, qhi, qhas))
    klo, khi, khas = (x[None, :, None, :] for x in (klo, khi, khas))
    present = qhas & khas
    spread = np.maximum(qhi - klo, khi - qlo)
    window, allowed = self.window[None, None], self.allowed[None, None]
    some = present & allowed & (gap <= window)
    every = ~present | (allowed & (spread <= window))
    has_any = some.any(axis=(2, 3))
    has_all = every.all(axis=(2, 3)) & k_complete[None, :]
    return np.where(has_all & has_any, FULL, np.where(has_any, PARTIAL, SKIP)).astype(np.int8)

  def visible_tile_fraction(self, block_q: int, block_k: int) -> float:
    """Share of tiles a kernel visits (PARTIAL or FULL)."""
    return float(np.mean(self.tile_classes(block_q, block_k) != SKIP))


def modality_mask(q: TokenLayout, k: TokenLayout, allowed) -> BlockMask:
  """Modality blocks: query modality a sees key modality b iff allowed[a][b]."""
  allowed = np.asarray(allowed, bool)
  return BlockMask(q, k, allowed, np.full(allowed.shape, np.inf, np.float32))


def temporal_window_mask(q: TokenLayout, k: TokenLayout, window: float,
                         num_modalities: int | None = None) -> BlockMask:
  """Every pair of modalities sees only keys within +-window on the shared time axis.

  Pass a [M, M] array instead of a float for a different window per modality pair (inf: none).
  """
  m = num_modalities or (max(int(q.modality.max(initial=0)), int(k.modality.max(initial=0))) + 1)
  w = np.asarray(window, np.float32)
  if w.ndim == 0:
    w = np.full((m, m), w, np.float32)
  return BlockMask(q, k, np.ones(w.shape, bool), w)


def self_attention_window(layout: TokenLayout, window: float) -> BlockMask:
  """Temporal window for self-attention over one layout (the model's joint sequence)."""
  return temporal_window_mask(layout, layout, window)


def key_padding_classes(kv_lengths, lk: int, block_k: int):
  """int8 [b, ceil(lk/bk)] classes of key padding (kv_lengths int [b]; None: no padding)."""
  nk = -(-lk // block_k)
  start = jnp.arange(nk, dtype=jnp.int32) * block_k
  if kv_lengths is None:
    length = jnp.full((1,), lk, jnp.int32)
  else:
    length = jnp.minimum(jnp.asarray(kv_lengths, jnp.int32), lk)
  end = start + block_k
  full = end[None, :] <= length[:, None]
  some = start[None, :] < length[:, None]
  return jnp.where(full, FULL, jnp.where(some, PARTIAL, SKIP)).astype(jnp.int8)


def dense_mask_classes(mask, block_q: int, block_k: int):
  """int8 [B, H, nq, nk] classes of a dense bool mask [B, H, Lq, lk] (Lq = 1 or padded lq)."""
  b, h, lq, lk = mask.shape
  bq = 1 if lq == 1 else block_q
  tiles = mask.reshape(b, h, lq // bq, bq, lk // block_k, block_k)
  some = jnp.any(tiles, axis=(3, 5))
  every = jnp.all(tiles, axis=(3, 5))
  return jnp.where(every, FULL, jnp.where(some, PARTIAL, SKIP)).astype(jnp.int8)


def call_tile_classes(lq: int, lk: int, lq_pad: int, lk_pad: int, block_q: int, block_k: int,
                      *, kv_len=None, block_mask: BlockMask | None = None, dense=None):
  """int8 [B, H, lq_pad/bq, lk_pad/bk]: key padding, rule and dense mask of one call combined.

  kv_len: int [b] already clipped to [0, lk] (None: all lk keys). dense: bool [B, H, Lq, lk_pad]
  with Lq = 1 or lq_pad, padding False. Keys at index >= lk are always invisible.
  """
  nq, nk = lq_pad // block_q, lk_pad // block_k
  cls = key_padding_classes(kv_len, lk, block_k)
  cls = jnp.pad(cls, ((0, 0), (0, nk - cls.shape[1])))[:, None, None, :]  # [b|1, 1, 1, nk]
  if block_mask is not None:
    static = block_mask.tile_classes(block_q, block_k)
    static = np.pad(static, ((0, nq - static.shape[0]), (0, nk - static.shape[1])))
    cls = jnp.minimum(cls, jnp.asarray(static)[None, None])
  if dense is not None:
    cls = jnp.minimum(cls, dense_mask_classes(dense, block_q, block_k))
  return jnp.broadcast_to(cls, (*cls.shape[:2], nq, nk))


def tile_schedule(classes):
  """[..., rows, cols] classes -> int32 [..., rows, 2 + cols]: n_full, n_partial, then indices.

  Visited columns come FULL first, then PARTIAL, each in increasing order; the tail after them
  repeats unvisited indices, which kernels never read.
  """
  classes = jnp.asarray(classes, jnp.int32)
  cols = classes.shape[-1]
  # Stable sort on (FULL first, PARTIAL next, SKIP last) keeps column order within each group.
  order = jnp.argsort((FULL - classes) * cols + jnp.arange(cols, dtype=jnp.int32), axis=-1)
  n_full = jnp.sum(classes == FULL, axis=-1, keepdims=True)
  n_part = jnp.sum(classes == PARTIAL, axis=-1, keepdims=True)
  return jnp.concatenate([n_full, n_part, order], axis=-1).astype(jnp.int32)


def _rule(mask: BlockMask, mq, tq, mk, tk) -> np.ndarray:
  visible = np.zeros(np.broadcast_shapes(mq.shape, mk.shape), bool)
  dt = np.abs(tq - tk)  # float32, the same arithmetic the kernels do
  for a, b, w in mask.pairs():
    visible |= (mq == a) & (mk == b) & (dt <= np.float32(w))
  return visible


def _tile_ranges(layout: TokenLayout, block: int, m: int):
  """Per tile and modality: min time, max time, whether the modality occurs (padding: no)."""
  n = len(layout)
  tiles = -(-n // block)
  pad = tiles * block - n
  mod = np.concatenate([layout.modality, np.full(pad, -1, np.int32)]).reshape(tiles, block)
  time = np.concatenate([layout.time, np.zeros(pad, np.float32)]).reshape(tiles, block)
  onehot = mod[:, :, None] == np.arange(m)[None, None, :]  # [tiles, block, M]
  lo = np.where(onehot, time[:, :, None], np.inf).min(axis=1).astype(np.float32)
  hi = np.where(onehot, time[:, :, None], -np.inf).max(axis=1).astype(np.float32)
  return lo, hi, onehot.any(axis=1)


@functools.lru_cache(maxsize=16)
def _nearest_gaps(q: TokenLayout, k: TokenLayout, block_q: int, block_k: int, m: int):
  """float32 [nq, nk, M, M]: min |t_q - t_k| over the tiles' tokens of each modality pair.

  Independent of the rule's windows, so it is cached per (layouts, tiles): sweeping windows
  over one layout (window_for_fraction) computes it once. Layouts hash by identity.
  """
  nq, nk = -(-len(q) // block_q), -(-len(k) // block_k)
  pad = nk * block_k - len(k)
  k_time = np.concatenate([k.time, np.zeros(pad, np.float32)])
  k_mod = np.concatenate([k.modality, np.full(pad, -1, np.int32)])
  out = np.full((nq, nk, m, m), np.inf, np.float32)
  for i in range(nq):
    rows = slice(i * block_q, (i + 1) * block_q)
    for a in range(m):
      times = np.sort(q.time[rows][q.modality[rows] == a])
      if times.size == 0:
        continue
      pos = np.searchsorted(times, k_time)
      lower = times[np.clip(pos - 1, 0, times.size - 1)]
      upper = times[np.clip(pos, 0, times.size - 1)]
      nearest = np.minimum(np.abs(k_time - lower), np.abs(upper - k_time))  # float32
      for b in range(m):
        out[i, :, a, b] = np.where(k_mod == b, nearest, np.inf).reshape(nk, block_k).min(axis=1)
  return out


def _same_layout(a: TokenLayout, b: TokenLayout) -> bool:
  return a is b or (np.array_equal(a.modality, b.modality) and np.array_equal(a.time, b.time))


def _grow(mask: BlockMask, m: int):
  a = np.zeros((m, m), bool)
  w = np.full((m, m), np.inf, np.float32)
  n = mask.num_modalities
  a[:n, :n], w[:n, :n] = mask.allowed, mask.window
  return a, w


def window_for_fraction(layout: TokenLayout, fraction: float, block_q: int, block_k: int,
                        step: float = 0.25) -> float:
  """The temporal window (a multiple of `step`) whose self-attention mask visits the share of
  tiles closest to `fraction`; the share is a step function of the window, so "closest"."""
  span = float(layout.time.max() - layout.time.min()) if len(layout) else 0.0
  best = None
  for w in np.arange(0.0, span + step, step):
    frac = self_attention_window(layout, float(w)).visible_tile_fraction(block_q, block_k)
    if best is None or abs(frac - fraction) < abs(best[1] - fraction):
      best = (float(w), frac)
  return best[0]
