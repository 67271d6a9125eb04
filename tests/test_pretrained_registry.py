"""avgen.pretrained: safetensors reading, weight assignment checks, sources, cache and CLI."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from avgen import pretrained
from avgen.pretrained import __main__ as cli
from avgen.pretrained import clip_text, hub
from avgen.pretrained.safetensors_io import (CheckpointError, Tensors, assign, read_safetensors_dir,
                                             read_safetensors_file)
from tests.pretrained_utils import run, save

IDS = jnp.asarray([[0, 5, 7, 19, 19, 19], [0, 3, 4, 6, 8, 19]], jnp.int32)
MASK = IDS != 19


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  torch.manual_seed(0)
  cfg = transformers.CLIPTextConfig(vocab_size=20, hidden_size=16, intermediate_size=24,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    max_position_embeddings=6, bos_token_id=0, eos_token_id=19,
                                    pad_token_id=19)
  return save(transformers.CLIPTextModel(cfg), tmp_path_factory.mktemp("clip"))


def _states(module):
  return np.asarray(run(module, IDS, MASK).last_hidden_state)


def test_read_safetensors_bf16_and_sharded_index(tmp_path):
  a = np.arange(6, dtype=np.float32).reshape(2, 3)
  b = np.array([1.5, -2.25], dtype=ml_dtypes.bfloat16)
  safetensors.numpy.save_file({"a": a}, str(tmp_path / "m-00001-of-00002.safetensors"))
  (tmp_path / "m-00002-of-00002.safetensors").write_bytes(_bf16_file({"b": b}))
  index = {"weight_map": {"a": "m-00001-of-00002.safetensors", "b": "m-00002-of-00002.safetensors"}}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  # A half-precision variant beside the full files must not be mixed in.
  safetensors.numpy.save_file({"a": a.astype(np.float16)}, str(tmp_path / "m.fp16.safetensors"))
  got = read_safetensors_dir(tmp_path)
  assert sorted(got) == ["a", "b"]
  np.testing.assert_array_equal(got["a"], a)
  assert got["b"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got["b"].astype(np.float32), [1.5, -2.25])


def _bf16_file(tensors):
  """A safetensors file written by hand (safetensors.numpy cannot write bfloat16)."""
  header, blobs, offset = {}, [], 0
  for k, v in tensors.items():
    raw = np.ascontiguousarray(v).tobytes()
    header[k] = {"dtype": "BF16", "shape": list(v.shape),
                 "data_offsets": [offset, offset + len(raw)]}
    blobs.append(raw)
    offset += len(raw)
  h = json.dumps(header).encode()
  return len(h).to_bytes(8, "little") + h + b"".join(blobs)


def test_truncated_safetensors_file_is_reported(tmp_path):
  safetensors.numpy.save_file({"w": np.ones((4, 4), np.float32)}, str(tmp_path / "m.safetensors"))
  data = (tmp_path / "m.safetensors").read_bytes()
  (tmp_path / "m.safetensors").write_bytes(data[:-8])
  with pytest.raises(CheckpointError, match="truncated"):
    read_safetensors_file(tmp_path / "m.safetensors")


def test_assign_lists_missing_unexpected_and_misshaped():
  abstract = nnx.eval_shape(lambda: nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
  with pytest.raises(CheckpointError) as e:
    assign(abstract, {"kernel": np.zeros((2, 3)), "extra": np.zeros(1)}, what="x")
  msg = str(e.value)
  assert "['bias']" in msg and "['extra']" in msg
  assert "kernel: checkpoint (2, 3) vs model (3, 2)" in msg
  m = assign(abstract, {"kernel": np.ones((3, 2)), "bias": np.arange(2.0)}, what="x")
  np.testing.assert_allclose(m(jnp.ones((1, 3))), [[3.0, 4.0]])


def test_unused_checkpoint_tensors_are_an_error(clip_dir, tmp_path):
  tensors = read_safetensors_file(clip_dir / "model.safetensors")
  tensors = {k: np.array(v) for k, v in tensors.items()}
  tensors["encoder.layers.0.mlp.fc3.weight"] = np.zeros((2, 2), np.float32)
  path = tmp_path / "extra"
  path.mkdir()
  (path / "config.json").write_text((clip_dir / "config.json").read_text())
  safetensors.numpy.save_file(tensors, str(path / "model.safetensors"))
  with pytest.raises(CheckpointError, match="not used by the conversion: encoder.layers.0.mlp.fc3"):
    pretrained.load("clip_text", path, cache=False)
  t = Tensors({"p.a": np.zeros(1), "p.b": np.zeros(1)}, what="t").with_prefix(["q.", "p."], "a")
  t["a"]
  assert t.unused() == ["p.b"] and t.unused(ignore=[r"\.b$"]) == []


def test_pickle_only_directory_is_refused(clip_dir, tmp_path):
  path = tmp_path / "pickled"
  path.mkdir()
  (path / "config.json").write_text((clip_dir / "config.json").read_text())
  torch.save({"w": torch.zeros(2)}, path / "pytorch_model.bin")
  with pytest.raises(CheckpointError, match=r"only pickle checkpoints \(pytorch_model.bin\)"):
    pretrained.load("clip_text", path, cache_dir=tmp_path / "cache")
  assert not (tmp_path / "cache").exists()  # refused before any conversion or cache write
  (path / "pytorch_model.bin").unlink()
  with pytest.raises(CheckpointError, match="no \\*.safetensors"):
    pretrained.load("clip_text", path, cache=False)


def test_bad_sources_and_kinds(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="not one of"):
    pretrained.load("clip", tmp_path)
  with pytest.raises(ValueError, match="neither an existing directory nor a hub id"):
    pretrained.load("clip_text", "no/such/dir with spaces")
  (tmp_path / "f.json").write_text("{}")
  with pytest.raises(ValueError, match="is a file"):
    pretrained.load("clip_text", tmp_path / "f.json")
  assert hub.parse_hub_id("stabilityai/sd-2/vae@v1.0") == ("stabilityai/sd-2", "vae", "v1.0")
  assert hub.parse_hub_id("openai/clip-vit-large-patch14") == (
      "openai/clip-vit-large-patch14", None, None)
  # The real download path, offline: it fails with advice instead of a bare network error.
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(RuntimeError, match="downloading it as hub repo 'avgen-test/none'"):
    pretrained.load("clip_text", "avgen-test/none", cache_dir=tmp_path / "cache")


def test_cache_restores_without_converting(clip_dir, tmp_path, monkeypatch):
  cache = tmp_path / "cache"
  first = pretrained.load("clip_text", clip_dir, cache_dir=cache)
  entries = list((cache / "clip_text").iterdir())
  assert len(entries) == 1 and (entries[0] / pretrained.MARKER).is_file()

  def no_conversion(*_):
    raise AssertionError("converted again instead of restoring the cache")

  monkeypatch.setattr(clip_text, "load_from_dir", no_conversion)
  second = pretrained.load("clip_text", clip_dir, cache_dir=cache)
  np.testing.assert_array_equal(_states(first), _states(second))
  # The cache keys on dtype: a bfloat16 load is a different entry (and would convert).
  with pytest.raises(AssertionError, match="converted again"):
    pretrained.load("clip_text", clip_dir, dtype=jnp.bfloat16, cache_dir=cache)


def test_damaged_cache_entry_is_rebuilt(clip_dir, tmp_path):
  cache = tmp_path / "cache"
  first = _states(pretrained.load("clip_text", clip_dir, cache_dir=cache))
  (entry,) = (cache / "clip_text").iterdir()
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(entry / "state")
  again = pretrained.load("clip_text", clip_dir, cache_dir=cache)
  np.testing.assert_array_equal(_states(again), first)
  assert (entry / "state").is_dir()  # converted again and saved afresh


def test_bfloat16_load_is_close_to_float32(clip_dir):
  f32 = pretrained.load("clip_text", clip_dir, cache=False)
  bf16 = pretrained.load("clip_text", clip_dir, dtype=jnp.bfloat16, cache=False)
  assert {x.dtype for x in jax.tree.leaves(nnx.state(bf16))} == {jnp.dtype(jnp.bfloat16)}
  a, b = _states(f32), _states(bf16).astype(np.float32)
  assert np.max(np.abs(a - b)) / np.max(np.abs(a)) < 3e-2


def test_convert_cli_then_load_the_converted_dir(clip_dir, tmp_path, capsys):
  out = tmp_path / "converted"
  args = ["convert", "--kind", "clip_text", "--source", str(clip_dir), "--out", str(out)]
  assert cli.main(args) == 0
  assert "converted clip_text" in capsys.readouterr().out
  assert (out / pretrained.MARKER).is_file() and not list(out.glob("*.safetensors"))
  reference = pretrained.load("clip_text", clip_dir, cache=False)
  np.testing.assert_array_equal(_states(pretrained.load("clip_text", out)), _states(reference))
  with pytest.raises(CheckpointError, match="holds a converted 'clip_text'"):
    pretrained.load("t5_encoder", out)
  with pytest.raises(FileExistsError):
    pretrained.convert("clip_text", clip_dir, out)


def test_fetch_cli_converts_into_the_cache(clip_dir, tmp_path, capsys):
  cache = tmp_path / "cache"
  rc = cli.main(["fetch", "--kind", "clip_text", "--source", str(clip_dir),
                 "--cache-dir", str(cache)])
  assert rc == 0 and "ok clip_text" in capsys.readouterr().out
  assert list((cache / "clip_text").glob(f"*/{pretrained.MARKER}"))
  with pytest.raises(SystemExit):
    cli.main(["fetch", "--cache-dir", str(cache)])  # neither --all nor --kind


def test_every_kind_names_a_default_source():
  mine = ("clip_text", "clip_vision", "t5_encoder", "wav2vec2", "videomae")
  sources = pretrained.default_sources()
  for kind in mine:
    assert hub.parse_hub_id(sources[kind]) is not None, kind


def _tiny_clip_tokenizer(max_len=8):
  vocab = {c: i for i, c in enumerate("abc")}
  vocab.update({c + "</w>": 3 + i for i, c in enumerate("abc")})
  vocab.update({"<|startoftext|>": 6, "<|endoftext|>": 7})
  return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_len)


def test_tokenizer_only_hub_folder_loads(tmp_path, monkeypatch):
  """A hub (sub)folder holding only a tokenizer loads; only tokenizer files are asked for."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top

  from avgen.pretrained.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top

  snapshot = tmp_path / "snapshot"
  _tiny_clip_tokenizer().save_pretrained(str(snapshot / "tokenizer"))
  assert not list(snapshot.rglob("*.safetensors"))
  calls = []

  def fake_download(repo_id, revision=None, allow_patterns=None, cache_dir=None):
    calls.append((repo_id, revision, list(allow_patterns)))
    return str(snapshot)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
  tokenizer = load_tokenizer("owner/model/tokenizer@v1", 8, cache_dir=tmp_path / "cache")
  ids, mask = tokenizer(["ab", "c"])
  assert ids.shape == (2, 8) and mask[0].sum() == 4  # start, a, b, end
  assert ids[0, 0] == 6 and ids[0, 3] == 7
  assert calls == [("owner/model", "v1", [f"tokenizer/{p}" for p in hub.TOKENIZER_PATTERNS])]
  assert not any("safetensors" in p for p in calls[0][2])  # no weights downloaded for it
  # Weights from the same folder are still refused: there are none.
  with pytest.raises(RuntimeError, match=r"no \*\.safetensors"):
    pretrained.load("clip_text", "owner/model/tokenizer@v1", cache_dir=tmp_path / "cache")


def test_shape_signature_names_the_frozen_text_encoder_source():
  """Checkpoints of a DiT trained on one frozen encoder's states must not resume on another's."""
  from avgen.train.checkpoints import shape_signature  # pylint: disable=g-import-not-at-top
  from configs.base import get_base_config  # pylint: disable=g-import-not-at-top

  byte = get_base_config("demo")
  assert "model.text_encoder_source" not in shape_signature(byte)  # trained, saved with it
  a, b = get_base_config("demo"), get_base_config("demo")
  for c, source in ((a, "/ckpt/clip-a"), (b, "owner/clip-b")):
    c.model.text_encoder, c.model.text_encoder_source = "clip_text", source
  assert shape_signature(a)["model.text_encoder_source"] == "/ckpt/clip-a"
  assert shape_signature(a) != shape_signature(b)
  # "" means the kind's default source, the same weights as naming it.
  a.model.text_encoder_source = ""
  b.model.text_encoder_source = clip_text.DEFAULT_SOURCE
  assert shape_signature(a) == shape_signature(b)
