"""Shared helpers of the sharpness-aware transforms (validation, norms, leaves).

Everything here is pure and jit-compatible. Trees may contain
``optax.MaskedNode`` leaves (when a transform runs inside ``optax.masked`` or
``optax.multi_transform``): a ``MaskedNode`` is an empty pytree node, so it has
no array leaves and every ``jax.tree.map`` below simply skips it.
"""
from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

F32 = jnp.float32
DEFAULT_EPS = 1e-12

GradFn = Callable[[Any], Any]
KeyPath = tuple


# ----------------------------------------------------------------------------- validation


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
  """Raises ValueError if a concrete hyperparameter is not > 0 (or >= 0).

  Traced values (e.g. under ``optax.inject_hyperparams`` inside ``jit``) are
  not checked: their value is unknown at trace time.
  """
  concrete = _concrete(value)
  if concrete is None:
    return
  if not np.all(np.isfinite(concrete)):
    raise ValueError(f"{name} must be finite, got {value!r}.")
  bad = np.any(concrete < 0) if allow_zero else np.any(concrete <= 0)
  if bad:
    cmp = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"{name} must be {cmp}, got {value!r}.")


def check_fraction(name: str, value: Any, *, closed_high: bool = False) -> None:
  """Raises ValueError if a concrete value is outside [0, 1) (or [0, 1])."""
  concrete = _concrete(value)
  if concrete is None:
    return
  high_ok = concrete <= 1 if closed_high else concrete < 1
  if not (np.all(concrete >= 0) and np.all(high_ok)):
    rng = "[0, 1]" if closed_high else "[0, 1)"
    raise ValueError(f"{name} must lie in {rng}, got {value!r}.")


def check_period(name: str, value: Any) -> int:
  """Returns a static positive int period; raises ValueError/TypeError."""
  concrete = _concrete(value)
  if concrete is None or np.ndim(concrete) != 0:
    raise TypeError(
        f"{name} must be a static Python int (mark it static_args in "
        f"optax.inject_hyperparams), got {value!r}.")
  if isinstance(value, bool) or float(concrete) != int(concrete):
    raise TypeError(f"{name} must be an int, got {value!r}.")
  if int(concrete) < 1:
    raise ValueError(f"{name} must be >= 1, got {value!r}.")
  return int(concrete)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"Unknown {name} {value!r}; expected one of {choices}.")


def check_base_optimizer(base_optimizer: Any, who: str) -> None:
  if not (hasattr(base_optimizer, "init") and hasattr(base_optimizer, "update")):
    raise TypeError(
        f"{who}: base_optimizer must be an optax GradientTransformation, got "
        f"{type(base_optimizer).__name__}.")


def _concrete(value: Any):
  if isinstance(value, bool):
    return None
  if isinstance(value, numbers.Number):
    return np.asarray(value)
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    return np.asarray(value)
  except Exception:  # noqa: BLE001 - non-concrete values are simply not checked
    return None


def require_grad_fn(grad_fn: Any, who: str) -> GradFn:
  if grad_fn is None:
    raise ValueError(
        f"{who}.update needs the extra argument grad_fn=f where f(params) -> "
        "grads on the current batch, e.g. "
        "tx.update(grads, state, params, grad_fn=jax.grad(lambda p: loss(p, batch))).")
  if not callable(grad_fn):
    raise TypeError(f"{who}: grad_fn must be callable, got {type(grad_fn).__name__}.")
  return grad_fn


def require_params(params: Any, who: str) -> None:
  if params is None:
    raise ValueError(f"{who}.update needs params (the unperturbed parameters).")


# ----------------------------------------------------------------------------- trees


def is_masked_node(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def has_masked_nodes(tree: Any) -> bool:
  return any(is_masked_node(x) for x in jax.tree.leaves(tree, is_leaf=is_masked_node))


def f32(x: Any) -> jax.Array:
  return jnp.asarray(x, F32)


def global_norm(tree: Any) -> jax.Array:
  """One float32 L2 norm over every leaf of ``tree`` (not per leaf)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), F32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(F32))) for x in leaves))


def tree_vdot(a: Any, b: Any) -> jax.Array:
  leaves = jax.tree.leaves(jax.tree.map(
      lambda x, y: jnp.sum(x.astype(F32) * y.astype(F32)), a, b))
  return sum(leaves) if leaves else jnp.zeros((), F32)


def add_perturbation(params: Any, eps: Any) -> Any:
  """``params + eps`` leaf by leaf, in each param's dtype."""
  return jax.tree.map(lambda p, e: p + e.astype(p.dtype), params, eps)


def cast_like(tree: Any, like: Any) -> Any:
  return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)


