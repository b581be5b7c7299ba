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

  Reference implementation followed: ``yule-BUAA/MergeLM``,
  ``model_merging_methods/mask_weights_utils.py`` (``mask_input_with_mask_rate`` with
  ``mask_strategy="random"``, ``use_rescale=True``, on delta weights). Deliberate
  differences: ``p = 1`` (drop everything) is rejected; the random stream is JAX's, so masks
  are not the reference's bit for bit.

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
                            trim: str = "global", *, keep: str = "exact",
                            disjoint: str = "mean", exclude: ExcludeFn = None) -> PyTree:
  """DARE+TIES: DARE each task vector, then TIES (default ``k=1``: no extra trim).

  As MergeLM's ``mask_merging`` (DARE on every model, then the chosen merge). Its
  ``ties_merging`` trims with ``param_value_mask_rate=0.8`` by default, i.e. ``k = 0.2``
  (and ``keep="reference"`` for its exact count); TIES options as
  :func:`ties_merged_vector`.
  """
  return ties_merged_vector(_dare_all(tvs, p, key, exclude), k, trim, keep=keep,
                            disjoint=disjoint, exclude=exclude)


def dare_ties(pretrained: PyTree, tvs: Sequence[PyTree], lam, p: float, key: jax.Array,
              k: float = 1.0, trim: str = "global", *, keep: str = "exact",
              disjoint: str = "mean", exclude: ExcludeFn = None) -> PyTree:
  """``θ0 + λ · dare_ties_merged_vector(...)``."""
  check_task_vectors(tvs, pretrained)
  merged = dare_ties_merged_vector(tvs, p, key, k, trim, keep=keep, disjoint=disjoint,
                                   exclude=exclude)
  return apply_task_vector(pretrained, merged, lam, exclude=exclude)


# ---------------------------------------------------------------------- Breadcrumbs
GRANULARITIES = ("row", "leaf")


def _band_ranks(c: int, drop_top: float, drop_bottom: float, keep_fraction):
  """(rank of the top threshold, rank of the lower threshold) for ``c`` entries.

  Kept: ranks ``n_top + 1 … n_low`` by magnitude (1 = largest).
  """
  n_top = int(drop_top * c)
  if keep_fraction is None:
    n_low = c - int(drop_bottom * c)
  else:
    n_low = min(n_top + int(keep_fraction * c), c)
  return n_top, n_low


def _band_mask(x, n_top: int, n_low: int):
  """Mask of the entries of rank ``n_top + 1 … n_low`` in each row of ``x`` (2-D)."""
  if n_low <= n_top or n_low == 0:
    return jnp.zeros(x.shape, bool)
  b = _topk.abs_bits(x)
  m = b >= _topk.kth_largest_bits_rows(x, n_low)[:, None]
  if n_top > 0:
    m = m & (b < _topk.kth_largest_bits_rows(x, n_top)[:, None])
  return m


def breadcrumbs_masks(tvs: Sequence[PyTree], drop_top: float = 0.01, drop_bottom: float = 0.9,
                      *, keep_fraction: Optional[float] = None, granularity: str = "row",
                      exclude: ExcludeFn = None) -> List[PyTree]:
  """Per task, boolean masks keeping the middle band of magnitudes (Model Breadcrumbs).

  Ranking unit (``granularity``):

  - ``"row"`` (default, the reference): each row along the last axis, i.e. each of the
    ``prod(shape[:-1])`` vectors ``x[..., :]`` of ``c = shape[-1]`` entries is ranked on its
    own (a 1-D leaf is one row; 0-d leaves are kept whole, as the reference leaves them
    untouched).
  - ``"leaf"``: the whole leaf of ``c = size`` entries is one ranking unit.

  In each unit the ``int(drop_top·c)`` largest magnitudes are dropped, and the
  ``int(drop_bottom·c)`` smallest. With ``keep_fraction = β`` (the reference's
  ``top_k_keep``; ``drop_bottom`` is then ignored) the ``int(β·c)`` largest magnitudes
  left after dropping the top are kept instead (``min(int(γ·c) + int(β·c), c)`` is the
  lowest kept rank) — exactly the reference's counts. Ranks come from exact thresholds
  (bit-pattern bisection, no sort): entries tied with the top threshold are all dropped,
  entries tied with the lower threshold all kept, where the reference's ``torch.topk``
  breaks ties by index. Non-mergeable leaves get an all-false mask.

  Reference implementation followed: ``rezazzr/breadcrumbs``, ``src/task_vectors.py``
  (``TaskVectorMiddleKeep`` with ``remove_first=True``: ``mask_remove_top`` zeroes the
  ``int(shape[-1]·γ)`` largest ``|τ|`` per row with ``torch.topk`` along the last dimension,
  then ``mask_keep_top`` keeps the ``int(shape[-1]·β)`` largest of what remains; the
  merged model is ``θ0 + α Σ_t masked τ_t``). Deliberate differences: the default
  parametrisation by ``drop_bottom`` (``keep_fraction`` gives the reference's), the tie
  rule above, and ``granularity="leaf"`` as an option.

  References:
    Davari, M., Belilovsky, E. "Model Breadcrumbs: Scaling Multi-Task Model Merging with
    Sparse Masks." ECCV 2024. arXiv:2312.06795.
  """
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
  if keep_fraction is None:
    if not (0.0 <= drop_top < 1.0 and 0.0 <= drop_bottom < 1.0
            and drop_top + drop_bottom < 1.0):
      raise ValueError(f"need 0 <= drop_top, drop_bottom and drop_top + drop_bottom < 1, got "
                       f"{drop_top!r}, {drop_bottom!r}")
  elif not (0.0 <= drop_top <= 1.0 and 0.0 <= keep_fraction <= 1.0):
    raise ValueError(f"need 0 <= drop_top <= 1 and 0 <= keep_fraction <= 1, got "
                     f"{drop_top!r}, {keep_fraction!r}")
  check_task_vectors(tvs)
  treedef = flatten(tvs[0])[1]
  masks = []
  for tv in tvs:
    out = []
    for path, x in flatten(tv)[0]:
      shape = jnp.shape(x)
      if not is_mergeable(path, x, exclude) or x.size == 0:
        out.append(jnp.zeros(shape, bool))
      elif granularity == "row" and x.ndim == 0:
        out.append(jnp.ones(shape, bool))
      else:
        x2 = x.reshape(-1, shape[-1]) if granularity == "row" else x.reshape(1, -1)
        n_top, n_low = _band_ranks(x2.shape[1], drop_top, drop_bottom, keep_fraction)
        out.append(_band_mask(x2, n_top, n_low).reshape(shape))
    masks.append(jax.tree_util.tree_unflatten(treedef, out))
  return masks


