"""Zero-shot heads (hand computation, cache), tokenizer, templates."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("transformers")

from saft_jax import models as M  # noqa: E402

import hf_utils as H  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tok"))
  vocab = H.write_tiny_tokenizer(d)
  tok = M.load_tokenizer(d)
  cfg = M.CLIPConfig(M.VisionConfig(image_size=8, patch_size=4, width=16, layers=1, heads=2,
                                    output_dim=8),
                     M.TextConfig(context_length=24, vocab_size=vocab, width=16, layers=1,
                                  heads=2, output_dim=8))
  clip = M.CLIP(cfg, H.random_params(M.init_clip_params, cfg, seed=3))
  return tok, clip


def test_tokenizer(setup):
  tok, clip = setup
  ids = M.tokenize(tok, ["a photo of a cat.", "x" * 40], context_length=12)
  assert ids.shape == (2, 12) and ids.dtype == np.int32
  vocab = tok.get_vocab()
  assert ids[0, 0] == vocab["<|startoftext|>"]
  assert list(ids[0, 1:3]) == [vocab["a</w>"], vocab["photo</w>"]]
  assert ids[1, -1] == vocab["<|endoftext|>"]  # truncated, end-of-text kept
  # end-of-text has the largest id, so argmax pooling finds it
  assert np.argmax(ids[0]) == list(ids[0]).index(vocab["<|endoftext|>"])


def test_head_matches_hand_computation_and_cache(setup, tmp_path):
  tok, clip = setup
  classes, templates = ["cat", "dog", "3"], ["a photo of a {c}.", lambda c: f"the {c}!"]
  head = M.zeroshot_head(clip, tok, classes, templates, cache_dir=str(tmp_path), batch_size=4)
  assert head.shape == (8, 3) and head.dtype == jnp.float32
  # hand computation, one prompt at a time, in NumPy
  enc = jax.jit(clip.encode_text)
  cols = []
  for c in classes:
    es = []
    for t in ("a photo of a {c}.".replace("{c}", c), f"the {c}!"):
      ids = M.tokenize(tok, [t], clip.config.text.context_length)
      e = np.asarray(enc(clip.params, ids), np.float64)[0]
      es.append(e / np.linalg.norm(e))
    m = np.mean(es, 0)
    cols.append(m / np.linalg.norm(m))
  ref = np.stack(cols, 1) * np.exp(float(clip.params["logit_scale"]))
  np.testing.assert_allclose(head, ref, rtol=1e-5, atol=1e-5)
  files = os.listdir(tmp_path)
  assert len(files) == 1 and files[0].endswith(".npy")
  # cached: same result without recomputation; a changed params tree gets a new key
  np.testing.assert_array_equal(
      M.zeroshot_head(clip, tok, classes, templates, cache_dir=str(tmp_path)), head)
  p2 = dict(clip.params, logit_scale=clip.params["logit_scale"] + 1.0)
  M.zeroshot_head(clip, tok, classes, templates, params=p2, cache_dir=str(tmp_path))
  M.zeroshot_head(clip, tok, classes[:2], templates, cache_dir=str(tmp_path))
  assert len(os.listdir(tmp_path)) == 3


def test_classify_is_argmax_cosine(setup):
  tok, clip = setup
  classes = ["cat", "dog", "bird", "7"]
  head = M.zeroshot_head(clip, tok, classes, ["a photo of a {c}."])
  imgs = jax.random.normal(jax.random.key(0), (6, 8, 8, 3))
  emb = np.asarray(jax.jit(clip.encode_image)(clip.params, imgs), np.float64)
  logits = np.asarray(M.classify(head, emb))
  class_emb = np.asarray(head, np.float64).T
  cos = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (
      class_emb / np.linalg.norm(class_emb, axis=1, keepdims=True)).T
  np.testing.assert_array_equal(logits.argmax(1), cos.argmax(1))
  np.testing.assert_allclose(logits, cos * np.exp(float(clip.params["logit_scale"])), rtol=1e-5,
                             atol=1e-5)


def test_templates_and_classnames():
  counts = {k: len(M.get_templates(k)) for k in M.DATASETS}
  assert counts == dict(Cars=8, DTD=8, EuroSAT=3, GTSRB=3, MNIST=1, RESISC45=18, SUN397=2,
                        SVHN=1)
  n = {k: len(M.get_classnames(k)) for k in M.DATASETS}
  assert n == dict(Cars=196, DTD=47, EuroSAT=10, GTSRB=43, MNIST=10, RESISC45=45, SUN397=397,
                   SVHN=10)
  assert all(len(set(M.get_classnames(k))) == n[k] for k in M.DATASETS)
  assert M.get_classnames("sun397")[0] == "abbey" and M.get_classnames("GTSRBVal")[14] == "stop"
  assert M.format_prompts(M.get_templates("MNIST"), "7") == ['a photo of the number: "7".']
  with pytest.raises(ValueError, match="unknown dataset"):
    M.get_templates("ImageNet")
