"""The README's main job, shortened: the demo config trains, checkpoints, logs and writes mp4s
whose streams have the configured duration (measured by decoding with ffmpeg)."""

import glob
import os
import subprocess
import sys

import numpy as np
import pytest

from avgen.sample import api, media
from configs import stage2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The README's command with fewer clips and steps (and a sample at the last one).
OVERRIDES = {"data.synthetic_clips": 32, "train.num_steps": 2, "sample.every": 2,
             "sample.num_steps": 2, "mel.griffin_lim_iters": 4}


@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory):
  """Runs `python -m avgen.main --config=configs/stage2.py:demo` as the README does: in its own
  process on one CPU device, like the laptop the demo is for (this process has 8 fake devices,
  whose sharded step compiles and checkpoints much more slowly)."""
  workdir = tmp_path_factory.mktemp("demo")
  xla_flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
               if not f.startswith("--xla_force_host_platform_device_count")]
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(xla_flags))
  cmd = [sys.executable, "-m", "avgen.main", "--config=configs/stage2.py:demo",
         f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in OVERRIDES.items()]]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  config = stage2.get_config("demo")
  for key, value in OVERRIDES.items():
    section, field = key.split(".")
    config[section][field] = value
  return str(workdir), config


def test_demo_leaves_checkpoint_logs_and_mp4s(demo_workdir):
  workdir, config = demo_workdir
  assert api.latest_step(workdir) == config.train.num_steps
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
