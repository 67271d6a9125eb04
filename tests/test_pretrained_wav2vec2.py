"""Wav2Vec2 against transformers: group norm + post-LN (base), layer norm + stable LN (robust)."""

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from avgen import pretrained
from avgen.pretrained.safetensors_io import read_safetensors_file
from tests.pretrained_utils import check, run, save

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
             conv_dim=(16, 16, 24), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3),
             num_conv_pos_embedding_groups=4)


def _compare(ours, ref, name, with_mask):
  g = torch.Generator().manual_seed(1)
  x = torch.randn(2, 800, generator=g)
  mask = torch.ones(2, 800, dtype=torch.long)
  mask[1, 530:] = 0
  args = (jnp.asarray(x.numpy()),) + ((jnp.asarray(mask.numpy(), bool),) if with_mask else ())
  o = run(ours, *args)
  with torch.no_grad():
    r = ref(x, attention_mask=mask if with_mask else None, output_hidden_states=True)
  check(f"{name} last_hidden_state", o.last_hidden_state, r.last_hidden_state)
  check(f"{name} extract_features", o.extract_features, r.extract_features)
  assert len(o.hidden_states) == len(r.hidden_states) == ref.config.num_hidden_layers + 1
  for i, (a, b) in enumerate(zip(o.hidden_states, r.hidden_states)):
    check(f"{name} hidden_states[{i}]", a, b)
  return o


def test_wav2vec2_base_layout_group_norm_post_ln(tmp_path):
  """Config 1: Wav2Vec2Model as facebook/wav2vec2-base (group norm, post-LN, no conv bias)."""
  torch.manual_seed(0)
  cfg = transformers.Wav2Vec2Config(feat_extract_norm="group", do_stable_layer_norm=False,
                                    conv_bias=False, num_conv_pos_embeddings=16, **SMALL)
  ref = transformers.Wav2Vec2Model(cfg).eval()
  ours = pretrained.load("wav2vec2", save(ref, tmp_path / "w2v"), cache=False)
  _compare(ours, ref, "wav2vec2 group/post-LN", with_mask=False)


def test_wav2vec2_robust_layout_layer_norm_stable_ln_with_mask(tmp_path):
  """Config 2: Wav2Vec2ForCTC as wav2vec2-large-robust (layer norm in every conv, stable pre-LN,
  conv bias, odd positional kernel), padded batch with an attention mask."""
  torch.manual_seed(0)
  cfg = transformers.Wav2Vec2Config(feat_extract_norm="layer", do_stable_layer_norm=True,
                                    conv_bias=True, num_conv_pos_embeddings=15, vocab_size=12,
                                    **{**SMALL, "num_hidden_layers": 3})
  ref = transformers.Wav2Vec2ForCTC(cfg).eval()
  path = save(ref, tmp_path / "w2v")
  ours = pretrained.load("wav2vec2", path, cache=False)
  o = _compare(ours, ref.wav2vec2, "wav2vec2 layer/stable-LN masked", with_mask=True)
  lengths = ref.wav2vec2._get_feat_extract_output_lengths  # pylint: disable=protected-access
  frames = int(lengths(torch.tensor(530)))
  np.testing.assert_array_equal(np.asarray(o.frame_mask).sum(-1), [o.frame_mask.shape[1], frames])


def test_wav2vec2_legacy_weight_norm_names(tmp_path):
  """Older checkpoints store the positional conv's weight norm as weight_g / weight_v."""
  torch.manual_seed(0)
  cfg = transformers.Wav2Vec2Config(feat_extract_norm="layer", do_stable_layer_norm=False,
                                    conv_bias=True, num_conv_pos_embeddings=16, **SMALL)
  ref = transformers.Wav2Vec2Model(cfg).eval()
  path = save(ref, tmp_path / "w2v")
  tensors = {k: np.array(v) for k, v in read_safetensors_file(path / "model.safetensors").items()}
  renamed = {k.replace("parametrizations.weight.original0", "weight_g")
              .replace("parametrizations.weight.original1", "weight_v"): v
             for k, v in tensors.items()}
  assert renamed.keys() != tensors.keys()
  safetensors.numpy.save_file(renamed, str(path / "model.safetensors"), metadata={"format": "pt"})
  ours = pretrained.load("wav2vec2", path, cache=False)
  _compare(ours, ref, "wav2vec2 layer/post-LN legacy weight_g", with_mask=False)


def test_wav2vec2_input_checks(tmp_path):
  torch.manual_seed(0)
  cfg = transformers.Wav2Vec2Config(num_conv_pos_embeddings=16, **SMALL)
  ours = pretrained.load("wav2vec2", save(transformers.Wav2Vec2Model(cfg), tmp_path / "w"),
                         cache=False)
  with pytest.raises(ValueError, match="too few"):
    ours(jnp.zeros((1, 12)))
  with pytest.raises(ValueError, match=r"\[B, samples\]"):
    ours(jnp.zeros((800,)))
  with pytest.raises(ValueError, match="attention_mask"):
    ours(jnp.zeros((2, 800)), jnp.ones((2, 700), bool))