def breadcrumbs_merge(pretrained: PyTree, tvs: Sequence[PyTree], lam, drop_top: float = 0.01,
                      drop_bottom: float = 0.9, *, keep_fraction: Optional[float] = None,
                      granularity: str = "row", exclude: ExcludeFn = None) -> PyTree:
  """``θ0 + Σ_t λ_t (mask_t ⊙ τ_t)`` with the masks of :func:`breadcrumbs_masks`.

  ``lam`` is a scalar (the reference's single ``α``) or one coefficient per task.
  """
  check_task_vectors(tvs, pretrained)
  masks = breadcrumbs_masks(tvs, drop_top, drop_bottom, keep_fraction=keep_fraction,
                            granularity=granularity, exclude=exclude)
  masked = [jax.tree.map(lambda x, m: jnp.where(m, x, jnp.zeros((), x.dtype)), tv, mk)
            for tv, mk in zip(tvs, masks)]
  return apply_task_vector(pretrained, sum_task_vectors(masked, lam, exclude=exclude), 1.0,
                           exclude=exclude)


# -------------------------------------------------------------------------- MagMax
MAGMAX_TIES = ("positive", "last")


def magmax_merged_vector(tvs: Sequence[PyTree], *, tie: str = "positive",
                         exclude: ExcludeFn = None) -> PyTree:
  """Per entry, the task-vector value of largest magnitude.

  ``tie`` decides exact magnitude ties between different values (``+a`` vs ``−a``):
  ``"positive"`` (default) takes the positive value, so the result does not depend on the
  order of the tasks; ``"last"`` takes the later task's value, as the reference's running
  ``torch.where(|cur| >= |best|, cur, best)``.

  Reference implementation followed: ``danielm1405/magmax``, ``src/merging/task_vectors.py``
  (``merge_max_abs``; its 8-dataset experiments apply the result with ``λ = 0.5``).
  Deliberate difference: the default tie rule.

  References:
    Marczak, D., Twardowski, B., Trzciński, T., Cygert, S. "MagMax: Leveraging Model
    Merging for Seamless Continual Learning." ECCV 2024. arXiv:2407.06322.
  """
  if tie not in MAGMAX_TIES:
    raise ValueError(f"tie must be one of {MAGMAX_TIES}, got {tie!r}")
  check_task_vectors(tvs)

  def pick(path, x0, xs):
    best = xs[0]
    for x in xs[1:]:
      ax, ab = jnp.abs(x), jnp.abs(best)
      take = (ax >= ab) if tie == "last" else (ax > ab) | ((ax == ab) & (x > best))
      best = jnp.where(take, x, best)
    return best
  return map_mergeable(pick, tvs[0], list(tvs), exclude, passthrough=jnp.zeros_like)


def magmax(pretrained: PyTree, tvs: Sequence[PyTree], lam=1.0, *, tie: str = "positive",
           exclude: ExcludeFn = None) -> PyTree:
  """``θ0 + λ · magmax_merged_vector(tvs)``."""
  check_task_vectors(tvs, pretrained)
  return apply_task_vector(pretrained, magmax_merged_vector(tvs, tie=tie, exclude=exclude),
                           lam, exclude=exclude)


