"""Stage 2: joint audio-video training; the alignment loss ramps up.

  python -m avgen.main --config=configs/stage2.py:demo --workdir=/tmp/demo   # CPU, minutes
  python -m avgen.main --config=configs/stage2.py:size=2B --workdir=DIR --config.data.path='/data/*.array_record'
"""

from configs.base import get_base_config


def get_config(arg=None):
  c = get_base_config(arg)
  c.stage = "stage2"
  c.diffusion.joint = True
  c.loss.diffusion, c.loss.align, c.loss.perceptual, c.loss.temporal = 1.0, 0.1, 0.05, 0.0
  c.loss.align_ramp_steps = c.train.num_steps // 4
  c.train.learning_rate = 5e-5
  if c.size == "demo":
    # The demo trains ~1k steps on a laptop CPU; the spec's 5e-5 is for long runs on big data.
    c.train.learning_rate = 1e-3
  return c
