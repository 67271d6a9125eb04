"""Small configs and data for trainer tests (kept tiny so each compile takes seconds on 2 cores)."""

import os

from configs import stage2
from data_pipeline import synthetic


def tiny_config(**overrides):
  c = stage2.get_config("demo")
  c.data.num_frames, c.data.fps = 4, 8
  c.data.audio_seconds = 0.5
  c.data.height = c.data.width = 16
  c.data.batch_size = 8
  c.data.caption_max_len = 24
  c.model.width, c.model.depth, c.model.num_heads = 32, 1, 2
  c.model.video_patch = (1, 4, 4)
  c.model.audio_patch = 4
  c.model.audio_head_depth, c.model.video_head_depth, c.model.video_head_channels = 1, 1, 8
  c.model.align_width = 16
  c.model.text_width, c.model.text_depth, c.model.text_heads = 32, 1, 2
  c.mel.n_mels = 16
  c.mel.griffin_lim_iters = 2
  c.train.num_steps = 6
  c.train.warmup_steps = 2
  c.train.checkpoint_every = 3
  c.train.log_every = 1
  c.sample.every = 0
  c.sample.num_steps = 2
  c.sample.prompts = ("a red circle bounces",)
  for key, value in overrides.items():
    section, field = key.split("__")
    c[section][field] = value
  return c


def make_shards(directory, config, num_clips=32, seed=0):
  d = config.data
  return synthetic.make_dataset(
      os.fspath(directory), num_clips, seed=seed, samples_per_shard=16, num_frames=d.num_frames,
      height=d.height, width=d.width, fps=d.fps, sample_rate=d.sample_rate)


def get_config(arg=None):
  """Lets `python -m avgen.main --config=tests/train_utils.py` run the tiny config (subprocess tests)."""
  del arg
  return tiny_config()
