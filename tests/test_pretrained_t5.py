"""T5 encoder against transformers from two tiny random configs (v1.1 gated GELU; original ReLU)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.t5.modeling_t5 import T5Attention

from avgen import pretrained
from avgen.models.encoders.t5 import relative_position_buckets
from tests.pretrained_utils import check, run, save


def _inputs(vocab, length):
  g = torch.Generator().manual_seed(1)
  ids = torch.randint(0, vocab, (2, length), generator=g)
  mask = torch.ones(2, length, dtype=torch.long)
  mask[1, length * 2 // 3:] = 0
  return ids, mask


def _compare(ours, ref_encoder, ids, mask, name):
  o = run(ours, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy(), bool))
  with torch.no_grad():
    r = ref_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
  check(f"{name} last_hidden_state", o.last_hidden_state, r.last_hidden_state)
  assert len(o.hidden_states) == len(r.hidden_states)
  for i, (a, b) in enumerate(zip(o.hidden_states, r.hidden_states)):
    check(f"{name} hidden_states[{i}]", a, b)


def test_t5_v1_1_encoder_model(tmp_path):
  """Config 1: T5EncoderModel, gated-gelu (v1.1 / Flan), 32 buckets, sequence past max_exact."""
  torch.manual_seed(0)
  cfg = transformers.T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=48, num_layers=3,
                              num_heads=4, feed_forward_proj="gated-gelu",
                              relative_attention_num_buckets=32, relative_attention_max_distance=20)
  ref = transformers.T5EncoderModel(cfg).eval()
  ours = pretrained.load("t5_encoder", save(ref, tmp_path / "t5"), cache=False)
  assert ours.blocks[0].ff.gated
  ids, mask = _inputs(50, 24)
  _compare(ours, ref, ids, mask, "t5 v1.1")


def test_t5_full_seq2seq_checkpoint_relu(tmp_path):
  """Config 2: T5ForConditionalGeneration (decoder weights ignored), ReLU, other sizes/buckets."""
  torch.manual_seed(0)
  cfg = transformers.T5Config(vocab_size=40, d_model=24, d_kv=4, d_ff=40, num_layers=2,
                              num_heads=3, feed_forward_proj="relu", layer_norm_epsilon=1e-5,
                              relative_attention_num_buckets=8, relative_attention_max_distance=12,
                              decoder_start_token_id=0)
  ref = transformers.T5ForConditionalGeneration(cfg).eval()
  ours = pretrained.load("t5_encoder", save(ref, tmp_path / "t5"), cache=False)
  assert not ours.blocks[0].ff.gated
  ids, mask = _inputs(40, 17)
  _compare(ours, ref.get_encoder(), ids, mask, "t5 relu")


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 12), (64, 256)])
def test_relative_position_buckets_match_torch(num_buckets, max_distance):
  """Every distance up to +-700, including those on log-bucket edges, lands in the same bucket."""
  length = 701
  ours = relative_position_buckets(length, num_buckets, max_distance)
  rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
  bucket = T5Attention._relative_position_bucket  # pylint: disable=protected-access
  ref = bucket(rel, True, num_buckets, max_distance).numpy()
  np.testing.assert_array_equal(ours, ref)


def test_t5_rejects_other_model_types(tmp_path):
  torch.manual_seed(0)
  cfg = transformers.CLIPTextConfig(vocab_size=20, hidden_size=16, intermediate_size=16,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    max_position_embeddings=6)
  path = save(transformers.CLIPTextModel(cfg), tmp_path / "clip")
  with pytest.raises(pretrained.CheckpointError, match="model_type 'clip_text_model'"):
    pretrained.load("t5_encoder", path, cache=False)
