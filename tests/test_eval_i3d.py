"""The Flax I3D port (FVD/KVD features) against a PyTorch reference, float32.

No pip package ships I3D, so the reference below is our own transcription of the original
architecture (DeepMind's kinetics-i3d, in the module and tensor naming of piergiaj/pytorch-i3d:
conv + BatchNorm(eps 1e-3) + ReLU units with TF "SAME" padding computed from the input size,
zero-padded SAME max pools, 9 Inception modules, VALID average pool, 1x1x1 logits conv, time
mean). Widths are configurable so the test runs at the real 16 x 224 x 224 geometry with 1/8 of
the channels.
"""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from avgen.metrics.nets import i3d  # pylint: disable=g-import-not-at-top


def _same_padding(sizes, kernel, stride):
  """F.pad argument (last dim first) for TF "SAME" over (T, H, W)."""
  pads = []
  for n, k, s in zip(sizes, kernel, stride):
    total = max(k - s, 0) if n % s == 0 else max(k - n % s, 0)
    pads.append((total // 2, total - total // 2))
  return [p for pair in reversed(pads) for p in pair]


class Unit(nn.Module):

  def __init__(self, cin, cout, kernel, stride=1, bn=True, bias=False, relu=True):
    super().__init__()
    self.kernel, self.stride, self.relu = (kernel,) * 3, (stride,) * 3, relu
    self.conv3d = nn.Conv3d(cin, cout, kernel, stride, padding=0, bias=bias)
    if bn:
      self.bn = nn.BatchNorm3d(cout, eps=1e-3, momentum=0.01)
    self.has_bn = bn

  def forward(self, x):
    x = self.conv3d(F.pad(x, _same_padding(x.shape[2:], self.kernel, self.stride)))
    if self.has_bn:
      x = self.bn(x)
    return F.relu(x) if self.relu else x


class Pool(nn.Module):

  def __init__(self, window, stride):
    super().__init__()
    self.window, self.stride = window, stride

  def forward(self, x):
    x = F.pad(x, _same_padding(x.shape[2:], self.window, self.stride))
    return F.max_pool3d(x, self.window, self.stride)


class Mixed(nn.Module):

  def __init__(self, cin, w):
    super().__init__()
    self.b0 = Unit(cin, w[0], 1)
    self.b1a, self.b1b = Unit(cin, w[1], 1), Unit(w[1], w[2], 3)
    self.b2a, self.b2b = Unit(cin, w[3], 1), Unit(w[3], w[4], 3)
    self.b3a, self.b3b = Pool((3, 3, 3), (1, 1, 1)), Unit(cin, w[5], 1)

  def forward(self, x):
    return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)),
                      self.b3b(self.b3a(x))], 1)


class ReferenceI3D(nn.Module):
  """Input [B, 3, T, H, W]; returns (time-averaged logits, time-averaged pooled features)."""

  def __init__(self, stem, mixed, num_classes, window=(2, 7, 7)):
    super().__init__()
    self.order = []

    def add(name, module):
      self.add_module(name, module)
      self.order.append(name)

    add("Conv3d_1a_7x7", Unit(3, stem[0], 7, stride=2))
    add("MaxPool3d_2a_3x3", Pool((1, 3, 3), (1, 2, 2)))
    add("Conv3d_2b_1x1", Unit(stem[0], stem[1], 1))
    add("Conv3d_2c_3x3", Unit(stem[1], stem[2], 3))
    add("MaxPool3d_3a_3x3", Pool((1, 3, 3), (1, 2, 2)))
    channels = stem[2]
    for name, widths in zip(i3d.MIXED, mixed):
      if name == "Mixed_4b":
        add("MaxPool3d_4a_3x3", Pool((3, 3, 3), (2, 2, 2)))
      if name == "Mixed_5b":
        add("MaxPool3d_5a_2x2", Pool((2, 2, 2), (2, 2, 2)))
      add(name, Mixed(channels, widths))
      channels = widths[0] + widths[2] + widths[4] + widths[5]
    self.avg_pool = nn.AvgPool3d(window, stride=1)
    self.logits = Unit(channels, num_classes, 1, bn=False, bias=True, relu=False)

  def forward(self, x):
    for name in self.order:
      x = getattr(self, name)(x)
    pooled = self.avg_pool(x)  # [B, C, T', 1, 1]
    logits = self.logits(pooled)
    return logits[:, :, :, 0, 0].mean(2), pooled[:, :, :, 0, 0].mean(2)


