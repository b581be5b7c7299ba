"""Weight averaging and task arithmetic.

References:
  Wortsman, M. et al. "Model soups: averaging weights of multiple fine-tuned models improves
  accuracy without increasing inference time." ICML 2022. arXiv:2203.05482.
  Ilharco, G. et al. "Editing Models with Task Arithmetic." ICLR 2023. arXiv:2212.04089.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from ._task_vectors import (ExcludeFn, PyTree, check_task_vectors, leaf_dtype,
                            map_mergeable)


def task_lams(lam, t: int) -> jnp.ndarray:
  """``lam`` as a float32 ``(T,)`` array (a scalar is broadcast); may be traced."""
  lam = jnp.asarray(lam).astype(jnp.float32)
  if lam.ndim == 0:
    return jnp.broadcast_to(lam, (t,))
  if lam.shape != (t,):
    raise ValueError(f"lam must be a scalar or have one entry per task ({t}), "
                     f"got shape {lam.shape}")
  return lam


def sum_leaves(xs: Sequence, weights=None) -> jnp.ndarray:
  """``Σ_t w_t x_t`` in float32, tasks added in list order."""
  acc = None
  for t, x in enumerate(xs):
    v = x.astype(jnp.float32)
    if weights is not None:
      v = weights[t] * v
    acc = v if acc is None else acc + v
  return acc


def weight_average(models: Sequence[PyTree], *, exclude: ExcludeFn = None) -> PyTree:
  """Uniform soup ``(1/T) Σ_t θ_t``; non-float/excluded leaves come from ``models[0]``."""
  check_task_vectors(models, what="model")
  inv = jnp.float32(1.0 / len(models))
  return map_mergeable(
      lambda p, x0, xs: (sum_leaves(xs) * inv).astype(leaf_dtype(x0)),
      models[0], list(models), exclude)


def sum_task_vectors(tvs: Sequence[PyTree], lam=1.0, *, exclude: ExcludeFn = None) -> PyTree:
  """``Σ_t λ_t τ_t`` (the task-arithmetic vector; zeros on non-mergeable leaves)."""
  check_task_vectors(tvs)
  lams = task_lams(lam, len(tvs))
  return map_mergeable(lambda p, x0, xs: sum_leaves(xs, lams).astype(leaf_dtype(x0)),
                       tvs[0], list(tvs), exclude, passthrough=jnp.zeros_like)


def task_arithmetic(pretrained: PyTree, tvs: Sequence[PyTree], lam, *,
                    exclude: ExcludeFn = None) -> PyTree:
  """``θ0 + Σ_t λ_t τ_t``; ``lam`` is a scalar or one per task, and may be traced.

  Computed in float32 and cast once to each leaf's dtype (no intermediate rounding of the
  merged vector), so ``jax.vmap`` over ``lam`` gives a vectorized coefficient search.
  """
  check_task_vectors(tvs, pretrained)
  lams = task_lams(lam, len(tvs))
  return map_mergeable(
      lambda p, x0, xs: (x0.astype(jnp.float32) + sum_leaves(xs, lams)).astype(leaf_dtype(x0)),
      pretrained, list(tvs), exclude)
