"""What several benchmarks share."""

from __future__ import annotations

import numpy as np


def synthetic_batch(config, shapes, seed=0):
  b, lt = config.data.batch_size, config.data.caption_max_len
  rng = np.random.default_rng(seed)
  return {
      "video": rng.standard_normal((b,) + shapes["video"], np.float32),
      "audio": rng.standard_normal((b,) + shapes["audio"], np.float32),
      "text_ids": rng.integers(3, 200, (b, lt)).astype(np.int32),
      "text_mask": np.ones((b, lt), bool),
      "skipped_records": np.zeros((b,), np.int32),
  }
