"""Flax ports of the evaluation feature extractors vs their PyTorch originals (same weights,
float32): LPIPS (lpips 0.1.4), VGGish (torchvggish 0.2), CLAP (transformers ClapModel, unfused
and fused). I3D is in test_eval_i3d.py."""

import json
import os
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from avgen.metrics import temporal  # pylint: disable=g-import-not-at-top
# pylint: disable-next=g-import-not-at-top
from avgen.metrics.nets import clap, common, lpips as lpips_port, vggish


# ---------------------------------------------------------------------------------------------
# LPIPS


def _alexnet_features():
  """torchvision's AlexNet `features` layout (lpips takes its trunk from torchvision, whose CPU
  build cannot be installed next to this torch; the lpips code itself is the original)."""
  nn = torch.nn
  return nn.Sequential(
      nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(True), nn.MaxPool2d(3, 2),
      nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(True), nn.MaxPool2d(3, 2),
      nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(True), nn.Conv2d(384, 256, 3, padding=1),
      nn.ReLU(True), nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(3, 2))


@pytest.fixture(scope="module")
def lpips_reference():
  """lpips.LPIPS(net='alex') with a random trunk and the package's v0.1 lin weights."""
  models = types.ModuleType("torchvision.models")

  def alexnet(pretrained=False, **unused):
    assert not pretrained
    net = torch.nn.Module()
    net.features = _alexnet_features()
    return net

  models.alexnet = alexnet
  package = types.ModuleType("torchvision")
  package.models = models
  saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.models")}
  sys.modules.update({"torchvision": package, "torchvision.models": models})
  try:
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(0)
    return lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v


def _nchw(x):
  return torch.tensor(x).permute(0, 3, 1, 2)


def test_lpips_port_matches_the_lpips_package(lpips_reference, tmp_path):
  whole = tmp_path / "lpips_alex.pth"
  torch.save(lpips_reference.state_dict(), whole)
  # The other accepted layout: a torchvision AlexNet state dict + the package's lin file.
  trunk = tmp_path / "alexnet.pth"
  state = lpips_reference.state_dict()
  features = {}
  for index, part in zip((0, 3, 6, 8, 10), ("slice1", "slice2", "slice3", "slice4", "slice5")):
    for kind in ("weight", "bias"):
      features[f"features.{index}.{kind}"] = state[f"net.{part}.{index}.{kind}"]
  features["classifier.1.weight"] = torch.zeros(4, 9216)  # present in torchvision's file
  torch.save(features, trunk)

  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
  x1 = np.clip(x0 + 0.2 * rng.standard_normal(x0.shape), -1, 1).astype(np.float32)
  with torch.no_grad():
    expected = lpips_reference(_nchw(x0), _nchw(x1)).numpy().ravel()
  for model in (lpips_port.load_lpips(str(whole)), lpips_port.load_lpips(str(trunk))):
    np.testing.assert_allclose(np.asarray(model(x0, x1)), expected, rtol=1e-4)


def test_lpips_temporal_consistency_pairs_every_consecutive_frame(lpips_reference, tmp_path):
  path = tmp_path / "lpips_alex.pth"
  torch.save(lpips_reference.state_dict(), path)
  model = lpips_port.load_lpips(str(path))
  rng = np.random.default_rng(1)
  video = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
  frames = video.astype(np.float32) / 127.5 - 1
  with torch.no_grad():
    expected = lpips_reference(_nchw(frames[:-1]), _nchw(frames[1:])).numpy().mean()
  for batch_size in (3, 64):  # batch boundaries must not drop or misalign a pair
    result = temporal.lpips_consistency([video], model, batch_size=batch_size)
    assert result["score"] == pytest.approx(float(expected), rel=1e-4)
  still = temporal.lpips_consistency([np.repeat(video[:1], 4, 0)], model)
  assert still["score"] == pytest.approx(0.0, abs=1e-6) and not still["fallback"]


# ---------------------------------------------------------------------------------------------
# VGGish


@pytest.fixture(scope="module")
def vggish_reference(tmp_path_factory):
  """torchvggish's VGG (random weights, no download) and its state dict file."""
  tv = pytest.importorskip("torchvggish.torchvggish")
  torch.manual_seed(0)
  model = tv._vgg(postprocess=False).eval()  # pylint: disable=protected-access
  path = tmp_path_factory.mktemp("vggish") / "vggish.pth"
  torch.save(model.state_dict(), path)
  return model, str(path)


