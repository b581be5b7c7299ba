"""Split a parameter pytree into trainable and frozen parts (FTLO, frozen heads).

The two parts have the SAME tree structure as the original; leaves that belong to the
other part are ``None`` (an empty subtree for JAX and optax). Differentiating a loss
with respect to the trainable part therefore computes no gradient for frozen leaves,
optimizers keep no state for them, weight decay never touches them, and SAM never
perturbs them.
"""
from __future__ import annotations

from typing import Any, Callable

import jax

PyTree = Any


def _path_str(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def mask_from_predicate(params: PyTree, predicate: Callable[[str, Any], bool]) -> PyTree:
  """Builds a boolean mask from ``predicate(path, leaf)``; ``path`` is like ``"a/b/kernel"``."""
  return jax.tree_util.tree_map_with_path(lambda p, x: bool(predicate(_path_str(p), x)), params)


def _check_mask(params: PyTree, mask: PyTree):
  p_paths = [_path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  m_leaves = jax.tree_util.tree_leaves_with_path(mask)
  m_paths = [_path_str(p) for p, _ in m_leaves]
  if p_paths != m_paths:
    missing = sorted(set(p_paths) - set(m_paths))
    extra = sorted(set(m_paths) - set(p_paths))
    raise ValueError(
        f"mask structure does not match params: missing leaves {missing[:5]}, "
        f"unexpected leaves {extra[:5]}")
  for p, m in m_leaves:
    if not isinstance(m, bool):
      raise TypeError(f"mask leaf {_path_str(p)!r} must be a Python bool, got {type(m).__name__}")


def partition(params: PyTree, mask: PyTree | Callable[[str, Any], bool]) -> tuple[PyTree, PyTree]:
  """Splits ``params`` into ``(trainable, frozen)``.

  Args:
    params: the full parameter pytree.
    mask: a pytree of Python bools with the structure of ``params`` (True = trainable),
      or a predicate ``(path, leaf) -> bool``.

  Returns:
    ``(trainable, frozen)``: two trees with the structure of ``params`` in which the
    leaves of the other part are ``None``.
  """
  if callable(mask):
    mask = mask_from_predicate(params, mask)
  _check_mask(params, mask)
  treedef = jax.tree.structure(params)
  leaves = treedef.flatten_up_to(params)
  flags = treedef.flatten_up_to(mask)
  trainable = treedef.unflatten([x if m else None for x, m in zip(leaves, flags)])
  frozen = treedef.unflatten([None if m else x for x, m in zip(leaves, flags)])
  return trainable, frozen


def combine(trainable: PyTree, frozen: PyTree) -> PyTree:
  """Inverse of :func:`partition`: takes each leaf from whichever part is not ``None``.

  ``frozen=None`` (nothing frozen, plain SGD fine-tuning) returns ``trainable``.
  """
  if frozen is None:
    return trainable
  is_none = lambda x: x is None
  def pick(a, b):
    if a is not None and b is not None:
      raise ValueError("a leaf is set in both the trainable and the frozen part")
    return b if a is None else a
  try:
    return jax.tree.map(pick, trainable, frozen, is_leaf=is_none)
  except ValueError as e:
    raise ValueError(f"combine: trainable and frozen trees do not match: {e}") from e
