"""open_clip's BPE vocabulary file as a tokenizer source: hand-derived ids, open_clip's
text cleaning, and agreement with transformers' CLIPTokenizer built from the same merges."""
import gzip
import html
import json
import os
import shutil

import numpy as np
import pytest

from saft_jax import models as M
from saft_jax.models import tokenizer as T

# A tiny vocabulary in the format of bpe_simple_vocab_16e6.txt.gz: a header line, then one
# merge per line, symbols in CLIP's byte-to-unicode alphabet ("é" is the bytes "Ã©").
MERGES = ["p h", "ph o", "pho t", "phot o</w>", "c a", "ca t</w>", "t h", "th e</w>",
          "o f</w>", "' s</w>", "d o", "do g</w>", "! !</w>", "Ã ©</w>", "c af</w>", "a f</w>"]
# The vocabulary: 256 byte symbols, the same with </w>, one per merge, then start / end of
# text. Printable ASCII comes first in byte order, so "a" is 97 - 33 = 64 and "a</w>" 320
# (as in CLIP's 49408-token vocabulary).
W = 256          # offset of the "</w>" symbols
M0 = 512         # id of the first merge
SOT, EOT = M0 + len(MERGES), M0 + len(MERGES) + 1


def _ascii(c, end=False):
  return ord(c) - 33 + (W if end else 0)


def _write_bpe(path, merges=MERGES):
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write("\n".join(["\"bpe_simple_vocab_16e6.txt#version: 0.2"] + merges) + "\n")


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
  d = tmp_path_factory.mktemp("bpe")
  p = str(d / T.BPE_VOCAB_FILE)
  _write_bpe(p)
  return p


@pytest.fixture(scope="module")
def tok(bpe_path):
  return M.load_tokenizer(bpe_path)


def test_hand_derived_ids(tok):
  assert isinstance(tok, M.BPETokenizer) and tok.vocab_size == M0 + len(MERGES) + 2
  assert (tok.sot_token_id, tok.eot_token_id) == (SOT, EOT)
  # pieces: "a" "photo" "of" "the" "cat" "'s" "dog" "!!" "zz"
  want = [_ascii("a", True), M0 + 3, M0 + 8, M0 + 7, M0 + 5, M0 + 9, M0 + 11, M0 + 12,
          _ascii("z"), _ascii("z", True)]
  assert tok.encode("a photo of the cat's dog!! zz") == want
  # "phot" ends in "t</w>", which no merge takes: "pho" + "t</w>"
  assert tok.encode("phot") == [M0 + 1, _ascii("t", True)]
  # lowest rank first: "c a" (rank 4) before "a f</w>" (rank 15), so "c af</w>" never applies
  assert tok.encode("caf") == [M0 + 4, _ascii("f", True)]
  # "é" (UTF-8 c3 a9) is one merged symbol; "3" is one digit per piece
  assert tok.encode("é 33") == [M0 + 13, _ascii("3", True), _ascii("3", True)]


def test_cleaning_as_open_clip(tok):
  # HTML entities unescaped twice, whitespace runs collapsed, lowercased, curly quotes
  same = ["the cat & dog", "the cat &amp; dog", "The  CAT &amp;amp; dog", "\tthe cat\n& dog  "]
  ids = [tok.encode(t) for t in same]
  assert all(i == ids[0] for i in ids)
  assert ids[0] == [M0 + 7, M0 + 5, _ascii("&", True), M0 + 11]
  assert tok.encode("cat\u2019s") == tok.encode("cat's") == [M0 + 5, M0 + 9]
  # without the cleaning "&amp;" would be the pieces "&", "amp", ";"
  assert len(tok.encode("&amp;")) == 1


