"""Exported inference: the jax.export sampler and denoiser, reloaded in a process that cannot
import avgen or flax, equal the in-process ones, also with a frozen CLIP text encoder (then
without transformers or torch too); int8 weights stay within their bound."""

import json
import os
import string
import subprocess
import sys
import textwrap
import types

import jax
import numpy as np
import pytest

from avgen.models.tokenizer import ByteTokenizer
from avgen.sample import api, export, exported_runtime, pipeline
from sample_utils import FAST_COMPILE, build_checkpoint, sample_config, shared_checkpoint

PROMPTS = ["a red circle bounces", "a blue square"]
SEEDS = [3, 4]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
  return api.load_pipeline(shared_checkpoint(tmp_path_factory), compiler_options=FAST_COMPILE)


@pytest.fixture(scope="module")
def reference(pipe):
  """The in-process latents for PROMPTS / SEEDS (the batch tests compile this program too)."""
  requests = [pipeline.Request(p, seed=s) for p, s in zip(PROMPTS, SEEDS)]
  video, audio, *_ = pipe.sample_latents(requests, num_inference_steps=2)
  return np.asarray(video), np.asarray(audio)


_RUN_WITHOUT_AVGEN = textwrap.dedent("""
    import sys
    import numpy as np
    for name in ("avgen", "flax", "orbax", "optax"):  # the model code must not be needed
      sys.modules[name] = None
    sys.path.insert(0, sys.argv[1])
    import avgen_exported
    sampler = avgen_exported.load(sys.argv[1], {{"xla_backend_optimization_level": 0}})
    video, audio = sampler.sample({prompts!r}, seeds={seeds!r})
    inputs = np.load(sys.argv[2])
    text = sampler.tokenize({prompts!r})
    negative = sampler.tokenize([""] * {n})
    dv, da = sampler.denoise(text, negative, inputs["video_t"], inputs["audio_t"], 0.7, 0.4,
                             guidance_video=2.0, guidance_audio=3.0)
    np.savez(sys.argv[3], video=video, audio=audio, dv=dv, da=da)
""")


def test_exported_sampler_runs_without_avgen_and_equals_the_pipeline(pipe, reference,
                                                                     tmp_path):
  directory = export.export_sampler(pipe, str(tmp_path / "exp"), batch_size=2,
                                    num_inference_steps=2)
  assert sorted(os.listdir(directory)) == sorted(
      ["sampler.jaxexport", "denoiser.jaxexport", "weights.npz", "meta.json",
       export.RUNTIME_NAME])
  rng = np.random.default_rng(0)
  variant = pipe._variant()  # pylint: disable=protected-access
  video_t = rng.normal(size=(2,) + variant.video_shape).astype(np.float32)
  audio_t = rng.normal(size=(2,) + variant.audio_shape).astype(np.float32)
  np.savez(tmp_path / "inputs.npz", video_t=video_t, audio_t=audio_t)
  script = _RUN_WITHOUT_AVGEN.format(prompts=PROMPTS, seeds=SEEDS, n=len(PROMPTS))
  env = dict(os.environ, PYTHONPATH="", XLA_FLAGS="", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script, directory, str(tmp_path / "inputs.npz"),
                         str(tmp_path / "out.npz")], cwd=str(tmp_path), env=env,
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(tmp_path / "out.npz")
  for name, ours, ref in zip(("video", "audio"), (got["video"], got["audio"]), reference):
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < 1e-5, f"{name}: exported vs in-process relative error {err:.2e}"

  text = pipe.text_inputs(PROMPTS)
  negative = pipe.text_inputs([""] * 2)
  args = (pipe.weights, text, negative, video_t, audio_t, np.full(2, 0.7, np.float32),
          np.full(2, 0.4, np.float32), np.full(2, 2.0, np.float32), np.full(2, 3.0, np.float32))
  dv, da = jax.jit(pipe.denoiser_fn()).lower(*args).compile(FAST_COMPILE)(*args)
  for ours, ref in ((got["dv"], dv), (got["da"], da)):
    ref = np.asarray(ref)
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()


def test_runtime_tokenizer_is_avgens():
  texts = ["", "a red circle", "ünïcode ♪ and a prompt longer than the twenty-four tokens"]
  ours = exported_runtime.byte_tokenize(texts, 24)
  ref = ByteTokenizer(24)(texts)
  np.testing.assert_array_equal(ours[0], ref[0])
  np.testing.assert_array_equal(ours[1], ref[1])


