"""Analysis helpers on task vectors: cosine similarities, sign conflicts, per-leaf norms."""
from __future__ import annotations

from typing import Dict, Sequence

import jax.numpy as jnp

from ._task_vectors import ExcludeFn, PyTree, check_task_vectors, flatten, is_mergeable


def _columns(tvs, exclude):
  flats = [flatten(t)[0] for t in tvs]
  idx = [j for j, (p, x) in enumerate(flats[0]) if is_mergeable(p, x, exclude)]
  return [[flats[i][j][1].astype(jnp.float32) for i in range(len(tvs))] for j in idx]


def cosine_similarity_matrix(tvs: Sequence[PyTree], *, exclude: ExcludeFn = None) -> jnp.ndarray:
  """``(T, T)`` cosine similarities of the task vectors, each flattened over all mergeable
  leaves (a zero vector has similarity 0 with everything, 1 with itself is not forced)."""
  check_task_vectors(tvs)
  t = len(tvs)
  gram = jnp.zeros((t, t), jnp.float32)
  for col in _columns(tvs, exclude):
    m = jnp.stack([x.ravel() for x in col])
    gram = gram + m @ m.T
  norms = jnp.sqrt(jnp.diag(gram))
  den = norms[:, None] * norms[None, :]
  return jnp.where(den > 0, gram / jnp.where(den > 0, den, 1.0), 0.0)


def sign_conflict_rate(tvs: Sequence[PyTree], *, exclude: ExcludeFn = None) -> jnp.ndarray:
  """Fraction of entries where some task vector is > 0 and another < 0.

  The denominator is the number of mergeable entries (all of them, zeros included).
  """
  check_task_vectors(tvs)
  conflicts = jnp.zeros((), jnp.float32)
  total = 0
  for col in _columns(tvs, exclude):
    pos = col[0] > 0
    neg = col[0] < 0
    for x in col[1:]:
      pos, neg = pos | (x > 0), neg | (x < 0)
    conflicts = conflicts + jnp.sum(pos & neg, dtype=jnp.float32)
    total += col[0].size
  return conflicts / max(total, 1)


def leaf_norms(tree: PyTree, *, exclude: ExcludeFn = None) -> Dict[str, jnp.ndarray]:
  """``{leaf path: L2 norm}`` (float32) for every mergeable leaf."""
  flat, _ = flatten(tree)
  return {p: jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))))
          for p, x in flat if is_mergeable(p, x, exclude)}


def global_norm(tree: PyTree, *, exclude: ExcludeFn = None) -> jnp.ndarray:
  """L2 norm over all mergeable leaves."""
  norms = list(leaf_norms(tree, exclude=exclude).values())
  return jnp.sqrt(sum((n * n for n in norms), jnp.zeros((), jnp.float32)))
