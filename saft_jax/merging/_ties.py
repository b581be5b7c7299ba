"""TIES merging: trim, elect sign, disjoint mean.

The λ-independent part (:func:`ties_merged_vector`) is separate from the application
(:func:`~saft_jax.merging.apply_task_vector`), so a λ search computes it once::

    merged = jax.jit(ties_merged_vector, static_argnames=("k", "trim"))(tvs, k=0.2)
    models = jax.vmap(lambda lam: apply_task_vector(theta0, merged, lam))(lams)

Algorithm (Yadav et al., 2023; facts read from the reference code, see SPEC §6):

1. Trim: in each task vector keep the entries whose magnitude is at least the exact
   ``n_keep``-th largest magnitude (``n_keep = max(1, int(k·n))``), zero the others.
   ``trim="global"``: ``n`` and the threshold are over all mergeable leaves of that task
   vector (the reference); ``trim="per_leaf"``: per tensor (the LLM tool's choice).
   Ties at the threshold are all kept (the reference's ``>=``), and thresholds come from
   bit-pattern bisection (:mod:`._topk`), never from a sort. Note the reference's
   ``kthvalue(d - int(d·k))`` is the ``int(d·k)+1``-th largest, i.e. it keeps one entry more
   than ``k·d``; we keep exactly the top ``int(d·k)`` (plus ties).
2. Elect: ``s = sign(Σ_t trimmed_t)`` per entry; where ``s == 0`` use the majority sign
   ``sign(Σ_entries s)`` over the whole merged vector (all mergeable leaves, in both trim
   modes), as the reference's ``resolve_zero_signs(..., "majority")``.
3. Disjoint mean: average the trimmed entries whose sign agrees with ``s`` (strictly
   positive where ``s > 0``, strictly negative where ``s < 0``), dividing by their count
   clipped below at 1. Then ``θ_M = θ0 + λ · merged``.

References:
  Yadav, P., Tam, D., Choshen, L., Raffel, C., Bansal, M. "TIES-Merging: Resolving
  Interference When Merging Models." NeurIPS 2023. arXiv:2306.01708.
"""
from __future__ import annotations

from typing import List, Sequence

import jax
import jax.numpy as jnp

from . import _topk
from ._task_vectors import (ExcludeFn, PyTree, apply_task_vector, check_task_vectors, flatten,
                            is_mergeable, leaf_dtype)

TRIM_MODES = ("global", "per_leaf")


def check_trim(trim: str) -> None:
  if trim not in TRIM_MODES:
    raise ValueError(f"trim must be one of {TRIM_MODES}, got {trim!r}")


# ---------------------------------------------------------------- leaf-level primitives
def trim_leaf(x: jax.Array, thr_bits) -> jax.Array:
  """Zero the entries of ``x`` below the magnitude threshold (bit pattern)."""
  return jnp.where(_topk.topk_mask(x, thr_bits), x, jnp.zeros((), x.dtype))


def sum_sign_leaf(trimmed: Sequence[jax.Array]) -> jax.Array:
  """``sign(Σ_t trimmed_t)`` in float32 (tasks summed in list order)."""
  s = trimmed[0].astype(jnp.float32)
  for x in trimmed[1:]:
    s = s + x.astype(jnp.float32)
  return jnp.sign(s)


def sign_total_leaf(sign: jax.Array) -> jax.Array:
  """``Σ sign`` over a leaf as int32 (for the majority sign)."""
  return jnp.sum(sign.astype(jnp.int32), dtype=jnp.int32)


def disjoint_mean_leaf(trimmed: Sequence[jax.Array], sign: jax.Array, majority) -> jax.Array:
  """Mean of the entries agreeing with the elected sign (float32 result)."""
  elected = jnp.where(sign == 0, jnp.asarray(majority, jnp.float32), sign)
  total = jnp.zeros(sign.shape, jnp.float32)
  count = jnp.zeros(sign.shape, jnp.float32)
  for x in trimmed:
    x = x.astype(jnp.float32)
    keep = jnp.where(elected > 0, x > 0, x < 0)
    total = total + jnp.where(keep, x, 0.0)
    count = count + keep.astype(jnp.float32)
  return total / jnp.maximum(count, 1.0)


