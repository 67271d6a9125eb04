"""The offline eval job, `python -m eval.run`: inputs, report, summary, plots, failures."""

import json
import os

import numpy as np
import pytest

from avgen.metrics import weights as weights_lib
from avgen.sample import media
from data_pipeline import schema, synthetic
from eval import compute, data, extractors, plots, run

FPS, RATE = 8.0, 16000


def _clip(seed, i):
  return synthetic.make_clip(np.random.default_rng([seed, i]), num_frames=16, height=32, width=32,
                             fps=FPS, sample_rate=RATE, max_objects=2)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """A folder of generated-like clips (mp4 + wav + caption) and a shard of reference clips."""
  root = tmp_path_factory.mktemp("eval")
  generated = root / "generated"
  generated.mkdir()
  for i in range(4):
    clip = _clip(5, i)
    media.write_mp4(generated / f"clip_{i}.mp4", clip["video"], FPS, clip["audio"], RATE, scale=2)
    media.write_wav(generated / f"clip_{i}.wav", clip["audio"], RATE)
    (generated / f"clip_{i}.txt").write_text(clip["caption"])
  (generated / "broken.mp4").write_bytes(b"not a video")
  schema.write_shards((_clip(6, i) for i in range(4)), str(root / "reference"), 8)
  return root


def _run(inputs, out, *extra):
  return run.main(["--generated", str(inputs / "generated"), "--reference",
                   str(inputs / "reference"), "--out", str(out), "--no-progress", *extra])


def test_job_writes_report_summary_and_plots(inputs, tmp_path, monkeypatch):
  monkeypatch.delenv(weights_lib.ENV_DIR, raising=False)
  out = tmp_path / "report.json"
  _run(inputs, out, "--metrics", "av_align,sync,temporal")
  report = json.loads(out.read_text())
  assert set(report) == {"job", "av_align", "sync", "temporal"}
  job = report["job"]
  assert job["generated"]["num_clips"] == 4 and job["reference"]["num_clips"] == 4
  assert [s["name"] for s in job["generated"]["skipped"]] == ["broken"]  # listed, not dropped
  # Each metric names what it computed.
  assert "TempoTokens" in report["av_align"]["variant"]
  assert 0.0 <= report["av_align"]["score"] and len(report["av_align"]["per_clip"]) == 4
  assert report["temporal"]["fallback"] and "NOT LPIPS" in report["temporal"]["note"]
  assert "spec_target" not in report["temporal"]  # the LPIPS target is not for the fallback
  # Real clips through H.264 + wav: perfect sync, and the detectors agree with the ground truth.
  assert report["sync"]["score"] == 1.0
  truth = report["sync"]["reference"]["detectors_vs_ground_truth"]
  assert truth["num_clips"] == 4 and truth["visual_impacts"]["f1"] == 1.0
  summary = (tmp_path / "report.md").read_text()
  assert "| sync | 1 |" in summary and "fallback" in summary and "broken" in summary
  for path in job["plots"]:
    assert (tmp_path / path).stat().st_size > 0
  assert {os.path.basename(p) for p in job["plots"]} >= {"scores.png", "per_clip.png",
                                                         "best_worst_sync.png"}
  # Same inputs and seed: the same report.
  again = tmp_path / "again.json"
  _run(inputs, again, "--metrics", "av_align,sync,temporal", "--plots-dir", str(tmp_path / "p2"))
  first, second = report, json.loads(again.read_text())
  first["job"].pop("plots"), second["job"].pop("plots")
  assert first == second


def test_pil_plots_without_matplotlib(inputs, tmp_path):
  clips = data.load_clip_set(str(inputs / "reference"), progress=False)
  report = {"sync": {"score": 0.5, "per_clip": {c.name: i / 4 for i, c in enumerate(clips.clips)}},
            "fad": {"score": 3.0, "spec_target": "< 2.0"}}
  written = plots.write_plots(str(tmp_path), report, ["sync", "fad"],
                              {c.name: c for c in clips.clips}, {"sync": True, "fad": False},
                              use="pil")
  assert {os.path.basename(p) for p in written} == {"scores.png", "per_clip.png",
                                                    "best_worst_sync.png"}
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for path in written:
    assert min(Image.open(path).size) > 16


