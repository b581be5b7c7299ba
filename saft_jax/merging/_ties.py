"""TIES merging: trim, elect sign, disjoint mean (or disjoint sum).

The λ-independent part (:func:`ties_merged_vector`) is separate from the application
(:func:`~saft_jax.merging.apply_task_vector`), so a λ search computes it once::

    merged = jax.jit(ties_merged_vector, static_argnames=("k", "trim"))(tvs, k=0.2)
    models = jax.vmap(lambda lam: apply_task_vector(theta0, merged, lam))(lams)

Reference implementation followed: ``prateeky2806/ties-merging`` (``src/ties_merging.py``,
``src/utils/merge_utils.py``: ``topk_values_mask``, ``resolve_sign``, ``disjoint_merge``),
the same code as ``nik-dim/tall_masks`` (``src/utils/ties_utils.py``). Algorithm:

1. Trim: in each task vector keep the entries whose magnitude is at least the exact
   ``n_keep``-th largest magnitude, zero the others. ``trim="global"``: ``n`` and the
   threshold are over all mergeable leaves of that task vector (the reference, which
   flattens the whole model); ``trim="per_leaf"``: per tensor (the convention of LLM merging
   tools). Ties at the threshold are all kept (the reference's ``>=``); thresholds come from
   an exact radix select on the bit patterns (:mod:`._topk`), never from a full sort.
   ``keep="exact"`` (default): ``n_keep = max(1, int(k·n))``, exactly the top ``k`` fraction.
   ``keep="reference"``: ``n_keep = min(int(k·n) + 1, n)``, the reference's count (its
   ``kthvalue(n − int(n·k))`` is the ``int(n·k)+1``-th largest, one entry more than ``k·n``).
   Both rules apply per leaf under ``trim="per_leaf"``.
2. Elect: ``s = sign(Σ_t trimmed_t)`` per entry; where ``s == 0`` use the majority sign
   ``sign(Σ_entries s)`` over the whole merged vector (all mergeable leaves, in both trim
   modes), as the reference's ``resolve_zero_signs(..., "majority")``.
3. Disjoint merge of the trimmed entries whose sign agrees with ``s`` (strictly positive
   where ``s > 0``, strictly negative where ``s < 0``): ``disjoint="mean"`` (default, the
   reference's ``dis-mean``) divides their sum by their count clipped below at 1;
   ``disjoint="sum"`` (the reference's ``dis-sum``, used by TALL masks / Consensus-TIES)
   returns the sum. Then ``θ_M = θ0 + λ · merged``.

Deliberate differences from the reference: the default keep count (``int(k·n)``, see
above; ``keep="reference"`` reproduces the reference); ``k`` is a fraction in ``(0, 1]``
(the reference takes a percentage, 100 meaning no trim); arithmetic is float32 per leaf
instead of one flattened vector, so sums may differ in the last bits.

References:
  Yadav, P., Tam, D., Choshen, L., Raffel, C., Bansal, M. "TIES-Merging: Resolving
  Interference When Merging Models." NeurIPS 2023. arXiv:2306.01708.
"""
from __future__ import annotations

import functools
from typing import List, Sequence

import jax
import jax.numpy as jnp

from . import _topk
from ._task_vectors import (ExcludeFn, PyTree, apply_task_vector, check_task_vectors, flatten,
                            is_mergeable, leaf_dtype)

TRIM_MODES = ("global", "per_leaf")
DISJOINT_MODES = ("mean", "sum")
KEEP_MODES = _topk.KEEP_MODES


def check_trim(trim: str) -> None:
  if trim not in TRIM_MODES:
    raise ValueError(f"trim must be one of {TRIM_MODES}, got {trim!r}")


def check_disjoint(disjoint: str) -> None:
  if disjoint not in DISJOINT_MODES:
    raise ValueError(f"disjoint must be one of {DISJOINT_MODES}, got {disjoint!r}")


# ---------------------------------------------------------------- leaf-level primitives
# Each primitive is one compiled program per leaf shape and dtype: applied eagerly, leaf by
# leaf, their few fused programs compile and run faster than the dozens of single
# operations they are made of (same arithmetic, so the same bits).
@jax.jit
def trim_leaf(x: jax.Array, thr_bits) -> jax.Array:
  """Zero the entries of ``x`` below the magnitude threshold (bit pattern)."""
  return jnp.where(_topk.topk_mask(x, thr_bits), x, jnp.zeros((), x.dtype))


@jax.jit
def sum_sign_leaf(trimmed: Sequence[jax.Array]) -> jax.Array:
  """``sign(Σ_t trimmed_t)`` in float32 (tasks summed in list order)."""
  s = trimmed[0].astype(jnp.float32)
  for x in trimmed[1:]:
    s = s + x.astype(jnp.float32)
  return jnp.sign(s)


@jax.jit
def sign_total_leaf(sign: jax.Array) -> jax.Array:
  """``Σ sign`` over a leaf as int32 (for the majority sign)."""
  return jnp.sum(sign.astype(jnp.int32), dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames="disjoint")
def disjoint_leaf(trimmed: Sequence[jax.Array], sign: jax.Array, majority,
                  disjoint: str = "mean") -> jax.Array:
  """Mean (or sum) of the entries agreeing with the elected sign (float32 result)."""
  check_disjoint(disjoint)
  elected = jnp.where(sign == 0, jnp.asarray(majority, jnp.float32), sign)
  total = jnp.zeros(sign.shape, jnp.float32)
  count = jnp.zeros(sign.shape, jnp.float32)
  for x in trimmed:
    x = x.astype(jnp.float32)
    keep = jnp.where(elected > 0, x > 0, x < 0)
    total = total + jnp.where(keep, x, 0.0)
    count = count + keep.astype(jnp.float32)
  if disjoint == "sum":
    return total
  return total / jnp.maximum(count, 1.0)


