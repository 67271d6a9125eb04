"""The README's main job, shortened: the demo config trains, checkpoints, logs and writes mp4s
whose streams have the configured duration (measured by decoding with ffmpeg)."""

import glob
import os

import numpy as np
import pytest

from avgen.sample import api, media
from avgen.train import trainer
from configs import stage2


@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("demo")
  config = stage2.get_config("demo")
  config.data.synthetic_clips = 32
  config.train.num_steps = 2
  config.sample.every = 2
  config.sample.num_steps = 2
  config.mel.griffin_lim_iters = 4
  trainer.train(config, str(workdir))
  return str(workdir), config


def test_demo_leaves_checkpoint_logs_and_mp4s(demo_workdir):
  workdir, config = demo_workdir
  assert os.listdir(os.path.join(workdir, "checkpoints"))
  assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  mp4s = sorted(glob.glob(os.path.join(workdir, "samples", "*.mp4")))
  assert len(mp4s) == len(config.sample.prompts)
  seconds = config.data.num_frames / config.data.fps
  for path in mp4s:
    info = media.probe(path)
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac"
    assert info["num_frames"] == config.data.num_frames
    assert info["video_duration"] == pytest.approx(seconds, abs=1e-3)
    assert info["audio_duration"] == pytest.approx(seconds, abs=1024 / info["sample_rate"])
    assert os.path.exists(path[:-4] + ".wav")


@pytest.mark.parametrize("mode", ["text_to_audio_video", "audio_to_video", "video_to_audio"])
def test_sampling_modes_from_the_workdir(demo_workdir, tmp_path, mode):
  workdir, config = demo_workdir
  d = config.data
  tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(int(d.audio_seconds * d.sample_rate)) / d.sample_rate)
  wav = str(tmp_path / "in.wav")
  media.write_wav(wav, tone.astype(np.float32), d.sample_rate)
  frames = np.zeros((d.num_frames, d.height, d.width, 3), np.uint8)
  frames[:, 8:16, 8:16] = 255
  mp4 = str(tmp_path / "in.mp4")
  media.write_mp4(mp4, frames, d.fps)
  clip = api.generate_from_workdir(workdir, "a red circle bounces", mode=mode, audio_path=wav,
                                   video_path=mp4, num_steps=2)
  assert clip.video.shape == (d.num_frames, d.height, d.width, 3) and clip.video.dtype == np.uint8
  assert clip.audio.shape == (int(d.audio_seconds * d.sample_rate),)
  if mode == "audio_to_video":
    np.testing.assert_allclose(clip.audio, media.read_audio(wav, sample_rate=d.sample_rate), atol=1e-6)
  if mode == "video_to_audio":
    np.testing.assert_array_equal(clip.video, media.read_video(mp4, fps=d.fps)[0])
  out = str(tmp_path / "out.mp4")
  clip.save(out)
  assert media.probe(out)["num_frames"] == d.num_frames
