"""Byte-level tokenizer for the demo's trainable text encoder (nothing to download).

ids: 0 = padding, 1 = begin, 2 = end, 3 + b for each UTF-8 byte b. An empty caption is
[begin, end], which is also the "no text" input of classifier-free guidance.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

PAD, BOS, EOS, OFFSET = 0, 1, 2, 3
VOCAB_SIZE = OFFSET + 256


class ByteTokenizer:

  def __init__(self, max_len: int):
    if max_len < 3:
      raise ValueError(f"ByteTokenizer: max_len must be >= 3, got {max_len}")
    self.max_len = max_len
    self.vocab_size = VOCAB_SIZE

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Returns ids int32 [B, max_len] and mask bool [B, max_len]; long captions are cut."""
    if isinstance(texts, str):
      raise TypeError("ByteTokenizer expects a list of strings, got one str")
    ids = np.full((len(texts), self.max_len), PAD, np.int32)
    for i, text in enumerate(texts):
      body = np.frombuffer(text.encode("utf-8"), np.uint8)[: self.max_len - 2].astype(np.int32)
      row = np.concatenate([[BOS], body + OFFSET, [EOS]])
      ids[i, : len(row)] = row
    return ids, ids != PAD

  def decode(self, ids: np.ndarray) -> str:
    body = [int(i) - OFFSET for i in ids if int(i) >= OFFSET]
    return bytes(body).decode("utf-8", errors="replace")