SMALL_STEM = (8, 8, 24)
SMALL_MIXED = tuple(tuple(max(2, w // 8) for w in m) for m in i3d.MIXED_WIDTHS)


def _reference(num_classes=10, window=(2, 7, 7), seed=0):
  torch.manual_seed(seed)
  model = ReferenceI3D(SMALL_STEM, SMALL_MIXED, num_classes, window).eval()
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
    model.logits.conv3d.bias.normal_()
  return model


def _ncthw(x):
  return torch.tensor(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))


def _assert_close(ours, expected):
  ours, expected = np.asarray(ours), np.asarray(expected)
  assert ours.shape == expected.shape
  error = np.abs(ours - expected).max() / np.abs(expected).max()
  assert error < 1e-4, error


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory):
  model = _reference(num_classes=400)  # the eval job wants Kinetics-400 logits
  path = tmp_path_factory.mktemp("i3d") / "i3d_small.pt"
  torch.save(model.state_dict(), path)
  return model, str(path)


def test_i3d_port_matches_the_reference_at_the_fvd_geometry(reference_file):
  reference, path = reference_file
  model = i3d.load_i3d(path)
  assert model.settings.mixed == SMALL_MIXED and model.settings.stem == SMALL_STEM
  # Noise and a moving pattern: their embeddings differ by ~15% of the largest value, so a
  # port that lost the input (or mixed the clips) would fail by far more than the tolerance.
  t, h, w = np.meshgrid(np.arange(16), np.arange(224), np.arange(224), indexing="ij")
  wave = np.stack([np.sin(0.3 * w - 0.5 * t), np.cos(0.2 * h + 0.4 * t), np.sin(0.05 * (h + w))],
                  -1)
  noise = np.random.default_rng(0).uniform(-1, 1, wave.shape)
  x = np.stack([noise, wave]).astype(np.float32)
  with torch.no_grad():
    logits, features = reference(_ncthw(x))
  out = i3d._forward(model, x)  # pylint: disable=protected-access
  _assert_close(out["logits"], logits.numpy())
  _assert_close(out["features"], features.numpy())
  assert np.abs(logits[0] - logits[1]).max() > 0.05 * np.abs(logits).max()
  assert out["features"].shape == (2, model.settings.feature_dim)


def test_i3d_port_matches_on_odd_sizes_with_several_time_steps(tmp_path):
  # 17 x 40 x 56: stride-2 layers meet odd sizes (asymmetric SAME padding) and two time steps
  # remain after the average pool, so the time mean matters.
  reference = _reference(num_classes=7, window=(2, 2, 2), seed=1)
  torch.save({f"module.{k}": v for k, v in reference.state_dict().items()},  # DataParallel names
             tmp_path / "i3d.pt")
  model = i3d.load_i3d(tmp_path / "i3d.pt", pool_window=(2, 2, 2))
  assert model.settings.num_classes == 7
  x = np.random.default_rng(1).uniform(-1, 1, (1, 17, 40, 56, 3)).astype(np.float32)
  with torch.no_grad():
    logits, features = reference(_ncthw(x))
  forward = i3d._forward  # pylint: disable=protected-access
  out = forward(model, x)
  _assert_close(out["logits"], logits.numpy())
  _assert_close(out["features"], features.numpy())
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
