"""The trainer's in-training evaluation hook, its config fields, and the eval job's CLIP score
(avgen's CLIP ports against a tiny random transformers CLIPModel)."""

import glob
import json
import logging
import os
import string
import struct

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from tensorboardX.proto import event_pb2

from avgen import config as config_lib
from avgen.metrics import in_training, weights as weights_lib
from avgen.models.encoders.clip import preprocess_images
from avgen.sample import media
from avgen.sample.generate import Clip
from avgen.train import metrics as metrics_lib, trainer
from configs import stage2
from data_pipeline import synthetic
from eval import data as eval_data, extractors, run as eval_run
from tests.pretrained_utils import check


def _scalars(logdir):
  """{tag: {step: value}} from tensorboardX event files (TFRecord framing)."""
  out = {}
  for path in sorted(glob.glob(os.path.join(logdir, "*tfevents*"))):
    data, pos = open(path, "rb").read(), 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        out.setdefault(v.tag, {})[event.step] = v.simple_value
  return out


def _synthetic_clips(config, count=3, seed=0):
  d, rng = config.data, np.random.default_rng(seed)
  clips = []
  for _ in range(count):
    ex = synthetic.make_clip(rng, num_frames=16, height=32, width=32, fps=float(d.fps),
                             sample_rate=d.sample_rate)
    clips.append(Clip(video=ex["video"], audio=ex["audio"], fps=d.fps,
                      sample_rate=d.sample_rate))
  return clips


def test_eval_config_fields_and_rules():
  demo, big = stage2.get_config("demo"), stage2.get_config("size=B")
  assert (demo.eval.every, tuple(demo.eval.metrics)) == (300, ("sync", "temporal"))
  assert demo.eval.every % demo.sample.every == 0  # evaluates the samples it writes anyway
  assert set(big.eval.metrics) <= set(in_training.KNOWN_METRICS)
  for field, value in (("every", -1), ("metrics", ("sync", "fad")), ("metrics", ())):
    c = stage2.get_config("demo")
    c.eval[field] = value
    with pytest.raises(config_lib.ConfigError, match=rf"config\.eval\.{field}"):
      config_lib.validate(c)
  # A config saved before the eval section existed (e.g. in an old checkpoint) still validates.
  old = stage2.get_config("demo")
  del old["eval"]
  config_lib.validate(old)
  assert trainer.eval_interval(old) == 0
  c = stage2.get_config("demo")
  c.eval.lpips_weights = "/nowhere/lpips_alex.pth"
  with pytest.raises(ValueError, match="config.eval.lpips_weights"):
    trainer._load_lpips(c)  # pylint: disable=protected-access


def test_hook_logs_the_scores_of_the_sampled_clips(tmp_path):
  config = stage2.get_config("demo")
  config.data.num_frames, config.data.audio_seconds = 16, 2.0
  clips = _synthetic_clips(config)
  writer = metrics_lib.Writer(str(tmp_path))
  values = trainer.evaluate_clips(clips, config, 300, writer, primary=True)
  writer.close()
  # Real synthetic clips are in sync: the event score is exactly 1.
  assert values["eval/sync_score"] == 1.0
  assert values["eval/sync_f1_within_1_frame"] == 1.0
  assert 0 < values["eval/temporal_pixel_l1_consecutive_frames"] < 1
  assert "eval/av_align" not in values  # not among the demo's eval.metrics
  logged = _scalars(str(tmp_path / "tensorboard"))
  assert {tag: steps for tag, steps in logged.items() if tag.startswith("eval/")} == {
      tag: {300: pytest.approx(v)} for tag, v in values.items()}

  # Audio two frames late: the hook reports the loss of sync.
  late = [Clip(video=c.video, audio=np.roll(c.audio, 2 * config.data.sample_rate // 8),
               fps=c.fps, sample_rate=c.sample_rate) for c in clips]
  shifted = trainer.evaluate_clips(late, config, 600, metrics_lib.Writer(str(tmp_path / "b")),
                                   primary=True)
  assert shifted["eval/sync_score"] < 0.6


def test_hook_runs_on_process_zero_only_and_never_stops_training(tmp_path, monkeypatch, caplog):
  config = stage2.get_config("demo")
  clips = _synthetic_clips(config, count=1)
  called = []
  monkeypatch.setattr(in_training, "evaluate_samples", lambda *a, **k: called.append(1) or {})
  writer = metrics_lib.Writer(str(tmp_path / "other"), enabled=False)
  assert trainer.evaluate_clips(clips, config, 300, writer, primary=False) == {}
  assert not called

  def broken(*args, **kwargs):
    raise RuntimeError("metric exploded")

  monkeypatch.setattr(in_training, "evaluate_samples", broken)
  writer = metrics_lib.Writer(str(tmp_path / "primary"))
  with caplog.at_level(logging.ERROR):
    assert trainer.evaluate_clips(clips, config, 300, writer, primary=True) == {}
  writer.close()
  assert any("evaluation failed" in r.getMessage() for r in caplog.records)
  assert "metric exploded" in caplog.text
  logged = _scalars(str(tmp_path / "primary" / "tensorboard"))
  assert not [t for t in logged if t.startswith("eval/")]


# ---- CLIP score in the eval job ---------------------------------------------------------------

def _clip_tokenizer():
  letters = string.ascii_lowercase
  vocab = {c: i for i, c in enumerate(letters)}
  vocab.update({c + "</w>": 26 + i for i, c in enumerate(letters)})
  vocab.update({"<|startoftext|>": 52, "<|endoftext|>": 53})
  return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=12)


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory):
  """A tiny CLIPModel (both towers, projections) and its tokenizer, saved by transformers."""
  torch.manual_seed(0)
  text = dict(vocab_size=54, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=12, bos_token_id=52,
              eos_token_id=53, pad_token_id=53)
  vision = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                image_size=16, patch_size=4)
  model = transformers.CLIPModel(transformers.CLIPConfig(
      text_config=text, vision_config=vision, projection_dim=24)).eval()
  path = tmp_path_factory.mktemp("clip_model")
  model.save_pretrained(str(path), safe_serialization=True)
  _clip_tokenizer().save_pretrained(str(path))
  return model, str(path)


