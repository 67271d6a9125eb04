"""Stage 3: high-quality fine-tuning with stronger alignment and a temporal term.

  python -m avgen.main --config=configs/stage3.py:size=2B --workdir=DIR
"""

from configs.base import get_base_config


def get_config(arg=None):
  c = get_base_config(arg)
  c.stage = "stage3"
  c.diffusion.joint = True
  c.loss.diffusion, c.loss.align, c.loss.perceptual, c.loss.temporal = 1.0, 0.5, 0.1, 0.02
  c.loss.align_ramp_steps = 0
  c.train.learning_rate = 1e-5
  return c
