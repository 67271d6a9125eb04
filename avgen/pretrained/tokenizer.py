"""Tokenizers of pretrained text encoders (through transformers), shaped like ByteTokenizer.

`TextTokenizer(hf_tokenizer, max_len)(texts) -> (ids int32 [B, max_len], mask bool [B, max_len])`
pads on the right to max_len and cuts longer captions (keeping the end-of-text token, which the
CLIP tower pools), so batches have one static shape.
"""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

import numpy as np

from avgen.pretrained import hub


class TextTokenizer:

  def __init__(self, hf_tokenizer, max_len: int):
    limit = getattr(hf_tokenizer, "model_max_length", None)
    if max_len < 2:
      raise ValueError(f"TextTokenizer: max_len must be >= 2, got {max_len}")
    if limit is not None and limit < 10**9 and max_len > limit:
      raise ValueError(f"TextTokenizer: max_len {max_len} > the tokenizer's model_max_length "
                       f"{limit} (the encoder has no positions beyond it)")
    self.hf, self.max_len = hf_tokenizer, max_len
    self.vocab_size = len(hf_tokenizer)

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(texts, str):
      raise TypeError("TextTokenizer expects a list of strings, got one str")
    enc = self.hf(list(texts), padding="max_length", truncation=True, max_length=self.max_len,
                  return_attention_mask=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    mask = np.asarray(enc["attention_mask"], bool)
    if ids.shape != (len(texts), self.max_len):
      raise RuntimeError(f"TextTokenizer: tokenizer returned {ids.shape}, expected "
                         f"{(len(texts), self.max_len)}")
    return ids, mask

  def empty(self, batch: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The empty caption, the 'no text' input of classifier-free guidance."""
    return self([""] * batch)

  def decode(self, ids: np.ndarray) -> str:
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(source: str | os.PathLike, max_len: int, *,
                   cache_dir: str | os.PathLike | None = None) -> TextTokenizer:
  """The tokenizer saved with a checkpoint (local dir or hub id), e.g. CLIP's or T5's.

  Only tokenizer files are downloaded (hub.TOKENIZER_PATTERNS), and the folder need hold no
  weights: a hub repo or subfolder with just a tokenizer (e.g. 'owner/name/tokenizer') works.
  """
  import transformers  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else hub.default_cache_dir()
  path = hub.resolve(source, what="load_tokenizer", cache_dir=root,
                     patterns=hub.TOKENIZER_PATTERNS, require_weights=False)
  try:
    hf = transformers.AutoTokenizer.from_pretrained(str(path))
  except (OSError, ValueError) as e:
    raise ValueError(f"load_tokenizer: no usable tokenizer files in {path} ({e})") from e
  return TextTokenizer(hf, max_len)
