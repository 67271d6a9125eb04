"""Sampling: the Generator, clips and media I/O."""