def disjoint_mean_leaf(trimmed: Sequence[jax.Array], sign: jax.Array, majority) -> jax.Array:
  """Mean of the entries agreeing with the elected sign (float32 result)."""
  return disjoint_leaf(trimmed, sign, majority, "mean")


# ---------------------------------------------------------------- pytree level
def _mergeable_columns(tvs, exclude):
  """Paths, treedef, flat leaves of tvs[0], and per mergeable leaf the list over tasks."""
  flats = [flatten(t)[0] for t in tvs]
  first, treedef = flatten(tvs[0])
  idx = [j for j, (p, x) in enumerate(first) if is_mergeable(p, x, exclude)]
  cols = {j: [f[j][1] for f in flats] for j in idx}
  return first, treedef, idx, cols


def ties_thresholds(tvs: Sequence[PyTree], k: float = 0.2, trim: str = "global", *,
                    keep: str = "exact", exclude: ExcludeFn = None):
  """Trim thresholds as int32 bit patterns of the exact ``n_keep``-th largest magnitude.

  ``keep`` chooses ``n_keep`` (see the module docstring): ``"exact"`` or ``"reference"``.

  Returns:
    ``global``: array ``(T,)``; ``per_leaf``: dict ``path -> (T,)`` over mergeable leaves.
  """
  check_trim(trim)
  _topk.check_keep(keep)
  check_task_vectors(tvs)
  first, _, idx, cols = _mergeable_columns(tvs, exclude)
  t = len(tvs)
  if trim == "global":
    n = sum(first[j][1].size for j in idx)
    n_keep = _topk.keep_count(k, max(n, 1), keep)
    groups = [[cols[j][i] for j in idx] for i in range(t)]
    return _topk.kth_largest_bits_groups(groups, [n_keep] * t)
  _topk.keep_count(k, 1, keep)
  idx = [j for j in idx if first[j][1].size]
  if not idx:
    return {}
  groups = [[cols[j][i]] for j in idx for i in range(t)]
  n_keeps = [_topk.keep_count(k, first[j][1].size, keep) for j in idx for _ in range(t)]
  bits = _topk.kth_largest_bits_groups(groups, n_keeps).reshape(len(idx), t)
  return {first[j][0]: bits[m] for m, j in enumerate(idx)}


def ties_trim(tvs: Sequence[PyTree], k: float = 0.2, trim: str = "global", *,
              keep: str = "exact", exclude: ExcludeFn = None) -> List[PyTree]:
  """Step 1 only: the trimmed task vectors (same structure and dtypes)."""
  thr = ties_thresholds(tvs, k, trim, keep=keep, exclude=exclude)
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
                       keep: str = "exact", disjoint: str = "mean",
                       exclude: ExcludeFn = None) -> PyTree:
  """The λ-independent TIES vector (trim + elect + disjoint mean or sum).

  Args:
    tvs: task vectors (same structure, shapes and dtypes).
    k: fraction of entries kept per task vector, in (0, 1].
    trim: ``"global"`` (threshold over the whole task vector) or ``"per_leaf"``.
    keep: ``"exact"`` (keep ``int(k·n)``, at least 1) or ``"reference"`` (keep
      ``int(k·n) + 1`` as the reference code; all of ``n`` when ``k = 1``), plus ties.
    disjoint: ``"mean"`` (TIES) or ``"sum"`` (the reference's ``dis-sum``, used to build
      τ_MTL for TALL masks / Consensus-TIES).
    exclude: predicate on leaf paths never merged (their merged value is 0).

  Returns:
    A pytree like ``tvs[0]`` with each leaf's dtype; apply it with
    ``apply_task_vector(θ0, merged, lam)``.
  """
  check_disjoint(disjoint)
  trimmed = ties_trim(tvs, k, trim, keep=keep, exclude=exclude)
  first, treedef, idx, cols = _mergeable_columns(trimmed, exclude)
  signs = {j: sum_sign_leaf(cols[j]) for j in idx}
  total = jnp.zeros((), jnp.int32)
  for j in idx:
    total = total + sign_total_leaf(signs[j])
  majority = jnp.sign(total).astype(jnp.float32)
  flat = [jnp.zeros_like(x) for _, x in first]
  for j in idx:
    flat[j] = disjoint_leaf(cols[j], signs[j], majority,
                            disjoint).astype(leaf_dtype(first[j][1]))
  return jax.tree_util.tree_unflatten(treedef, flat)


def ties(pretrained: PyTree, tvs: Sequence[PyTree], lam=1.0, k: float = 0.2,
         trim: str = "global", *, keep: str = "exact", disjoint: str = "mean",
         exclude: ExcludeFn = None) -> PyTree:
  """TIES merge ``θ0 + λ · ties_merged_vector(tvs, k, trim, keep=..., disjoint=...)``.

  ``λ`` is a scalar and may be traced; see :func:`ties_merged_vector` for the options.
  """
  check_task_vectors(tvs, pretrained)
  merged = ties_merged_vector(tvs, k, trim, keep=keep, disjoint=disjoint, exclude=exclude)
  return apply_task_vector(pretrained, merged, lam, exclude=exclude)