@pytest.mark.parametrize("rate", [16000, 22050])
def test_vggish_front_end_matches_torchvggish(rate):
  vggish_input = pytest.importorskip("torchvggish.vggish_input")
  audio = np.random.default_rng(rate).uniform(-0.5, 0.5, int(2.1 * rate))
  expected = vggish_input.waveform_to_examples(audio, rate, return_tensor=False)
  ours = vggish.log_mel_examples(audio, rate)
  assert ours.shape == expected.shape == (2, 96, 64)
  np.testing.assert_allclose(ours, expected, atol=1e-5)
  assert vggish.log_mel_examples(audio[:int(0.9 * rate)], rate).shape == (0, 96, 64)


def test_vggish_port_matches_torchvggish(vggish_reference, tmp_path):
  reference, path = vggish_reference
  tv = pytest.importorskip("torchvggish.torchvggish")
  pca = {"pca_eigen_vectors": torch.randn(128, 128) * 0.1, "pca_means": torch.randn(128, 1) * 0.01}
  torch.save(pca, tmp_path / "pca.pth")
  model = vggish.load_vggish(path, str(tmp_path / "pca.pth"))
  examples = vggish.log_mel_examples(np.random.default_rng(0).uniform(-0.5, 0.5, 32000), 16000)
  with torch.no_grad():
    x = torch.tensor(examples)[:, None]
    with_relu = reference(x).numpy()
    pre_relu = reference.embeddings[:-1](
        reference.features(x).permute(0, 2, 3, 1).reshape(len(x), -1)).numpy()
  scale = np.abs(pre_relu).max()
  np.testing.assert_allclose(np.asarray(model(examples, relu_output=True)), with_relu,
                             atol=1e-5 * scale)
  ours = np.asarray(model(examples))
  np.testing.assert_allclose(ours, pre_relu, atol=1e-5 * scale)
  assert (ours < 0).any()  # the FAD embedding keeps negative values (no final ReLU)
  post = tv.Postprocessor.__new__(tv.Postprocessor)  # its __init__ downloads the PCA file
  # pylint: disable-next=protected-access
  post._pca_matrix, post._pca_means = pca["pca_eigen_vectors"], pca["pca_means"]
  expected = post.postprocess(torch.tensor(pre_relu * 50)).numpy()
  np.testing.assert_array_equal(np.asarray(model.postprocess(pre_relu * 50)), expected)


def test_weights_with_a_wrong_layout_are_refused(lpips_reference, tmp_path):
  torch.save({"features.0.weight": torch.zeros(32, 1, 3, 3), "features.0.bias": torch.zeros(32)},
             tmp_path / "narrow.pth")
  expected = r"features\.0\.weight has shape \(32, 1, 3, 3\) .*expects \(3, 3, 1, 64\)"
  with pytest.raises(ValueError, match=expected):
    vggish.load_vggish(str(tmp_path / "narrow.pth"))
  state = dict(lpips_reference.state_dict(), **{"extra.weight": torch.zeros(1)})
  torch.save(state, tmp_path / "extra.pth")
  with pytest.raises(ValueError, match="not used.*extra.weight"):
    lpips_port.load_lpips(str(tmp_path / "extra.pth"))
  state = {k: v for k, v in lpips_reference.state_dict().items() if k != "lin2.model.1.weight"}
  torch.save(state, tmp_path / "missing.pth")
  with pytest.raises(KeyError, match="lin2.model.1.weight"):
    lpips_port.load_lpips(str(tmp_path / "missing.pth"))


# ---------------------------------------------------------------------------------------------
# CLAP


