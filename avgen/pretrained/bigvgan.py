"""BigVGAN checkpoints: config.json + the generator's state dict as safetensors.

The `bigvgan` package (2.4.1) saves `bigvgan_generator.pt` (a torch pickle of {"generator":
state_dict}) + config.json, and the nvidia/bigvgan_v2_* hub repos hold only that pickle. avgen
loads safetensors only, so such a directory is converted once with
`safetensors_from_pickle(src, out)`, which reads the pickle with torch's restricted
`weights_only` unpickler (tensors and containers only; no code runs) and writes the same state
dict keys to out/model.safetensors beside a copy of config.json.

Weights may be stored with weight norm (`weight_g`, `weight_v`, as trained and published),
as torch parametrizations (`parametrizations.weight.original0/1`), or plain (`weight`, after
remove_weight_norm); all three load. The anti-aliasing filters are computed, not read; the
checkpoint's copies (saved as buffers) are checked against them.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
from flax import nnx

from avgen.models.autoencoders.bigvgan import (
    BigVGAN, BigVGANConfig, downsample_filter, upsample_filter)
from avgen.pretrained.safetensors_io import (
    CheckpointError, Tensors, assign, conv, read_config)

# 22050 Hz, n_fft 1024, hop 256, window 1024, 80 bins over 0-8 kHz: the v2 22 kHz model whose
# bins all lie below 8 kHz, the Nyquist frequency of our 16 kHz audio (its sibling
# bigvgan_v2_22khz_80band_256x spans 0-11025 Hz, and its top bins would only see silence).
DEFAULT_SOURCE = "nvidia/bigvgan_v2_22khz_80band_fmax8k_256x"
CACHE_VERSION = 1
PICKLE_NAME = "bigvgan_generator.pt"
# The hub repos publish the pickle only; the registry converts it (weights-only) on first load.
HUB_PATTERNS = ("config.json", "*.safetensors", PICKLE_NAME)
# What to do with a pickle-only directory (the package's own save format), for error messages.
PICKLE_HINT = ("the bigvgan package saves bigvgan_generator.pt; convert it once with "
               "`avgen.pretrained.bigvgan.safetensors_from_pickle(src_dir, out_dir)` "
               "(torch weights_only loading, no code runs) and load out_dir")


def build(path: pathlib.Path, dtype) -> BigVGAN:
  config = BigVGANConfig.from_json(read_config(path, what="bigvgan"),
                                   what=f"bigvgan config {path}/config.json")
  return BigVGAN(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)


def norm_weight(t: Tensors, base: str) -> np.ndarray:
  """The effective conv weight under `base`, undoing weight norm: w = g * v / |v| (per dim 0)."""
  for g_key, v_key in ((f"{base}.weight_g", f"{base}.weight_v"),
                       (f"{base}.parametrizations.weight.original0",
                        f"{base}.parametrizations.weight.original1")):
    if g_key in t and v_key in t:
      g = np.asarray(t[g_key], np.float32)
      v = np.asarray(t[v_key], np.float32)
      norm = np.sqrt(np.square(v).sum(axis=tuple(range(1, v.ndim)), keepdims=True))
      return v * (g / norm)
  return np.asarray(t[f"{base}.weight"])  # raises naming the plain key if none is there


def torch_base(path: tuple, resblock: str) -> str:
  """Our module path (without the leaf) -> the torch module name."""
  parts = [str(p) for p in path]
  if parts[0] == "ups":  # torch nests each upsampler in a one-element ModuleList
    parts.insert(2, "0")
  if resblock == "2" and len(parts) > 2 and parts[2] == "convs1":
    parts[2] = "convs"
  return ".".join(parts)


def _check_filters(t: Tensors, what: str) -> None:
  expected = {"upsample.filter": upsample_filter(),
              "downsample.lowpass.filter": downsample_filter()}
  for key in list(t):
    for suffix, taps in expected.items():
      if key.endswith(suffix):
        stored = np.asarray(t[key], np.float32).reshape(-1)
        if stored.shape != taps.shape or not np.allclose(stored, taps, rtol=1e-5, atol=1e-7):
          raise CheckpointError(f"{what}: anti-aliasing filter {key} differs from the Kaiser-sinc "
                                "filter this port computes; the checkpoint was made by another "
                                "BigVGAN variant")


def load_from_dir(path: pathlib.Path, dtype) -> BigVGAN:
  what = f"bigvgan {path}"
  t = Tensors.from_dir(path, what=what)
  abstract = nnx.eval_shape(lambda: build(path, dtype))
  resblock = abstract.config.resblock
  arrays = {}
  for p, _ in nnx.to_flat_state(nnx.state(abstract)):
    base, leaf = torch_base(p[:-1], resblock), str(p[-1])
    if leaf == "kernel":
      w = norm_weight(t, base)
      # ConvTranspose1d stores (in, out, k), Conv1d (out, in, k); both become (k, in, out).
      arrays["/".join(map(str, p))] = np.transpose(w, (2, 0, 1)) if p[0] == "ups" else conv(w)
    else:  # bias, and the snake's alpha / beta
      arrays["/".join(map(str, p))] = np.asarray(t[f"{base}.{leaf}"])
  _check_filters(t, what)
  t.check_all_used()
  return assign(abstract, arrays, what=what)


def safetensors_from_pickle(src: str | pathlib.Path, out: str | pathlib.Path) -> pathlib.Path:
  """Converts a `bigvgan` package directory (config.json + bigvgan_generator.pt) to safetensors.

  Needs torch. Uses `torch.load(weights_only=True)`, which refuses pickles holding anything but
  tensors and plain containers, so converting an untrusted download runs no code from it.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top

  src, out = pathlib.Path(src), pathlib.Path(out)
  pickle = src / PICKLE_NAME
  if not (src / "config.json").is_file() or not pickle.is_file():
    raise CheckpointError(f"bigvgan: {src} must hold config.json and {PICKLE_NAME}")
  try:
    checkpoint = torch.load(pickle, map_location="cpu", weights_only=True)
  except Exception as e:  # the restricted unpickler refuses anything but tensors
    raise CheckpointError(f"bigvgan: {pickle} is not a plain tensor checkpoint "
                          f"({type(e).__name__}: {e}); refusing to unpickle it") from None
  state = checkpoint.get("generator") if isinstance(checkpoint, dict) else None
  if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
    raise CheckpointError(f"bigvgan: {pickle} has no 'generator' state dict of tensors")
  out.mkdir(parents=True, exist_ok=True)
  save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
            metadata={"converted_from": PICKLE_NAME})
  shutil.copy2(src / "config.json", out / "config.json")
  json.loads((out / "config.json").read_text())  # fail here, not at load, on a broken config
  return out