def pmean(tree: Any, axis_name: str | None) -> Any:
  if axis_name is None:
    return tree
  return jax.lax.pmean(tree, axis_name)


def leaf_name(path: KeyPath) -> str:
  """The last key of a key path as a string ('' for the root)."""
  if not path:
    return ""
  k = path[-1]
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _path_names(path: KeyPath) -> list[str]:
  return [leaf_name((k,)) for k in path]


def default_weight_predicate(path: KeyPath, leaf: Any = None) -> bool:
  """Default ASAM leaf selection: True unless the last path key contains 'bias'.

  Every leaf but biases gets ``T = |θ| + η``: dense/conv kernels, LayerNorm
  scales, and also embedding tables, CLIP's ``class_embedding`` /
  ``positional_embedding`` and its output projection ``proj/kernel``. This is
  SPEC §3's rule ("weight" leaves are kernels, embeddings and LayerNorm
  scales). It is *not* the ASAM reference code's rule (``'weight' in name``
  on PyTorch parameter names, ``SamsungLabs/ASAM`` ``asam.py``), which leaves
  parameters registered without a ``.weight`` suffix — CLIP's
  ``class_embedding``, ``positional_embedding``, ``visual.proj``,
  ``text_projection`` — at ``T = 1``; use ``reference_weight_predicate`` (or
  ``asam(..., weight_predicate="reference")``) for that rule.

  Args:
    path: a ``jax.tree_util`` key path.
    leaf: the leaf (unused by the default; custom predicates may use it).
  """
  del leaf
  return "bias" not in leaf_name(path).lower()


# Flax leaf names whose PyTorch counterpart is a module's ``.weight``:
# Linear/Conv kernels, LayerNorm/BatchNorm scales, nn.Embed tables.
_TORCH_WEIGHT_LEAVES = ("kernel", "scale", "embedding")


def reference_weight_predicate(path: KeyPath, leaf: Any = None) -> bool:
  """The ASAM reference's ``'weight' in name`` rule, on PyTorch-equivalent names.

  ``SamsungLabs/ASAM`` (``asam.py``) scales a parameter iff its PyTorch name
  contains ``weight``. A Flax leaf is given the name its PyTorch counterpart
  has in open_clip's CLIP (the layout of ``saft_jax.models``):

  * ``kernel`` / ``scale`` / ``embedding`` leaves are modules' ``.weight``
    (Linear, Conv, LayerNorm, Embedding) -> True; except a ``proj/kernel``
    not inside an MLP (``mlp/proj`` is ``c_proj.weight``): that is CLIP's raw
    projection parameter (``visual.proj``, ``text_projection``) -> False;
  * ``token_embedding`` is ``token_embedding.weight`` (nn.Embedding) -> True;
  * any other leaf (biases, ``class_embedding``, ``positional_embedding``,
    ``logit_scale``) -> True only if some key of its path contains
    ``weight`` (so trees that keep PyTorch names work unchanged).

  Args:
    path: a ``jax.tree_util`` key path.
    leaf: the leaf (unused).
  """
  del leaf
  names = _path_names(path)
  if not names:
    return False
  last = names[-1]
  if last in _TORCH_WEIGHT_LEAVES:
    raw_proj = (last == "kernel" and len(names) >= 2 and names[-2] == "proj"
                and (len(names) < 3 or names[-3] != "mlp"))
    return not raw_proj
  if last == "token_embedding":
    return True
  return any("weight" in n.lower() for n in names)


def resolve_mask(mask: Any, params: Any, who: str) -> Any:
  """Returns a bool tree (one python bool per array leaf) or None for 'all'.

  ``mask`` is None, a pytree of bools with the structure of params, or a
  callable ``params -> such a pytree``. True = trainable (perturbed).
  """
  if mask is None:
    return None
  tree = mask(params) if callable(mask) else mask
  try:
    flags = jax.tree.map(lambda m, _: m, tree, params)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{who}: mask must be a pytree of bools with the structure of params "
        f"(or a callable returning one): {e}") from e
  paths_flags = jax.tree_util.tree_leaves_with_path(flags)
  for path, m in paths_flags:
    if not isinstance(m, (bool, np.bool_)):
      raise TypeError(
          f"{who}: mask leaf at {jax.tree_util.keystr(path)} must be a Python "
          f"bool, got {type(m).__name__}.")
  if paths_flags and not any(bool(m) for _, m in paths_flags):
    raise ValueError(f"{who}: mask selects no leaf to perturb.")
  return flags


def masked_zero(tree: Any, flags: Any) -> Any:
  """Zeros the leaves whose flag is False (no-op when flags is None)."""
  if flags is None:
    return tree
  return jax.tree.map(lambda x, m: x if m else jnp.zeros_like(x), tree, flags)


