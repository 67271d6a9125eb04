"""Ingestion without ffmpeg: clip measures, rules, settings, captions, manifest, shard plan."""

import json
import os

import numpy as np
import pytest

from data_pipeline import captions
from data_pipeline import filters
from data_pipeline import manifest
from data_pipeline import sharding
from data_pipeline.preprocess_config import CONFIG_FILE, PreprocessConfig, check_saved_config

SR = 16000


def _with_noise(signal, snr_db, seed=0):
  noise = np.random.default_rng(seed).standard_normal(len(signal))
  noise *= np.sqrt(np.mean(signal**2) / 10**(snr_db / 10) / np.mean(noise**2))
  return signal + noise


def _signals():
  t = np.arange(2 * SR) / SR
  tone = 0.3 * np.sin(2 * np.pi * 440 * t)
  return {
      "steady tone": tone,
      "beeps": tone * ((t % 0.5) < 0.2),  # sound that comes and goes
      "chirp": 0.3 * np.sin(2 * np.pi * (300 * t + 400 * t**2)),
  }


@pytest.mark.parametrize("name", ["steady tone", "beeps", "chirp"])
@pytest.mark.parametrize("true_snr", [0.0, 10.0, 20.0, 30.0])
def test_snr_estimate_tracks_the_true_snr_in_white_noise(name, true_snr):
  estimate = filters.snr_db(_with_noise(_signals()[name], true_snr))
  assert estimate == pytest.approx(true_snr, abs=1.5)


def test_snr_of_noise_alone_silence_and_clean_sound():
  rng = np.random.default_rng(1)
  white = 0.1 * rng.standard_normal(2 * SR)
  spectrum = np.fft.rfft(rng.standard_normal(2 * SR))
  spectrum[1:] /= np.sqrt(np.fft.rfftfreq(2 * SR, 1 / SR)[1:])  # 1/f power: pink
  pink = np.fft.irfft(spectrum, 2 * SR)
  pink *= 0.1 / pink.std()
  assert filters.snr_db(white) < 0
  assert filters.snr_db(pink) < 5
  assert filters.snr_db(np.zeros(2 * SR)) == filters.SNR_FLOOR_DB
  assert filters.snr_db(_signals()["beeps"]) > 40  # beeps over digital silence


def test_blur_score_is_the_laplacian_variance_of_luma_and_drops_with_blur():
  rng = np.random.default_rng(0)
  video = rng.integers(0, 256, (3, 20, 24, 3), np.uint8)
  luma = np.round(video.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))
  laplacian = (luma[:, :-2, 1:-1] + luma[:, 2:, 1:-1] + luma[:, 1:-1, :-2] + luma[:, 1:-1, 2:]
               - 4 * luma[:, 1:-1, 1:-1])
  reference = np.median(laplacian.reshape(3, -1).var(axis=1))
  # OpenCV rounds luma in fixed point: a level off here and there.
  assert filters.blur_score(video) == pytest.approx(reference, rel=0.01)
  blurred = video.astype(np.float64)
  for axis in (1, 2):  # a 5-tap box blur along height, then width
    blurred = sum(np.roll(blurred, s, axis=axis) for s in range(-2, 3)) / 5
  assert filters.blur_score(blurred.astype(np.uint8)) < 0.05 * filters.blur_score(video)
  assert filters.blur_score(np.full((2, 8, 8, 3), 77, np.uint8)) == 0.0


def test_silence_ratio_counts_quiet_20ms_frames():
  audio = np.full(SR, 0.1, np.float32)
  audio[:int(0.3 * SR)] = 1e-4  # -80 dBFS: silent at the -50 dB default
  assert filters.silence_ratio(audio, SR, -50.0) == pytest.approx(0.3)
  assert filters.silence_ratio(audio, SR, -100.0) == 0.0


