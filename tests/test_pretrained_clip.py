"""CLIP text and vision towers against transformers, from two tiny random configs each."""

import string

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from avgen import pretrained
from avgen.models.encoders import build_text_encoder
from tests.pretrained_utils import check, run, save

VOCAB = 54  # 26 letters, 26 word-final letters, <|startoftext|> = 52, <|endoftext|> = 53


def _tiny_tokenizer(max_len):
  letters = string.ascii_lowercase
  vocab = {c: i for i, c in enumerate(letters)}
  vocab.update({c + "</w>": 26 + i for i, c in enumerate(letters)})
  vocab.update({"<|startoftext|>": 52, "<|endoftext|>": 53})
  return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_len)


def _text_inputs(eos: int, vocab: int):
  """Two rows; row 0 ends early (eos at 5, then padding), row 1 fills the length."""
  g = torch.Generator().manual_seed(1)
  ids = torch.randint(0, min(eos, vocab - 1), (2, 8), generator=g)
  ids[0, 5:] = eos
  ids[1, 7] = eos
  mask = torch.ones(2, 8, dtype=torch.long)
  mask[0, 6:] = 0
  return ids, mask


def _compare_text(ours, ref, ids, mask, name, projection=None):
  o = run(ours, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy(), bool))
  with torch.no_grad():
    r = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)
  check(f"{name} last_hidden_state", o.last_hidden_state, r.last_hidden_state)
  check(f"{name} pooler_output", o.pooler_output, r.pooler_output)
  assert len(o.hidden_states) == len(r.hidden_states)
  for i, (a, b) in enumerate(zip(o.hidden_states, r.hidden_states)):
    check(f"{name} hidden_states[{i}]", a, b)
  if projection is not None:
    check(f"{name} text_embeds", o.text_embeds, projection(r.pooler_output))
  else:
    assert o.text_embeds is None


def _compare_vision(ours, ref, name, projection=None, size=16):
  g = torch.Generator().manual_seed(2)
  px = torch.randn(2, 3, size, size, generator=g)
  o = run(ours, jnp.asarray(px.permute(0, 2, 3, 1).numpy()))
  with torch.no_grad():
    r = ref(pixel_values=px, output_hidden_states=True)
  check(f"{name} last_hidden_state", o.last_hidden_state, r.last_hidden_state)
  check(f"{name} pooler_output", o.pooler_output, r.pooler_output)
  for i, (a, b) in enumerate(zip(o.hidden_states, r.hidden_states)):
    check(f"{name} hidden_states[{i}]", a, b)
  if projection is not None:
    check(f"{name} image_embeds", o.image_embeds, projection(r.pooler_output))


def test_clip_model_checkpoint_text_and_vision(tmp_path):
  """Config 1: a full CLIPModel (openai layout: quick_gelu, legacy eos_token_id=2 -> argmax)."""
  torch.manual_seed(0)
  text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=8, hidden_act="quick_gelu",
              bos_token_id=52, eos_token_id=2, pad_token_id=53)
  vision = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                image_size=16, patch_size=4, hidden_act="quick_gelu")
  cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
  ref = transformers.CLIPModel(cfg).eval()
  path = save(ref, tmp_path / "clip")
  ids, mask = _text_inputs(eos=53, vocab=VOCAB)
  ours = pretrained.load("clip_text", path, cache=False)
  with torch.no_grad():
    _compare_text(ours, ref.text_model, ids, mask, "clip1 text", projection=ref.text_projection)
    vis = pretrained.load("clip_vision", path, cache=False)
    _compare_vision(vis, ref.vision_model, "clip1 vision", projection=ref.visual_projection)


