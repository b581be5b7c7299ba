"""Data-free sparsifying successors of TIES: DARE, Model Breadcrumbs, MagMax, TALL/Consensus.

Every function takes task vectors (lists of pytrees like the pre-trained model); merges
return ``θ0 + λ · merged`` through :func:`apply_task_vector`, and the λ-independent vectors
are available separately (``*_merged_vector``) for vectorized coefficient searches.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp

from . import _topk
from ._basic import sum_leaves, sum_task_vectors, task_lams
from ._task_vectors import (ExcludeFn, PyTree, apply_task_vector, check_task_vectors,
                            flatten, is_mergeable, leaf_dtype, map_mergeable)
from ._ties import ties_merged_vector


# ---------------------------------------------------------------------------- DARE
def dare(tv: PyTree, p: float, key: jax.Array, *, exclude: ExcludeFn = None) -> PyTree:
  """Drop And REscale: zero each entry with probability ``p``, scale survivors by 1/(1−p).

  ``E[dare(τ)] = τ`` entry-wise. Deterministic for a given ``key`` (leaf ``j`` uses
  ``fold_in(key, j)``, ``j`` the flat leaf index).

  References:
    Yu, L., Yu, B., Yu, H., Huang, F., Li, Y. "Language Models are Super Mario: Absorbing
    Abilities from Homologous Models as a Free Lunch." ICML 2024. arXiv:2311.03099.
  """
  if not 0.0 <= float(p) < 1.0:
    raise ValueError(f"DARE drop rate p must be in [0, 1), got {p!r}")
  flat, treedef = flatten(tv)
  out = []
  for j, (path, x) in enumerate(flat):
    if is_mergeable(path, x, exclude):
      keep = jax.random.bernoulli(jax.random.fold_in(key, j), 1.0 - p, x.shape)
      x = jnp.where(keep, x.astype(jnp.float32) * jnp.float32(1.0 / (1.0 - p)),
                    0.0).astype(leaf_dtype(x))
    out.append(x)
  return jax.tree_util.tree_unflatten(treedef, out)


def _dare_all(tvs, p, key, exclude):
  check_task_vectors(tvs)
  keys = jax.random.split(key, len(tvs))
  return [dare(tv, p, keys[i], exclude=exclude) for i, tv in enumerate(tvs)]


def dare_merge(pretrained: PyTree, tvs: Sequence[PyTree], lam, p: float, key: jax.Array, *,
               exclude: ExcludeFn = None) -> PyTree:
  """DARE + task arithmetic: ``θ0 + Σ_t λ_t dare(τ_t)`` (task ``t`` uses ``split(key)[t]``)."""
  check_task_vectors(tvs, pretrained)
  merged = sum_task_vectors(_dare_all(tvs, p, key, exclude), lam, exclude=exclude)
  return apply_task_vector(pretrained, merged, 1.0, exclude=exclude)


def dare_ties_merged_vector(tvs: Sequence[PyTree], p: float, key: jax.Array, k: float = 1.0,
                            trim: str = "global", *, exclude: ExcludeFn = None) -> PyTree:
  """DARE+TIES: DARE each task vector, then TIES (default ``k=1``: no extra trim)."""
  return ties_merged_vector(_dare_all(tvs, p, key, exclude), k, trim, exclude=exclude)


def dare_ties(pretrained: PyTree, tvs: Sequence[PyTree], lam, p: float, key: jax.Array,
              k: float = 1.0, trim: str = "global", *, exclude: ExcludeFn = None) -> PyTree:
  """``θ0 + λ · dare_ties_merged_vector(...)``."""
  check_task_vectors(tvs, pretrained)
  merged = dare_ties_merged_vector(tvs, p, key, k, trim, exclude=exclude)
  return apply_task_vector(pretrained, merged, lam, exclude=exclude)


# ---------------------------------------------------------------------- Breadcrumbs
def breadcrumbs_masks(tvs: Sequence[PyTree], drop_top: float = 0.01, drop_bottom: float = 0.9,
                      *, exclude: ExcludeFn = None) -> List[PyTree]:
  """Per task and per leaf, boolean masks keeping the middle band of magnitudes.

  In each leaf of ``n`` entries, the ``int(drop_top·n)`` largest and the
  ``int(drop_bottom·n)`` smallest magnitudes are masked out (exact ranks from bit-pattern
  bisection; entries tied with a threshold follow the ``>=`` rule of :mod:`._topk`: ties at
  the top threshold are dropped, ties at the lower threshold kept). Non-mergeable leaves get
  an all-false mask.

  References:
    Davari, M., Belilovsky, E. "Model Breadcrumbs: Scaling Multi-Task Model Merging with
    Sparse Masks." ECCV 2024. arXiv:2312.06795.
  """
  if not (0.0 <= drop_top < 1.0 and 0.0 <= drop_bottom < 1.0 and drop_top + drop_bottom < 1.0):
    raise ValueError(f"need 0 <= drop_top, drop_bottom and drop_top + drop_bottom < 1, got "
                     f"{drop_top!r}, {drop_bottom!r}")
  check_task_vectors(tvs)
  flats = [flatten(t)[0] for t in tvs]
  treedef = flatten(tvs[0])[1]
  groups, ranks, where = [], [], []
  for j, (path, x) in enumerate(flats[0]):
    if is_mergeable(path, x, exclude) and x.size:
      n = x.size
      for i in range(len(tvs)):
        n_top, n_upper = int(drop_top * n), n - int(drop_bottom * n)
        for r, kind in ((n_top, "top"), (n_upper, "low")):
          if r > 0:
            groups.append([flats[i][j][1]])
            ranks.append(r)
            where.append((i, j, kind))
  bits = _topk.kth_largest_bits_groups(groups, ranks) if groups else None
  thr = {w: bits[m] for m, w in enumerate(where)}
  masks = []
  for i in range(len(tvs)):
    out = []
    for j, (path, x) in enumerate(flats[i]):
      m = jnp.zeros(jnp.shape(x), bool)
      if is_mergeable(path, x, exclude) and x.size and (i, j, "low") in thr:
        b = _topk.abs_bits(x)
        m = b >= thr[(i, j, "low")]
        if (i, j, "top") in thr:
          m = m & (b < thr[(i, j, "top")])
      out.append(m)
    masks.append(jax.tree_util.tree_unflatten(treedef, out))
  return masks


def breadcrumbs_merge(pretrained: PyTree, tvs: Sequence[PyTree], lam, drop_top: float = 0.01,
                      drop_bottom: float = 0.9, *, exclude: ExcludeFn = None) -> PyTree:
  """``θ0 + Σ_t λ_t (mask_t ⊙ τ_t)`` with the Breadcrumbs masks."""
  check_task_vectors(tvs, pretrained)
  masks = breadcrumbs_masks(tvs, drop_top, drop_bottom, exclude=exclude)
  masked = [jax.tree.map(lambda x, m: jnp.where(m, x, jnp.zeros((), x.dtype)), tv, mk)
            for tv, mk in zip(tvs, masks)]
  return apply_task_vector(pretrained, sum_task_vectors(masked, lam, exclude=exclude), 1.0,
                           exclude=exclude)


# -------------------------------------------------------------------------- MagMax
def magmax_merged_vector(tvs: Sequence[PyTree], *, exclude: ExcludeFn = None) -> PyTree:
  """Per entry, the task-vector value of largest magnitude.

  On an exact magnitude tie between opposite signs the positive value wins, so the result
  does not depend on the order of the tasks.

  References:
    Marczak, D., Twardowski, B., Trzciński, T., Cygert, S. "MagMax: Leveraging Model
    Merging for Seamless Continual Learning." ECCV 2024. arXiv:2407.06322.
  """
  check_task_vectors(tvs)

  def pick(path, x0, xs):
    best = xs[0]
    for x in xs[1:]:
      ax, ab = jnp.abs(x), jnp.abs(best)
      best = jnp.where((ax > ab) | ((ax == ab) & (x > best)), x, best)
    return best
  return map_mergeable(pick, tvs[0], list(tvs), exclude, passthrough=jnp.zeros_like)


def magmax(pretrained: PyTree, tvs: Sequence[PyTree], lam=1.0, *,
           exclude: ExcludeFn = None) -> PyTree:
  """``θ0 + λ · magmax_merged_vector(tvs)``."""
  check_task_vectors(tvs, pretrained)
  return apply_task_vector(pretrained, magmax_merged_vector(tvs, exclude=exclude), lam,
                           exclude=exclude)


# ------------------------------------------------------------- TALL masks / Consensus
def tall_masks(tvs: Sequence[PyTree], tall_lambda=0.4, merged: Optional[PyTree] = None, *,
               exclude: ExcludeFn = None) -> List[PyTree]:
  """TALL masks ``m_t = |τ_t| >= λ_t · |τ_MTL − τ_t|`` (boolean pytrees).

  Args:
    tvs: task vectors.
    tall_lambda: ``λ_t``, a scalar or one per task (the paper selects it per task on
      validation data from ``[0.2, 0.6]``).
    merged: the multi-task vector ``τ_MTL``; default the task-arithmetic sum ``Σ_t τ_t``.

  References:
    Wang, K., Dimitriadis, N., Ortiz-Jiménez, G., Fleuret, F., Frossard, P. "Localizing
    Task Information for Improved Model Merging and Compression." ICML 2024.
    arXiv:2405.07813.
  """
  check_task_vectors(tvs)
  lams = task_lams(tall_lambda, len(tvs))
  if merged is None:
    merged = sum_task_vectors(tvs, exclude=exclude)
  flats = [flatten(t)[0] for t in tvs]
  mflat, treedef = flatten(merged)
  out = []
  for i in range(len(tvs)):
    leaves = []
    for j, (path, x) in enumerate(flats[i]):
      if is_mergeable(path, x, exclude):
        x32, m32 = x.astype(jnp.float32), mflat[j][1].astype(jnp.float32)
        leaves.append(jnp.abs(x32) >= lams[i] * jnp.abs(m32 - x32))
      else:
        leaves.append(jnp.zeros(jnp.shape(x), bool))
    out.append(jax.tree_util.tree_unflatten(treedef, leaves))
  return out


def consensus_merged_vector(tvs: Sequence[PyTree], k: int = 2, tall_lambda=0.4,
                            merged: Optional[PyTree] = None, *,
                            exclude: ExcludeFn = None) -> PyTree:
  """Consensus merging: keep ``τ_MTL`` only where at least ``k`` TALL masks agree.

  ``k=2`` removes "selfish" (one task) and "catastrophic" (no task) weights. ``merged``
  (default task arithmetic ``Σ τ_t``; pass a TIES vector for Consensus-TIES) is the vector
  being masked. See :func:`tall_masks` for the reference.
  """
  if merged is None:
    merged = sum_task_vectors(tvs, exclude=exclude)
  masks = tall_masks(tvs, tall_lambda, merged, exclude=exclude)
  votes = jax.tree.map(lambda *ms: sum_leaves([m.astype(jnp.int32) for m in ms]), *masks)
  return jax.tree.map(lambda x, v: jnp.where(v >= k, x, jnp.zeros((), x.dtype)),
                      merged, votes)


def consensus_merge(pretrained: PyTree, tvs: Sequence[PyTree], lam=1.0, k: int = 2,
                    tall_lambda=0.4, merged: Optional[PyTree] = None, *,
                    exclude: ExcludeFn = None) -> PyTree:
  """``θ0 + λ · consensus_merged_vector(...)``."""
  check_task_vectors(tvs, pretrained)
  vec = consensus_merged_vector(tvs, k, tall_lambda, merged, exclude=exclude)
  return apply_task_vector(pretrained, vec, lam, exclude=exclude)
