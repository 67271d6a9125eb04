"""Frozen pretrained text encoders in training and sampling, with tiny random CLIP / T5 models
saved by transformers: a short training run, checkpoints without encoder weights, sampling from
the workdir, the frozen weights as a step argument, and the config errors."""

import glob
import os
import string
import struct

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers
from flax import nnx
from tensorboardX.proto import event_pb2

import train_utils
from avgen import config as config_lib
from avgen import pretrained
from avgen.metrics import in_training
from avgen.models import build_model, encoders, text_encoder as text_encoder_lib
from avgen.models.tokenizer import ByteTokenizer, build_tokenizer
from avgen.parallel import mesh as mesh_lib
from avgen.sample.load import load_generator
from avgen.train import state as state_lib, step as step_lib, trainer
from data_pipeline import loader, schema
from tests.pretrained_utils import check

WIDTH = 32  # the tiny encoders' width = the tiny config's model.text_width


def _clip_tokenizer(max_len):
  letters = string.ascii_lowercase
  vocab = {c: i for i, c in enumerate(letters)}
  vocab.update({c + "</w>": 26 + i for i, c in enumerate(letters)})
  vocab.update({"<|startoftext|>": 52, "<|endoftext|>": 53})
  return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_len)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  """A tiny CLIPTextModel with OpenAI's 77 positions, and its tokenizer, as transformers saves."""
  torch.manual_seed(0)
  cfg = transformers.CLIPTextConfig(
      vocab_size=54, hidden_size=WIDTH, intermediate_size=37, num_hidden_layers=1,
      num_attention_heads=4, max_position_embeddings=77, bos_token_id=52, eos_token_id=53,
      pad_token_id=53)
  path = tmp_path_factory.mktemp("clip")
  transformers.CLIPTextModel(cfg).save_pretrained(str(path), safe_serialization=True)
  _clip_tokenizer(77).save_pretrained(str(path))
  return str(path)


@pytest.fixture(autouse=True)
def _pretrained_cache(tmp_path_factory, monkeypatch):
  monkeypatch.setenv("AVGEN_PRETRAINED_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _config(clip_dir, **overrides):
  c = train_utils.tiny_config(**overrides)
  c.model.text_encoder = "clip_text"
  c.model.text_encoder_source = clip_dir
  c.data.caption_max_len = 16
  return c


def _scalars(logdir, tag):
  """{step: value} of one scalar from tensorboardX event files (TFRecord framing)."""
  out = {}
  for path in sorted(glob.glob(os.path.join(logdir, "*tfevents*"))):
    data, pos = open(path, "rb").read(), 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      out.update({event.step: v.simple_value for v in event.summary.value if v.tag == tag})
  return out


@pytest.fixture(scope="module")
def trained(clip_dir, tmp_path_factory):
  """Two steps with a frozen CLIP on a data=4 x fsdp=2 mesh; checkpoint, samples and eval at 2."""
  root = tmp_path_factory.mktemp("frozen_run")
  config = _config(clip_dir, train__num_steps=2, train__checkpoint_every=2)
  config.sample.every = config.eval.every = 2
  config.eval.metrics = ("sync", "temporal")
  config.mesh.data, config.mesh.fsdp = 4, 2
  train_utils.make_shards(root / "data", config, num_clips=16)
  config.data.path = str(root / "data" / "*.array_record")
  calls = []
  real = in_training.evaluate_samples

  def spy(videos, audios, meta, metrics, **kwargs):
    calls.append((np.stack(videos), np.stack(audios), dict(meta), tuple(metrics)))
    calls[-1] += (real(videos, audios, meta, metrics, **kwargs),)
    return calls[-1][-1]

  encoded = []  # the id shapes the frozen encoder is traced with
  real_apply = encoders.FrozenTextEncoder.apply

  def apply_spy(self, params, ids, mask):
    encoded.append(tuple(ids.shape))
    return real_apply(self, params, ids, mask)

  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("AVGEN_PRETRAINED_CACHE", str(root / "cache"))
    mp.setattr(in_training, "evaluate_samples", spy)
    mp.setattr(encoders.FrozenTextEncoder, "apply", apply_spy)
    state = trainer.train(config, str(root / "run"))
  return config, str(root / "run"), state, calls, encoded


def test_frozen_clip_trains_without_its_weights_in_state_or_checkpoint(trained):
  config, workdir, state, _, encoded = trained
  assert int(state.step) == 2 and int(state.nonfinite_total) == 0
  # The step encoded the batch's captions (the sampler: prompts + negative prompts).
  assert (config.data.batch_size, config.data.caption_max_len) in encoded
  assert (2 * len(config.sample.prompts), config.data.caption_max_len) in encoded
  losses = _scalars(os.path.join(workdir, "tensorboard"), "loss")
  assert sorted(losses) == [1, 2] and all(np.isfinite(v) for v in losses.values())
  assert list(state.params.keys()) == ["dit"]
  dit_only = nnx.state(nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0))), nnx.Param)
  assert sum(x.size for x in jax.tree.leaves(state.params)) == sum(
      x.size for x in jax.tree.leaves(dit_only))

  # What orbax wrote: parameters, EMA and Adam moments of the DiT only.
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(os.path.join(workdir, "checkpoints", "2", "state"))
  meta = getattr(meta, "item_metadata", meta)
  paths = ["/".join(str(getattr(k, "key", k)) for k in p)
           for p, _ in jax.tree_util.tree_flatten_with_path(getattr(meta, "tree", meta))[0]]
  assert any("dit" in p for p in paths)
  assert not [p for p in paths if "text" in p and "dit" not in p], paths
  shapes = {tuple(x.shape) for x in jax.tree.leaves(getattr(meta, "tree", meta))}
  assert (54, WIDTH) not in shapes  # the encoder's token table