# ---------------------------------------------------------------- pytree level
def _mergeable_columns(tvs, exclude):
  """Paths, treedef, flat leaves of tvs[0], and per mergeable leaf the list over tasks."""
  flats = [flatten(t)[0] for t in tvs]
  first, treedef = flatten(tvs[0])
  idx = [j for j, (p, x) in enumerate(first) if is_mergeable(p, x, exclude)]
  cols = {j: [f[j][1] for f in flats] for j in idx}
  return first, treedef, idx, cols


def ties_thresholds(tvs: Sequence[PyTree], k: float = 0.2, trim: str = "global", *,
                    exclude: ExcludeFn = None):
  """Trim thresholds as int32 bit patterns of the exact ``n_keep``-th largest magnitude.

  Returns:
    ``global``: array ``(T,)``; ``per_leaf``: dict ``path -> (T,)`` over mergeable leaves.
  """
  check_trim(trim)
  check_task_vectors(tvs)
  first, _, idx, cols = _mergeable_columns(tvs, exclude)
  t = len(tvs)
  if trim == "global":
    n = sum(first[j][1].size for j in idx)
    _topk.keep_count(k, max(n, 1))
    groups = [[cols[j][i] for j in idx] for i in range(t)]
    return _topk.kth_largest_bits_groups(groups, [_topk.keep_count(k, max(n, 1))] * t)
  _topk.keep_count(k, 1)
  idx = [j for j in idx if first[j][1].size]
  if not idx:
    return {}
  groups = [[cols[j][i]] for j in idx for i in range(t)]
  n_keeps = [_topk.keep_count(k, first[j][1].size) for j in idx for _ in range(t)]
  bits = _topk.kth_largest_bits_groups(groups, n_keeps).reshape(len(idx), t)
  return {first[j][0]: bits[m] for m, j in enumerate(idx)}


def ties_trim(tvs: Sequence[PyTree], k: float = 0.2, trim: str = "global", *,
              exclude: ExcludeFn = None) -> List[PyTree]:
  """Step 1 only: the trimmed task vectors (same structure and dtypes)."""
  thr = ties_thresholds(tvs, k, trim, exclude=exclude)
  first, treedef, idx, cols = _mergeable_columns(tvs, exclude)
  out = []
  for i, tv in enumerate(tvs):
    flat = [x for _, x in flatten(tv)[0]]
    for j in idx:
      p = first[j][0]
      if first[j][1].size:
        flat[j] = trim_leaf(cols[j][i], thr[i] if trim == "global" else thr[p][i])
    out.append(jax.tree_util.tree_unflatten(treedef, flat))
  return out


def ties_merged_vector(tvs: Sequence[PyTree], k: float = 0.2, trim: str = "global", *,
                       exclude: ExcludeFn = None) -> PyTree:
  """The λ-independent TIES vector (trim + elect + disjoint mean).

  Args:
    tvs: task vectors (same structure, shapes and dtypes).
    k: fraction of entries kept per task vector, in (0, 1].
    trim: ``"global"`` (threshold over the whole task vector) or ``"per_leaf"``.
    exclude: predicate on leaf paths never merged (their merged value is 0).

  Returns:
    A pytree like ``tvs[0]`` with each leaf's dtype; apply it with
    ``apply_task_vector(θ0, merged, lam)``.
  """
  trimmed = ties_trim(tvs, k, trim, exclude=exclude)
  first, treedef, idx, cols = _mergeable_columns(trimmed, exclude)
  signs = {j: sum_sign_leaf(cols[j]) for j in idx}
  total = jnp.zeros((), jnp.int32)
  for j in idx:
    total = total + sign_total_leaf(signs[j])
  majority = jnp.sign(total).astype(jnp.float32)
  flat = [jnp.zeros_like(x) for _, x in first]
  for j in idx:
    flat[j] = disjoint_mean_leaf(cols[j], signs[j], majority).astype(leaf_dtype(first[j][1]))
  return jax.tree_util.tree_unflatten(treedef, flat)


def ties(pretrained: PyTree, tvs: Sequence[PyTree], lam=1.0, k: float = 0.2,
         trim: str = "global", *, exclude: ExcludeFn = None) -> PyTree:
  """TIES merge ``θ0 + λ · ties_merged_vector(tvs, k, trim)`` (λ a scalar, may be traced)."""
  check_task_vectors(tvs, pretrained)
  merged = ties_merged_vector(tvs, k, trim, exclude=exclude)
  return apply_task_vector(pretrained, merged, lam, exclude=exclude)
