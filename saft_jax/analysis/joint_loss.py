"""Joint-task loss over coefficient grids and along straight lines in weight space.

- `joint_loss_grid`: `L_joint(θ0 + α1 τ1 + α2 τ2 [+ Σ_k λ_k τ_k]) = Σ_t L_t(θ)` on the
  (α1, α2) grid (two-task and all-task merges), vectorized over grid chunks.
- `loss_barrier`: the loss along `θ(α) = (1 − α) θ_a + α θ_b`, α ∈ [0, 1], and the barrier
  `max_α L(θ(α)) − [(1 − α) L(θ_a) + α L(θ_b)]` (used e.g. between two fine-tuned models,
  SPEC §9, and from the merged model to each task model, SPEC §7).
- `jtl_linearity`: `L_joint(α θ1 + (1−α) θ2) − [α L_joint(θ1) + (1−α) L_joint(θ2)]` over α.

Losses: each `loss_fn` is `loss_fn(params) -> scalar` when `batches` is None, else
`loss_fn(params, batch) -> scalar mean loss`, with `batches[t]` one batch (any pytree
that is not a Python list) or a Python list of batches, averaged weighted by their
leading (example) dimension. A sequence of loss functions is summed (the joint loss).

References:
  Frankle, Dziugaite, Roy, Carbin. "Linear Mode Connectivity and the Lottery Ticket
  Hypothesis", ICML 2020 (loss barrier).
  Zhou et al. "On the Emergence of Cross-Task Linearity ...", ICML 2024.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from saft_jax.analysis import _tree
from saft_jax.analysis.disentanglement import _fixed_coefs, _grid_axes

PyTree = Any


class JointLossResult(NamedTuple):
  """`joint` (G1, G2) = Σ_t `per_task[t]`; row i ↔ alphas1[i]."""
  alphas1: np.ndarray
  alphas2: np.ndarray
  joint: np.ndarray
  per_task: np.ndarray


class LossBarrier(NamedTuple):
  """Loss along a straight line.

  Attributes:
    alphas: path coefficients (see the producing function for their meaning).
    losses: loss at each α (summed over loss functions).
    linear: the linear interpolation of the endpoint losses at each α.
    excess: `losses − linear`.
    barrier: `max(excess)` (0 or negative for a convex-looking path).
    barrier_alpha: the α where the maximum is reached.
    endpoint_losses: (loss at α = 0, loss at α = 1).
  """
  alphas: np.ndarray
  losses: np.ndarray
  linear: np.ndarray
  excess: np.ndarray
  barrier: float
  barrier_alpha: float
  endpoint_losses: tuple


def _as_fns(loss_fn):
  fns = list(loss_fn) if isinstance(loss_fn, (list, tuple)) else [loss_fn]
  if not fns or not all(callable(f) for f in fns):
    raise TypeError("loss_fn must be a callable or a non-empty sequence of callables")
  return fns


def _make_combined(args, c):
  return _tree.combine(args[0], list(args[1]), c)


def _make_interpolated(args, c):
  return _tree.interpolate(args[0], args[1], c)


@functools.lru_cache(maxsize=32)
def _loss_map_fn(fn, make_params, chunk_size, batched):
  """Compiled `lax.map` of a loss over coefficient rows (cached)."""
  if batched:
    return jax.jit(lambda args, b, coefs: jax.lax.map(
        lambda c: fn(make_params(args, c), b), coefs, batch_size=chunk_size))
  return jax.jit(lambda args, coefs: jax.lax.map(
      lambda c: fn(make_params(args, c)), coefs, batch_size=chunk_size))


def _evaluate(fns, batches, make_params, args, coefs, chunk_size):
  """Losses (num_fns, P) of every loss function at make_params(args, coefs[p])."""
  if not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  if batches is not None:
    if not isinstance(batches, (list, tuple)) or len(batches) != len(fns):
      raise ValueError(f"batches must hold one entry per loss function ({len(fns)})")
  out = []
  for t, fn in enumerate(fns):
    if batches is None:
      f = _loss_map_fn(fn, make_params, chunk_size, False)
      out.append(np.asarray(f(args, coefs), np.float64))
      continue
    blist = batches[t] if isinstance(batches[t], list) else [batches[t]]
    if not blist:
      raise ValueError(f"batches[{t}] is an empty list")
    f = _loss_map_fn(fn, make_params, chunk_size, True)
    total, weight = 0.0, 0
    for i, b in enumerate(blist):
      w = _tree.leading_dim(b, f"batches[{t}][{i}]")
      total = total + w * np.asarray(f(args, b, coefs), np.float64)
      weight += w
    out.append(total / weight)
  return np.stack(out)


def joint_loss_grid(
    loss_fns: Callable | Sequence[Callable],
    theta0: PyTree,
    task_vectors: Sequence[PyTree],
    alphas=None,
    *,
    batches: Optional[Sequence[Any]] = None,
    fixed_task_vectors: Sequence[PyTree] = (),
    fixed_coefs=None,
    chunk_size: int = 8,
) -> JointLossResult:
  """Joint loss `Σ_t L_t(θ0 + α1 τ1 + α2 τ2 + Σ_k λ_k τ_k)` on an (α1, α2) grid.

  Args:
    loss_fns: one loss function per task (summed), or a single one.
    theta0: pre-trained parameters.
    task_vectors: `(τ1, τ2)`.
    alphas: grid axis (1-D) for both coefficients or a pair of axes; default 21
      points in [−2, 2].
    batches: None (losses close over their data) or one entry per loss function.
    fixed_task_vectors, fixed_coefs: other task vectors at fixed λ_k (all-task merge).
    chunk_size: grid points evaluated at once under vmap.
  """
  fns = _as_fns(loss_fns)
  if not isinstance(task_vectors, (list, tuple)) or len(task_vectors) != 2:
    raise ValueError("task_vectors must be a pair (τ1, τ2)")
  _tree.check_task_vectors(theta0, task_vectors, "task_vectors")
  _tree.check_task_vectors(theta0, list(fixed_task_vectors), "fixed_task_vectors")
  a1, a2 = _grid_axes(alphas)
  lam = _fixed_coefs(fixed_coefs, len(fixed_task_vectors))
  base = _tree.combine(theta0, list(fixed_task_vectors), lam)
  g1, g2 = jnp.meshgrid(a1, a2, indexing="ij")
  coefs = jnp.stack([g1.reshape(-1), g2.reshape(-1)], axis=1)
  make = _make_combined
  per = _evaluate(fns, batches, make, (base, list(task_vectors)), coefs, chunk_size)
  per = per.reshape(len(fns), a1.shape[0], a2.shape[0])
  return JointLossResult(np.asarray(a1), np.asarray(a2), per.sum(0), per)


def loss_along_line(
    loss_fn: Callable | Sequence[Callable],
    params_a: PyTree,
    params_b: PyTree,
    alphas,
    *,
    batches: Optional[Sequence[Any]] = None,
    chunk_size: int = 8,
) -> np.ndarray:
  """Loss (summed over loss functions) at `(1 − α) params_a + α params_b` for each α."""
  fns = _as_fns(loss_fn)
  _tree.check_same_structure(params_a, params_b, "params_a", "params_b")
  al = _tree.check_alphas(alphas, "alphas")
  make = _make_interpolated
  return _evaluate(fns, batches, make, (params_a, params_b), al, chunk_size).sum(0)


def loss_barrier(
    loss_fn: Callable | Sequence[Callable],
    params_a: PyTree,
    params_b: PyTree,
    num_points: int = 11,
    *,
    alphas=None,
    batches: Optional[Sequence[Any]] = None,
    chunk_size: int = 8,
) -> LossBarrier:
  """Loss barrier on the straight line `θ(α) = (1 − α) params_a + α params_b`.

  Args:
    loss_fn: a loss function or a sequence of them (summed: the joint loss).
    params_a, params_b: the two endpoints (α = 0 and α = 1).
    num_points: points evenly spaced in [0, 1] (ignored when `alphas` is given).
    alphas: explicit path coefficients (the endpoints are always evaluated too).
    batches, chunk_size: see the module docstring.

  Returns:
    A `LossBarrier`; `barrier = max_α L(θ(α)) − [(1 − α) L(θ_a) + α L(θ_b)]`.

  References:
    Frankle et al., "Linear Mode Connectivity and the Lottery Ticket Hypothesis", 2020.
  """
  if alphas is None:
    if not isinstance(num_points, int) or num_points < 2:
      raise ValueError(f"num_points must be an int >= 2, got {num_points!r}")
    alphas = np.linspace(0.0, 1.0, num_points, dtype=np.float32)
  al = np.asarray(_tree.check_alphas(alphas, "alphas"))
  full = np.concatenate([al, np.array([0.0, 1.0], np.float32)])
  losses = loss_along_line(loss_fn, params_a, params_b, full, batches=batches,
                           chunk_size=chunk_size)
  la, lb = float(losses[-2]), float(losses[-1])
  losses = losses[:-2]
  al64 = al.astype(np.float64)
  linear = (1.0 - al64) * la + al64 * lb
  excess = losses - linear
  i = int(np.argmax(excess))
  return LossBarrier(al, losses, linear, excess, float(excess[i]), float(al[i]), (la, lb))


def merged_to_task_barriers(
    loss_fn: Callable | Sequence[Callable],
    merged_params: PyTree,
    task_params: Sequence[PyTree],
    num_points: int = 11,
    **kwargs,
) -> list:
  """`loss_barrier(loss_fn, merged_params, θ_t)` for every task model θ_t (α = 0: merged)."""
  return [loss_barrier(loss_fn, merged_params, p, num_points, **kwargs) for p in task_params]


def jtl_linearity(
    loss_fn: Callable | Sequence[Callable],
    params_1: PyTree,
    params_2: PyTree,
    alphas=None,
    *,
    batches: Optional[Sequence[Any]] = None,
    chunk_size: int = 8,
) -> LossBarrier:
  """Joint-task-loss linearity: `L(α θ1 + (1−α) θ2) − [α L(θ1) + (1−α) L(θ2)]` over α.

  Returned as a `LossBarrier` whose `alphas` are the weights of `params_1` and whose
  `excess` is the deviation above (default α: 11 points in [0, 1]). For a quadratic loss
  with Hessian H the deviation is `−½ α(1−α) dᵀHd`, d = θ1 − θ2, so its size is bounded
  by `½ α(1−α) λ_max ‖d‖²` (the sharpness bound of SPEC §7).
  """
  if alphas is None:
    alphas = np.linspace(0.0, 1.0, 11, dtype=np.float32)
  return loss_barrier(loss_fn, params_2, params_1, alphas=alphas, batches=batches,
                      chunk_size=chunk_size)
