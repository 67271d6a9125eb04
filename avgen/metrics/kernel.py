"""Kernel distances (KID for images, KVD for videos): unbiased MMD^2 with a cubic polynomial kernel.

k(x, y) = (x . y / D + 1)^3 (Bińkowski et al., "Demystifying MMD GANs", the KID paper). The
unbiased estimator of MMD^2 between samples X (m) and Y (n) leaves out the diagonal terms
k(x_i, x_i), k(y_j, y_j):

  MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (n (n - 1))
            - 2 sum_{i, j} k(x_i, y_j) / (m n),

so its expectation is the population MMD^2 (0 for equal distributions; single estimates can be
negative). As in the KID paper, the reported value is the mean (and std) over `num_subsets`
random subsets of `subset_size` vectors from each set, drawn without replacement within a
subset, with a numpy Generator seeded by `seed`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from avgen.metrics.frechet import check_features


def polynomial_kernel(x: np.ndarray, y: np.ndarray, degree: int = 3,
                      coef0: float = 1.0) -> np.ndarray:
  """(x . y / D + coef0)^degree for all pairs: [m, D], [n, D] -> [m, n]."""
  return (x @ y.T / x.shape[1] + coef0) ** degree


def mmd2_unbiased(x: Any, y: Any, degree: int = 3, coef0: float = 1.0) -> float:
  """Unbiased MMD^2 estimate between the rows of x [m, D] and y [n, D] (m, n >= 2)."""
  x, y = check_features("x", x), check_features("y", y)
  if x.shape[1] != y.shape[1]:
    raise ValueError(f"mmd2_unbiased: feature sizes differ: {x.shape[1]} vs {y.shape[1]}")
  m, n = x.shape[0], y.shape[0]
  k_xx = polynomial_kernel(x, x, degree, coef0)
  k_yy = polynomial_kernel(y, y, degree, coef0)
  k_xy = polynomial_kernel(x, y, degree, coef0)
  within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
  within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
  return float(within_x + within_y - 2.0 * k_xy.mean())


def kernel_distance(features1: Any, features2: Any, *, num_subsets: int = 100,
                    subset_size: int = 1000, seed: int = 0) -> dict[str, Any]:
  """KID/KVD: mean and std of MMD^2_u over random subsets; subset size is capped by the sets."""
  x = check_features("first feature set", features1)
  y = check_features("second feature set", features2)
  if x.shape[1] != y.shape[1]:
    raise ValueError(f"kernel_distance: feature sizes differ: {x.shape[1]} vs {y.shape[1]}")
  if isinstance(num_subsets, bool) or not isinstance(num_subsets, int) or num_subsets < 1:
    raise ValueError(f"num_subsets: must be an int >= 1, got {num_subsets!r}")
  if isinstance(subset_size, bool) or not isinstance(subset_size, int) or subset_size < 2:
    raise ValueError(f"subset_size: must be an int >= 2, got {subset_size!r}")
  size = min(subset_size, x.shape[0], y.shape[0])
  rng = np.random.default_rng(seed)
  values = np.array([
      mmd2_unbiased(x[rng.choice(x.shape[0], size, replace=False)],
                    y[rng.choice(y.shape[0], size, replace=False)])
      for _ in range(num_subsets)])
  return {"mean": float(values.mean()), "std": float(values.std()), "num_subsets": num_subsets,
          "subset_size": size, "kernel": "(x.y/D + 1)^3", "estimator": "unbiased MMD^2"}