# ------------------------------------------------------------- TALL masks / Consensus
def tall_masks(tvs: Sequence[PyTree], tall_lambda=0.4, merged: Optional[PyTree] = None, *,
               strict: bool = False, exclude: ExcludeFn = None) -> List[PyTree]:
  """TALL masks ``m_t = |τ_t| >= λ_t · |τ_MTL − τ_t|`` (boolean pytrees).

  Args:
    tvs: task vectors.
    tall_lambda: ``λ_t``, a scalar or one per task (the reference selects it per task on
      validation data from ``{0.2, 0.3, 0.4, 0.5, 0.6}``).
    merged: the multi-task vector ``τ_MTL``; default the task-arithmetic sum ``Σ_t τ_t``.
      For TALL masks built on TIES, as the reference's ``use_ties``, pass
      ``ties_merged_vector(tvs, k=0.2, disjoint="sum")``.
    strict: ``False`` (default) compares with ``>=``; ``True`` with ``>`` as the reference
      code. They differ only on exact equality, e.g. where ``τ_t = τ_MTL = 0`` (a zero of
      the merged vector, whatever the mask) or with ``λ_t = 0``.

  Reference implementation followed: ``nik-dim/tall_masks``,
  ``src/utils/tallmask_utils.py`` (``generate_task_masks``: ``|θ0 − θ_t| > λ |θ_MTL − θ_t|``
  with ``θ_MTL = θ0 + τ_MTL``). Deliberate differences: the default ``>=`` (``strict``), and
  the comparison is made on task vectors rather than on weights (equal up to float
  rounding).

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
        lhs, rhs = jnp.abs(x32), lams[i] * jnp.abs(m32 - x32)
        leaves.append(lhs > rhs if strict else lhs >= rhs)
      else:
        leaves.append(jnp.zeros(jnp.shape(x), bool))
    out.append(jax.tree_util.tree_unflatten(treedef, leaves))
  return out


def consensus_merged_vector(tvs: Sequence[PyTree], k: int = 2, tall_lambda=0.4,
                            merged: Optional[PyTree] = None, *, strict: bool = False,
                            exclude: ExcludeFn = None) -> PyTree:
  """Consensus merging: keep ``τ_MTL`` only where at least ``k`` TALL masks agree.

  ``k=2`` removes "selfish" (one task) and "catastrophic" (no task) weights. ``merged``
  (default task arithmetic ``Σ τ_t``) is the vector both the TALL masks are built from and
  the one masked; :func:`consensus_ties_merged_vector` uses the TIES vector as the
  reference's Consensus-TIES. ``strict`` as in :func:`tall_masks`.

  Reference implementation followed: ``nik-dim/tall_masks``, ``src/eval/aggregation.py``
  (``consensus``) and ``src/utils/tallmask_utils.py`` (``construct_consensus_mask``: votes
  ``>= prun_thre_k``). See :func:`tall_masks` for the deliberate differences.
  """
  if merged is None:
    merged = sum_task_vectors(tvs, exclude=exclude)
  masks = tall_masks(tvs, tall_lambda, merged, strict=strict, exclude=exclude)
  votes = jax.tree.map(lambda *ms: sum_leaves([m.astype(jnp.int32) for m in ms]), *masks)
  return jax.tree.map(lambda x, v: jnp.where(v >= k, x, jnp.zeros((), x.dtype)),
                      merged, votes)


def consensus_ties_merged_vector(tvs: Sequence[PyTree], k: int = 2, tall_lambda=0.4,
                                 ties_k: float = 0.2, *, keep: str = "exact",
                                 trim: str = "global", strict: bool = False,
                                 exclude: ExcludeFn = None) -> PyTree:
  """Consensus-TIES: :func:`consensus_merged_vector` on the TIES *disjoint sum*.

  ``τ_MTL = ties_merged_vector(tvs, ties_k, trim, keep=keep, disjoint="sum")``, as the
  reference (``ties_merging(..., reset_thresh=20, merge_func="dis-sum")`` for both the TALL
  masks and the masked vector). ``keep="reference"`` reproduces the reference's trim count
  ``int(k·n) + 1`` (see :func:`ties_merged_vector`); ``strict=True`` its ``>``.
  """
  merged = ties_merged_vector(tvs, ties_k, trim, keep=keep, disjoint="sum", exclude=exclude)
  return consensus_merged_vector(tvs, k, tall_lambda, merged, strict=strict, exclude=exclude)


def consensus_merge(pretrained: PyTree, tvs: Sequence[PyTree], lam=1.0, k: int = 2,
                    tall_lambda=0.4, merged: Optional[PyTree] = None, *,
                    strict: bool = False, exclude: ExcludeFn = None) -> PyTree:
  """``θ0 + λ · consensus_merged_vector(...)``."""
  check_task_vectors(tvs, pretrained)
  vec = consensus_merged_vector(tvs, k, tall_lambda, merged, strict=strict, exclude=exclude)
  return apply_task_vector(pretrained, vec, lam, exclude=exclude)
