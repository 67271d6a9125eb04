"""Helpers for the pretrained-port tests: save a PyTorch original, compare outputs."""

from __future__ import annotations

import pathlib

import numpy as np

TOL = 1e-5  # relative error bound of issue 5 (float32)


def rel_err(ours, ref) -> float:
  """max |ours - ref| / max |ref| over the whole tensor."""
  ours = np.asarray(ours, np.float64)
  ref = np.asarray(ref.detach().numpy() if hasattr(ref, "detach") else ref, np.float64)
  assert ours.shape == ref.shape, f"shape {ours.shape} vs reference {ref.shape}"
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def check(name: str, ours, ref, tol: float = TOL) -> float:
  err = rel_err(ours, ref)
  print(f"[rel-err] {name}: {err:.2e}")
  assert err <= tol, f"{name}: relative error {err:.3e} > {tol}"
  return err


def save(model, path: pathlib.Path) -> pathlib.Path:
  """Saves as transformers does by default (config.json + model.safetensors)."""
  model.save_pretrained(str(path), safe_serialization=True)
  assert list(path.glob("*.safetensors")), "the original did not write safetensors"
  return path


def run(module, *args):
  """module(*args) compiled as one program (much faster on CPU than op-by-op dispatch)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(module)
  return jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *args)
