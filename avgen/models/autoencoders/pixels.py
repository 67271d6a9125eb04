"""Pixel "latent space" for small configs: uint8 RGB <-> float32 in [-1, 1], no learned parts."""

from __future__ import annotations

import numpy as np


class PixelCodec:
  """encode: uint8 [..., H, W, 3] -> float32 [..., H, W, 3] in [-1, 1]; decode inverts it.

  Attributes mirror a learned codec's: `downsample` (spatial factor) and `channels`.
  """

  downsample = 1
  channels = 3

  def encode(self, video: np.ndarray) -> np.ndarray:
    video = np.asarray(video)
    if video.dtype != np.uint8:
      raise TypeError(f"PixelCodec.encode: video must be uint8, got {video.dtype}")
    if video.ndim < 3 or video.shape[-1] != 3:
      raise ValueError(
          f"PixelCodec.encode: video must have shape [..., H, W, 3], got {video.shape}")
    return video.astype(np.float32) / np.float32(127.5) - np.float32(1.0)

  def decode(self, latent) -> np.ndarray:
    """Float [..., H, W, 3] (values outside [-1, 1] are clipped) -> uint8."""
    latent = np.asarray(latent, np.float32)
    if latent.ndim < 3 or latent.shape[-1] != 3:
      raise ValueError(
          f"PixelCodec.decode: latent must have shape [..., H, W, 3], got {latent.shape}")
    return np.clip(np.rint((latent + 1.0) * 127.5), 0, 255).astype(np.uint8)
