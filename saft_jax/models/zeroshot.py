"""Frozen zero-shot classification heads built from the text tower.

For each class: encode every prompt template with the text tower, L2-normalize each
embedding, average over templates, L2-normalize again; stack the classes into a
`[D, C]` matrix and multiply by `exp(logit_scale)`. Image features are L2-normalized
before the head (`classify`).

References:
  Radford et al., "Learning Transferable Visual Models From Natural Language
  Supervision", ICML 2021 (arXiv:2103.00020).
  Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023 (arXiv:2212.04089).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from saft_jax.models.clip import normalize
from saft_jax.models.tokenizer import tokenize

Template = Union[str, Callable[[str], str]]


def head_from_text_embeddings(text_embeddings: jax.Array, logit_scale) -> jax.Array:
  """The head from per-(class, template) text embeddings.

  Args:
    text_embeddings: `[C, T, D]` unnormalized embeddings (class, template).
    logit_scale: the model's log temperature (the head is scaled by its exp).

  Returns:
    `[D, C]` float32 head.
  """
  e = normalize(jnp.asarray(text_embeddings))
  per_class = normalize(jnp.mean(e, axis=1))
  return per_class.T * jnp.exp(jnp.asarray(logit_scale, jnp.float32))


def classify(head: jax.Array, image_embeddings: jax.Array) -> jax.Array:
  """Logits `[B, C]` = normalize(image_embeddings) @ head."""
  return normalize(image_embeddings) @ head.astype(jnp.float32)


def prompts(classnames: Sequence[str], templates: Sequence[Template]) -> list:
  """All prompts, class-major: `[c0 t0, c0 t1, ..., c1 t0, ...]`."""
  out = []
  for c in classnames:
    for t in templates:
      out.append(t(c) if callable(t) else t.replace("{c}", c))
  return out


def params_hash(tree) -> str:
  """sha256 over the paths, dtypes, shapes and bytes of every leaf."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    a = np.asarray(leaf)
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{a.dtype.name}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def zeroshot_head(clip, tokenizer, classnames: Sequence[str], templates: Sequence[Template], *,
                  params: Optional[dict] = None, cache_dir: Optional[str] = None,
                  batch_size: int = 256, compute_dtype=jnp.float32) -> jax.Array:
  """Builds (or loads from the cache) the frozen zero-shot head of a task.

  Args:
    clip: a `saft_jax.models.CLIP` (its config and `encode_text`).
    tokenizer: from `load_tokenizer` (a `BPETokenizer` or transformers' `CLIPTokenizer`).
    classnames: the task's class names, in label order.
    templates: prompt templates (strings with `{c}`, or callables `classname -> prompt`).
    params: full CLIP params (default `clip.params`); only the text tower and
      logit_scale are used.
    cache_dir: if given, the head is stored as `.npy` under a key made of the hash of
      the text params and logit_scale, the prompts (class names x templates) and the
      text config, and reused when the key matches.
    batch_size: prompts per text-tower call.
    compute_dtype: activations dtype of the text tower.

  Returns:
    `[D, C]` float32 head.
  """
  if not classnames or not templates:
    raise ValueError("zeroshot_head: classnames and templates must be non-empty")
  params = clip.params if params is None else params
  texts = prompts(classnames, templates)
  cache_path = None
  if cache_dir is not None:
    h = hashlib.sha256()
    h.update(params_hash({"text": params["text"], "logit_scale": params["logit_scale"]}).encode())
    h.update(json.dumps(texts).encode())
    h.update(repr(clip.config.text).encode())
    h.update(jnp.dtype(compute_dtype).name.encode())
    cache_path = os.path.join(cache_dir, f"zeroshot_head_{h.hexdigest()[:40]}.npy")
    if os.path.isfile(cache_path):
      return jnp.asarray(np.load(cache_path))
  tokens = tokenize(tokenizer, texts, clip.config.text.context_length)
  n = len(tokens)
  pad = (-n) % batch_size if n > batch_size else 0
  tokens = np.concatenate([tokens, np.repeat(tokens[-1:], pad, 0)]) if pad else tokens
  enc = jax.jit(lambda p, t: clip.encode_text(p, t, compute_dtype=compute_dtype))
  embs = [np.asarray(enc(params, tokens[i:i + batch_size]))
          for i in range(0, len(tokens), batch_size)]
  emb = np.concatenate(embs)[:n].reshape(len(classnames), len(templates), -1)
  head = head_from_text_embeddings(emb, params["logit_scale"])
  if cache_path is not None:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = cache_path + f".tmp{os.getpid()}.npy"
    np.save(tmp, np.asarray(head))
    os.replace(tmp, cache_path)
  return head