def check_same_structure(got: Any, want: Any, who: str) -> None:
  """Raises if grad_fn's output does not match the params it was given."""
  s_got, s_want = jax.tree.structure(got), jax.tree.structure(want)
  if s_got != s_want:
    raise ValueError(
        f"{who}: grad_fn returned a pytree with structure {s_got}, but the "
        f"params have structure {s_want}; grad_fn(params) must return grads "
        "with the structure of params.")
  for (path, g), p in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree.leaves(want)):
    if jnp.shape(g) != jnp.shape(p):
      raise ValueError(
          f"{who}: grad_fn returned shape {jnp.shape(g)} at "
          f"{jax.tree_util.keystr(path)}, expected {jnp.shape(p)}.")


def to_varying(tree: Any, axis_name: str | None) -> Any:
  """Inside ``shard_map``: marks leaves as varying over ``axis_name``.

  A gradient taken with respect to a replicated (invariant) value inside
  ``shard_map`` is summed over the axis by JAX; with respect to a varying
  value it stays shard-local, which is what per-shard SAM needs.
  """
  if axis_name is None:
    return tree

  def cast(x):
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    varying = getattr(mat, "varying", None)
    if varying is None:
      varying = getattr(aval, "vma", frozenset())
    if axis_name in varying:
      return x
    return jax.lax.pcast(x, axis_name, to="varying")

  return jax.tree.map(cast, tree)


def call_grad_fn(grad_fn: GradFn, params: Any, who: str,
                 axis_name: str | None = None) -> Any:
  """Evaluates grad_fn(params) with a helpful error under optax.masked.

  With ``axis_name`` (per-shard mode inside ``shard_map``) params are first
  marked varying so that the returned gradient is shard-local.
  """
  params = to_varying(params, axis_name)
  if has_masked_nodes(params):
    try:
      out = grad_fn(params)
    except Exception as e:  # noqa: BLE001 - re-raised with an explanation
      raise TypeError(
          f"{who}: params contain optax.MaskedNode leaves (the transform runs "
          "inside optax.masked / optax.multi_transform), and grad_fn failed on "
          "them. Wrap it: grad_fn=saft_jax.optim.masked_grad_fn(grad_fn, "
          "full_params), or pass mask= to the transform instead of "
          f"optax.masked. Original error: {type(e).__name__}: {e}") from e
  else:
    out = grad_fn(params)
  check_same_structure(out, params, who)
  return out


def masked_grad_fn(grad_fn: GradFn, full_params: Any) -> GradFn:
  """Adapts a full-tree ``grad_fn`` to trees with ``optax.MaskedNode`` leaves.

  Inside ``optax.masked`` / ``optax.multi_transform`` a transform sees params
  with ``MaskedNode`` in place of the leaves it does not own. The returned
  function fills those leaves from ``full_params`` (their current, unperturbed
  values), calls ``grad_fn`` on the full tree, and masks the result the same
  way, so frozen leaves are never perturbed.

  Args:
    grad_fn: ``full_params -> full grads`` on the current batch.
    full_params: the current full parameter tree.
  """

  def fn(params):
    filled = jax.tree.map(lambda m, f: f if is_masked_node(m) else m,
                          params, full_params, is_leaf=is_masked_node)
    grads = grad_fn(filled)
    return jax.tree.map(lambda m, g: m if is_masked_node(m) else g,
                        params, grads, is_leaf=is_masked_node)

  return fn


def init_key(key: Any, who: str) -> jax.Array:
  """Raw uint32 key data from an int seed or a (typed or raw) PRNG key."""
  if key is None:
    raise ValueError(f"{who} needs a PRNG key or int seed (key=...).")
  if isinstance(key, (int, np.integer)) or (
      hasattr(key, "dtype") and jnp.issubdtype(key.dtype, jnp.integer)
      and jnp.ndim(key) == 0):
    return jax.random.key_data(jax.random.key(key))
  if hasattr(key, "dtype") and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  if not hasattr(key, "dtype"):
    raise TypeError(f"{who}: key must be an int seed or a PRNG key, got {key!r}.")
  arr = jnp.asarray(key)
  if arr.dtype != jnp.uint32:
    raise TypeError(f"{who}: key must be an int seed or a PRNG key, got {key!r}.")
  return arr


def split_key(raw: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Splits raw key data; returns (next raw key data, a typed subkey)."""
  nxt, sub = jax.random.split(jax.random.wrap_key_data(raw))
  return jax.random.key_data(nxt), sub


def count_inc(count: jax.Array) -> jax.Array:
  return optax.safe_increment(count)
