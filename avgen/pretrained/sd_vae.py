"""diffusers AutoencoderKL checkpoints (config.json + diffusion_pytorch_model.safetensors).

Our module mirrors diffusers' attribute names, so each variable's torch key follows from its
path: `downsample` is diffusers' `downsamplers.0.conv`, `upsample` is `upsamplers.0.conv`,
`attention` is `attentions.0`, `to_out` is `to_out.0`. Checkpoints saved before diffusers
renamed its attention (stabilityai/sd-vae-ft-mse among them) use query/key/value/proj_attn,
sometimes as 1x1 conv weights; both spellings load.
"""

from __future__ import annotations

import pathlib

import numpy as np
from flax import nnx

from avgen.models.autoencoders.sd_vae import AutoencoderKL, AutoencoderKLConfig
from avgen.pretrained.safetensors_io import (
    CheckpointError, Tensors, assign, conv, linear, read_config)

DEFAULT_SOURCE = "stabilityai/sd-vae-ft-mse"
CACHE_VERSION = 1

_SEGMENTS = {"downsample": "downsamplers.0.conv", "upsample": "upsamplers.0.conv",
             "attention": "attentions.0", "to_out": "to_out.0"}
_OLD_SEGMENTS = dict(_SEGMENTS, to_q="query", to_k="key", to_v="value", to_out="proj_attn")


def build(path: pathlib.Path, dtype) -> AutoencoderKL:
  config = AutoencoderKLConfig.from_diffusers(read_config(path, what="sd_vae"),
                                              what=f"sd_vae config {path}/config.json")
  return AutoencoderKL(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)


def torch_key(path: tuple, *, old_attention: bool = False) -> str:
  """Our variable path -> the diffusers key.

  ('encoder', 'down_blocks', 0, 'downsample', 'kernel')
    -> 'encoder.down_blocks.0.downsamplers.0.conv.weight'
  """
  segments = _OLD_SEGMENTS if old_attention else _SEGMENTS
  *body, leaf = (str(p) for p in path)
  return ".".join([segments.get(p, p) for p in body] + ["bias" if leaf == "bias" else "weight"])


def _read(t: Tensors, path: tuple) -> np.ndarray:
  key, old = torch_key(path), torch_key(path, old_attention=True)
  return t[old] if key not in t and old in t else t[key]  # t[key] raises naming the key


def load_from_dir(path: pathlib.Path, dtype) -> AutoencoderKL:
  t = Tensors.from_dir(path, what=f"sd_vae {path}")
  abstract = nnx.eval_shape(lambda: build(path, dtype))
  arrays = {}
  for p, var in nnx.to_flat_state(nnx.state(abstract)):
    w = np.asarray(_read(t, p))
    if p[-1] == "kernel" and len(var.shape) == 4:  # Conv2d (out, in, kh, kw)
      w = conv(w)
    elif p[-1] == "kernel":  # Linear (out, in), or an old 1x1 conv (out, in, 1, 1)
      if w.ndim == 4 and w.shape[2:] == (1, 1):
        w = w[:, :, 0, 0]
      w = linear(w)
    if w.shape != tuple(var.shape):
      raise CheckpointError(f"sd_vae {path}: tensor for {'/'.join(map(str, p))} has shape "
                            f"{w.shape} after conversion, the model wants {tuple(var.shape)}")
    arrays["/".join(str(x) for x in p)] = w
  t.check_all_used()
  return assign(abstract, arrays, what=f"sd_vae {path}")
