"""CLIP tokenization from local files only: Hugging Face tokenizer files or open_clip's BPE
vocabulary.

Two sources, the same token ids for CLIP's vocabulary:
  * a directory with Hugging Face CLIP tokenizer files (vocab.json + merges.txt, or
    tokenizer.json): transformers' `CLIPTokenizer`;
  * open_clip's / OpenAI's BPE vocabulary `bpe_simple_vocab_16e6.txt.gz` (shipped inside the
    open_clip package; a header line, then one merge per line), or a directory holding it:
    `BPETokenizer`, CLIP's byte-level BPE implemented here (no transformers, torch or ftfy).
"""
from __future__ import annotations

import gzip
import html
import importlib.util
import os
import re
import unicodedata
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

BPE_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
# OpenAI / open_clip read at most this many merges (a 49408-token vocabulary)
MAX_MERGES = 49152 - 256 - 2
# OpenAI CLIP's pre-tokenization: special tokens, contractions, letter runs, single digits,
# runs of other non-space characters (case-insensitive; text is lowercased first)
_PATTERN = (r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"
            r"|[^\s\p{L}\p{N}]+")
_SINGLE_QUOTES = re.compile("[\u02bc\u2018-\u201b]")  # as ftfy.chardata.SINGLE_QUOTE_RE
_DOUBLE_QUOTES = re.compile("[\u201c-\u201f]")


@lru_cache()
def bytes_to_unicode() -> Dict[int, str]:
  """CLIP's (GPT-2's) reversible byte -> printable unicode character table.

  The 188 printable Latin-1 bytes map to themselves and come first, in byte order; the
  other 68 follow, in byte order, mapped to chr(256 + n). This order is the order of the
  first 256 vocabulary entries.
  """
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
  table = {b: chr(b) for b in keep}
  for n, b in enumerate(b for b in range(256) if b not in table):
    table[b] = chr(256 + n)
  return table


def basic_clean(text: str) -> str:
  """open_clip's `basic_clean` without ftfy: of ftfy's fixes, NFC normalization and
  straight quotes (ftfy's `uncurl_quotes`); then HTML entities unescaped twice
  (`&amp;amp;` -> `&`), stripped. (ftfy's mojibake, ligature and full-width fixes are not
  applied: text that needs them may tokenize differently from open_clip.)"""
  text = unicodedata.normalize("NFC", text)
  text = _DOUBLE_QUOTES.sub('"', _SINGLE_QUOTES.sub("'", text))
  return html.unescape(html.unescape(text)).strip()


def whitespace_clean(text: str) -> str:
  """Runs of whitespace -> one space, stripped."""
  return " ".join(text.split())


def clean_text(text: str) -> str:
  """The text open_clip's CLIP tokenizer encodes ("lower" cleaning)."""
  return whitespace_clean(basic_clean(text)).lower()


