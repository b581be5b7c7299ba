"""Task vectors: ``τ = θ_ft − θ0`` and their arithmetic, plus input validation.

Conventions shared by the whole ``saft_jax.merging`` package:

- A *leaf path* is a ``/``-joined string of the pytree keys (``"params/blocks_3/mlp/kernel"``,
  list indices as integers: ``"layers/0/w"``). User predicates receive it.
- A leaf is *mergeable* when its dtype is floating and ``exclude(path)`` is false. Non-float
  leaves (step counters, integer buffers) and excluded leaves (e.g. frozen heads) are never
  merged: merges return the pre-trained leaf unchanged, task vectors hold zeros there.
- Arithmetic is done in float32 and cast back to each leaf's dtype, so bf16/f32 leaves keep
  their dtype and strict dtype promotion never triggers.

References:
  Ilharco, G. et al. "Editing Models with Task Arithmetic." ICLR 2023. arXiv:2212.04089.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
ExcludeFn = Optional[Callable[[str], bool]]


def _key_str(k) -> str:
  if isinstance(k, jax.tree_util.DictKey):
    return str(k.key)
  if isinstance(k, jax.tree_util.SequenceKey):
    return str(k.idx)
  if isinstance(k, jax.tree_util.GetAttrKey):
    return str(k.name)
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return str(k.key)
  return str(k)


def path_str(path) -> str:
  """``/``-joined string of a JAX key path (``("a", 0, "w") -> "a/0/w"``)."""
  return "/".join(_key_str(k) for k in path)


def leaf_dtype(leaf):
  return leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype


def is_float_leaf(leaf) -> bool:
  return bool(jnp.issubdtype(leaf_dtype(leaf), jnp.floating))


def is_mergeable(path: str, leaf, exclude: ExcludeFn = None) -> bool:
  """True for floating leaves whose path is not selected by ``exclude``."""
  return is_float_leaf(leaf) and not (exclude is not None and exclude(path))


def flatten(tree: PyTree):
  """``[(path_string, leaf), ...]`` and the treedef."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return [(path_str(p), x) for p, x in leaves], treedef


def check_like(reference: PyTree, others: Sequence[PyTree], what: str = "task vector",
               ref_name: str = "pretrained") -> None:
  """Raise a clear error unless every tree in ``others`` matches ``reference``.

  Structure, per-leaf shape and per-leaf dtype must agree; the message names the first
  offending leaf path.
  """
  if isinstance(others, (str, bytes)) or not isinstance(others, (list, tuple)):
    raise TypeError(f"expected a list of {what}s, got {type(others).__name__}")
  if len(others) == 0:
    raise ValueError(f"expected a non-empty list of {what}s, got an empty list")
  ref, ref_def = flatten(reference)
  for i, other in enumerate(others):
    oth, oth_def = flatten(other)
    if oth_def != ref_def:
      ref_paths = [p for p, _ in ref]
      oth_paths = [p for p, _ in oth]
      missing = [p for p in ref_paths if p not in oth_paths]
      extra = [p for p in oth_paths if p not in ref_paths]
      where = (f"missing leaf {missing[0]!r}" if missing else
               f"unexpected leaf {extra[0]!r}" if extra else "different container types")
      raise ValueError(
          f"{what} {i} has a different pytree structure than {ref_name}: {where}")
    for (p, a), (_, b) in zip(ref, oth):
      if np.shape(a) != np.shape(b):
        raise ValueError(f"{what} {i}: leaf {p!r} has shape {np.shape(b)}, "
                         f"{ref_name} has {np.shape(a)}")
      if leaf_dtype(a) != leaf_dtype(b):
        raise ValueError(f"{what} {i}: leaf {p!r} has dtype {leaf_dtype(b)}, "
                         f"{ref_name} has {leaf_dtype(a)}")


