"""The Flax I3D port (FVD/KVD features) against the original PyTorch I3D, float32.

The reference is piergiaj/pytorch-i3d's `InceptionI3d` as shipped in the PyPI package cd-fvd
0.1.1 (`cdfvd.third_party.i3d.pytorch_i3d`; the CI installs it with --no-deps, and a missing
reference fails rather than skips). Its module and tensor names are the ones `load_i3d` reads.
Weights and BatchNorm statistics are random (seeded), so every tensor of the file matters.

- At the FVD geometry the full original (400 classes, 1 clip of 16 x 224 x 224) runs unmodified,
  BatchNorm eps 1e-5 included (that code's value; the port defaults to TF-Hub's 1e-3).
- For odd sizes and the loader's edge cases, the same original classes are rebuilt with 1/8 of
  the channels (the original's `Unit3D` / `InceptionModule` swapped in place, its forward and
  pools untouched), BatchNorm eps set to 1e-3: the port's default path, at a fraction of the cost.
"""

import json
import os

import numpy as np
import pytest
import torch
from cdfvd.third_party.i3d import pytorch_i3d

from avgen.metrics.nets import i3d

nn = torch.nn

SMALL_STEM = (8, 8, 24)
SMALL_MIXED = tuple(tuple(max(2, w // 8) for w in m) for m in i3d.MIXED_WIDTHS)


def _shrink(model, num_classes, pool_window):
  """Swaps the original's units for 1/8-width ones built from the original's own classes."""
  stem_names = ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3")
  kernels, channels = ((7, 7, 7), (1, 1, 1), (3, 3, 3)), 3
  for name, width, kernel in zip(stem_names, SMALL_STEM, kernels):
    stride = (2, 2, 2) if name == "Conv3d_1a_7x7" else (1, 1, 1)
    setattr(model, name, pytorch_i3d.Unit3D(channels, width, kernel, stride=stride, name=name))
    channels = width
  for name, widths in zip(i3d.MIXED, SMALL_MIXED):
    setattr(model, name, pytorch_i3d.InceptionModule(channels, list(widths), name))
    channels = widths[0] + widths[2] + widths[4] + widths[5]
  model.avg_pool = nn.AvgPool3d(pool_window, stride=(1, 1, 1))
  model.logits = pytorch_i3d.Unit3D(channels, num_classes, (1, 1, 1), activation_fn=None,
                                    use_batch_norm=False, use_bias=True, name="logits")


def _original(num_classes=400, small=False, pool_window=(2, 7, 7), seed=0):
  """The original InceptionI3d in eval mode with random weights and BatchNorm statistics."""
  torch.manual_seed(seed)
  model = pytorch_i3d.InceptionI3d(num_classes)
  if small:
    _shrink(model, num_classes, pool_window)
  model.eval()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.Conv3d):  # He-scaled, so that the input still shows at the end
        fan_in = module.weight[0].numel()
        module.weight.normal_(0, (2 / fan_in) ** 0.5)
      if isinstance(module, nn.BatchNorm3d):  # statistics and affine parameters off identity
        module.running_mean.normal_(0, 0.1)
        module.running_var.uniform_(0.5, 2.0)
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0, 0.1)
        if small:
          module.eps = 1e-3
    model.logits.conv3d.bias.normal_()
  return model


def _run_original(model, x):
  """(logits, pre-logits features) of the original, both averaged over time like the port's."""
  with torch.no_grad():
    video = torch.tensor(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))  # [B, C, T, H, W]
    logits = model(video)
    features = model.extract_features(video)[:, :, :, 0, 0].mean(2)
  return logits.numpy(), features.numpy()


def _relative_error(ours, expected):
  ours, expected = np.asarray(ours), np.asarray(expected)
  assert ours.shape == expected.shape
  return np.abs(ours - expected).max() / np.abs(expected).max()


