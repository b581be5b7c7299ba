"""Exact first-order linearization of a model around θ0 (fine-tuning in tangent space).

    f_lin(x; θ0 + dθ) = f(x; θ0) + J_θ f(x; θ0) · dθ

computed with one `jax.jvp` (primal θ0, tangent dθ): no Jacobian is materialized and the
cost is about that of one forward pass plus its forward-mode derivative. Train `dθ`
(the task vector) directly; keep θ0 an argument of the compiled step (use
`linearized_apply` inside your own `jax.jit`, with params0 among the jitted arguments),
never a captured constant.

Merges of linearized models are linear in the task vectors:
`f_lin(x; θ0 + Σ λ_t τ_t) = f(x; θ0) + Σ λ_t J τ_t`, so `linear_merge_outputs` computes
`f(x; θ0)` and every `J τ_t` once and `combine_linear_outputs` evaluates any number of
coefficient vectors for free.

References:
  Ortiz-Jiménez, Favero and Frossard, "Task Arithmetic in the Tangent Space: Improved
  Editing of Pre-Trained Models", NeurIPS 2023 (arXiv:2305.12827).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, List, Sequence, Tuple

import jax
import jax.numpy as jnp

PyTree = Any


def _check_tangent(params0: PyTree, dparams: PyTree, name: str = "dparams") -> None:
  s0, s1 = jax.tree.structure(params0), jax.tree.structure(dparams)
  if s0 != s1:
    raise ValueError(f"{name} must have the structure of params0: {s1} != {s0}")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params0), jax.tree.leaves(dparams)):
    where = jax.tree_util.keystr(path)
    if jnp.shape(a) != jnp.shape(b):
      raise ValueError(f"{name}{where}: shape {jnp.shape(b)} != params0 shape {jnp.shape(a)}")
    if jnp.result_type(a) != jnp.result_type(b):
      raise TypeError(f"{name}{where}: dtype {jnp.result_type(b)} != params0 dtype "
                      f"{jnp.result_type(a)} (cast the tangent explicitly)")


def linearized_apply(apply_fn: Callable, params0: PyTree, dparams: PyTree, *inputs) -> PyTree:
  """`f(x; θ0) + J f(x; θ0) · dθ` with one `jax.jvp`; pure, jit it with params0 as an arg.

  Args:
    apply_fn: `apply_fn(params, *inputs) -> outputs` (any pytree of float arrays).
    params0: the linearization point θ0.
    dparams: the offset dθ = θ − θ0 (same structure, shapes and dtypes as params0).
    *inputs: the model inputs.
  """
  _check_tangent(params0, dparams)
  out, tangent = jax.jvp(lambda p: apply_fn(p, *inputs), (params0,), (dparams,))
  return jax.tree.map(jnp.add, out, tangent)


class LinearizedModel:
  """`apply_lin(dparams, *inputs)` bound to θ0; θ0 is passed to the compiled function as
  an argument (not baked in as a constant), so a new θ0 of the same shapes reuses the
  compiled code. Inside your own jitted step, call `self.apply(params0, dparams, *inputs)`
  (= `linearized_apply`) with params0 among the step's arguments instead."""

  def __init__(self, apply_fn: Callable, params0: PyTree):
    self.apply_fn = apply_fn
    self.params0 = params0
    self.jitted = jax.jit(functools.partial(linearized_apply, apply_fn))

  def __call__(self, dparams: PyTree, *inputs) -> PyTree:
    return self.jitted(self.params0, dparams, *inputs)

  def apply(self, params0: PyTree, dparams: PyTree, *inputs) -> PyTree:
    return linearized_apply(self.apply_fn, params0, dparams, *inputs)


def linearize(apply_fn: Callable, params0: PyTree) -> LinearizedModel:
  """The linearized model `apply_lin(dparams, *inputs) = f(θ0) + J f(θ0)·dparams`."""
  return LinearizedModel(apply_fn, params0)


def linear_merge_outputs(apply_fn: Callable, params0: PyTree, task_vectors: Sequence[PyTree],
                         *inputs) -> Tuple[PyTree, List[PyTree]]:
  """`(f(x; θ0), [J τ_t for each task vector])`: one forward and one linear pass per task.

  Uses `jax.linearize`, so the forward pass at θ0 is done once and each `J τ_t` is a
  jvp through the stored linearization.
  """
  if len(task_vectors) == 0:
    raise ValueError("linear_merge_outputs: task_vectors is empty")
  for t, tv in enumerate(task_vectors):
    _check_tangent(params0, tv, name=f"task_vectors[{t}]")
  f0, f_jvp = jax.linearize(lambda p: apply_fn(p, *inputs), params0)
  return f0, [f_jvp(tv) for tv in task_vectors]


def combine_linear_outputs(f0: PyTree, jtaus: Sequence[PyTree], coeffs: jax.Array) -> PyTree:
  """Outputs of the merged linearized models `f0 + Σ_t coeffs[l, t] J τ_t` for every row l.

  Args:
    f0: `f(x; θ0)` from `linear_merge_outputs`.
    jtaus: `[J τ_t]` from `linear_merge_outputs`.
    coeffs: `[num_lams, T]` merge coefficients (or `[T]` for a single merge).

  Returns:
    The output pytree with a leading `num_lams` axis (none for `[T]` coeffs).
  """
  coeffs = jnp.asarray(coeffs)
  single = coeffs.ndim == 1
  coeffs = coeffs[None] if single else coeffs
  if coeffs.ndim != 2 or coeffs.shape[1] != len(jtaus):
    raise ValueError(f"coeffs must be [num_lams, {len(jtaus)}], got {coeffs.shape}")

  def comb(f, *js):
    stacked = jnp.stack(js)  # [T, ...]
    c = coeffs.astype(stacked.dtype)
    out = f[None] + jnp.tensordot(c, stacked, axes=(1, 0))
    return out[0] if single else out

  return jax.tree.map(comb, f0, *jtaus)


def linear_merge_apply(apply_fn: Callable, params0: PyTree, task_vectors: Sequence[PyTree],
                       coeffs: jax.Array, *inputs) -> PyTree:
  """`combine_linear_outputs(*linear_merge_outputs(...), coeffs)` in one call."""
  f0, jt = linear_merge_outputs(apply_fn, params0, task_vectors, *inputs)
  return combine_linear_outputs(f0, jt, coeffs)
