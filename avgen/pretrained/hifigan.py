"""HiFi-GAN checkpoints as transformers saves `SpeechT5HifiGan` (config.json + model.safetensors).

Module paths equal transformers' names (conv_pre, upsampler.i, resblocks.n.convs1/convs2.j,
conv_post, mean, scale). Weight-normed weights (weight_g/weight_v or parametrizations) load too.
"""

from __future__ import annotations

import pathlib

import numpy as np
from flax import nnx

from avgen.models.autoencoders.hifigan import HiFiGAN, HiFiGANConfig
from avgen.pretrained.bigvgan import norm_weight
from avgen.pretrained.safetensors_io import Tensors, assign, conv, read_config

DEFAULT_SOURCE = "microsoft/speecht5_hifigan"
CACHE_VERSION = 1


def build(path: pathlib.Path, dtype) -> HiFiGAN:
  config = HiFiGANConfig.from_transformers(read_config(path, what="hifigan"),
                                           what=f"hifigan config {path}/config.json")
  return HiFiGAN(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)


def load_from_dir(path: pathlib.Path, dtype) -> HiFiGAN:
  what = f"hifigan {path}"
  t = Tensors.from_dir(path, what=what)
  abstract = nnx.eval_shape(lambda: build(path, dtype))
  arrays = {}
  for p, _ in nnx.to_flat_state(nnx.state(abstract)):
    name, base, leaf = "/".join(map(str, p)), ".".join(map(str, p[:-1])), str(p[-1])
    if leaf == "kernel":
      w = norm_weight(t, base)
      # ConvTranspose1d stores (in, out, k), Conv1d (out, in, k); both become (k, in, out).
      arrays[name] = np.transpose(w, (2, 0, 1)) if p[0] == "upsampler" else conv(w)
    else:
      arrays[name] = np.asarray(t[".".join(map(str, p))])
  t.check_all_used()
  return assign(abstract, arrays, what=what)