def test_unavailable_metrics_fail_before_any_clip_is_read(tmp_path, monkeypatch):
  monkeypatch.delenv(weights_lib.ENV_DIR, raising=False)
  missing = str(tmp_path / "does_not_exist")
  args = ["--generated", missing, "--out", str(tmp_path / "r.json"), "--no-progress"]
  with pytest.raises(SystemExit) as failure:
    run.main(args + ["--reference", missing, "--metrics", "fad,fvd,clip"])
  message = str(failure.value)
  assert "--weights vggish=PATH" in message and weights_lib.ENV_DIR in message
  assert "I3D" in message and "CLIP" in message
  with pytest.raises(SystemExit, match="pass --reference"):
    run.main(args + ["--metrics", "fad"])
  with pytest.raises(SystemExit, match="unknown metric"):
    run.main(args + ["--metrics", "fad,bogus"])
  with pytest.raises(SystemExit, match="not an existing file"):
    run.main(args + ["--reference", missing, "--metrics", "fad", "--weights",
                     f"vggish={tmp_path / 'nope.pth'}"])


def test_skip_unavailable_records_the_error_and_computes_the_rest(inputs, tmp_path, monkeypatch):
  monkeypatch.delenv(weights_lib.ENV_DIR, raising=False)
  out = tmp_path / "report.json"
  _run(inputs, out, "--metrics", "sync,clap", "--skip-unavailable", "--max-clips", "2")
  report = json.loads(out.read_text())
  assert "--weights clap=PATH" in report["clap"]["error"]
  generated = report["job"]["generated"]  # the first 2 names: broken.mp4 and clip_0
  assert report["sync"]["score"] == 1.0 and generated["num_clips"] == 1 and generated["skipped"]
  assert "not computed" in (tmp_path / "report.md").read_text()


def test_folder_reader_pairs_files_by_name(inputs):
  clips = data.load_clip_set(str(inputs / "generated"), progress=False)
  clip = clips.clips[0]
  assert clip.name == "clip_0" and clip.video.shape == (16, 64, 64, 3) and clip.fps == FPS
  # The wav is preferred over the mp4's AAC: it holds the written samples (16-bit).
  np.testing.assert_allclose(clip.audio, _clip(5, 0)["audio"], atol=1 / 32767)
  assert clip.caption == _clip(5, 0)["caption"]
  with pytest.raises(ValueError, match="no such file or folder"):
    data.load_clip_set(str(inputs / "nothing_here"))


def test_video_distances_run_with_any_video_extractor(inputs):
  generated = data.load_clip_set(str(inputs / "generated"), progress=False)
  reference = data.load_clip_set(str(inputs / "reference"), progress=False)
  # A stand-in extractor (I3D is not ported): per-clip mean colour and motion.
  def embed(videos):
    return np.stack([np.r_[v.reshape(-1, 3).mean(0),
                           np.abs(np.diff(v.astype(float), axis=0)).mean()] for v in videos])
  toy = extractors.Extractor("toy: mean RGB and frame change", {"video": embed})
  same = lambda items, desc: items
  fvd = compute.compute("fvd", generated, generated, toy, same)
  assert fvd["score"] == pytest.approx(0.0, abs=1e-9) and fvd["embedding_model"] == toy.name
  assert compute.compute("fvd", generated, reference, toy, same)["score"] > 0
  kvd = compute.compute("kvd", generated, reference, toy, same, seed=3)
  assert kvd == compute.compute("kvd", generated, reference, toy, same, seed=3)
  assert kvd["subset_size"] == 4 and "MMD" in kvd["definition"]
