"""Tokenizers: captions -> (ids int32 [B, L], mask bool [B, L]) with L = data.caption_max_len.

`ByteTokenizer` goes with the demo's trainable `byte` encoder (nothing to download). ids: 0 =
padding, 1 = begin, 2 = end, 3 + b for each UTF-8 byte b. A frozen pretrained encoder uses its
own tokenizer (`avgen.pretrained.tokenizer.TextTokenizer`, same call signature);
`build_tokenizer(config)` picks the one that goes with config.model.text_encoder. For both, the
empty caption `tokenizer([""])` is the "no text" input of classifier-free guidance and of text
dropout in training.
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


def build_tokenizer(config, *, cache_dir=None):
  """The tokenizer of config.model.text_encoder: ByteTokenizer, or the frozen encoder's own.

  A frozen encoder's tokenizer comes from model.text_tokenizer_source (default: the weights'
  source) through transformers; it is picklable, so grain worker processes can use it.
  """
  max_len = int(config.data.caption_max_len)
  if config.model.text_encoder == "byte":
    return ByteTokenizer(max_len)
  # pylint: disable=g-import-not-at-top  (transformers only when a pretrained encoder is used)
  from avgen.models.text_encoder import frozen_sources
  from avgen.pretrained.tokenizer import load_tokenizer
  _, source = frozen_sources(config)
  return load_tokenizer(source, max_len, cache_dir=cache_dir)
