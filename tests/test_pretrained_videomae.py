"""VideoMAE encoder against transformers, from two tiny random configs."""

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from avgen import pretrained
from avgen.pretrained.safetensors_io import read_safetensors_file
from tests.pretrained_utils import check, run, save


def _compare(ours, ref, name, frames, size, fc_norm=None):
  g = torch.Generator().manual_seed(1)
  x = torch.randn(2, frames, 3, size, size, generator=g)
  o = run(ours, jnp.asarray(x.permute(0, 1, 3, 4, 2).numpy()))
  with torch.no_grad():
    r = ref(x, output_hidden_states=True)
    pooled = r.last_hidden_state.mean(1)
    pooled = fc_norm(pooled) if fc_norm is not None else pooled
  check(f"{name} last_hidden_state", o.last_hidden_state, r.last_hidden_state)
  check(f"{name} pooler_output", o.pooler_output, pooled)
  assert len(o.hidden_states) == len(r.hidden_states)
  for i, (a, b) in enumerate(zip(o.hidden_states, r.hidden_states)):
    check(f"{name} hidden_states[{i}]", a, b)


def test_videomae_pretraining_checkpoint_final_layernorm_qv_bias(tmp_path):
  """Config 1: VideoMAEForPreTraining as MCG-NJU/videomae-base is published (decoder ignored),
  tubelet 2, q/v biases, final LayerNorm (no mean pooling); re-saved with the original
  q_bias / v_bias names it loads to the same numbers."""
  torch.manual_seed(0)
  cfg = transformers.VideoMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=40, image_size=16, patch_size=8,
                                    num_frames=4, tubelet_size=2, qv_bias=True,
                                    use_mean_pooling=False, decoder_hidden_size=16,
                                    decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                    decoder_intermediate_size=20)
  full = transformers.VideoMAEForPreTraining(cfg).eval()
  ref = full.videomae
  path = save(full, tmp_path / "vm")
  _compare(pretrained.load("videomae", path, cache=False), ref, "videomae 1", 4, 16)

  tensors = {k: np.array(v) for k, v in read_safetensors_file(path / "model.safetensors").items()}
  renamed = {k.replace("attention.attention.query.bias", "attention.attention.q_bias")
              .replace("attention.attention.value.bias", "attention.attention.v_bias"): v
             for k, v in tensors.items()}
  assert any("q_bias" in k for k in renamed)
  safetensors.numpy.save_file(renamed, str(path / "model.safetensors"), metadata={"format": "pt"})
  _compare(pretrained.load("videomae", path, cache=False), ref, "videomae 1 (q_bias names)", 4, 16)


def test_videomae_classifier_checkpoint_mean_pooling_fc_norm(tmp_path):
  """Config 2: VideoMAEForVideoClassification (classifier ignored, fc_norm kept), tubelet 1, no
  q/v bias, mean pooling (so no final LayerNorm), tanh GELU, other widths and patch size."""
  torch.manual_seed(0)
  cfg = transformers.VideoMAEConfig(hidden_size=24, num_hidden_layers=3, num_attention_heads=3,
                                    intermediate_size=30, image_size=12, patch_size=4,
                                    num_frames=3, tubelet_size=1, qv_bias=False,
                                    use_mean_pooling=True, hidden_act="gelu_new", num_labels=5)
  ref = transformers.VideoMAEForVideoClassification(cfg).eval()
  ours = pretrained.load("videomae", save(ref, tmp_path / "vm"), cache=False)
  assert ours.layernorm is None and ours.fc_norm is not None
  _compare(ours, ref.videomae, "videomae 2", 3, 12, fc_norm=ref.fc_norm)


def test_videomae_input_checks(tmp_path):
  torch.manual_seed(0)
  cfg = transformers.VideoMAEConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=16, image_size=8, patch_size=4,
                                    num_frames=2, tubelet_size=2)
  ours = pretrained.load("videomae", save(transformers.VideoMAEModel(cfg), tmp_path / "v"),
                         cache=False)
  with pytest.raises(ValueError, match=r"\(T, H, W, C\)"):
    ours(jnp.zeros((1, 2, 3, 8, 8)))  # channels-first by mistake