def test_clipping_is_counted_per_channel_not_after_the_mix():
  left = np.clip(1.5 * np.sin(np.linspace(0, 40 * np.pi, SR)), -1, 1)
  stereo = np.stack([left, np.zeros(SR)], axis=1).astype(np.float32)
  assert np.abs(stereo.mean(axis=1)).max() <= 0.5  # the mono mix never nears full scale
  assert filters.clipping_ratio(stereo, 0.94) > 0.2


def test_scene_cut_counter_reports_the_frame_after_each_hard_cut():
  rng = np.random.default_rng(0)
  shot_a = rng.integers(0, 80, (1, 24, 24, 3), np.uint8)
  shot_b = rng.integers(170, 256, (1, 24, 24, 3), np.uint8)
  video = np.concatenate([np.repeat(shot_a, 5, 0), np.repeat(shot_b, 4, 0),
                          np.repeat(shot_a, 3, 0)])
  counter = filters.SceneCutCounter(threshold=27.0, fps=8.0)
  # Fed in two pieces, as clips are: frame numbers count over the whole input.
  assert counter.feed(video[:7]) + counter.feed(video[7:]) == [5, 9]
  still = filters.SceneCutCounter(threshold=27.0, fps=8.0)
  assert still.feed(np.repeat(shot_a, 6, 0)) == []


def test_rules_use_the_spec_comparisons_at_their_thresholds():
  config = PreprocessConfig()
  at = {"blur": config.min_blur, "scene_cuts": config.max_scene_cuts,
        "snr_db": config.min_snr_db, "silence_ratio": config.max_silence_ratio,
        "clipping_ratio": config.max_clipping_ratio}
  # SNR must exceed 10 dB and silence stay under 50% (strict); the rest include the threshold.
  assert filters.failed_rules(at, config) == ["snr_db", "silence_ratio"]
  good = dict(at, snr_db=config.min_snr_db + 0.1, silence_ratio=0.49)
  assert filters.failed_rules(good, config) == []
  bad = dict(good, blur=config.min_blur - 1, scene_cuts=1, clipping_ratio=0.5)
  assert filters.failed_rules(bad, config) == ["blur", "scene_cuts", "clipping_ratio"]


def test_config_rejects_bad_settings_by_name(tmp_path):
  with pytest.raises(ValueError, match=r"unknown setting\(s\) \['min_blurr'\]"):
    PreprocessConfig.from_dict({"min_blurr": 3})
  with pytest.raises(ValueError, match="height must be > 0"):
    PreprocessConfig(height=0)
  with pytest.raises(ValueError, match="num_frames must be int"):
    PreprocessConfig(num_frames=8.5)
  with pytest.raises(ValueError, match="whole number of samples"):
    PreprocessConfig(num_frames=1, fps=3.0, sample_rate=16000)
  with pytest.raises(ValueError, match="must be even"):
    PreprocessConfig(height=31)
  path = tmp_path / "c.json"
  path.write_text("{not json")
  with pytest.raises(ValueError, match=f"--config '{path}': cannot read it as JSON"):
    PreprocessConfig.from_json(str(path))
  path.write_text(json.dumps({"min_blur": 5, "height": 64, "width": 64}))
  config = PreprocessConfig.from_json(str(path))
  assert (config.min_blur, config.height, config.num_frames) == (5, 64, 16)


def test_output_dir_keeps_its_settings(tmp_path):
  check_saved_config(str(tmp_path), PreprocessConfig(min_blur=50))
  assert json.loads((tmp_path / CONFIG_FILE).read_text())["min_blur"] == 50
  check_saved_config(str(tmp_path), PreprocessConfig(min_blur=50))  # same settings: fine
  with pytest.raises(ValueError, match=r"other settings \(min_blur: 50 -> 100.0\)"):
    check_saved_config(str(tmp_path), PreprocessConfig())


