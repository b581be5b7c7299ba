"""Small pytree helpers shared by the analysis modules (validation and arithmetic).

Kept private and self-contained so the analysis code does not depend on
`saft_jax.merging`; everything works on arbitrary pytrees of arrays.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)


def _paths(tree) -> list[str]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [jax.tree_util.keystr(p) for p, _ in leaves]


def check_same_structure(ref: PyTree, other: PyTree, ref_name: str, other_name: str) -> None:
  """Raises ValueError naming the offending leaf if structures or shapes differ."""
  ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(ref)
  oth_leaves, oth_def = jax.tree_util.tree_flatten_with_path(other)
  if ref_def != oth_def:
    ref_paths = {jax.tree_util.keystr(p) for p, _ in ref_leaves}
    oth_paths = {jax.tree_util.keystr(p) for p, _ in oth_leaves}
    missing = sorted(ref_paths - oth_paths)
    extra = sorted(oth_paths - ref_paths)
    detail = []
    if missing:
      detail.append(f"missing in {other_name}: {missing[:5]}")
    if extra:
      detail.append(f"extra in {other_name}: {extra[:5]}")
    if not detail:
      detail.append(f"tree definitions differ: {ref_def} vs {oth_def}")
    raise ValueError(
        f"{other_name} does not have the same pytree structure as {ref_name}; "
        + "; ".join(detail))
  for (path, a), (_, b) in zip(ref_leaves, oth_leaves):
    if np.shape(a) != np.shape(b):
      raise ValueError(
          f"leaf {jax.tree_util.keystr(path)} of {other_name} has shape {np.shape(b)}, "
          f"but {ref_name} has {np.shape(a)}")


def check_task_vectors(theta0: PyTree, task_vectors: Sequence[PyTree], name: str) -> None:
  if isinstance(task_vectors, dict) or not isinstance(task_vectors, (list, tuple)):
    raise TypeError(f"{name} must be a list/tuple of pytrees, got {type(task_vectors).__name__}")
  for k, tv in enumerate(task_vectors):
    check_same_structure(theta0, tv, "theta0", f"{name}[{k}]")


def combine(theta0: PyTree, task_vectors: Sequence[PyTree], coefs) -> PyTree:
  """Returns theta0 + sum_k coefs[k] * task_vectors[k], keeping theta0's leaf dtypes.

  Non-float leaves (integer buffers) are returned unchanged, never merged.
  `coefs` may be a traced 1-D array (used under vmap).
  """
  if not task_vectors:
    return theta0

  def leaf(p, *taus):
    if not _is_float(p):
      return p
    out = p
    for k, t in enumerate(taus):
      out = out + coefs[k].astype(p.dtype) * jnp.asarray(t).astype(p.dtype)
    return out

  return jax.tree.map(leaf, theta0, *task_vectors)


def interpolate(params_a: PyTree, params_b: PyTree, alpha) -> PyTree:
  """Returns (1 - alpha) * params_a + alpha * params_b (float leaves only)."""

  def leaf(a, b):
    if not _is_float(a):
      return a
    al = jnp.asarray(alpha).astype(a.dtype)
    return a + al * (jnp.asarray(b).astype(a.dtype) - a)

  return jax.tree.map(leaf, params_a, params_b)


def check_alphas(alphas, name: str) -> jnp.ndarray:
  """Validates a 1-D, non-empty, finite coefficient array and returns it as float32."""
  arr = np.asarray(alphas)
  if arr.ndim != 1:
    raise ValueError(f"{name} must be a 1-D array of coefficients, got shape {arr.shape}")
  if arr.size == 0:
    raise ValueError(f"{name} is empty: the grid needs at least one point")
  if not np.issubdtype(arr.dtype, np.number):
    raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"{name} contains non-finite values")
  return jnp.asarray(arr, dtype=jnp.float32)


def leading_dim(tree: PyTree, name: str) -> int:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise ValueError(f"{name} has no array leaves")
  sizes = {int(np.shape(x)[0]) if np.ndim(x) else -1 for x in leaves}
  if len(sizes) != 1 or -1 in sizes:
    raise ValueError(f"{name}: all leaves need the same leading (example) dimension, got {sorted(sizes)}")
  n = sizes.pop()
  if n == 0:
    raise ValueError(f"{name} has zero examples")
  return n


def batches_with_mask(tree: PyTree, n: int, batch_size: int | None):
  """Yields (batch, mask) with the last batch zero-padded to batch_size (one compile)."""
  if batch_size is None or batch_size >= n:
    yield tree, jnp.ones((n,), jnp.bool_)
    return
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    pad = batch_size - (stop - start)

    def take(x, start=start, stop=stop, pad=pad):
      x = jnp.asarray(x)[start:stop]
      if pad:
        x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)], axis=0)
      return x

    mask = jnp.arange(batch_size) < (stop - start)
    yield jax.tree.map(take, tree), mask


def tangent_like(params: PyTree, direction: PyTree) -> PyTree:
  """`direction` cast to params' leaf dtypes, float0 zeros for non-float leaves (for jvp)."""

  def leaf(p, d):
    if not _is_float(p):
      return np.zeros(np.shape(p), jax.dtypes.float0)
    return jnp.asarray(d).astype(jnp.asarray(p).dtype)

  return jax.tree.map(leaf, params, direction)
