"""LPIPS (Zhang et al. 2018), AlexNet trunk, version 0.1: the `lpips` package's default metric.

d(x0, x1) = sum_l mean_{h,w} w_l . (n(f_l(x0)) - n(f_l(x1)))^2, where f_l are the five ReLU
outputs of AlexNet's features on the scaled input (x - shift) / scale, n normalizes each
position's channel vector to unit length (plus 1e-10), and w_l are the learned 1x1 "lin" weights.

Weights: the AlexNet trunk comes from torchvision's ImageNet checkpoint and the lin layers from
the `lpips` package (`lpips/weights/v0.1/alex.pth`). Accepted files: a state dict of the whole
`lpips.LPIPS` module (`net.slice1.0.weight`, ..., `lin0.model.1.weight`, ...), or a torchvision
AlexNet state dict (`features.0.weight`, ...) together with the lin file.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avgen.metrics.nets import common

# Per-channel shift and scale of lpips' ScalingLayer (ImageNet statistics in [-1, 1] units).
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)
# AlexNet convs: (in, out, kernel, stride, padding); a 3x3/2 max pool precedes convs 2 and 3.
_ALEXNET = ((3, 64, 11, 4, 2), (64, 192, 5, 1, 2), (192, 384, 3, 1, 1), (384, 256, 3, 1, 1),
            (256, 256, 3, 1, 1))
_TORCHVISION_INDEX = (0, 3, 6, 8, 10)  # conv positions in torchvision's alexnet.features
_LPIPS_SLICE = ("slice1.0", "slice2.3", "slice3.6", "slice4.8", "slice5.10")


class LPIPS(nnx.Module):
  """LPIPS distance between image batches in [-1, 1], NHWC float -> [B]."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.convs = nnx.List([common.Conv2D(i, o, k, stride=s, padding=p, rngs=rngs)
                           for i, o, k, s, p in _ALEXNET])
    self.lins = nnx.List([common.Conv2D(o, 1, 1, use_bias=False, rngs=rngs)
                          for _, o, _, _, _ in _ALEXNET])

  def features(self, x: jax.Array) -> list[jax.Array]:
    h = (x - _SHIFT) / _SCALE
    outs = []
    for i, conv in enumerate(self.convs):
      if i in (1, 2):
        h = common.max_pool(h, 3, 2)
      h = jax.nn.relu(conv(h))
      outs.append(h)
    return outs

  def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
    total = 0.0
    for f0, f1, lin in zip(self.features(x0), self.features(x1), self.lins):
      n0 = f0 / (jnp.sqrt(jnp.sum(f0 * f0, -1, keepdims=True)) + 1e-10)
      n1 = f1 / (jnp.sqrt(jnp.sum(f1 * f1, -1, keepdims=True)) + 1e-10)
      total = total + jnp.mean(lin(jnp.square(n0 - n1)), axis=(1, 2, 3))
    return total


def lin_weights_from_package() -> str | None:
  """Path of the lin weights shipped inside the `lpips` pip package, if it is installed."""
  try:
    import importlib.util  # pylint: disable=g-import-not-at-top
    spec = importlib.util.find_spec("lpips")
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "v0.1", "alex.pth")
  return path if os.path.isfile(path) else None


def load_lpips(weights: str, lin_weights: str | None = None) -> LPIPS:
  """LPIPS with weights from a whole-module state dict, or a torchvision AlexNet + lin file."""
  state = common.load_torch_state_dict(weights)
  if "features.0.weight" in state:
    lin_weights = lin_weights or lin_weights_from_package()
    if lin_weights is None:
      raise FileNotFoundError(
          f"LPIPS: {weights!r} holds only the AlexNet trunk; the lin layers come from the lpips "
          "package (pip install lpips) or a path given as lin_weights")
    # torchvision's classifier layers are not part of LPIPS and are left out.
    state = {f"net.{s}.{kind}": common.take(state, f"features.{i}.{kind}")
             for s, i in zip(_LPIPS_SLICE, _TORCHVISION_INDEX) for kind in ("weight", "bias")}
    state.update(common.load_torch_state_dict(lin_weights))
  # lpips registers its lin layers twice (`linN` and the ModuleList `lins.N`): same tensors.
  state = {k: v for k, v in state.items() if not k.startswith("lins.")}
  model = common.abstract(lambda: LPIPS(rngs=nnx.Rngs(0)))
  for conv, name in zip(model.convs, _LPIPS_SLICE):
    common.assign_conv(conv, state, f"net.{name}")
  for i, lin in enumerate(model.lins):
    common.assign_conv(lin, state, f"lin{i}.model.1")
  common.check_consumed(state, "LPIPS", ignore=("scaling_layer.shift", "scaling_layer.scale"))
  common.check_all_assigned(model, "LPIPS")
  return model
