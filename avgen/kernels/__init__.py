"""Attention kernels behind one entry point."""

from avgen.kernels.attention import IMPLS, attention

__all__ = ["IMPLS", "attention"]
