"""Metric math and detectors of avgen.metrics: Fréchet distance, KID, cosine scores, AV-Align,
the synthetic sync score, temporal consistency and the in-training hook."""

import numpy as np
import pytest
import scipy.linalg

from avgen.metrics import av_align, frechet, in_training, kernel, similarity, sync, temporal
from data_pipeline import synthetic

FPS, RATE = 8.0, 16000


def _clips(n, num_frames=16, seed=3):
  return [synthetic.make_clip(np.random.default_rng([seed, i]), num_frames=num_frames, height=32,
                              width=32, fps=FPS, sample_rate=RATE, max_objects=2)
          for i in range(n)]


def _delay(audio, frames):
  n = int(round(frames * RATE / FPS))
  return np.concatenate([np.zeros(n, audio.dtype), audio[:len(audio) - n]])


# ---------------------------------------------------------------------------------------------
# Fréchet distance


def _scipy_fd(x, y):
  """The common pytorch-fid style formula with scipy's general sqrtm."""
  m1, m2 = x.mean(0), y.mean(0)
  s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  return float(np.sum((m1 - m2)**2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


@pytest.mark.parametrize("num", [200, 20])  # full-rank, and rank-deficient (20 samples, 64 dims)
def test_frechet_identical_sets_is_zero_and_mean_shift_adds_its_square(num):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((num, 64)) @ rng.standard_normal((64, 64))
  shift = rng.standard_normal(64)
  scale = np.trace(np.cov(x.T))
  assert frechet.frechet_distance_from_features(x, x) == pytest.approx(0.0, abs=1e-9 * scale)
  # Same covariance, means apart by `shift`: FD = |shift|^2 exactly.
  assert frechet.frechet_distance_from_features(x, x + shift) == pytest.approx(shift @ shift,
                                                                               rel=1e-9)


@pytest.mark.parametrize("num", [500, 40, 20])
def test_frechet_matches_scipy_sqrtm(num):
  rng = np.random.default_rng(num)
  x = rng.standard_normal((num, 64))
  y = 1.3 * rng.standard_normal((num, 64)) + 0.2
  ours = frechet.frechet_distance_from_features(x, y)
  assert isinstance(ours, float)
  assert ours == pytest.approx(_scipy_fd(x, y), rel=1e-7)


def test_trace_sqrt_is_exact_for_near_singular_covariances():
  rng = np.random.default_rng(1)
  rotation, _ = np.linalg.qr(rng.standard_normal((64, 64)))
  a = np.r_[np.ones(10), np.full(54, 1e-10)]  # condition numbers of 1e10
  b = np.r_[np.full(32, 2.0), np.full(32, 1e-9)]
  cov1, cov2 = rotation @ np.diag(a) @ rotation.T, rotation @ np.diag(b) @ rotation.T
  # Commuting covariances: tr((S1 S2)^1/2) = sum(sqrt(a_i b_i)).
  assert frechet.trace_sqrt_product(cov1, cov2) == pytest.approx(np.sum(np.sqrt(a * b)), rel=1e-7)
  fd = frechet.frechet_distance(np.zeros(64), cov1, np.zeros(64), cov2)
  assert fd == pytest.approx(a.sum() + b.sum() - 2 * np.sum(np.sqrt(a * b)), rel=1e-7)


def test_frechet_rejects_bad_input():
  with pytest.raises(ValueError, match="NaN"):
    frechet.frechet_distance_from_features(np.full((4, 3), np.nan), np.zeros((4, 3)))
  with pytest.raises(ValueError, match="feature sizes differ"):
    frechet.frechet_distance_from_features(np.zeros((4, 3)), np.zeros((4, 2)))
  with pytest.raises(ValueError, match=r"\[N, D\]"):
    frechet.gaussian_stats(np.zeros(5))
  with pytest.raises(ValueError, match="symmetric"):
    frechet.frechet_distance(np.zeros(2), np.array([[1.0, 1.0], [0.0, 1.0]]), np.zeros(2),
                             np.eye(2))


# ---------------------------------------------------------------------------------------------
# KID / KVD


def test_mmd_matches_the_definition_written_as_loops():
  rng = np.random.default_rng(0)
  x, y = rng.standard_normal((5, 3)), rng.standard_normal((4, 3)) + 0.5
  k = lambda a, b: (a @ b / 3 + 1) ** 3
  xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
  yy = sum(k(y[i], y[j]) for i in range(4) for j in range(4) if i != j) / 12
  xy = sum(k(x[i], y[j]) for i in range(5) for j in range(4)) / 20
  assert kernel.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_mmd_estimator_is_unbiased():
  rng = np.random.default_rng(0)
  trials, n, mu = 3000, 8, 0.5
  # 1-D features: (xy + 1)^3 = 1 + 3xy + 3x^2y^2 + x^3y^3, so between N(0,1) and N(mu,1)
  # MMD^2 = 3 (dm1)^2 + 3 (dm2)^2 + (dm3)^2 with moments m1 = mu, m2 = 1 + mu^2, m3 = mu^3 + 3mu.
  exact = 3 * mu**2 + 3 * mu**4 + (mu**3 + 3 * mu) ** 2
  different = np.array([kernel.mmd2_unbiased(rng.standard_normal((n, 1)),
                                             rng.standard_normal((n, 1)) + mu)
                        for _ in range(trials)])
  same = np.array([kernel.mmd2_unbiased(rng.standard_normal((n, 1)), rng.standard_normal((n, 1)))
                   for _ in range(trials)])
  for estimates, expected in ((different, exact), (same, 0.0)):
    stderr = estimates.std() / np.sqrt(trials)
    assert abs(estimates.mean() - expected) < 4 * stderr
  # The biased (V-statistic) estimate, which keeps the diagonal, is far off at this sample size.
  x, y = rng.standard_normal((trials, n, 1)), rng.standard_normal((trials, n, 1))
  biased = np.mean([kernel.polynomial_kernel(a, a).mean() + kernel.polynomial_kernel(b, b).mean()
                    - 2 * kernel.polynomial_kernel(a, b).mean() for a, b in zip(x, y)])
  assert biased > 20 * same.std() / np.sqrt(trials)


def test_kernel_distance_is_seeded_and_caps_the_subset_size():
  rng = np.random.default_rng(0)
  x, y = rng.standard_normal((30, 4)), rng.standard_normal((20, 4)) + 1.0
  a = kernel.kernel_distance(x, y, num_subsets=10, subset_size=1000, seed=5)
  assert a == kernel.kernel_distance(x, y, num_subsets=10, subset_size=1000, seed=5)
  assert a["subset_size"] == 20 and a["mean"] > 0
  assert kernel.kernel_distance(x, y, num_subsets=10, subset_size=10, seed=6)["mean"] != \
      kernel.kernel_distance(x, y, num_subsets=10, subset_size=10, seed=5)["mean"]
  with pytest.raises(ValueError, match="subset_size"):
    kernel.kernel_distance(x, y, subset_size=1)


# ---------------------------------------------------------------------------------------------
# Cosine scores


def test_cosine_similarity_and_clip_score_with_toy_encoders():
  cosines = similarity.cosine_similarity([[1, 0], [1, 1]], [[2, 0], [-1, -1]])
  assert cosines == pytest.approx([1, -1])
  with pytest.raises(ValueError, match="zero norm"):
    similarity.cosine_similarity([[0, 0]], [[1, 0]])
  colors = {"red": [1.0, 0.0, 0.0], "green": [0.0, 1.0, 0.0]}
  image_encoder = lambda frames: frames.reshape(len(frames), -1, 3).mean(1).astype(float) + 1e-3
  text_encoder = lambda texts: np.array([colors[t] for t in texts])
  red = np.zeros((4, 8, 8, 3), np.uint8)
  red[..., 0] = 255
  green = np.roll(red, 1, axis=-1)
  matched = similarity.clip_score([red, green], ["red", "green"], image_encoder, text_encoder)
  swapped = similarity.clip_score([red, green], ["green", "red"], image_encoder, text_encoder)
  assert matched["score"] == pytest.approx(1.0, abs=1e-5)
  assert swapped["score"] == pytest.approx(0.0, abs=1e-5)
  with pytest.raises(ValueError, match="no caption"):
    similarity.clip_score([red], [""], image_encoder, text_encoder)


# ---------------------------------------------------------------------------------------------
# AV-Align


def test_av_align_iou_follows_the_recipe():
  fps = 10.0
  assert av_align.intersection_over_union([0.52, 1.0], [0.5, 1.3], fps) == pytest.approx(1 / 3)
  # Strict window: exactly one frame away does not match.
  assert av_align.intersection_over_union([0.6], [0.5], fps) == 0.0
  # The recipe counts audio peaks, so two sounds near one motion peak both match (score > 1).
  assert av_align.intersection_over_union([0.48, 0.53], [0.5], fps) == pytest.approx(2.0)
  assert av_align.intersection_over_union([], [], fps) is None
  # Strict local maxima only: plateaus and end points are not peaks.
  assert av_align.video_peaks([3, 0, 2, 2, 0, 1, 0, 5], fps).tolist() == [0.5]


def test_av_align_on_a_constructed_clip_gives_the_hand_computed_score():
  fps, num_frames, size = 10.0, 20, 64
  # A grey blob that is still except for 4-pixel jumps into frames 5 and 13: motion peaks at
  # 0.5 s and 1.3 s. Noise bursts at 0.52, 1.0 and 1.33 s: two of three sounds near a peak.
  steps = np.zeros(num_frames)
  steps[[5, 13]] = 4
  xs = 16 + np.cumsum(steps)
  yy, xx = np.mgrid[0:size, 0:size]
  frames = np.stack([np.exp(-((xx - x) ** 2 + (yy - 32) ** 2) / 50.0) for x in xs])
  video = np.repeat(np.round(frames * 255).astype(np.uint8)[..., None], 3, axis=-1)
  audio = np.zeros(int(num_frames / fps * RATE), np.float32)
  rng = np.random.default_rng(0)
  for t in (0.52, 1.0, 1.33):
    start = int(t * RATE)
    audio[start:start + 800] += 0.5 * np.exp(-np.arange(800) / 150) * rng.standard_normal(800)
  result = av_align.av_align_clip(video, fps, audio, RATE)
  assert result["video_peaks"] == pytest.approx([0.5, 1.3])
  assert result["audio_peaks"] == pytest.approx([0.52, 1.0, 1.33], abs=0.03)
  assert result["score"] == pytest.approx(2 / (3 + 2 - 2))  # I=2, |A|=3, |V|=2


# ---------------------------------------------------------------------------------------------
# Synthetic sync score


def test_match_events_maximizes_the_number_of_pairs():
  # Nearest-first matching would pair 0.5 with 0.4 and leave both others alone.
  assert sorted(sync.match_events([0.0, 0.5], [0.4, 0.9], 0.45)) == [(0, 0), (1, 1)]
  assert sync.match_events([0.0], [1.0], 0.5) == []


def test_sync_is_perfect_on_real_clips_and_falls_as_audio_is_shifted():
  clips = _clips(24)
  truth = [sync.ground_truth_times(c["meta"]).tolist() for c in clips]

  def score(shift):
    events = [sync.clip_events(c["video"], _delay(c["audio"], shift), FPS, RATE) for c in clips]
    return sync.sync_score(events, truth)

  real = score(0)
  assert real["score"] == 1.0 and real["within_1_frame"]["f1"] == 1.0
  assert real["same_frame"]["tp"] >= 40  # the clips do hold events to match
  assert real["mean_abs_offset_frames"] < 0.1
  check = real["detectors_vs_ground_truth"]
  assert check["audio_onsets"]["f1"] == 1.0 and check["visual_impacts"]["f1"] == 1.0
  shifted = {k: score(k) for k in (1, 2, 4)}
  for k, result in shifted.items():
    assert result["score"] < 0.6, k
  assert shifted[1]["within_1_frame"]["f1"] > 0.85  # one frame late is still within one frame
  assert shifted[2]["within_1_frame"]["f1"] < 0.75 and shifted[4]["within_1_frame"]["f1"] < 0.75
  assert 0.7 < shifted[1]["mean_abs_offset_frames"] < 1.2
  assert shifted[2]["mean_abs_offset_frames"] > shifted[1]["mean_abs_offset_frames"]
  assert shifted[1]["mean_offset_frames"] > 0.5  # audio late: positive offsets


def test_visual_impacts_have_sub_frame_timing():
  errors = []
  for clip in _clips(10, seed=11):
    impacts, _ = sync.visual_impacts(clip["video"], FPS)
    truth = sync.ground_truth_times(clip["meta"])
    for t in impacts:
      errors.append(np.min(np.abs(truth - t)) * FPS)
  assert len(errors) >= 15 and np.median(errors) < 0.05 and np.max(errors) < 0.3


def test_sync_scores_only_what_the_video_shows():
  visible = np.ones(16, bool)
  visible[7] = False  # an object hidden in frame 7
  # Frames 1..14 are scored except the 3 frames around frame 7.
  assert sync.scored_intervals(visible, FPS) == [(1 / FPS, 6 / FPS), (9 / FPS, 15 / FPS)]
  # An unmatched sound inside an unscored stretch is not a miss; one inside a scored one is.
  counts = sync.count_matches([0.9, 0.3], [], sync.scored_intervals(visible, FPS), FPS, 0.5)
  assert (counts["tp"], counts["fp"], counts["fn"]) == (0, 0, 1)


# ---------------------------------------------------------------------------------------------
# Temporal consistency and the in-training hook


def test_pixel_fallback_is_labelled_and_measures_frame_change():
  still = np.zeros((4, 8, 8, 3), np.uint8)
  flicker = still.copy()
  flicker[1::2] = 255
  result = temporal.pixel_consistency([still, flicker])
  assert result["per_clip"] == [0.0, 1.0] and result["score"] == 0.5
  assert result["fallback"] and result["method"] == temporal.PIXEL_NAME
  with pytest.raises(ValueError, match="at least 2 frames"):
    temporal.pixel_consistency([still[:1]])


def test_evaluate_samples_returns_scalars():
  clips = _clips(4, num_frames=16, seed=5)
  videos = np.stack([c["video"] for c in clips])
  audios = np.stack([c["audio"] for c in clips])
  meta = {"fps": FPS, "sample_rate": RATE}
  out = in_training.evaluate_samples(videos, audios, meta, metrics=("sync", "temporal"))
  assert out["eval/sync_score"] == 1.0
  assert set(out) == {"eval/sync_score", "eval/sync_f1_within_1_frame",
                      "eval/sync_mean_abs_offset_frames", "eval/temporal_" + temporal.PIXEL_NAME}
  assert all(isinstance(v, float) for v in out.values())
  late = in_training.evaluate_samples(videos, [_delay(a, 2) for a in audios], meta,
                                      metrics=("sync",))
  assert late["eval/sync_score"] < 0.6
  with pytest.raises(ValueError, match="unknown in-training metric"):
    in_training.evaluate_samples(videos, audios, meta, metrics=("fad",))
  with pytest.raises(ValueError, match="'fps'"):
    in_training.evaluate_samples(videos, audios, {"sample_rate": RATE})


def test_sync_is_undefined_without_events():
  still = np.zeros((8, 32, 32, 3), np.uint8)
  silence = np.zeros(RATE, np.float32)
  result = sync.sync_score([sync.clip_events(still, silence, FPS, RATE)])
  assert result["score"] is None and result["per_clip"] == [None]
  assert in_training.evaluate_samples([still], [silence], {"fps": FPS, "sample_rate": RATE},
                                      metrics=("sync",)) == {}
