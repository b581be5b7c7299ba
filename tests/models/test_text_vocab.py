"""Text tokenizers for T5: the byte vocabulary (vs transformers' ByT5Tokenizer) and
SentencePiece tokenizers read from local files."""
import os

import numpy as np
import pytest

from saft_jax import models as M
from saft_jax.models import text_vocab as TV

TEXTS = ["hello world", "", "héllo — 日本語 ✓", "a" * 40, "tab\tnew\nline  end "]


def test_byte_vocab_layout():
  v = TV.ByteVocab()
  assert v.vocab_size == 384 and TV.ByteVocab(extra_ids=0).vocab_size == 259
  assert (v.pad_id, v.eos_id, v.unk_id) == (0, 1, 2)
  ids, mask = v.encode(["ab", "é"], 5)
  assert ids.dtype == np.int32 and mask.dtype == np.int32
  assert ids.tolist() == [[100, 101, 1, 0, 0], [0xC3 + 3, 0xA9 + 3, 1, 0, 0]]
  assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
  # truncation keeps EOS last; without EOS the first max_len bytes
  assert v.encode("abcdef", 4)[0].tolist() == [[100, 101, 102, 1]]
  ids, mask = v.encode("abcdef", 4, add_eos=False)
  assert ids.tolist() == [[100, 101, 102, 103]] and mask.tolist() == [[1, 1, 1, 1]]
  assert v.encode_one("ab") == [100, 101, 1]
  with pytest.raises(ValueError, match="max_len"):
    v.encode(["a"], 0)
  with pytest.raises(TypeError, match="strings"):
    v.encode([b"a"], 4)
  with pytest.raises(ValueError, match="extra_ids"):
    TV.ByteVocab(extra_ids=-1)


def test_byte_vocab_decode():
  v = TV.ByteVocab()
  ids, _ = v.encode(TEXTS, 64)
  assert v.decode(ids) == TEXTS
  assert M.decode_texts(v, ids) == TEXTS
  assert v.decode(ids[2]) == TEXTS[2]
  assert v.decode([100, 1, 101]) == "a"  # stops at EOS
  assert v.decode([0, 2, 100, 300, 101]) == "ab"  # pad, unknown, sentinel dropped
  # a truncated multi-byte character is dropped, not garbled
  ids, _ = v.encode(["日本"], 3)
  assert v.decode(ids) == [""]
  with pytest.raises(ValueError, match="1-D or 2-D"):
    v.decode(np.zeros((1, 1, 1), np.int32))


def test_byte_vocab_matches_byt5_tokenizer():
  transformers = pytest.importorskip("transformers")
  if not hasattr(transformers, "ByT5Tokenizer"):
    pytest.skip("transformers has no ByT5Tokenizer")
  tok = transformers.ByT5Tokenizer()
  v = TV.ByteVocab()
  assert len(tok) == v.vocab_size
  for max_len in (8, 64):
    ref = tok(TEXTS, max_length=max_len, truncation=True, padding="max_length",
              return_tensors="np")
    ids, mask = v.encode(TEXTS, max_len)
    np.testing.assert_array_equal(ids, ref["input_ids"])
    np.testing.assert_array_equal(mask, ref["attention_mask"])
    hf_ids, hf_mask = M.encode_texts(tok, TEXTS, max_len)
    np.testing.assert_array_equal(hf_ids, ids)
    np.testing.assert_array_equal(hf_mask, mask)
  ids, _ = v.encode(TEXTS, 64)
  assert M.decode_texts(tok, ids) == v.decode(ids) == TEXTS


def _unigram_vocab():
  """A small T5-style Unigram vocabulary: pad, EOS, unknown, then pieces."""
  pieces = ["▁hello", "▁world", "▁the", "▁", "s", "h", "e", "l", "o", "w", "r", "d", "t"]
  return [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [
      (p, -1.0 - 0.1 * i) for i, p in enumerate(pieces)]


def test_load_text_tokenizer_from_tokenizer_json(tmp_path):
  transformers = pytest.importorskip("transformers")
  src = transformers.T5Tokenizer(vocab=_unigram_vocab(), extra_ids=3)
  d = str(tmp_path / "tok")
  src.save_pretrained(d)
  assert os.path.isfile(os.path.join(d, "tokenizer.json"))
  tok = M.load_text_tokenizer(d)
  ids, mask = M.encode_texts(tok, ["hello world", "the worlds"], 6)
  assert ids.dtype == np.int32
  assert ids.tolist() == [[3, 4, 1, 0, 0, 0], [5, 4, 7, 1, 0, 0]]
  assert mask.tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]]
  assert M.decode_texts(tok, ids) == ["hello world", "the worlds"]
  # tokens after EOS (greedy_decode pads there) are ignored
  assert M.decode_texts(tok, [[3, 1, 4, 4]]) == ["hello"]
  # tokenizer.json alone
  os.remove(os.path.join(d, "tokenizer_config.json"))
  assert M.encode_texts(M.load_text_tokenizer(d), ["hello world"], 4)[0].tolist() == \
      [[3, 4, 1, 0]]