def test_rows_padding_truncation(tok):
  ids = M.tokenize(tok, ["a photo", "x" * 40], context_length=6)
  assert ids.dtype == np.int32 and ids.shape == (2, 6)
  assert list(ids[0]) == [SOT, _ascii("a", True), M0 + 3, EOT, 0, 0]  # open_clip pads with 0
  assert list(ids[1]) == [SOT] + [_ascii("x")] * 4 + [EOT]  # cut, end-of-text kept
  assert np.argmax(ids[0]) == 3  # argmax pooling finds end-of-text
  assert list(M.tokenize(tok, "a photo", 4)[0]) == [SOT, _ascii("a", True), M0 + 3, EOT]


def test_header_only_and_bad_lines(tmp_path):
  p = str(tmp_path / "v.txt.gz")
  _write_bpe(p, [])
  t = M.load_tokenizer(p)
  assert t.vocab_size == 514 and t.encode("ab") == [_ascii("a"), _ascii("b", True)]
  _write_bpe(p, ["a b c"])
  with pytest.raises(ValueError, match="line 2 is not a merge"):
    M.load_tokenizer(p)


def test_sources(bpe_path, tmp_path):
  d = tmp_path / "dir"
  d.mkdir()
  shutil.copy(bpe_path, d / T.BPE_VOCAB_FILE)
  assert isinstance(M.load_tokenizer(str(d)), M.BPETokenizer)
  with pytest.raises(ValueError, match=r"does not exist.*vocab\.json.*bpe_simple_vocab_16e6"):
    M.load_tokenizer(str(tmp_path / "empty_dir_missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="not a tokenizer source"):
    M.load_tokenizer(str(tmp_path / "empty"))


def _hf_files(d):
  """vocab.json + merges.txt for the same merges, the vocabulary laid out with
  transformers' own byte-to-unicode table (not ours)."""
  try:
    from transformers.convert_slow_tokenizer import bytes_to_unicode
  except ImportError:
    pytest.skip("transformers without convert_slow_tokenizer.bytes_to_unicode")
  symbols = list(bytes_to_unicode().values())
  vocab = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in MERGES]
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(vocab)}, f)
  with open(os.path.join(d, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(MERGES) + "\n")


def test_matches_transformers_clip_tokenizer(tok, tmp_path):
  pytest.importorskip("transformers")
  _hf_files(str(tmp_path / "hf"))
  hf = M.load_tokenizer(str(tmp_path / "hf"))
  assert not isinstance(hf, M.BPETokenizer)
  texts = ["a photo of the cat's dog!!", "Tom &amp; Jerry", "fish &amp;amp; chips",
           "  multiple   spaces\tand\nnew lines ", "punctuation: a-b, c.d; (e)!? \"q\" [x]",
           "MiXeD CaSe PhOtO", "naïve café", "1234 5.6e-7", "it's we'll they're I'd",
           "x" * 100, "ok 😀 ünïcödé"]
  # transformers does not unescape HTML entities: give it the text open_clip unescapes
  want = hf([html.unescape(html.unescape(t)) for t in texts])["input_ids"]
  for t, w in zip(texts, want):
    assert [SOT] + tok.encode(t) + [EOT] == list(w), t
  # the same rows (up to padding: transformers pads with end-of-text, open_clip with 0)
  ours, theirs = M.tokenize(tok, texts, 12), M.tokenize(
      hf, [html.unescape(html.unescape(t)) for t in texts], 12)
  for a, b in zip(ours, theirs):
    n = list(a).index(EOT) + 1
    assert list(a[:n]) == list(b[:n]) and not a[n:].any()


def test_real_vocabulary_matches_open_clip_if_installed():
  open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")
  path = M.open_clip_bpe_path()
  assert path is not None and os.path.isfile(path)
  ref = open_clip_tokenizer.SimpleTokenizer(path)
  ours = M.load_tokenizer(path)
  texts = ["a photo of a cat.", "Tom &amp; Jerry", "A  photo\tof the  DOG!!",
           "it's 2024, isn't it?", "naïve café", "x" * 200]
  np.testing.assert_array_equal(M.tokenize(ours, texts), ref(texts).numpy())