def test_training_samples_and_evaluates_with_the_frozen_encoder(trained):
  config, workdir, _, calls, _ = trained
  assert len(glob.glob(os.path.join(workdir, "samples", "step_000002_*.mp4"))) == len(
      config.sample.prompts)
  # One evaluation at step 2, on the clips just sampled, logged as returned.
  (videos, audios, meta, metrics, values), = calls
  d = config.data
  assert videos.shape == (len(config.sample.prompts), d.num_frames, d.height, d.width, 3)
  assert meta == {"fps": d.fps, "sample_rate": d.sample_rate} and metrics == ("sync", "temporal")
  wav = os.path.join(workdir, "samples", "step_000002_0.wav")
  from avgen.sample import media  # pylint: disable=g-import-not-at-top
  np.testing.assert_allclose(media.read_audio(wav, sample_rate=d.sample_rate), audios[0],
                             atol=1e-4)
  assert "eval/temporal_pixel_l1_consecutive_frames" in values
  for tag, value in values.items():
    assert _scalars(os.path.join(workdir, "tensorboard"), tag) == {2: pytest.approx(value)}


def test_generator_from_the_workdir_loads_the_frozen_encoder(trained, clip_dir):
  """load_generator rebuilds the encoder from the saved config (the trainer's run above already
  sampled through the same Generator code with its own encoder)."""
  _, workdir, _, _, _ = trained
  restored, generator, params = load_generator(workdir)
  assert restored.model.text_encoder_source == clip_dir and list(params.keys()) == ["dit"]
  assert generator.text_encoder is not None and generator.text_encoder.width == WIDTH
  ids, mask = generator.tokenizer(["a red circle", "a blue square"])
  np.testing.assert_array_equal(ids, _clip_tokenizer(77)(
      ["a red circle", "a blue square"], padding="max_length", max_length=16)["input_ids"])
  # The sampler's text inputs are the encoder's states of these ids (zero at padding).
  inputs = generator.text_inputs(generator.text_params, jnp.asarray(ids), jnp.asarray(mask))
  assert set(inputs) == {"text_states", "text_mask"}
  states = np.asarray(inputs["text_states"])
  ref = transformers.CLIPTextModel.from_pretrained(clip_dir).eval()
  with torch.no_grad():
    want = ref(input_ids=torch.tensor(ids, dtype=torch.long),
               attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()
  check("sampler text states", states * mask[..., None], want * mask[..., None])
  assert not states[~mask].any()


def test_the_step_takes_the_frozen_weights_as_an_argument(clip_dir):
  """Baked-in weights would show up in the compiled program as a constant holding their bytes."""
  config = _config(clip_dir)
  encoder = text_encoder_lib.build_frozen_text_encoder(config)
  mesh = mesh_lib.build_mesh(config, jax.devices()[:1])
  rules = tuple(tuple(r) for r in config.mesh.rules)
  tx = state_lib.build_optimizer(config.train)
  graphdef, rest, abstract = state_lib.abstract_state(config, tx)
  step = step_lib.make_train_step(config, graphdef, rest, tx, mesh, rules,
                                  state_lib.state_shardings(abstract, mesh, rules),
                                  mesh_lib.batch_sharding(mesh), text_encoder=encoder)
  shapes = config_lib.latent_shapes(config)
  b, length = config.data.batch_size, config.data.caption_max_len
  batch = {"video": jax.ShapeDtypeStruct((b,) + shapes["video"], jnp.float32),
           "audio": jax.ShapeDtypeStruct((b,) + shapes["audio"], jnp.float32),
           "text_ids": jax.ShapeDtypeStruct((b, length), jnp.int32),
           "text_mask": jax.ShapeDtypeStruct((b, length), jnp.bool_),
           "skipped_records": jax.ShapeDtypeStruct((b,), jnp.int32)}
  table = np.asarray(encoder.params["token_embedding"]["embedding"][...])
  fingerprint = table[:4].tobytes().hex()
  program = step.jitted.lower(abstract, batch, encoder.params).as_text().lower()
  assert fingerprint not in program
  main = next(line for line in program.splitlines() if "func.func public @main" in line)
  assert f"tensor<54x{WIDTH}xf32>" in main  # the token table is an argument of the program
  # The same search finds weights that are closed over (so the assertion above can fail).
  baked = jax.jit(lambda ids, mask: encoder.apply(encoder.params, ids, mask)).lower(
      jnp.zeros((1, length), jnp.int32), jnp.ones((1, length), bool)).as_text().lower()
  assert fingerprint in baked


def test_text_dropout_gives_the_frozen_tokenizers_empty_caption(clip_dir):
  config = _config(clip_dir)
  tokenizer = build_tokenizer(config)
  ids, mask = tokenizer(["a cat", "dog sat on a mat"])
  empty_ids, empty_mask = step_lib.empty_caption(tokenizer)
  np.testing.assert_array_equal(empty_ids[:2], [52, 53])  # <|startoftext|> <|endoftext|> pad...
  assert empty_mask.sum() == 2
  key = jax.random.key(0)
  drop = lambda p: step_lib._drop_text(  # pylint: disable=protected-access
      key, jnp.asarray(ids), jnp.asarray(mask), p, empty_ids, empty_mask)
  dropped, kept = drop(1.0), drop(0.0)
  np.testing.assert_array_equal(dropped[0], np.stack([empty_ids] * 2))
  np.testing.assert_array_equal(dropped[1], np.stack([empty_mask] * 2))
  np.testing.assert_array_equal(kept[0], ids)
  np.testing.assert_array_equal(kept[1], mask)
  # The byte encoder's empty caption is still [BOS, EOS].
  byte_ids, byte_mask = step_lib.empty_caption(ByteTokenizer(8))
  np.testing.assert_array_equal(byte_ids, [1, 2, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(byte_mask, byte_ids != 0)


def test_loader_tokenizes_captions_with_the_frozen_tokenizer(clip_dir, tmp_path):
  config = _config(clip_dir)
  paths = train_utils.make_shards(tmp_path, config, num_clips=2)
  record = schema.read_records(paths[0], 0, 1)[0]
  caption = schema.decode_example(record)["caption"]
  out = loader.ExampleTransform(config)(record)
  want = _clip_tokenizer(77)([caption], padding="max_length", max_length=16, truncation=True)
  np.testing.assert_array_equal(out["text_ids"], want["input_ids"][0])
  np.testing.assert_array_equal(out["text_mask"], np.asarray(want["attention_mask"][0], bool))


def test_config_errors_name_the_field_before_weights_are_read(clip_dir, tmp_path, monkeypatch):
  def no_weights(*args, **kwargs):
    raise AssertionError("weights were read before the config check")

  monkeypatch.setattr(pretrained, "load", no_weights)
  wide = _config(clip_dir)
  wide.model.text_width = 48
  with pytest.raises(ValueError, match=r"config.model.text_width=48 .* width 32"):
    text_encoder_lib.build_frozen_text_encoder(wide)
  long = _config(clip_dir)
  long.data.caption_max_len = 78
  with pytest.raises(ValueError, match=r"config.data.caption_max_len=78 .* 77 token positions"):
    text_encoder_lib.build_frozen_text_encoder(long)
  # The trainer checks before it makes any data.
  wide.data.path = ""
  with pytest.raises(ValueError, match="text_width"):
    trainer.train(wide, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "data")
  unknown = _config(clip_dir)
  unknown.model.text_encoder = "bert"
  with pytest.raises(config_lib.ConfigError, match="model.text_encoder"):
    config_lib.validate(unknown)

  # A model for a frozen encoder holds no text encoder, and tells a caller passing ids.
  model = nnx.eval_shape(lambda: build_model(_config(clip_dir), nnx.Rngs(0)))
  assert model.text_encoder is None
  assert not [p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)) if "text_encoder" in p]
  c = _config(clip_dir)
  shapes = config_lib.latent_shapes(c)
  args = (jnp.zeros((1,) + shapes["video"]), jnp.zeros((1,) + shapes["audio"]), jnp.zeros(1),
          jnp.zeros(1))
  with pytest.raises(ValueError, match="frozen and held outside the model"):
    model(*args, jnp.zeros((1, 16), jnp.int32), jnp.ones((1, 16), bool))
  with pytest.raises(ValueError, match="text_width=32"):
    model(*args, text_mask=jnp.ones((1, 16), bool), text_states=jnp.zeros((1, 16, 48)))


def test_t5_encoder_is_selected_by_config(tmp_path):
  """t5_encoder: the frozen states of the configured tokenizer's ids match T5EncoderModel."""
  # pylint: disable=g-import-not-at-top
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, processors
  vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
           + [("▁" + c, -1.0) for c in string.ascii_lowercase]
           + [(c, -2.0) for c in string.ascii_lowercase])
  tok = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=2))
  tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
  tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                     special_tokens=[("</s>", 1)])
  torch.manual_seed(0)
  cfg = transformers.T5Config(vocab_size=len(vocab), d_model=WIDTH, d_kv=8, d_ff=48, num_layers=2,
                              num_heads=4, feed_forward_proj="gated-gelu", is_encoder_decoder=False)
  ref = transformers.T5EncoderModel(cfg).eval()
  ref.save_pretrained(str(tmp_path / "t5"), safe_serialization=True)
  transformers.T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                               unk_token="<unk>", extra_ids=0,
                               model_max_length=512).save_pretrained(str(tmp_path / "tok"))
  config = ml_collections.ConfigDict({
      "model": {"text_encoder": "t5_encoder", "text_encoder_source": str(tmp_path / "t5"),
                "text_tokenizer_source": str(tmp_path / "tok"), "dtype": "float32",
                "text_width": WIDTH},
      "data": {"caption_max_len": 12}})
  encoder = text_encoder_lib.build_frozen_text_encoder(config, cache_dir=tmp_path / "cache")
  ids, mask = build_tokenizer(config)(["a cat", "a dog sat on a mat"])
  assert ids[0, :4].tolist() == [3, 5, 29, 48] and ids[0, 4] == 1 and mask.sum(1)[0] == 5
  states = np.asarray(encoder(jnp.asarray(ids), jnp.asarray(mask)))
  with torch.no_grad():
    want = ref(input_ids=torch.tensor(ids, dtype=torch.long),
               attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()
  check("t5 frozen states", states * mask[..., None], want * mask[..., None])
  config.data.caption_max_len = 600  # T5 positions are relative; its tokenizer says 512
  with pytest.raises(ValueError, match="model_max_length"):
    build_tokenizer(config)
