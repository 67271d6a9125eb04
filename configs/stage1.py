"""Stage 1: single-modality pretraining (each example trains audio or video, not both).

  python -m avgen.main --config=configs/stage1.py:size=B --workdir=/tmp/stage1
"""

from configs.base import get_base_config


def get_config(arg=None):
  c = get_base_config(arg)
  c.stage = "stage1"
  c.diffusion.joint = False  # one modality per example; the other is pure noise, loss masked
  c.diffusion.audio_to_video_prob = 0.0
  c.diffusion.video_to_audio_prob = 0.0
  c.loss.diffusion, c.loss.align, c.loss.perceptual, c.loss.temporal = 1.0, 0.0, 0.0, 0.0
  c.train.learning_rate = 1e-4
  return c
