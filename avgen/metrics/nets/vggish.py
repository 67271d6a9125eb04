"""VGGish (Hershey et al. 2017), the audio embedding of FAD, with its log-mel front end.

Front end (as the original's `vggish_input` / `mel_features`): mono, resampled to 16 kHz
(resampy, as the original), 25 ms periodic-Hann frames every 10 ms, |rfft| with 512 bins, a
64-band HTK mel matrix over 125-7500 Hz (DC bin zeroed), log(mel + 0.01), and examples of 96
frames (0.96 s) every 96 frames, without padding: a waveform shorter than 0.96 s has none.

Network: VGG convs 64, pool, 128, pool, 256, 256, pool, 512, 512, pool (3x3, ReLU, 2x2 pools)
on the [96, 64] patch; the [6, 4, 512] map flattened in (h, w, c) order; fc 4096, 4096, 128.

FAD uses the 128-d fc2 output without an activation: TensorFlow's current `vggish_slim`
(which Google's FAD runs) has no ReLU there, while torchvggish 0.2 keeps an older final ReLU;
`relu_output=True` gives torchvggish's output. The PCA + 8-bit quantization postprocessing of
the AudioSet release is available (`postprocess`) but FAD does not use it.

Weights: a torchvggish state dict (`vggish-10086976.pth`: `features.N.*`, `embeddings.N.*`);
PCA parameters from `vggish_pca_params-970ea276.pth` (`pca_eigen_vectors`, `pca_means`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avgen.metrics.nets import common
from avgen.models.layers import Dense

SAMPLE_RATE = 16000
WINDOW = 400  # 25 ms
HOP = 160  # 10 ms
FFT = 512
NUM_BANDS = 64
MEL_RANGE = (125.0, 7500.0)
LOG_OFFSET = 0.01
EXAMPLE_FRAMES = 96
_CONVS = (64, "pool", 128, "pool", 256, 256, "pool", 512, 512, "pool")
_TORCH_CONV_INDEX = (0, 3, 6, 8, 11, 13)  # conv positions in torchvggish's `features`


def _hertz_to_mel(hz):
  return 1127.0 * np.log1p(np.asarray(hz, np.float64) / 700.0)


def mel_matrix() -> np.ndarray:
  """[257, 64] HTK triangles, linear in mel, over 125-7500 Hz; the DC bin gets no weight."""
  bins_mel = _hertz_to_mel(np.linspace(0.0, SAMPLE_RATE / 2, FFT // 2 + 1))
  edges = np.linspace(*_hertz_to_mel(MEL_RANGE), NUM_BANDS + 2)
  lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
  rising = (bins_mel[:, None] - lower) / (centre - lower)
  falling = (upper - bins_mel[:, None]) / (upper - centre)
  weights = np.maximum(0.0, np.minimum(rising, falling))
  weights[0] = 0.0
  return weights


def log_mel_examples(audio: Any, sample_rate: int) -> np.ndarray:
  """Waveform [S] (or [S, C]) -> log-mel examples [N, 96, 64] float32 (N may be 0)."""
  audio = np.asarray(audio, np.float64)
  if audio.ndim == 2:
    audio = audio.mean(axis=1)
  if audio.ndim != 1:
    raise ValueError(f"audio: must be [S] or [S, C], got shape {audio.shape}")
  if sample_rate != SAMPLE_RATE:
    import resampy  # pylint: disable=g-import-not-at-top
    audio = resampy.resample(audio, sample_rate, SAMPLE_RATE)
  if len(audio) < WINDOW:
    return np.zeros((0, EXAMPLE_FRAMES, NUM_BANDS), np.float32)
  num_frames = 1 + (len(audio) - WINDOW) // HOP
  frames = audio[np.arange(num_frames)[:, None] * HOP + np.arange(WINDOW)]
  hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WINDOW) / WINDOW)  # periodic
  log_mel = np.log(np.abs(np.fft.rfft(frames * hann, FFT)) @ mel_matrix() + LOG_OFFSET)
  num_examples = len(log_mel) // EXAMPLE_FRAMES
  return log_mel[:num_examples * EXAMPLE_FRAMES].reshape(
      num_examples, EXAMPLE_FRAMES, NUM_BANDS).astype(np.float32)


class VGGish(nnx.Module):
  """Log-mel examples [N, 96, 64] -> embeddings [N, 128]."""

  def __init__(self, *, rngs: nnx.Rngs):
    convs, channels = [], 1
    for layer in _CONVS:
      if layer != "pool":
        convs.append(common.Conv2D(channels, layer, 3, padding=1, rngs=rngs))
        channels = layer
    self.convs = nnx.List(convs)
    self.fc1a = Dense(512 * 6 * 4, 4096, ("conv_in", "mlp"), rngs=rngs)
    self.fc1b = Dense(4096, 4096, ("mlp", "mlp"), rngs=rngs)
    self.fc2 = Dense(4096, 128, ("mlp", "embed"), rngs=rngs)
    self.pca_matrix = nnx.Variable(jnp.eye(128, dtype=jnp.float32))
    self.pca_means = nnx.Variable(jnp.zeros((128,), jnp.float32))

  def __call__(self, examples: jax.Array, *, relu_output: bool = False) -> jax.Array:
    h = examples[..., None]  # [N, 96, 64, 1]
    convs = iter(self.convs)
    for layer in _CONVS:
      h = common.max_pool(h, 2, 2) if layer == "pool" else jax.nn.relu(next(convs)(h))
    h = h.reshape(h.shape[0], -1)  # [N, 6*4*512] in (h, w, c) order, as the original
    h = jax.nn.relu(self.fc1a(h))
    h = jax.nn.relu(self.fc1b(h))
    h = self.fc2(h)
    return jax.nn.relu(h) if relu_output else h

  def postprocess(self, embeddings: jax.Array) -> jax.Array:
    """AudioSet-release PCA (with whitening), clip to [-2, 2], 8-bit quantization (0..255)."""
    pca = (embeddings - self.pca_means[...]) @ self.pca_matrix[...].T
    return jnp.round((jnp.clip(pca, -2.0, 2.0) + 2.0) * (255.0 / 4.0))


def load_vggish(weights: str, pca_weights: str | None = None) -> VGGish:
  """VGGish from a torchvggish state dict (and optionally its PCA parameters)."""
  state = common.load_torch_state_dict(weights)
  model = common.abstract(lambda: VGGish(rngs=nnx.Rngs(0)))
  for conv, index in zip(model.convs, _TORCH_CONV_INDEX):
    common.assign_conv(conv, state, f"features.{index}")
  for dense, index in ((model.fc1a, 0), (model.fc1b, 2), (model.fc2, 4)):
    common.assign_dense(dense, state, f"embeddings.{index}")
  common.check_consumed(state, "VGGish")
  if pca_weights is None:  # identity PCA: `postprocess` then only clips and quantizes
    model.pca_matrix.set_value(jnp.eye(128, dtype=jnp.float32))
    model.pca_means.set_value(jnp.zeros((128,), jnp.float32))
  else:
    pca = common.load_torch_state_dict(pca_weights)
    common.assign(model.pca_matrix, common.take(pca, "pca_eigen_vectors"), "pca_eigen_vectors")
    common.assign(model.pca_means, common.take(pca, "pca_means").reshape(-1), "pca_means")
  common.check_all_assigned(model, "VGGish")
  return model


_forward = nnx.jit(lambda model, examples: model(examples))  # one compilation per shape


def embed_audio(model: VGGish, audios: list[np.ndarray], sample_rate: int,
                batch_size: int = 64) -> tuple[np.ndarray, list[int]]:
  """All 0.96 s examples of all clips -> (embeddings [N, 128], examples per clip)."""
  examples = [log_mel_examples(a, sample_rate) for a in audios]
  counts = [len(e) for e in examples]
  stacked = np.concatenate(examples) if examples else np.zeros((0, EXAMPLE_FRAMES, NUM_BANDS))
  out = [np.asarray(_forward(model, jnp.asarray(stacked[i:i + batch_size])))
         for i in range(0, len(stacked), batch_size)]
  return (np.concatenate(out) if out else np.zeros((0, 128), np.float32)), counts