def map_mergeable(fn: Callable, reference: PyTree, trees: Sequence[PyTree],
                  exclude: ExcludeFn = None, passthrough: Optional[Callable] = None) -> PyTree:
  """Apply ``fn(path, ref_leaf, [leaf_t...])`` on mergeable leaves; others pass through.

  ``passthrough(ref_leaf)`` gives the value of non-mergeable leaves (default: ``ref_leaf``).
  """
  ref, treedef = flatten(reference)
  flat = [flatten(t)[0] for t in trees]
  out = []
  for j, (p, x) in enumerate(ref):
    if is_mergeable(p, x, exclude):
      out.append(fn(p, x, [f[j][1] for f in flat]))
    else:
      out.append(x if passthrough is None else passthrough(x))
  return jax.tree_util.tree_unflatten(treedef, out)


def _f32(x):
  return jnp.asarray(x).astype(jnp.float32)


def _cast(x32, like):
  return x32.astype(leaf_dtype(like))


def task_vector(pretrained: PyTree, finetuned: PyTree, *, exclude: ExcludeFn = None) -> PyTree:
  """``τ = θ_ft − θ0`` leaf by leaf (zeros on non-float and excluded leaves).

  Args:
    pretrained: ``θ0``.
    finetuned: ``θ_ft``, same structure, shapes and dtypes.
    exclude: optional predicate on the leaf path; selected leaves get a zero task vector.

  Returns:
    A pytree like ``pretrained`` (same dtypes).
  """
  check_like(pretrained, [finetuned], what="fine-tuned model")
  return map_mergeable(lambda p, x0, xs: _cast(_f32(xs[0]) - _f32(x0), x0), pretrained,
                       [finetuned], exclude, passthrough=jnp.zeros_like)


def apply_task_vector(pretrained: PyTree, tv: PyTree, scale=1.0, *,
                      exclude: ExcludeFn = None) -> PyTree:
  """``θ0 + scale · τ`` on mergeable leaves; other leaves are ``θ0``'s, unchanged.

  ``scale`` may be a Python float or a traced scalar array (so callers can ``jax.vmap``
  over many coefficients).
  """
  check_like(pretrained, [tv])
  s = _f32(scale)
  if s.ndim != 0:
    raise ValueError(f"scale must be a scalar, got shape {s.shape}")
  return map_mergeable(lambda p, x0, ts: _cast(_f32(x0) + s * _f32(ts[0]), x0), pretrained,
                       [tv], exclude)


def _tv_map(fn, first: PyTree, rest: Sequence[PyTree]) -> PyTree:
  if rest:
    check_like(first, list(rest), ref_name="first task vector")
  return map_mergeable(lambda p, x, xs: _cast(fn(_f32(x), *[_f32(v) for v in xs]), x),
                       first, list(rest))


def add_task_vectors(*tvs: PyTree) -> PyTree:
  """Sum of task vectors (float leaves; other leaves come from the first)."""
  if not tvs:
    raise ValueError("add_task_vectors needs at least one task vector")
  def _sum(x, *xs):
    for v in xs:
      x = x + v
    return x
  return _tv_map(_sum, tvs[0], tvs[1:])


def subtract_task_vectors(a: PyTree, b: PyTree) -> PyTree:
  """``a − b`` leaf by leaf."""
  return _tv_map(lambda x, y: x - y, a, [b])


def scale_task_vector(tv: PyTree, scale) -> PyTree:
  """``scale · τ`` (``scale`` may be traced)."""
  s = _f32(scale)
  return _tv_map(lambda x: s * x, tv, [])


def negate_task_vector(tv: PyTree) -> PyTree:
  """``−τ``: adding it to ``θ0`` makes the model forget the task (Ilharco et al., 2023)."""
  return _tv_map(lambda x: -x, tv, [])


def check_task_vectors(tvs: Sequence[PyTree], reference: PyTree = None,
                       what: str = "task vector") -> None:
  """Validate a non-empty list of trees against ``reference`` (default: the first)."""
  if isinstance(tvs, (str, bytes)) or not isinstance(tvs, (list, tuple)):
    raise TypeError(f"expected a list of {what}s, got {type(tvs).__name__}")
  if len(tvs) == 0:
    raise ValueError(f"expected a non-empty list of {what}s, got an empty list")
  if reference is None:
    check_like(tvs[0], list(tvs), what=what, ref_name=f"{what} 0")
  else:
    check_like(reference, list(tvs), what=what)
