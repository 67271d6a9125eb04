"""Shared pieces of the extractor ports: convs and pooling in NHWC, loading torch state dicts."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avgen.models.layers import param


class Conv2D(nnx.Module):
  """2D conv over NHWC with explicit symmetric zero padding (PyTorch's `padding=p`)."""

  def __init__(self, channels_in: int, channels_out: int, kernel: int | Sequence[int], *,
               rngs: nnx.Rngs, stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
               use_bias: bool = True):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
    self.stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
    ph, pw = (padding, padding) if isinstance(padding, int) else tuple(padding)
    self.padding = ((ph, ph), (pw, pw))
    init = nnx.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)
    self.kernel = param(rngs, init, (kh, kw, channels_in, channels_out),
                        (None, None, "conv_in", "conv_out"), jnp.float32)
    zeros = nnx.initializers.zeros_init()
    self.bias = param(rngs, zeros, channels_out, ("conv_out",), jnp.float32) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.lax.conv_general_dilated(x, self.kernel[...], self.stride, self.padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=jax.lax.Precision.HIGHEST)
    return y if self.bias is None else y + self.bias[...]


def max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  """PyTorch's MaxPool2d(window, stride) on NHWC: no padding, partial windows dropped."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1),
                               (1, stride, stride, 1), "VALID")


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A state dict saved with `torch.save` (.pt/.pth/.bin) or safetensors -> numpy arrays."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights: no such file: {path!r}")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return dict(load_file(path))
  import torch  # pylint: disable=g-import-not-at-top
  state = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(state, Mapping):
    raise ValueError(f"weights {path!r}: expected a state dict (name -> tensor), "
                     f"got {type(state).__name__}")
  return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in state.items()}


def abstract(factory):
  """The module `factory()` builds, with shapes only: loaders fill it from a checkpoint, so no
  time goes to random initialisation (minutes for VGGish's 67M parameters on a CPU)."""
  return nnx.eval_shape(factory)


def assign(target: nnx.Variable, value: Any, name: str, source_shape=None) -> None:
  """Sets a parameter from a converted array after checking its shape (`source_shape`: the
  tensor's shape in the checkpoint, named in the error when the layout was converted)."""
  value = np.asarray(value, np.float32)
  expected = tuple(target.get_value().shape)
  if expected != value.shape:
    given = value.shape if source_shape is None else f"{tuple(source_shape)} (ours: {value.shape})"
    raise ValueError(f"weights: {name} has shape {given}; the model expects {expected}")
  target.set_value(jnp.asarray(value))


def check_all_assigned(model: nnx.Module, what: str) -> None:
  """After loading into an `abstract` module, every variable must hold an array."""
  missing = [jax.tree_util.keystr(path) for path, leaf in
             jax.tree_util.tree_leaves_with_path(nnx.state(model))
             if isinstance(leaf, jax.ShapeDtypeStruct)]
  if missing:
    raise ValueError(f"weights for {what}: no tensor for {len(missing)} parameter(s), "
                     f"e.g. {missing[:5]}")


def take(state: dict[str, np.ndarray], name: str) -> np.ndarray:
  """Pops a tensor from a state dict, with an error naming what is missing."""
  if name not in state:
    raise KeyError(f"weights: missing tensor {name!r}")
  return state.pop(name)


def assign_conv(conv: Conv2D, state: dict[str, np.ndarray], prefix: str) -> None:
  """torch Conv2d weight [O, I, kh, kw] (+ bias [O]) -> HWIO kernel."""
  weight = take(state, f"{prefix}.weight")
  assign(conv.kernel, weight.transpose(2, 3, 1, 0), f"{prefix}.weight", weight.shape)
  if conv.bias is not None:
    assign(conv.bias, take(state, f"{prefix}.bias"), f"{prefix}.bias")


def assign_dense(dense, state: dict[str, np.ndarray], prefix: str) -> None:
  """torch Linear weight [O, I] (+ bias [O]) -> avgen Dense kernel [I, O]."""
  weight = take(state, f"{prefix}.weight")
  kernel_shape = dense.kernel.get_value().shape
  if weight.size != np.prod(kernel_shape):
    raise ValueError(f"weights: {prefix}.weight has shape {weight.shape}; the model expects "
                     f"{int(np.prod(kernel_shape[len(dense.in_shape):]))} x "
                     f"{int(np.prod(dense.in_shape))}")
  assign(dense.kernel, weight.T.reshape(kernel_shape), f"{prefix}.weight", weight.shape)
  if dense.bias is not None:
    bias = take(state, f"{prefix}.bias")
    shape = dense.bias.get_value().shape  # [heads, head_dim] for attention projections
    assign(dense.bias, bias.reshape(shape) if bias.size == np.prod(shape) else bias,
           f"{prefix}.bias")


def check_consumed(state: dict[str, np.ndarray], what: str, ignore: Sequence[str] = ()) -> None:
  """Every tensor of a state dict must have found a home: a leftover means a wrong layout."""
  left = sorted(k for k in state if not any(k.endswith(s) for s in ignore))
  if left:
    raise ValueError(f"weights for {what}: {len(left)} tensor(s) were not used, e.g. {left[:5]}")
