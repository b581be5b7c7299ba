"""Cross-task linearity (CTL): per-layer cosine distance between the features of an
interpolated model and the interpolation of the features.

    Dis_cos^ℓ(α) = 1 − cos( f^ℓ(x; α θ_i + (1−α) θ_j),  α f^ℓ(x; θ_i) + (1−α) f^ℓ(x; θ_j) )

averaged over the inputs of tasks i and j (pooled: every example weighs the same);
the cosine is taken over each example's flattened feature. Lower means stronger CTL.
Features are whatever `apply_features(params, x)` returns: a dict or list (any pytree)
of per-layer arrays with a leading example axis, e.g. every block's residual output,
the final embedding and the logits.

References:
  Zhou, Chen, Wang, Yan, Liu, Wen, Tan. "On the Emergence of Cross-Task Linearity in
  the Pretraining-Finetuning Paradigm", ICML 2024.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from saft_jax.analysis import _tree

PyTree = Any


class CTLResult(NamedTuple):
  """Per-layer cosine distances.

  Attributes:
    names: layer names (from the feature pytree's key paths, e.g. "block_3", "logits").
    alphas: the interpolation coefficients, shape (A,).
    dis_cos: shape (A, L): pooled mean over all inputs of all input sets.
    per_input_set: shape (S, A, L): mean over each input set separately.
  """
  names: tuple
  alphas: np.ndarray
  dis_cos: np.ndarray
  per_input_set: np.ndarray

  def as_dict(self, alpha_index: int = 0) -> dict:
    """`{layer name: Dis_cos}` for one α (JSON-friendly floats)."""
    return {n: float(v) for n, v in zip(self.names, self.dis_cos[alpha_index])}


def _key_name(k) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def layer_names(features: PyTree) -> tuple:
  """Readable names of the leaves of a feature pytree ("block_0", "0", "blocks/3")."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(features)
  return tuple("/".join(_key_name(k) for k in path) or "output" for path, _ in leaves)


def _cos_dist(a, b):
  a = a.reshape(a.shape[0], -1).astype(jnp.float32)
  b = b.reshape(b.shape[0], -1).astype(jnp.float32)
  num = jnp.sum(a * b, axis=-1)
  den = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
  return 1.0 - num / jnp.maximum(den, jnp.finfo(jnp.float32).tiny)


@functools.lru_cache(maxsize=16)
def _ctl_stats_fn(fn, chunk_size):
  """Compiled per-batch CTL sums (cached)."""

  def stats(pi, pj, xb, mb, alphas):
    fi, fj = fn(pi, xb), fn(pj, xb)

    def one(a):
      fm = fn(_tree.interpolate(pj, pi, a), xb)

      def leaf(m, a_, b_):
        target = a.astype(a_.dtype) * a_ + (1 - a).astype(b_.dtype) * b_
        return jnp.sum(_cos_dist(m, target) * mb.astype(jnp.float32))

      return jnp.stack(jax.tree.leaves(jax.tree.map(leaf, fm, fi, fj)))

    return jax.lax.map(one, alphas, batch_size=chunk_size)

  return jax.jit(stats)


def cross_task_linearity(
    apply_features: Callable | Sequence[Callable],
    params_i: PyTree,
    params_j: PyTree,
    inputs: Any | Sequence[Any],
    *,
    alpha=0.5,
    batch_size: Optional[int] = None,
    chunk_size: int = 4,
) -> CTLResult:
  """Per-layer CTL distance between two fine-tuned models.

  Args:
    apply_features: `(params, x) -> pytree of per-layer features (B, ...)`, one callable
      or one per input set (same feature structure for all).
    params_i, params_j: the two models (same pytree structure).
    inputs: one input array/pytree, or a list/tuple of input sets (e.g. tasks i and j).
    alpha: interpolation coefficient (weight of θ_i), scalar or 1-D array.
    batch_size: examples per batch (None: whole set at once).
    chunk_size: α values evaluated at once under vmap.

  Returns:
    A `CTLResult`.

  References:
    Zhou et al., "On the Emergence of Cross-Task Linearity ...", ICML 2024.
  """
  _tree.check_same_structure(params_i, params_j, "params_i", "params_j")
  scalar = np.ndim(alpha) == 0
  alphas = _tree.check_alphas(np.atleast_1d(np.asarray(alpha, np.float32)) if scalar else alpha,
                              "alpha")
  sets = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
  if not sets:
    raise ValueError("inputs is empty")
  fns = list(apply_features) if isinstance(apply_features, (list, tuple)) else (
      [apply_features] * len(sets))
  if len(fns) != len(sets) or not all(callable(f) for f in fns):
    raise ValueError(f"need one callable apply_features per input set ({len(sets)}), got {len(fns)}")

  names, sums, counts = None, [], []
  for s, (fn, x) in enumerate(zip(fns, sets)):

    n = _tree.leading_dim(x, f"inputs[{s}]")
    feats = jax.eval_shape(fn, params_i, jax.tree.map(lambda a: a[:1], x))
    these = layer_names(feats)
    if names is None:
      names = these
    elif these != names:
      raise ValueError(f"apply_features for input set {s} returns layers {these}, expected {names}")
    stats = _ctl_stats_fn(fn, chunk_size)
    acc = 0.0
    for xb, mb in _tree.batches_with_mask(x, n, batch_size):
      acc = acc + np.asarray(stats(params_i, params_j, xb, mb, alphas), np.float64)
    sums.append(acc)
    counts.append(n)
  per_set = np.stack([s / c for s, c in zip(sums, counts)])
  pooled = sum(sums) / float(sum(counts))
  return CTLResult(names, np.asarray(alphas), pooled, per_set)