def test_load_text_tokenizer_errors(tmp_path):
  with pytest.raises(ValueError, match="no tokenizer.json"):
    M.load_text_tokenizer(str(tmp_path))
  other = tmp_path / "vocab.txt"
  other.write_text("a\n")
  with pytest.raises(ValueError, match=".model"):
    M.load_text_tokenizer(str(other))
  with pytest.raises(ValueError, match="neither"):
    M.load_text_tokenizer(str(tmp_path / "absent"))
  try:
    import sentencepiece  # noqa: F401
  except ImportError:
    fake = tmp_path / "spiece.model"
    fake.write_bytes(b"\x00")
    with pytest.raises(ImportError, match="sentencepiece"):
      M.load_text_tokenizer(str(fake))


def test_load_sentencepiece_model(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  pytest.importorskip("transformers")
  lines = ["the quick brown fox jumps over the lazy dog",
           "hello world, the world says hello", "a small vocabulary for a test"] * 20
  prefix = str(tmp_path / "tiny")
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=prefix,
                                 vocab_size=48, model_type="unigram", pad_id=0, eos_id=1,
                                 unk_id=2, bos_id=-1, hard_vocab_limit=False)
  sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
  tok = M.load_text_tokenizer(prefix + ".model")
  for text in ("hello world", "the lazy fox"):
    assert tok(text)["input_ids"] == sp.encode(text) + [1]
  ids, _ = M.encode_texts(tok, ["hello world"], 12)
  assert M.decode_texts(tok, ids) == ["hello world"]
  # a directory holding only spiece.model
  d = tmp_path / "spiece_dir"
  d.mkdir()
  (d / "spiece.model").write_bytes(open(prefix + ".model", "rb").read())
  assert M.load_text_tokenizer(str(d))("hello world")["input_ids"] == \
      sp.encode("hello world") + [1]


def test_word_vocab_layout_and_round_trip():
  v = TV.WordVocab(("the", "dog", "ran", ",", ":"), extra_ids=2)
  assert v.vocab_size == 3 + 5 + 2 and (v.pad_id, v.eos_id, v.unk_id) == (0, 1, 2)
  ids, mask = v.encode(["the dog ran", "the cat, <X1> ran:"], 8)
  assert ids.dtype == np.int32 and mask.dtype == np.int32
  # words, then EOS, then padding; "cat" is unknown; <X1> is the second sentinel id
  assert ids.tolist() == [[3, 4, 5, 1, 0, 0, 0, 0], [3, 2, 6, 9, 5, 7, 1, 0]]
  assert mask.tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]]
  assert v.encode("the dog ran the dog", 3)[0].tolist() == [[3, 4, 1]]  # EOS kept
  assert v.encode("the dog", 2, add_eos=False)[0].tolist() == [[3, 4]]
  assert v.encode_one("<X5>") == [2, 1]  # a sentinel beyond extra_ids is unknown
  assert M.encode_texts(v, ["the dog"], 4)[0].tolist() == [[3, 4, 1, 0]]
  # decoding: words joined by spaces, no space before punctuation, unknown dropped
  assert v.decode(v.encode("the dog , ran:", 8)[0][0]) == "the dog, ran:"
  assert M.decode_texts(v, v.encode(["<X0> dog <X1>", "the"], 6)[0]) == ["<X0> dog <X1>", "the"]
  assert v.decode([3, 1, 4]) == "the"
  for bad, match in ((("a", "a"), "repeated"), (("two words",), "single words"),
                     (("<X0>",), "sentinels")):
    with pytest.raises(ValueError, match=match):
      TV.WordVocab(bad)
  with pytest.raises(ValueError, match="extra_ids"):
    TV.WordVocab(("a",), extra_ids=-1)
  with pytest.raises(ValueError, match="1-D or 2-D"):
    v.decode(np.zeros((1, 1, 1), np.int32))
