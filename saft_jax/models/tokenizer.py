"""CLIP tokenization through transformers' `CLIPTokenizer`, from a local directory only."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def load_tokenizer(path: str):
  """`transformers.CLIPTokenizer` from a local directory (vocab.json + merges.txt, or a
  Hugging Face CLIP checkpoint directory). Never touches the network."""
  try:
    from transformers import CLIPTokenizer
  except ImportError as err:  # pragma: no cover
    raise ImportError("tokenization needs transformers (pip install transformers)") from err
  return CLIPTokenizer.from_pretrained(path, local_files_only=True)


def tokenize(tokenizer, texts: Sequence[str], context_length: int = 77) -> np.ndarray:
  """`[len(texts), context_length]` int32 token ids: start token, BPE tokens, end-of-text,
  padding; too-long texts are truncated with end-of-text kept as the last token (as
  open_clip's tokenizer)."""
  if isinstance(texts, str):
    texts = [texts]
  out = tokenizer(list(texts), padding="max_length", max_length=context_length,
                  truncation=True, return_tensors="np")
  return np.asarray(out["input_ids"], dtype=np.int32)