def test_caption_sources_in_order(tmp_path):
  video = str(tmp_path / "v.mp4")
  tags = {"title": "Title", "description": "A  described\nscene"}
  assert captions.find_caption(video, tags) == {
      "caption": "A described scene", "source": "tag:description", "errors": []}
  (tmp_path / "v.json").write_text(json.dumps({"caption": "from json"}))
  assert captions.find_caption(video, tags)["source"] == "sidecar_json"
  (tmp_path / "v.txt").write_text("  from\ttxt \n")
  assert captions.find_caption(video, tags)["caption"] == "from txt"
  # A broken sidecar is reported and the next source is used.
  (tmp_path / "v.txt").write_bytes(b"\xff\xfe bad")
  (tmp_path / "v.json").write_text("{oops")
  found = captions.find_caption(video, {})
  assert found["caption"] == "" and found["source"] == "none"
  assert [e.split(":")[0] for e in found["errors"]] == ["v.txt", "v.json"]
  names = {"v.mp4", "v.txt", "v.json", "notes.txt"}
  assert captions.is_sidecar(str(tmp_path / "v.txt"), names)
  assert not captions.is_sidecar(str(tmp_path / "notes.txt"), names)  # a stray file: an input
  assert not captions.is_sidecar(str(tmp_path / "v.mp4"), names)


def test_manifest_drops_a_torn_line_and_keeps_the_last_record(tmp_path):
  out = str(tmp_path)
  with manifest.ManifestWriter(out) as writer:
    writer.append({"path": "a", "status": "rejected"})
    writer.append({"path": "b", "status": "rejected"})
  with open(tmp_path / manifest.MANIFEST_FILE, "ab") as f:
    f.write(b'{"path": "c", "sta')  # a run killed mid-line
  assert sorted(manifest.read_manifest(out)) == ["a", "b"]
  with manifest.ManifestWriter(out) as writer:
    writer.append({"path": "a", "status": "accepted"})
  lines = (tmp_path / manifest.MANIFEST_FILE).read_text().splitlines()
  assert [json.loads(line)["path"] for line in lines] == ["a", "b", "a"]  # torn line gone
  assert manifest.read_manifest(out)["a"]["status"] == "accepted"
  manifest.write_manifest(out, [{"path": "b", "status": "x"}, {"path": "a", "status": "y"},
                                {"path": "b", "status": "z"}])
  lines = (tmp_path / manifest.MANIFEST_FILE).read_text().splitlines()
  assert [(json.loads(l)["path"], json.loads(l)["status"]) for l in lines] == [
      ("a", "y"), ("b", "z")]
  assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_shard_plan_cuts_sorted_clips_into_equal_shards():
  records = [
      {"path": "b.mp4", "status": "accepted", "clips": 3, "clip_file": "clips/b"},
      {"path": "a.mp4", "status": "accepted", "clips": 4, "clip_file": "clips/a"},
      {"path": "c.mp4", "status": "rejected", "clips": 0, "clip_file": None},
      {"path": "d.mp4", "status": "accepted", "clips": 1, "clip_file": "clips/d"},
  ]
  plan = sharding.plan_shards(records, 3)
  assert [s["name"] for s in plan] == [
      "data-00000-of-00003.array_record", "data-00001-of-00003.array_record",
      "data-00002-of-00003.array_record"]
  assert [s["pieces"] for s in plan] == [
      [["a.mp4", "clips/a", 0, 3]],
      [["a.mp4", "clips/a", 3, 4], ["b.mp4", "clips/b", 0, 2]],
      [["b.mp4", "clips/b", 2, 3], ["d.mp4", "clips/d", 0, 1]]]
  assert [s["num_records"] for s in plan] == [3, 3, 2]
  assert sharding.plan_shards(list(reversed(records)), 3) == plan  # order of records: none
  with pytest.raises(ValueError, match=r"1 accepted input\(s\) have no clip file yet.*'e.mp4'"):
    sharding.plan_shards(records + [{"path": "e.mp4", "status": "accepted", "clips": 2,
                                     "clip_file": None}], 3)
