"""Train avgen: `python -m avgen.main --config=configs/stage2.py:demo --workdir=/tmp/demo`.

`--config` takes a config file with `get_config(arg)` and `:arg` (size / key=value pairs);
any field can be overridden with `--config.section.field=value`. A run started on a workdir
that holds checkpoints resumes from the latest one.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config(arg)).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  import jax
  from avgen import config as config_lib
  from avgen.train import trainer
  from avgen.parallel import distributed

  distributed.initialize_from_environment()
  config = _CONFIG.value
  try:
    config_lib.validate(config, jax.device_count())
  except config_lib.ConfigError as e:
    sys.exit(f"invalid config: {e}")
  try:
    trainer.train(config, _WORKDIR.value)
  except trainer.TrainingStopped as e:
    sys.exit(f"training stopped: {e}")


def run():
  app.run(main)


if __name__ == "__main__":
  run()
