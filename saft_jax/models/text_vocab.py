"""Text tokenizers for T5 models: SentencePiece vocabularies read through transformers
from local files, and a byte-level vocabulary (ByT5's) that needs no files.

Both kinds go through `encode_texts` / `decode_texts`, which return and take NumPy
arrays: `[N, max_len]` int32 ids (EOS appended, padded with the pad id, truncated
keeping EOS last) and an int32 attention mask.

References:
  Xue et al., "ByT5: Towards a Token-Free Future with Pre-trained Byte-to-Byte Models",
  TACL 2022 (arXiv:2105.13626).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import tempfile
from typing import List, Sequence, Tuple, Union

import numpy as np

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
BYTE_OFFSET = 3  # byte b has id b + 3
NUM_BYTES = 256


def _as_list(texts) -> List[str]:
  if isinstance(texts, str):
    return [texts]
  texts = list(texts)
  for t in texts:
    if not isinstance(t, str):
      raise TypeError(f"texts must be strings, got {type(t).__name__}")
  return texts


def _check_max_len(max_len) -> int:
  if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 1:
    raise ValueError(f"max_len must be a positive int, got {max_len!r}")
  return int(max_len)


@dataclasses.dataclass(frozen=True)
class ByteVocab:
  """ByT5's byte-level vocabulary: 0 pad, 1 EOS, 2 unknown, then the 256 UTF-8 byte
  values (byte b is id b + 3), then `extra_ids` sentinel ids. The ids are those of
  transformers' `ByT5Tokenizer`; unlike it, text is always read as bytes (a literal
  "</s>" in a text is four bytes, not EOS).

  Attributes:
    extra_ids: sentinel ids after the bytes (ByT5 checkpoints have 125, which makes
      `vocab_size` 384, their embedding size).
  """
  extra_ids: int = 125

  pad_id = PAD_ID
  eos_id = EOS_ID
  unk_id = UNK_ID

  def __post_init__(self):
    if isinstance(self.extra_ids, bool) or not isinstance(self.extra_ids, (int, np.integer)) \
        or self.extra_ids < 0:
      raise ValueError(f"ByteVocab: extra_ids must be a non-negative int, got {self.extra_ids!r}")

  @property
  def vocab_size(self) -> int:
    return BYTE_OFFSET + NUM_BYTES + self.extra_ids

  def encode_one(self, text: str, add_eos: bool = True) -> List[int]:
    """Ids of one text (UTF-8 bytes + 3), EOS appended; no padding or truncation."""
    ids = [b + BYTE_OFFSET for b in text.encode("utf-8")]
    return ids + [EOS_ID] if add_eos else ids

  def encode(self, texts: Union[str, Sequence[str]], max_len: int, *,
             add_eos: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """`(ids, mask)`, both `[N, max_len]` int32: the bytes of each text, then EOS, then
    padding; a longer text keeps its first `max_len - 1` bytes and EOS (its first
    `max_len` bytes when `add_eos=False`)."""
    return _pack([self.encode_one(t, add_eos=False) for t in _as_list(texts)],
                 _check_max_len(max_len), add_eos)

  def decode_one(self, ids: Sequence[int]) -> str:
    """Text of one id sequence: bytes up to the first EOS; pad, unknown and sentinel ids
    are dropped, as are incomplete UTF-8 sequences."""
    out = bytearray()
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == EOS_ID:
        break
      if BYTE_OFFSET <= i < BYTE_OFFSET + NUM_BYTES:
        out.append(i - BYTE_OFFSET)
    return out.decode("utf-8", errors="ignore")

  def decode(self, ids) -> Union[str, List[str]]:
    """`decode_one` of a 1-D sequence, or the list of texts of a 2-D batch."""
    return _decode(self, ids)


# ----------------------------------------------------------------------------- words
WORD_PATTERN = re.compile(r"<X\d+>|[A-Za-z0-9_]+|[^\sA-Za-z0-9_]")
_NO_SPACE_BEFORE = (",", ".", ":", ";", "!", "?")


@dataclasses.dataclass(frozen=True)
class WordVocab:
  """A closed word-level vocabulary: 0 pad, 1 EOS, 2 unknown, then `words` in order,
  then `extra_ids` sentinels `<X0>`, `<X1>`, ... (T5's sentinel ids sit at the end of
  the vocabulary the same way).

  Text is split into words (letters, digits and `_`), single punctuation characters and
  sentinel strings `<Xi>` (:data:`WORD_PATTERN`); a word not in `words` is the unknown
  id. Made for closed languages such as the offline text suite's grammar
  (:func:`saft_jax.data.text_offline.vocabulary`), where it plays the role of T5's
  SentencePiece vocabulary (one id per word, not per byte).

  Attributes:
    words: the vocabulary's words, distinct, none of them a sentinel string.
    extra_ids: number of sentinel ids after the words.
  """
  words: Tuple[str, ...]
  extra_ids: int = 0

  pad_id = PAD_ID
  eos_id = EOS_ID
  unk_id = UNK_ID

  def __post_init__(self):
    words = tuple(self.words)
    object.__setattr__(self, "words", words)
    if isinstance(self.extra_ids, bool) or not isinstance(self.extra_ids, (int, np.integer)) \
        or self.extra_ids < 0:
      raise ValueError(f"WordVocab: extra_ids must be a non-negative int, got {self.extra_ids!r}")
    if len(set(words)) != len(words):
      dup = sorted({w for w in words if words.count(w) > 1})
      raise ValueError(f"WordVocab: repeated words {dup}")
    bad = [w for w in words if not isinstance(w, str) or WORD_PATTERN.fullmatch(w) is None
           or w.startswith("<X")]
    if bad:
      raise ValueError(f"WordVocab: {bad[:5]} are not single words (or are sentinels)")
    table = {w: i + BYTE_OFFSET for i, w in enumerate(words)}
    start = BYTE_OFFSET + len(words)
    table.update({f"<X{i}>": start + i for i in range(self.extra_ids)})
    object.__setattr__(self, "_ids", table)
    object.__setattr__(self, "_tokens", {i: w for w, i in table.items()})

  @property
  def vocab_size(self) -> int:
    return BYTE_OFFSET + len(self.words) + self.extra_ids

  def encode_one(self, text: str, add_eos: bool = True) -> List[int]:
    """Ids of one text's words (unknown words: `unk_id`), EOS appended."""
    ids = [self._ids.get(w, UNK_ID) for w in WORD_PATTERN.findall(text)]
    return ids + [EOS_ID] if add_eos else ids

  def encode(self, texts: Union[str, Sequence[str]], max_len: int, *,
             add_eos: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """`(ids, mask)` `[N, max_len]` int32, truncated and padded as `ByteVocab.encode`."""
    return _pack([self.encode_one(t, add_eos=False) for t in _as_list(texts)],
                 _check_max_len(max_len), add_eos)

  def decode_one(self, ids: Sequence[int]) -> str:
    """Text of one id sequence up to the first EOS (pad and unknown ids dropped)."""
    out = []
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == EOS_ID:
        break
      word = self._tokens.get(i)
      if word is None:
        continue
      if out and word in _NO_SPACE_BEFORE:
        out[-1] += word
      else:
        out.append(word)
    return " ".join(out)

  def decode(self, ids) -> Union[str, List[str]]:
    """`decode_one` of a 1-D sequence, or the list of texts of a 2-D batch."""
    return _decode(self, ids)


def _decode(vocab, ids) -> Union[str, List[str]]:
  """`vocab.decode_one` of a 1-D sequence, or the list of texts of a 2-D batch."""
  arr = np.asarray(ids)
  if arr.ndim == 1:
    return vocab.decode_one(arr)
  if arr.ndim == 2:
    return [vocab.decode_one(row) for row in arr]
  raise ValueError(f"{type(vocab).__name__}.decode: ids must be 1-D or 2-D, got shape "
                   f"{arr.shape}")


def _pack(rows: List[List[int]], max_len: int, add_eos: bool) -> Tuple[np.ndarray, np.ndarray]:
  """`(ids, mask)` of id rows: EOS appended (kept on truncation), right padding."""
  ids = np.full((len(rows), max_len), PAD_ID, np.int32)
  mask = np.zeros((len(rows), max_len), np.int32)
  for i, row in enumerate(rows):
    row = row[:max_len - 1] + [EOS_ID] if add_eos else row[:max_len]
    ids[i, :len(row)] = row
    mask[i, :len(row)] = 1
  return ids, mask


# ----------------------------------------------------------------------------- SentencePiece
def load_text_tokenizer(path: str):
  """A transformers tokenizer from local files only (never touches the network).

  Args:
    path: a tokenizer or checkpoint directory (tokenizer.json and/or spiece.model with
      tokenizer_config.json or config.json, as saved by transformers), a directory
      holding only `spiece.model`, or a SentencePiece `.model` file (both read as
      `T5Tokenizer`, which adds T5's 100 `<extra_id_*>` sentinels after the
      SentencePiece vocabulary). Reading a `.model` file needs the `sentencepiece`
      package; `tokenizer.json` does not.
  """
  try:
    from transformers import AutoTokenizer, T5Tokenizer
  except ImportError as err:  # pragma: no cover
    raise ImportError("load_text_tokenizer needs transformers (pip install transformers)") from err
  if os.path.isfile(path):
    if not path.endswith(".model"):
      raise ValueError(f"{path!r}: expected a SentencePiece .model file or a directory")
    _need_sentencepiece(path)
    with tempfile.TemporaryDirectory() as tmp:
      os.symlink(os.path.abspath(path), os.path.join(tmp, "spiece.model"))
      return T5Tokenizer.from_pretrained(tmp, local_files_only=True)
  if not os.path.isdir(path):
    raise ValueError(f"{path!r} is neither a tokenizer directory nor a .model file")
  has = lambda name: os.path.isfile(os.path.join(path, name))
  if has("tokenizer_config.json") or has("config.json"):
    if not has("tokenizer.json") and has("spiece.model"):
      _need_sentencepiece(os.path.join(path, "spiece.model"))
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
  if has("tokenizer.json"):
    return T5Tokenizer.from_pretrained(path, local_files_only=True)
  if has("spiece.model"):
    _need_sentencepiece(os.path.join(path, "spiece.model"))
    return T5Tokenizer.from_pretrained(path, local_files_only=True)
  raise ValueError(f"{path!r}: no tokenizer.json, spiece.model, tokenizer_config.json or "
                   f"config.json")


def _need_sentencepiece(path: str) -> None:
  if importlib.util.find_spec("sentencepiece") is None:
    raise ImportError(f"reading the SentencePiece model {path!r} needs the sentencepiece "
                      f"package (pip install sentencepiece); a tokenizer.json needs nothing")


# ----------------------------------------------------------------------------- both kinds
def encode_texts(tokenizer, texts: Union[str, Sequence[str]],
                 max_len: int) -> Tuple[np.ndarray, np.ndarray]:
  """`(ids, mask)` `[N, max_len]` int32 from a `ByteVocab`, a `WordVocab` or a
  transformers tokenizer
  (T5's: EOS appended, right padding, truncation keeping EOS)."""
  max_len = _check_max_len(max_len)
  texts = _as_list(texts)
  if isinstance(tokenizer, (ByteVocab, WordVocab)):
    return tokenizer.encode(texts, max_len)
  out = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len,
                  return_tensors="np")
  return (np.asarray(out["input_ids"], np.int32), np.asarray(out["attention_mask"], np.int32))


def decode_texts(tokenizer, ids) -> List[str]:
  """Texts of `[N, T]` ids (e.g. `greedy_decode` output): each row up to its first EOS,
  special tokens dropped."""
  arr = np.asarray(ids)
  if arr.ndim != 2:
    raise ValueError(f"decode_texts: ids must be [N, T], got shape {arr.shape}")
  if isinstance(tokenizer, (ByteVocab, WordVocab)):
    return tokenizer.decode(arr)
  eos = tokenizer.eos_token_id
  rows = []
  for row in arr.tolist():
    if eos is not None and eos in row:
      row = row[:row.index(eos)]
    rows.append(row)
  return tokenizer.batch_decode(rows, skip_special_tokens=True)