def _assert_close(ours, expected):
  error = _relative_error(ours, expected)
  assert error < 1e-4, error


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory):
  model = _original(num_classes=400, small=True)  # the eval job wants Kinetics-400 logits
  path = tmp_path_factory.mktemp("i3d") / "i3d_small.pt"
  torch.save(model.state_dict(), path)
  return model, str(path)


def test_i3d_port_matches_the_original_at_the_fvd_geometry(tmp_path):
  reference = _original()
  torch.save(reference.state_dict(), tmp_path / "i3d_400.pt")
  model = i3d.load_i3d(tmp_path / "i3d_400.pt", bn_eps=1e-5)  # the original code's epsilon
  assert model.settings.mixed == i3d.MIXED_WIDTHS and model.settings.num_classes == 400
  x = np.random.default_rng(0).uniform(-1, 1, (1, 16, 224, 224, 3)).astype(np.float32)
  logits, features = _run_original(reference, x)
  out = i3d._forward(model, x)  # pylint: disable=protected-access
  # Measured: 9.3e-7 (logits) and 4.2e-7 (features), relative to the largest value. Loading
  # with the port's default eps 1e-3 instead gives 8e-3: the BatchNorm statistics matter.
  _assert_close(out["logits"], logits)
  _assert_close(out["features"], features)
  assert out["features"].shape == (1, 1024)
  # The random logits bias does not hide the network: the rest spans a comparable range.
  bias = reference.logits.conv3d.bias.detach().numpy()
  assert np.ptp(logits[0] - bias) > 0.3 * np.ptp(logits[0])


def test_i3d_port_matches_on_odd_sizes_with_several_time_steps(tmp_path):
  # 17 x 40 x 56: stride-2 layers meet odd sizes (asymmetric SAME padding) and two time steps
  # remain after the average pool, so the time mean matters. The original's 2x7x7 pool needs
  # 224x224, so this 1/8-width copy pools 2x2x2.
  reference = _original(num_classes=7, small=True, pool_window=(2, 2, 2), seed=1)
  torch.save({f"module.{k}": v for k, v in reference.state_dict().items()},  # DataParallel names
             tmp_path / "i3d.pt")
  model = i3d.load_i3d(tmp_path / "i3d.pt", pool_window=(2, 2, 2))
  assert model.settings.num_classes == 7
  assert model.settings.mixed == SMALL_MIXED and model.settings.stem == SMALL_STEM
  # Noise and a moving pattern: a port that lost the input or mixed the clips would fail.
  t, h, w = np.meshgrid(np.arange(17), np.arange(40), np.arange(56), indexing="ij")
  wave = np.stack([np.sin(0.3 * w - 0.5 * t), np.cos(0.2 * h + 0.4 * t), np.sin(0.05 * (h + w))],
                  -1)
  noise = np.random.default_rng(1).uniform(-1, 1, wave.shape)
  x = np.stack([noise, wave]).astype(np.float32)
  logits, features = _run_original(reference, x)
  forward = i3d._forward  # pylint: disable=protected-access
  out = forward(model, x)
  _assert_close(out["logits"], logits)
  _assert_close(out["features"], features)
  assert np.abs(logits[0] - logits[1]).max() > 0.05 * np.abs(logits).max()
  with pytest.raises(ValueError, match="average pool"):
    forward(model, x[:, :8])  # too few frames for the 2-frame pool


def test_torchscript_archives_load_through_their_state_dict(reference_file, tmp_path):
  reference, path = reference_file

  class Wrapper(nn.Module):  # the network under an attribute: a prefix on every tensor name
    def __init__(self):
      super().__init__()
      self.i3d = reference

    def forward(self, x):
      return x * 2

  traced = torch.jit.trace(Wrapper(), torch.zeros(1))
  traced.save(str(tmp_path / "i3d_torchscript.pt"))
  assert "i3d.Mixed_5c.b0.conv3d.weight" in traced.state_dict()
  scripted = nnx_state(i3d.load_i3d(tmp_path / "i3d_torchscript.pt"))
  plain = nnx_state(i3d.load_i3d(path))
  assert scripted.keys() == plain.keys() and len(plain) > 250
  for key, value in plain.items():
    np.testing.assert_array_equal(scripted[key], value, err_msg=key)