def read_bpe_merges(path: str) -> List[Tuple[str, str]]:
  """The merges of a gzipped CLIP BPE vocabulary file (the first line is a header)."""
  with gzip.open(path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")[1:]
  merges = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    parts = tuple(line.split())
    if len(parts) != 2:
      raise ValueError(f"{path}: line {i + 2} is not a merge (two symbols): {line!r}")
    merges.append(parts)
  return merges[:MAX_MERGES]


class BPETokenizer:
  """CLIP's byte-level BPE tokenizer (OpenAI CLIP / open_clip `SimpleTokenizer`).

  The vocabulary is the 256 byte symbols, the same with `</w>` (end of word), one token per
  merge, then `<|startoftext|>` and `<|endoftext|>` (so end-of-text has the largest id).
  Text is cleaned as open_clip does (`clean_text`), split by CLIP's pattern, each piece
  byte-encoded and merged by rank.

  Attributes:
    encoder: token string -> id.
    sot_token_id, eot_token_id: the start / end-of-text ids.
    context_length: default length of `__call__`'s rows.
  """

  def __init__(self, merges: Sequence[Tuple[str, str]], context_length: int = 77):
    try:
      import regex
    except ImportError as err:  # pragma: no cover - transformers depends on regex
      raise ImportError("BPETokenizer needs the regex package (pip install regex)") from err
    self.byte_encoder = bytes_to_unicode()
    symbols = list(self.byte_encoder.values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
    self.encoder = {tok: i for i, tok in enumerate(vocab)}
    self.decoder = {i: tok for tok, i in self.encoder.items()}
    self.bpe_ranks = {tuple(m): i for i, m in enumerate(merges)}
    self.sot_token_id, self.eot_token_id = self.encoder[SOT], self.encoder[EOT]
    self.context_length = context_length
    self._pattern = regex.compile(_PATTERN, regex.IGNORECASE)
    self._cache = {SOT: SOT, EOT: EOT}

  @classmethod
  def from_file(cls, path: str, context_length: int = 77) -> "BPETokenizer":
    """From a gzipped BPE vocabulary file (`bpe_simple_vocab_16e6.txt.gz`)."""
    return cls(read_bpe_merges(path), context_length)

  @property
  def vocab_size(self) -> int:
    return len(self.encoder)

  def get_vocab(self) -> Dict[str, int]:
    return dict(self.encoder)

  def bpe(self, piece: str) -> List[str]:
    """The BPE symbols of one byte-encoded piece (lowest-rank pair merged first)."""
    if piece in self._cache:
      return self._cache[piece].split(" ")
    word = list(piece[:-1]) + [piece[-1] + "</w>"]
    while len(word) > 1:
      ranked = [(self.bpe_ranks.get(p, float("inf")), p) for p in zip(word, word[1:])]
      rank, (first, second) = min(ranked, key=lambda rp: rp[0])
      if rank == float("inf"):
        break
      merged, i = [], 0
      while i < len(word):
        if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    self._cache[piece] = " ".join(word)
    return word

  def encode(self, text: str) -> List[int]:
    """Token ids of `text`, without start / end-of-text."""
    ids = []
    for piece in self._pattern.findall(clean_text(text)):
      piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
      ids.extend(self.encoder[s] for s in self.bpe(piece))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """Text of token ids (start / end-of-text and padding kept as written)."""
    byte_decoder = {c: b for b, c in self.byte_encoder.items()}
    text = "".join(self.decoder[int(i)] for i in ids)
    out = bytearray()
    for c in text.replace("</w>", " "):
      out.extend(bytes([byte_decoder[c]]) if c in byte_decoder else c.encode("utf-8"))
    return out.decode("utf-8", errors="replace")

  def __call__(self, texts, context_length: Optional[int] = None) -> np.ndarray:
    """`[len(texts), context_length]` int32: start, tokens, end-of-text, zero padding;
    too-long texts are cut and end with end-of-text (as open_clip)."""
    if isinstance(texts, str):
      texts = [texts]
    n = context_length or self.context_length
    out = np.zeros((len(texts), n), np.int32)
    for row, text in enumerate(texts):
      ids = [self.sot_token_id] + self.encode(text) + [self.eot_token_id]
      if len(ids) > n:
        ids = ids[:n]
        ids[-1] = self.eot_token_id
      out[row, :len(ids)] = ids
    return out


def open_clip_bpe_path() -> Optional[str]:
  """open_clip's packaged `bpe_simple_vocab_16e6.txt.gz` if open_clip is installed (found
  without importing it), else None."""
  try:
    spec = importlib.util.find_spec("open_clip")
  except (ImportError, ValueError):
    return None
  for d in (spec.submodule_search_locations or []) if spec else []:
    p = os.path.join(d, BPE_VOCAB_FILE)
    if os.path.isfile(p):
      return p
  return None


def _has_hf_files(d: str) -> bool:
  has = lambda n: os.path.isfile(os.path.join(d, n))
  return (has("vocab.json") and has("merges.txt")) or has("tokenizer.json")


def load_tokenizer(path: str, context_length: int = 77):
  """A CLIP tokenizer from local files; never touches the network.

  Args:
    path: one of
      * a directory with Hugging Face CLIP tokenizer files (vocab.json + merges.txt, or
        tokenizer.json; e.g. a Hugging Face CLIP checkpoint or an open_clip hub directory):
        transformers' `CLIPTokenizer`;
      * open_clip's BPE vocabulary file `bpe_simple_vocab_16e6.txt.gz` (or any gzipped
        file in that format), or a directory holding it: a `BPETokenizer`.
    context_length: default row length of a `BPETokenizer` (`tokenize` passes its own).

  Returns:
    A tokenizer for `tokenize`.
  """
  if os.path.isfile(path) and path.endswith(".gz"):
    return BPETokenizer.from_file(path, context_length)
  if os.path.isdir(path):
    if _has_hf_files(path):
      try:
        from transformers import CLIPTokenizer
      except ImportError as err:  # pragma: no cover
        raise ImportError("Hugging Face tokenizer files need transformers (pip install "
                          f"transformers), or pass open_clip's {BPE_VOCAB_FILE}") from err
      return CLIPTokenizer.from_pretrained(path, local_files_only=True)
    if os.path.isfile(os.path.join(path, BPE_VOCAB_FILE)):
      return BPETokenizer.from_file(os.path.join(path, BPE_VOCAB_FILE), context_length)
  found = open_clip_bpe_path()
  hint = f" (open_clip is installed: {found})" if found else ""
  what = "does not exist" if not os.path.exists(path) else "is not a tokenizer source"
  raise ValueError(f"{path!r} {what}: pass a directory with Hugging Face CLIP tokenizer files "
                   f"(vocab.json + merges.txt, or tokenizer.json), open_clip's {BPE_VOCAB_FILE}"
                   f"{hint}, or a directory holding it")


def tokenize(tokenizer, texts: Sequence[str], context_length: int = 77) -> np.ndarray:
  """`[len(texts), context_length]` int32 token ids: start token, BPE tokens, end-of-text,
  padding; too-long texts are truncated with end-of-text kept as the last token (as
  open_clip's tokenizer). `tokenizer` is a `BPETokenizer` or transformers' CLIPTokenizer."""
  if isinstance(texts, str):
    texts = [texts]
  if isinstance(tokenizer, BPETokenizer):
    return tokenizer(list(texts), context_length)
  out = tokenizer(list(texts), padding="max_length", max_length=context_length,
                  truncation=True, return_tensors="np")
  return np.asarray(out["input_ids"], dtype=np.int32)