def test_clip_separate_towers_second_config(tmp_path):
  """Config 2: CLIPTextModel (no projection, exact GELU, eos named by id and not the largest id)
  and CLIPVisionModelWithProjection (other patch size, eps, depth)."""
  torch.manual_seed(0)
  tcfg = transformers.CLIPTextConfig(
      vocab_size=40, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
      num_attention_heads=6, max_position_embeddings=10, hidden_act="gelu", layer_norm_eps=1e-6,
      bos_token_id=0, eos_token_id=30, pad_token_id=1)
  text = transformers.CLIPTextModel(tcfg).eval()
  ids, mask = _text_inputs(eos=30, vocab=40)
  ids[1, 3] = 35  # a larger id before eos: the argmax rule would pick it, the eos rule must not
  ours = pretrained.load("clip_text", save(text, tmp_path / "text"), cache=False)
  _compare_text(ours, text, ids, mask, "clip2 text")
  assert ours.text_projection is None

  vcfg = transformers.CLIPVisionConfig(
      hidden_size=24, intermediate_size=30, num_hidden_layers=1, num_attention_heads=2,
      image_size=24, patch_size=8, hidden_act="gelu", layer_norm_eps=1e-6, projection_dim=12)
  vision = transformers.CLIPVisionModelWithProjection(vcfg).eval()
  vis = pretrained.load("clip_vision", save(vision, tmp_path / "vision"), cache=False)
  with torch.no_grad():
    _compare_vision(vis, vision.vision_model, "clip2 vision", projection=vision.visual_projection,
                    size=24)


def test_frozen_clip_text_encoder_from_config(tmp_path):
  """build_text_encoder: tokenizer + encoder by config name; states zero at padding."""
  torch.manual_seed(0)
  cfg = transformers.CLIPTextConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=8, bos_token_id=52, eos_token_id=53,
      pad_token_id=53)
  ref = transformers.CLIPTextModel(cfg).eval()
  path = save(ref, tmp_path / "clip")
  _tiny_tokenizer(8).save_pretrained(str(path))
  config = ml_collections.ConfigDict({
      "model": {"text_encoder": "clip_text", "text_encoder_source": str(path), "dtype": "float32",
                "text_width": 32},
      "data": {"caption_max_len": 8}})
  enc = build_text_encoder(config, cache_dir=tmp_path / "cache")
  assert enc.width == 32
  captions = ["a cat", "dog sat on a mat", ""]
  states, mask = enc.encode(captions)
  ids, mask_np = enc.tokenizer(captions)
  assert ids.shape == (3, 8) and ids[0, 0] == 52 and 53 in ids[0]
  np.testing.assert_array_equal(np.asarray(mask), mask_np)
  np.testing.assert_array_equal(mask_np.sum(-1), [6, 8, 2])  # cut at max_len, eos kept
  assert ids[1, -1] == 53
  with torch.no_grad():
    r = ref(input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask_np, dtype=torch.long)).last_hidden_state.numpy()
  check("frozen clip_text states", np.asarray(states) * mask_np[..., None], r * mask_np[..., None])
  assert np.all(np.asarray(states)[~mask_np] == 0)

  config.model.text_width = 64
  with pytest.raises(ValueError, match="text_width=64"):
    build_text_encoder(config, cache_dir=tmp_path / "cache")
  config.model.text_width, config.data.caption_max_len = 32, 9
  with pytest.raises(ValueError, match="caption_max_len=9"):
    build_text_encoder(config, cache_dir=tmp_path / "cache")


def test_clip_input_checks(tmp_path):
  torch.manual_seed(0)
  cfg = transformers.CLIPTextConfig(vocab_size=20, hidden_size=16, intermediate_size=16,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    max_position_embeddings=6, bos_token_id=0, eos_token_id=19,
                                    pad_token_id=19)
  ours = pretrained.load("clip_text", save(transformers.CLIPTextModel(cfg), tmp_path / "t"),
                         cache=False)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    ours(jnp.zeros((1, 7), jnp.int32))
  with pytest.raises(ValueError, match=r"\[B, L\]"):
    ours(jnp.zeros((7,), jnp.int32))
  # The vision tower of a text-only checkpoint does not exist: a clear error, not a crash.
  with pytest.raises(pretrained.CheckpointError, match="vision"):
    pretrained.load("clip_vision", tmp_path / "t", cache=False)


def test_preprocess_images_crops_and_normalises():
  from avgen.models.encoders.clip import (  # pylint: disable=g-import-not-at-top
      CLIP_MEAN, CLIP_STD, preprocess_images)
  img = np.zeros((1, 20, 40, 3), np.uint8)
  img[:, :, 10:30] = 255  # a white centre band: exactly what a centre crop keeps of a 2:1 image
  out = np.asarray(preprocess_images(jnp.asarray(img), 10))
  assert out.shape == (1, 10, 10, 3)
  white = (1.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
  np.testing.assert_allclose(out[0, :, 2:8], np.broadcast_to(white, (10, 6, 3)), atol=1e-5)
  with pytest.raises(ValueError, match="3 channels"):
    preprocess_images(jnp.zeros((1, 3, 8, 8)), 4)