def _make_clap_folder(folder, fused=False):
  """A tiny random transformers ClapModel + processor saved with save_pretrained."""
  transformers = pytest.importorskip("transformers")
  if fused:  # the extractor's fusion shrinks mels to 64 bins, so the model takes 64
    audio = dict(window_size=4, num_mel_bins=64, spec_size=128, hidden_size=32, depths=[2, 2],
                 num_attention_heads=[2, 4], patch_embeds_hidden_size=16, enable_fusion=True)
  else:
    audio = dict(window_size=4, num_mel_bins=16, spec_size=32, hidden_size=32, depths=[2, 2],
                 num_attention_heads=[2, 4], patch_embeds_hidden_size=16)
  config = transformers.ClapConfig(
      text_config=dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37, max_position_embeddings=40),
      audio_config=audio, projection_dim=24)
  torch.manual_seed(0)
  model = transformers.ClapModel(config).eval()
  with torch.no_grad():  # move every weight and statistic off its initial value
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
    for module in model.audio_model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.normal_()
        module.running_var.uniform_(0.5, 2.0)
  model.save_pretrained(folder)
  vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
  vocab.update({c: 5 + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyzĠ")})
  tokenizer = transformers.RobertaTokenizer(vocab=vocab, merges=[])
  # 16 kHz and 1 s give 34 mel frames, within the tiny models' 64 / 256-frame inputs.
  features = transformers.ClapFeatureExtractor(feature_size=audio["num_mel_bins"],
                                               sampling_rate=16000, hop_length=480,
                                               max_length_s=1, frequency_max=8000)
  processor = transformers.ClapProcessor(feature_extractor=features, tokenizer=tokenizer)
  processor.save_pretrained(folder)
  return model, str(folder)


@pytest.fixture(scope="module")
def clap_folder(tmp_path_factory):
  return _make_clap_folder(tmp_path_factory.mktemp("clap"))


@pytest.fixture(scope="module")
def fused_clap_folder(tmp_path_factory):
  return _make_clap_folder(tmp_path_factory.mktemp("clap_fused"), fused=True)


def test_clap_port_matches_transformers(clap_folder):
  reference, folder = clap_folder
  model = clap.load_clap(folder)
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 40, (2, 22))
  mask = np.ones((2, 22), np.int64)
  ids[1, 15:], mask[1, 15:] = 1, 0  # a padded caption
  # 34 frames, stretched to the 64-frame input by bicubic resizing (as 10 s clips: 1001 -> 1024).
  features = rng.standard_normal((2, 1, 34, 16)).astype(np.float32)
  with torch.no_grad():
    expected = reference.get_audio_features(input_features=torch.tensor(features)).pooler_output
  np.testing.assert_allclose(np.asarray(clap.audio_embeddings(model, features)), expected.numpy(),
                             atol=2e-6)
  with torch.no_grad():
    expected = reference.get_text_features(input_ids=torch.tensor(ids),
                                           attention_mask=torch.tensor(mask)).pooler_output
  np.testing.assert_allclose(np.asarray(clap.text_embeddings(model, ids, mask)), expected.numpy(),
                             atol=2e-6)


def test_clap_encoders_match_the_original_pipeline(clap_folder):
  reference, folder = clap_folder
  encoders = clap.ClapEncoders(folder)
  rng = np.random.default_rng(1)
  # 16 kHz, as the tiny feature extractor: no resampling. One clip is repeat-padded.
  audios = [rng.uniform(-0.3, 0.3, 16000).astype(np.float32),
            rng.uniform(-0.3, 0.3, 12000).astype(np.float32)]
  captions = ["a red circle bounces", "a blue square"]
  features = encoders.processor.feature_extractor(
      audios, sampling_rate=16000, truncation="rand_trunc", padding="repeatpad",
      return_tensors="pt")["input_features"]
  tokens = encoders.processor.tokenizer(captions, padding=True, return_tensors="pt")
  assert tuple(features.shape) == (2, 1, 34, 16) and tuple(tokens["input_ids"].shape) == (2, 22)
  with torch.no_grad():
    expected_audio = reference.get_audio_features(input_features=features).pooler_output
    expected_text = reference.get_text_features(
        input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
  np.testing.assert_allclose(encoders.audio(audios, 16000), expected_audio.numpy(), atol=2e-6)
  text = encoders.text(captions)
  np.testing.assert_allclose(text, expected_text.numpy(), atol=2e-6)
  assert np.abs(text[0] - text[1]).max() > 1e-3  # the captions do tokenize differently


def test_fused_clap_port_matches_transformers(fused_clap_folder):
  reference, folder = fused_clap_folder
  model = clap.load_clap(folder)
  # Clip 0 is "longer": its three chunks (channels 1-3) are fused into the first channel's
  # patches; clip 1 is not, so only its first channel counts.
  features = np.random.default_rng(0).standard_normal((2, 4, 101, 64)).astype(np.float32)
  is_longer = np.array([True, False])
  with torch.no_grad():
    expected = reference.get_audio_features(
        input_features=torch.tensor(features),
        is_longer=torch.tensor(is_longer)[:, None]).pooler_output.numpy()
  ours = np.asarray(clap.audio_embeddings(model, features, is_longer))
  np.testing.assert_allclose(ours, expected, atol=2e-6)
  unfused = np.asarray(clap.audio_embeddings(model, features, np.array([False, False])))
  assert np.abs(unfused[0] - ours[0]).max() > 1e-2  # the fusion did change clip 0
  np.testing.assert_allclose(unfused[1], ours[1], atol=1e-6)
  with pytest.raises(ValueError, match=r"\[B, 4, T, M\] for this fused model"):
    clap.audio_embeddings(model, features[:, :1])


def test_fused_clap_encoders_are_deterministic_and_match_the_original(fused_clap_folder):
  reference, folder = fused_clap_folder
  encoders = clap.ClapEncoders(folder)
  assert encoders.fused
  rng = np.random.default_rng(3)
  # 1.5 s is longer than the extractor's 1 s: whole clip + 3 chunks; 0.7 s is repeat-padded.
  audios = [rng.uniform(-0.3, 0.3, 24000).astype(np.float32),
            rng.uniform(-0.3, 0.3, 11200).astype(np.float32)]
  extractor = encoders.processor.feature_extractor
  expected_features = []
  for audio in audios:
    np.random.seed(clap.FUSION_SEED)
    expected_features.append(extractor([audio], sampling_rate=16000, truncation="fusion",
                                       padding="repeatpad", return_tensors="pt"))
  # The extractor calls the lone short clip "longer" (it marks a random clip of a batch without
  # long ones); our encoder keeps each clip's own flag.
  assert [bool(f["is_longer"][0, 0]) for f in expected_features] == [True, True]
  with torch.no_grad():
    expected = reference.get_audio_features(
        input_features=torch.cat([f["input_features"] for f in expected_features]),
        is_longer=torch.tensor([[True], [False]])).pooler_output.numpy()
  state = np.random.get_state()
  ours = encoders.audio(audios, 16000)
  np.testing.assert_allclose(ours, expected, atol=2e-6)
  assert np.array_equal(np.random.get_state()[1], state[1])  # the global RNG is left as it was
  np.testing.assert_array_equal(encoders.audio(audios[::-1], 16000), ours[::-1])


def test_clap_refuses_unported_configs(tmp_path):
  with pytest.raises(ValueError, match="channel_map"):
    clap.settings_from_config({"audio_config": {"enable_fusion": True,
                                                "fusion_type": "channel_map"}})
  with pytest.raises(FileNotFoundError, match="config.json"):
    clap.load_clap(str(tmp_path))


def test_state_dict_loader_reads_safetensors_and_torch_files(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file({"a": np.ones((2, 3), np.float32)}, tmp_path / "w.safetensors")
  torch.save({"a": torch.ones(2, 3)}, tmp_path / "w.pth")
  for name in ("w.safetensors", "w.pth"):
    state = common.load_torch_state_dict(str(tmp_path / name))
    np.testing.assert_array_equal(state["a"], np.ones((2, 3)))
  with pytest.raises(FileNotFoundError, match="no such file"):
    common.load_torch_state_dict(str(tmp_path / "missing.pth"))


# ---------------------------------------------------------------------------------------------
# The eval job with weights


def test_eval_job_computes_fad_and_clap_with_provided_weights(vggish_reference, clap_folder,
                                                              tmp_path, monkeypatch):
  from data_pipeline import schema, synthetic  # pylint: disable=g-import-not-at-top
  from eval import run  # pylint: disable=g-import-not-at-top
  from avgen.metrics import weights as weights_lib  # pylint: disable=g-import-not-at-top

  def clips(seed):  # 2 s each: two 0.96 s VGGish examples per clip
    return (synthetic.make_clip(np.random.default_rng([seed, i]), num_frames=16, height=32,
                                width=32, fps=8.0, sample_rate=16000) for i in range(2))

  schema.write_shards(clips(1), str(tmp_path / "generated"), 8)
  schema.write_shards(clips(2), str(tmp_path / "reference"), 8)
  # VGGish through the weights folder, CLAP through --weights.
  weights_dir = tmp_path / "weights"
  weights_dir.mkdir()
  os.symlink(vggish_reference[1], weights_dir / weights_lib.WEIGHTS["vggish"].file_name)
  monkeypatch.setenv(weights_lib.ENV_DIR, str(weights_dir))
  out = tmp_path / "report.json"
  report = run.main(["--generated", str(tmp_path / "generated"), "--reference",
                     str(tmp_path / "reference"), "--metrics", "fad,clap", "--weights",
                     f"clap={clap_folder[1]}", "--out", str(out), "--no-progress"])
  fad, clap_entry = report["fad"], report["clap"]
  assert fad["num_embeddings"] == {"generated": 4, "reference": 4}
  assert fad["score"] > 0 and "VGGish" in fad["embedding_model"]
  assert fad["rank_warning"]  # 4 embeddings in 128 dimensions
  assert len(clap_entry["per_clip"]) == 2 and -1 <= clap_entry["score"] <= 1
  assert "CLAP" in clap_entry["embedding_model"] and "first 1 s" in clap_entry["embedding_model"]
  assert json.loads(out.read_text())["fad"]["score"] == pytest.approx(fad["score"])
