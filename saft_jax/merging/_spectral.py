"""Spectral merges on the per-layer SVD of task matrices: TSV-M, Iso-C, Iso-CTS.

Only 2-D leaves (dense kernels) are treated as matrices; other mergeable leaves (biases,
norms, conv kernels) use the rule of each method's reference code: mean of the task
vectors for TSV-M, sum for Iso-C/Iso-CTS. SVDs run in float32; results are cast back.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from ._basic import sum_leaves
from ._task_vectors import (ExcludeFn, PyTree, apply_task_vector, check_task_vectors,
                            leaf_dtype, map_mergeable)


def _svd(m):
  return jnp.linalg.svd(m, full_matrices=False)


def _polar(m):
  """Nearest matrix with orthonormal columns (``U Vᵀ`` of ``m``'s SVD)."""
  u, _, vh = _svd(m)
  return u @ vh


def _tsv_leaf(xs):
  t = len(xs)
  mats = [x.astype(jnp.float32) for x in xs]
  r = int(min(mats[0].shape) / t)
  if r == 0:
    raise ValueError(f"TSV-M: a {mats[0].shape} matrix has fewer singular values than tasks "
                     f"({t}); exclude it or merge fewer tasks")
  us, ss, vs = [], [], []
  for m in mats:
    u, s, vh = _svd(m)
    us.append(u[:, :r]); ss.append(s[:r]); vs.append(vh[:r, :])
  u = _polar(jnp.concatenate(us, axis=1))
  vh = _polar(jnp.concatenate(vs, axis=0).T).T
  return (u * jnp.concatenate(ss)[None, :]) @ vh


def tsv_merged_vector(tvs: Sequence[PyTree], *, exclude: ExcludeFn = None) -> PyTree:
  """TSV-M merged vector.

  Per matrix leaf: keep each task's top ``r = ⌊min(m, n)/T⌋`` singular triplets,
  concatenate ``U = [U_1 … U_T]``, ``Σ = diag(Σ_1 … Σ_T)``, ``V = [V_1 … V_T]``, replace
  ``U`` and ``V`` by their nearest orthonormal matrices (polar factor, as the reference's
  ``svd`` then ``u @ vh``) and return ``U⊥ Σ V⊥ᵀ``. Other leaves: mean of the task vectors.

  References:
    Gargiulo, A. A., Crisostomi, D., Bucarelli, M. S., Scardapane, S., Silvestri, F.,
    Rodolà, E. "Task Singular Vectors: Reducing Task Interference in Model Merging."
    CVPR 2025. arXiv:2412.00081.
  """
  check_task_vectors(tvs)
  t = len(tvs)

  def leaf(path, x0, xs):
    if x0.ndim == 2:
      return _tsv_leaf(xs).astype(leaf_dtype(x0))
    return (sum_leaves(xs) / t).astype(leaf_dtype(x0))
  return map_mergeable(leaf, tvs[0], list(tvs), exclude, passthrough=jnp.zeros_like)


def tsv_merge(pretrained: PyTree, tvs: Sequence[PyTree], alpha=1.0, *,
              exclude: ExcludeFn = None) -> PyTree:
  """``θ0 + α · tsv_merged_vector(tvs)`` (the paper uses α = 1)."""
  check_task_vectors(tvs, pretrained)
  return apply_task_vector(pretrained, tsv_merged_vector(tvs, exclude=exclude), alpha,
                           exclude=exclude)


def iso_c_merged_vector(tvs: Sequence[PyTree], *, exclude: ExcludeFn = None) -> PyTree:
  """Iso-C: flatten the spectrum of the task-arithmetic sum.

  Per matrix leaf, with ``Δ = Σ_t τ_t = U Σ Vᵀ``: ``σ̄ U Vᵀ``, ``σ̄`` the mean of the
  ``min(m, n)`` singular values. Other leaves: ``Δ``.

  References:
    Marczak, D., Magistri, S., Cygert, S., Twardowski, B., Bagdanov, A. D., van de Weijer, J.
    "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces."
    ICML 2025. arXiv:2502.04959.
  """
  check_task_vectors(tvs)

  def leaf(path, x0, xs):
    d = sum_leaves(xs)
    if x0.ndim == 2:
      u, s, vh = _svd(d)
      d = jnp.mean(s) * (u @ vh)
    return d.astype(leaf_dtype(x0))
  return map_mergeable(leaf, tvs[0], list(tvs), exclude, passthrough=jnp.zeros_like)


def _iso_cts_leaf(xs, frac):
  t = len(xs)
  d = sum_leaves(xs)
  u, s, vh = _svd(d)
  k = min(s.shape[0], int(s.shape[0] * frac))
  r = int(round((s.shape[0] - k) / t))
  uc, sc, vc = u[:, :k], s[:k], vh[:k, :]
  us, ss, vs = [], [], []
  if r > 0:
    for x in xs:
      x = x.astype(jnp.float32)
      resid = x - uc @ (uc.T @ x)
      ut, st, vt = _svd(resid)
      us.append(ut[:, :r]); ss.append(st[:r]); vs.append(vt[:r, :])
  uu = _polar(jnp.concatenate(us + [uc], axis=1))
  vv = _polar(jnp.concatenate(vs + [vc], axis=0).T).T
  sig = jnp.mean(jnp.concatenate(ss + [sc]))
  return sig * (uu @ vv)


def iso_cts_merged_vector(tvs: Sequence[PyTree], common_space_fraction: float = 0.8, *,
                          exclude: ExcludeFn = None) -> PyTree:
  """Iso-CTS: common subspace of ``Δ = Σ τ_t`` plus task-specific subspaces, flat spectrum.

  Per matrix leaf with ``r0 = min(m, n)``: keep ``k = ⌊f · r0⌋`` top singular triplets of
  ``Δ`` (common space); for each task project ``τ_t`` off the common left space and keep
  its top ``round((r0 − k)/T)`` triplets; concatenate, orthonormalize ``U`` and ``V``
  (polar factor), and set every singular value to the mean of the kept ones. Other leaves:
  ``Δ``. ``common_space_fraction = 1`` gives Iso-C. See :func:`iso_c_merged_vector` for the
  reference.
  """
  if not 0.0 < common_space_fraction <= 1.0:
    raise ValueError(f"common_space_fraction must be in (0, 1], got {common_space_fraction!r}")
  check_task_vectors(tvs)

  def leaf(path, x0, xs):
    if x0.ndim == 2:
      return _iso_cts_leaf(xs, common_space_fraction).astype(leaf_dtype(x0))
    return sum_leaves(xs).astype(leaf_dtype(x0))
  return map_mergeable(leaf, tvs[0], list(tvs), exclude, passthrough=jnp.zeros_like)


def iso_c(pretrained: PyTree, tvs: Sequence[PyTree], alpha=1.0, *,
          exclude: ExcludeFn = None) -> PyTree:
  """``θ0 + α · iso_c_merged_vector(tvs)`` (α searched on validation in the paper)."""
  check_task_vectors(tvs, pretrained)
  return apply_task_vector(pretrained, iso_c_merged_vector(tvs, exclude=exclude), alpha,
                           exclude=exclude)


def iso_cts(pretrained: PyTree, tvs: Sequence[PyTree], alpha=1.0,
            common_space_fraction: float = 0.8, *, exclude: ExcludeFn = None) -> PyTree:
  """``θ0 + α · iso_cts_merged_vector(tvs, common_space_fraction)``."""
  check_task_vectors(tvs, pretrained)
  vec = iso_cts_merged_vector(tvs, common_space_fraction, exclude=exclude)
  return apply_task_vector(pretrained, vec, alpha, exclude=exclude)
