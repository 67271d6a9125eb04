"""Fréchet distance between Gaussian fits of two feature sets (FAD, FVD, FID all use it).

FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

The usual recipe takes `scipy.linalg.sqrtm(S1 @ S2)`, whose input is not symmetric: with few
samples (a rank-deficient covariance) it can return complex values or lose digits, and
implementations patch it by adding eps * I. Here the trace term is computed from a symmetric
matrix instead: S1 S2 is similar to A = S1^(1/2) S2 S1^(1/2) (conjugate by S1^(1/2)), so
tr((S1 S2)^(1/2)) = sum(sqrt(eig(A))), and A is symmetric positive semi-definite. Both
eigendecompositions are symmetric (`eigh`, float64), and eigenvalues that rounding pushed below
zero, or that are below the rounding noise of `eigh`, are set to zero (exact for PSD inputs).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


class GaussianStats(NamedTuple):
  """Mean [D] and covariance [D, D] (unbiased, ddof=1) of a feature set, float64."""
  mean: np.ndarray
  cov: np.ndarray
  count: int


def check_features(name: str, features: Any, min_count: int = 2) -> np.ndarray:
  """Features as float64 [N, D]; raises ValueError naming `name` for a wrong shape or NaN."""
  features = np.asarray(features)
  if features.ndim != 2:
    raise ValueError(f"{name}: features must have shape [N, D], got {features.shape}")
  if features.shape[0] < min_count:
    raise ValueError(f"{name}: needs at least {min_count} feature vectors, got {features.shape[0]}")
  if not np.issubdtype(features.dtype, np.number):
    raise ValueError(f"{name}: features must be numeric, got dtype {features.dtype}")
  features = features.astype(np.float64)
  if not np.all(np.isfinite(features)):
    raise ValueError(f"{name}: features contain NaN or infinite values")
  return features


def gaussian_stats(features: Any, name: str = "features") -> GaussianStats:
  features = check_features(name, features)
  return GaussianStats(features.mean(axis=0), np.cov(features, rowvar=False, ddof=1),
                       features.shape[0])


def _psd_eigvals(eigvals: np.ndarray) -> np.ndarray:
  """Eigenvalues of a PSD matrix with the rounding noise around 0 set to 0.

  `eigh` gets each eigenvalue to about D * eps * max|eigenvalue| absolutely, so smaller ones are
  noise; left in, their square roots (~1e-6 relative each) would add up to a visible error for
  rank-deficient covariances (fewer samples than dimensions).
  """
  floor = len(eigvals) * np.finfo(np.float64).eps * max(float(np.abs(eigvals).max()), 0.0)
  return np.where(eigvals > floor, eigvals, 0.0)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  eigvals, eigvecs = np.linalg.eigh(matrix)
  return (eigvecs * np.sqrt(_psd_eigvals(eigvals))) @ eigvecs.T


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
  """tr((cov1 cov2)^(1/2)) for symmetric PSD cov1, cov2 (see the module docstring)."""
  root1 = _psd_sqrt(cov1)
  inner = root1 @ cov2 @ root1
  inner = (inner + inner.T) / 2  # symmetric up to rounding; eigh reads one triangle only
  return float(np.sum(np.sqrt(_psd_eigvals(np.linalg.eigvalsh(inner)))))


def _check_stats(name: str, mean: Any, cov: Any) -> tuple[np.ndarray, np.ndarray]:
  mean, cov = np.asarray(mean, np.float64), np.asarray(cov, np.float64)
  if mean.ndim != 1 or cov.shape != (mean.shape[0],) * 2:
    raise ValueError(f"{name}: mean must be [D] and cov [D, D], got {mean.shape} and {cov.shape}")
  if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(cov))):
    raise ValueError(f"{name}: mean or cov contains NaN or infinite values")
  if not np.allclose(cov, cov.T, rtol=1e-6, atol=1e-9 * max(1.0, float(np.abs(cov).max()))):
    raise ValueError(f"{name}: cov must be symmetric")
  return mean, cov


def frechet_distance(mean1: Any, cov1: Any, mean2: Any, cov2: Any) -> float:
  """Fréchet distance between N(mean1, cov1) and N(mean2, cov2); >= 0 up to rounding."""
  mean1, cov1 = _check_stats("first Gaussian", mean1, cov1)
  mean2, cov2 = _check_stats("second Gaussian", mean2, cov2)
  if mean1.shape != mean2.shape:
    raise ValueError(f"frechet_distance: feature sizes differ: {mean1.shape[0]} vs "
                     f"{mean2.shape[0]}")
  diff = mean1 - mean2
  value = diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt_product(cov1, cov2)
  # The terms cancel to 0 for equal Gaussians; rounding may leave a tiny negative residue.
  return float(max(value, 0.0))


def frechet_distance_from_features(features1: Any, features2: Any) -> float:
  """Fréchet distance between Gaussian fits (mean, unbiased covariance) of two feature sets."""
  s1 = gaussian_stats(features1, "first feature set")
  s2 = gaussian_stats(features2, "second feature set")
  return frechet_distance(s1.mean, s1.cov, s2.mean, s2.cov)