def test_int8_weights_within_half_a_step_and_the_export_close(pipe, reference, tmp_path):
  _, _, flat = export.flatten_params(pipe.weights)
  quantized = export.quantize_int8(flat, min_size=1024)
  n_quantized = 0
  for name, w in flat.items():
    entry = quantized[name]
    if w.ndim < 2 or w.size < 1024:
      assert entry is w
      continue
    n_quantized += 1
    assert entry["q"].dtype == np.int8 and entry["scale"].shape == (w.shape[-1],)
    error = np.abs(w - entry["q"].astype(np.float32) * entry["scale"])
    assert np.all(error <= entry["scale"] / 2 + 1e-7), name
  assert n_quantized >= 4

  int8_dir = export.export_sampler(pipe, str(tmp_path / "int8"), batch_size=2,
                                   num_inference_steps=2, quantize="int8", min_size=1024)
  with open(os.path.join(int8_dir, "meta.json")) as f:
    meta = json.load(f)
  f32_bytes = sum(w.nbytes for w in flat.values())
  assert meta["quantize"] == "int8" and meta["weight_bytes"] < 0.5 * f32_bytes
  got = export.load(int8_dir, FAST_COMPILE).sample(PROMPTS, seeds=SEEDS)
  for ours, r in zip(got, reference):
    err = np.abs(ours - r).max() / np.abs(r).max()
    assert 0 < err < 0.1, err  # changed (the weights did), but not far


# ---------------------------------------------------------------------------------------------
# Frozen pretrained text encoders


def _clip_tokenizer(max_len):
  import transformers  # pylint: disable=g-import-not-at-top
  letters = string.ascii_lowercase
  vocab = {c: i for i, c in enumerate(letters)}
  vocab.update({c + "</w>": 26 + i for i, c in enumerate(letters)})
  vocab.update({"<|startoftext|>": 52, "<|endoftext|>": 53})
  return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_len)


@pytest.fixture(scope="module")
def frozen_pipe(tmp_path_factory):
  """A pipeline whose model reads a tiny random CLIP text tower (saved as transformers does)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("frozen_export")
  torch.manual_seed(0)
  cfg = transformers.CLIPTextConfig(
      vocab_size=54, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
      num_attention_heads=4, max_position_embeddings=77, bos_token_id=52, eos_token_id=53,
      pad_token_id=53)
  transformers.CLIPTextModel(cfg).save_pretrained(str(root / "clip"), safe_serialization=True)
  _clip_tokenizer(77).save_pretrained(str(root / "clip"))
  config = sample_config()
  config.model.text_encoder, config.model.text_encoder_source = "clip_text", str(root / "clip")
  config.data.caption_max_len = 16
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("AVGEN_PRETRAINED_CACHE", str(root / "cache"))
    ckpt = build_checkpoint(root / "ckpt", config)
    yield pipeline.AudioVideoGenerationPipeline.from_pretrained(
        ckpt, compiler_options=FAST_COMPILE)


_RUN_FROZEN_WITHOUT_AVGEN = textwrap.dedent("""
    import sys
    import numpy as np
    for name in ("avgen", "flax", "orbax", "optax", "transformers", "torch"):
      sys.modules[name] = None
    sys.path.insert(0, sys.argv[1])
    import avgen_exported
    sampler = avgen_exported.load(sys.argv[1], {{"xla_backend_optimization_level": 0}})
    video, audio = sampler.sample({prompts!r}, seeds={seeds!r})
    ids, mask = sampler.tokenize({prompts!r})
    np.savez(sys.argv[2], video=video, audio=audio, ids=ids, mask=mask)