def nnx_state(model):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model))}


def test_weights_in_another_layout_are_refused(reference_file, tmp_path):
  reference, _ = reference_file
  state = reference.state_dict()
  torch.save({k: v for k, v in state.items() if k != "Mixed_4c.b2b.bn.running_var"},
             tmp_path / "missing.pt")
  with pytest.raises(KeyError, match="Mixed_4c.b2b.bn.running_var"):
    i3d.load_i3d(tmp_path / "missing.pt")
  torch.save(dict(state, **{"extra.weight": torch.zeros(1)}), tmp_path / "extra.pt")
  with pytest.raises(ValueError, match="not used.*extra.weight"):
    i3d.load_i3d(tmp_path / "extra.pt")
  torch.save(dict(state, **{"head.fc.weight": torch.zeros(1)}),  # the prefix is "" here
             tmp_path / "outside.pt")
  with pytest.raises(ValueError, match="not used.*head.fc.weight"):
    i3d.load_i3d(tmp_path / "outside.pt")
  torch.save(dict(state, **{"Mixed_3b.b0.conv3d.bias": torch.zeros(8)}), tmp_path / "bias.pt")
  with pytest.raises(ValueError, match="not used.*Mixed_3b.b0.conv3d.bias"):
    i3d.load_i3d(tmp_path / "bias.pt")
  wrong = dict(state)
  wrong["Mixed_3b.b1b.conv3d.weight"] = torch.zeros(16, 12, 1, 3, 3)  # a 2D-style kernel
  torch.save(wrong, tmp_path / "kernel.pt")
  with pytest.raises(ValueError, match=r"Mixed_3b.b1b.conv3d.weight has shape \(16, 12, 1, 3, 3\)"):
    i3d.load_i3d(tmp_path / "kernel.pt")
  torch.save({"features.0.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "other.pt")
  with pytest.raises(ValueError, match="piergiaj"):
    i3d.load_i3d(tmp_path / "other.pt")


def test_fvd_preprocessing_follows_the_tensorflow_reference():
  # TF1 resize_bilinear without half-pixel centres samples input position i * in / out: doubling
  # [a, b] gives [a, (a + b) / 2, b, b] (a half-pixel resize would give [a, .75a+.25b, ...]).
  np.testing.assert_allclose(i3d.tf1_bilinear_matrix(2, 4),
                             [[1, 0], [0.5, 0.5], [0, 1], [0, 1]])
  np.testing.assert_allclose(i3d.tf1_bilinear_matrix(5, 5), np.eye(5))
  down = i3d.tf1_bilinear_matrix(7, 3)  # positions 0, 7/3, 14/3
  np.testing.assert_allclose(down[1, 2:4], [2 / 3, 1 / 3])
  np.testing.assert_allclose(down.sum(1), 1.0)
  rng = np.random.default_rng(0)
  video = rng.integers(0, 256, (20, 2, 3, 3), dtype=np.uint8)
  video[:, :, :, 2] = 0
  video[:, :, :, 1] = 255
  out = i3d.preprocess(video, num_frames=16, size=4)
  assert out.shape == (16, 4, 4, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out[..., 1], 1.0, atol=1e-6)  # 255 -> 1
  np.testing.assert_allclose(out[..., 2], -1.0, atol=1e-6)  # 0 -> -1
  # Row 1 of 4 from 2 rows: the mean of the two input rows (then the first 3 of 4 columns map to
  # input columns 0, 0.75, 1.5).
  expected = (video[:16, 0, 0, 0].astype(np.float32) + video[:16, 1, 0, 0]) / 2 / 127.5 - 1
  np.testing.assert_allclose(out[:, 1, 0, 0], expected, atol=1e-5)
  with pytest.raises(ValueError, match="has 20 frames"):
    i3d.preprocess(video, num_frames=24)
  with pytest.raises(ValueError, match="uint8"):
    i3d.preprocess(video.astype(np.float32))


def test_eval_job_computes_fvd_and_kvd_with_i3d_weights(reference_file, tmp_path, monkeypatch):
  import itertools  # pylint: disable=g-import-not-at-top
  from data_pipeline import schema, synthetic  # pylint: disable=g-import-not-at-top
  from eval import run  # pylint: disable=g-import-not-at-top
  from avgen.metrics import weights as weights_lib  # pylint: disable=g-import-not-at-top

  def clips(seed, count, frames=16):
    return (synthetic.make_clip(np.random.default_rng([seed, i]), num_frames=frames, height=32,
                                width=32, fps=8.0, sample_rate=16000) for i in range(count))

  # The generated set ends with a 12-frame clip: shorter than the 16 frames FVD uses.
  schema.write_shards(itertools.chain(clips(1, 3), clips(3, 1, frames=12)),
                      str(tmp_path / "generated"), 8)
  schema.write_shards(clips(2, 3), str(tmp_path / "reference"), 8)
  monkeypatch.delenv(weights_lib.ENV_DIR, raising=False)
  out = tmp_path / "r.json"
  report = run.main(["--generated", str(tmp_path / "generated"), "--reference",
                     str(tmp_path / "reference"), "--metrics", "fvd,kvd", "--weights",
                     f"i3d={reference_file[1]}", "--out", str(out), "--no-progress"])
  fvd, kvd = report["fvd"], report["kvd"]
  assert fvd["num_features"] == {"generated": 3, "reference": 3} and fvd["score"] > 0
  assert [e["reason"] for e in fvd["excluded_clips"]] == [
      "12 frames; the embedding uses the first 16"]
  assert "I3D" in fvd["embedding_model"] and "400-d Kinetics logits" in fvd["embedding_model"]
  assert "first 16 frames" in fvd["embedding_model"] and "224x224" in fvd["embedding_model"]
  assert "TF-Hub" in fvd["note"] and fvd["rank_warning"]
  assert kvd["embedding_model"] == fvd["embedding_model"] and np.isfinite(kvd["score"])
  assert json.loads(out.read_text())["fvd"]["score"] == pytest.approx(fvd["score"])
  assert "12 frames" in (tmp_path / "r.md").read_text()
  # The job's features are the port's, clip by clip: rows do not depend on a clip's place in a
  # (padded) batch.
  from eval import compute, data, extractors  # pylint: disable=g-import-not-at-top
  extractor = extractors.i3d({"i3d": reference_file[1]}, False)
  reference = data.load_clip_set(str(tmp_path / "reference"), progress=False)
  features = compute.video_features(reference.clips, extractor, lambda items, desc: items, "r")
  direct = i3d.embed_videos(extractor.model, [c.video for c in reversed(reference.clips)])
  assert features.shape == (3, 400)
  np.testing.assert_allclose(features, direct[::-1], rtol=1e-5, atol=1e-5)


def test_missing_i3d_weights_name_how_to_provide_them(tmp_path, monkeypatch):
  from eval import run  # pylint: disable=g-import-not-at-top
  from avgen.metrics import weights as weights_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv(weights_lib.ENV_DIR, raising=False)
  with pytest.raises(SystemExit) as failure:
    run.main(["--generated", str(tmp_path), "--reference", str(tmp_path), "--metrics", "fvd,kvd",
              "--out", str(tmp_path / "r.json"), "--no-progress"])
  message = str(failure.value)
  assert "--weights i3d=PATH" in message and "i3d_pretrained_400.pt" in message
  assert "I3D" in message and os.fspath(weights_lib.ENV_DIR) in message