def _torch_clip_score(model, videos, captions):
  """Mean over clips of the mean over frames of cos(image, caption), computed by transformers
  on the pixels our preprocessing makes (the resize is ours; the networks are theirs)."""
  tok = _clip_tokenizer()(captions, padding="max_length", max_length=12, truncation=True,
                          return_tensors="pt")
  with torch.no_grad():
    text = model.get_text_features(input_ids=tok["input_ids"],
                                   attention_mask=tok["attention_mask"])
    text = getattr(text, "pooler_output", text)
    per_clip = []
    for i, video in enumerate(videos):
      pixels = np.asarray(preprocess_images(jnp.asarray(video), 16)).transpose(0, 3, 1, 2)
      image = model.get_image_features(pixel_values=torch.tensor(pixels))
      image = getattr(image, "pooler_output", image)
      per_clip.append(torch.nn.functional.cosine_similarity(image, text[i:i + 1]).mean().item())
  return float(np.mean(per_clip)), per_clip


def test_clip_extractor_matches_transformers(clip_model, tmp_path, monkeypatch):
  model, path = clip_model
  monkeypatch.setenv("AVGEN_PRETRAINED_CACHE", str(tmp_path / "cache"))
  ex = extractors.clip({"clip": path}, download=False, batch_size=4)
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 256, (6, 20, 24, 3), dtype=np.uint8)  # 6 frames: one padded batch
  captions = ["a red ball", "two cats", "the quick brown fox jumps over the lazy dog"]
  tok = _clip_tokenizer()(captions, padding="max_length", max_length=12, truncation=True,
                          return_tensors="pt")
  pixels = np.asarray(preprocess_images(jnp.asarray(frames), 16)).transpose(0, 3, 1, 2)
  with torch.no_grad():
    want_text = model.get_text_features(input_ids=tok["input_ids"],
                                        attention_mask=tok["attention_mask"])
    want_image = model.get_image_features(pixel_values=torch.tensor(pixels))
  check("clip text embeds", ex.embed["text"](captions),
        getattr(want_text, "pooler_output", want_text))
  check("clip image embeds", ex.embed["image"](frames),
        getattr(want_image, "pooler_output", want_image))
  assert "CLIP" in ex.name and "clip_model" in ex.name


def test_eval_job_reports_the_clip_score(clip_model, tmp_path, monkeypatch):
  model, path = clip_model
  monkeypatch.setenv("AVGEN_PRETRAINED_CACHE", str(tmp_path / "cache"))
  monkeypatch.delenv(weights_lib.ENV_DIR, raising=False)
  folder = tmp_path / "generated"
  folder.mkdir()
  rng = np.random.default_rng(1)
  captions = {"a": "a red ball", "b": "green squares"}
  for name, caption in captions.items():
    media.write_mp4(str(folder / f"{name}.mp4"), rng.integers(0, 256, (4, 16, 16, 3), np.uint8), 8)
    (folder / f"{name}.txt").write_text(caption)
  out = str(tmp_path / "report.json")
  report = eval_run.main(["--generated", str(folder), "--metrics", "clip", "--weights",
                          f"clip={path}", "--out", out, "--no-progress"])
  clips = eval_data.load_clip_set(str(folder), progress=False).clips
  want, want_per_clip = _torch_clip_score(model, [c.video for c in clips],
                                          [c.caption for c in clips])
  assert report["clip"]["score"] == pytest.approx(want, abs=1e-5)
  assert list(report["clip"]["per_clip"].values()) == pytest.approx(want_per_clip, abs=1e-5)
  assert "CLIP" in report["clip"]["embedding_model"]
  assert json.load(open(out))["clip"]["score"] == pytest.approx(want, abs=1e-5)

  # Without weights the job stops before reading clips and says how to provide them.
  with pytest.raises(SystemExit, match=r"clip.*--weights clip=PATH"):
    eval_run.main(["--generated", str(folder), "--metrics", "clip", "--out", out,
                   "--no-progress"])