""")


def test_export_with_a_frozen_text_encoder_runs_without_the_model_code(frozen_pipe, tmp_path):
  pipe = frozen_pipe
  requests = [pipeline.Request(p, seed=s) for p, s in zip(PROMPTS, SEEDS)]
  video, audio, *_ = pipe.sample_latents(requests, num_inference_steps=2)
  reference = np.asarray(video), np.asarray(audio)
  directory = export.export_sampler(pipe, str(tmp_path / "exp"), batch_size=2,
                                    num_inference_steps=2)
  assert export.TOKENIZER_NAME in os.listdir(directory)
  with open(os.path.join(directory, "meta.json")) as f:
    meta = json.load(f)
  assert meta["tokenizer"]["kind"] == "hf" and meta["text_encoder"] == "clip_text"
  # The encoder's weights travel with the DiT's (its 54-token table among them).
  with np.load(os.path.join(directory, "weights.npz")) as weights:
    encoder = [n for n in weights.files if n.startswith("1/")]
    assert encoder and (54, 32) in {weights[n].shape for n in encoder}

  script = _RUN_FROZEN_WITHOUT_AVGEN.format(prompts=PROMPTS, seeds=SEEDS)
  env = dict(os.environ, PYTHONPATH="", XLA_FLAGS="", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script, directory, str(tmp_path / "out.npz")],
                        cwd=str(tmp_path), env=env, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(tmp_path / "out.npz")
  ids, mask = pipe.text_inputs(PROMPTS)
  np.testing.assert_array_equal(got["ids"], ids)
  np.testing.assert_array_equal(got["mask"], mask)
  for name, ours, ref in zip(("video", "audio"), (got["video"], got["audio"]), reference):
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < 1e-5, f"{name}: exported vs in-process relative error {err:.2e}"


def _t5_tokenizer(path):
  """A tiny T5-style (Unigram, Metaspace, </s> appended, <pad> = 0) fast tokenizer."""
  # pylint: disable=g-import-not-at-top
  import tokenizers
  import transformers
  from tokenizers import decoders, models, pre_tokenizers, processors
  vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
           + [("\u2581" + c, -1.0) for c in string.ascii_lowercase]
           + [(c, -2.0) for c in string.ascii_lowercase])
  tok = tokenizers.Tokenizer(models.Unigram(vocab, unk_id=2))
  tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
  tok.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                     special_tokens=[("</s>", 1)])
  transformers.T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                               unk_token="<unk>", extra_ids=0,
                               model_max_length=512).save_pretrained(str(path))
  return str(path)


def _fake_pipe(tokenizer, kind, max_len):
  config = types.SimpleNamespace(model=types.SimpleNamespace(text_encoder=kind),
                                 data=types.SimpleNamespace(caption_max_len=max_len))
  return types.SimpleNamespace(config=config, tokenizer=tokenizer)


def test_exported_tokenizers_match_the_pipelines_or_are_left_out(tmp_path, caplog):
  from avgen.pretrained.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  cases = [("clip_text", _clip_tokenizer(77), 16), ("t5_encoder", None, 12)]
  for kind, hf, max_len in cases:
    source = str(tmp_path / kind)
    if hf is None:
      _t5_tokenizer(source)
    else:
      hf.save_pretrained(source)
    ours = load_tokenizer(source, max_len, cache_dir=tmp_path / "cache")
    directory = tmp_path / f"exp_{kind}"
    directory.mkdir()
    entry = export.export_tokenizer(_fake_pipe(ours, kind, max_len), str(directory))
    assert entry["kind"] == "hf", kind
    runtime = exported_runtime.ExportedSampler.__new__(exported_runtime.ExportedSampler)
    runtime.directory, runtime.meta, runtime._hf_tokenizer = (  # pylint: disable=protected-access
        str(directory), {"tokenizer": entry}, None)
    texts = ["a cat", "", "THE Dog sat; on a mat", "x " * 50]
    for got, want in zip(runtime.tokenize(texts), ours(texts)):
      np.testing.assert_array_equal(got, want)

  # A tokenizer that does more than its fast backend (here: lower-cases first) is not exported
  # as tokenizer.json; the export says so and the runtime asks for token ids.
  class Lowering(type(ours)):
    def __call__(self, texts):
      return super().__call__([t.lower() for t in texts])

  lowering = Lowering(ours.hf, ours.max_len)
  directory = tmp_path / "exp_differs"
  directory.mkdir()
  (directory / export.TOKENIZER_NAME).write_text("{}")  # a stale one from an earlier export
  entry = export.export_tokenizer(_fake_pipe(lowering, "t5_encoder", 12), str(directory))
  assert entry["kind"] == "external" and not os.listdir(directory)
  assert "does not reproduce" in caplog.text
  runtime.meta = {"tokenizer": entry}
  with pytest.raises(ValueError, match="sample_tokens"):
    runtime.tokenize(["a cat"])
