"""Fisher merging: per-parameter averaging weighted by each model's diagonal Fisher.

    θ* = Σ_t c_t F̃_t ⊙ θ_t / Σ_t c_t F̃_t,    F̃_t = max(F_t, floor),

with ``F_t`` the diagonal Fisher of model ``t`` on its own task's data and ``c_t`` the
model coefficients (uniform by default), each divided by ``‖F_t‖₂`` (the global L2 norm
over all mergeable leaves) when ``normalize`` is set.

:func:`fisher_diagonal` estimates ``F`` from per-example gradients (``jax.vmap`` of
``jax.grad``) of any ``apply(params, x) -> logits`` model, plain or linearized:

* ``labels=None`` (default, the reference's ``expectation_wrt_logits``): the exact Fisher
  of the model's predictive distribution, ``F = (1/n) Σ_x Σ_y p(y|x) (∇ log p(y|x))²``
  — no labels needed; one gradient per example and class (classes are scanned, so memory
  is one per-example gradient batch);
* ``labels`` given: the empirical Fisher ``(1/n) Σ_x (∇ log p(y_x|x))²`` at the labels.

Reference implementation followed: the authors' ``mmatena/model_merging``
(``model_merging/fisher.py``: ``_compute_exact_fisher_for_batch``;
``model_merging/merging.py``: ``_merge_with_coeffs``, ``_l2_norm_of_fisher``,
``fisher_floor = 1e-6``, ``normalize_fishers = True``). Deliberate differences: the floor
is applied to every model's Fisher (the reference's ``favor_target_model=False``; its
default floors only the first, "target", model, which has no meaning in a symmetric
multi-task merge); ``max(F, floor)`` rather than FusionBench's ``F + 1e-6`` (equal up to
``1e-6``); the L2 norm is over the float mergeable leaves only.

References:
  Matena, M., Raffel, C. "Merging Models with Fisher-Weighted Averaging." NeurIPS 2022.
  arXiv:2111.09832.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from ._task_vectors import (ExcludeFn, PyTree, check_like, check_task_vectors, flatten,
                            is_mergeable, leaf_dtype, map_mergeable)

FISHER_FLOOR = 1e-6


def _f32_zeros(params):
  return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)


def _per_example_sq_grads(apply, params, x, classes, weights, model_args):
  """``Σ_b weights[b] · (∇ log p(classes[b] | x_b))²`` over a batch, float32."""
  def one(xi, ci, wi):
    def logp(p):
      logits = apply(p, jax.tree.map(lambda a: a[None], xi), *model_args)[0]
      return jax.nn.log_softmax(logits.astype(jnp.float32))[ci]
    g = jax.grad(logp)(params)
    return jax.tree.map(lambda a: wi * jnp.square(a.astype(jnp.float32)), g)
  grads = jax.vmap(one)(x, classes, weights)
  return jax.tree.map(lambda a: jnp.sum(a, axis=0), grads)


def fisher_batch(apply: Callable, params: PyTree, x, labels=None, weights=None,
                 model_args: tuple = ()) -> PyTree:
  """``Σ_b w_b F(x_b)``: the weighted sum over the examples of ``x`` of their diagonal
  Fisher (see the module docstring); ``weights`` default to 1 (0 drops a padding row).

  Jit-able; ``x`` is an array (or pytree of arrays) with the examples on the leading axis,
  ``apply(params, x, *model_args) -> logits``.
  """
  n = jax.tree_util.tree_leaves(x)[0].shape[0]
  weights = jnp.ones((n,), jnp.float32) if weights is None else weights.astype(jnp.float32)
  if labels is not None:
    return _per_example_sq_grads(apply, params, x, jnp.asarray(labels, jnp.int32), weights,
                                 model_args)
  logits = apply(params, x, *model_args).astype(jnp.float32)
  probs = jax.lax.stop_gradient(jax.nn.softmax(logits, -1)) * weights[:, None]

  def body(acc, c):
    f = _per_example_sq_grads(apply, params, x, jnp.full((n,), c, jnp.int32), probs[:, c],
                              model_args)
    return jax.tree.map(jnp.add, acc, f), None
  acc, _ = jax.lax.scan(body, _f32_zeros(params), jnp.arange(probs.shape[-1]))
  return acc


# One executable per (apply, shapes): ``apply`` is a static argument (hashed by identity).
_fisher_batch_jit = jax.jit(fisher_batch, static_argnums=(0,))


def _pad_rows(tree, size: int):
  """Pads the leading axis to ``size`` by repeating the last row."""
  def pad(a):
    a = jnp.asarray(a)
    extra = size - a.shape[0]
    return a if extra == 0 else jnp.concatenate([a, jnp.repeat(a[-1:], extra, axis=0)])
  return jax.tree.map(pad, tree)


def fisher_diagonal(apply: Callable, params: PyTree, inputs, labels=None, *,
                    batch_size: int = 32, model_args: tuple = ()) -> PyTree:
  """Diagonal Fisher of ``apply`` at ``params``, averaged over the examples of ``inputs``.

  Args:
    apply: ``apply(params, x, *model_args) -> logits [B, C]``, any pure JAX model (e.g.
      features plus a frozen head, or a linearized model ``lambda p, x: f_lin(p, x)``).
    params: the model's parameters (a fine-tuned ``θ_t``).
    inputs: an array (or pytree of arrays) with ``n`` examples on the leading axis, no
      padding.
    labels: ``None`` for the exact Fisher (expectation over the model's predictions, the
      reference), or ``[n]`` integer labels for the empirical Fisher.
    batch_size: examples per compiled call (the last batch is padded with zero-weight
      rows, so every call has the same shapes).
    model_args: extra arguments of ``apply`` (e.g. a task's head), passed to the compiled
      function as arguments rather than captured constants, so one executable serves
      every task.

  Returns:
    A float32 pytree like ``params``.
  """
  n = jax.tree_util.tree_leaves(inputs)[0].shape[0]
  if n == 0:
    raise ValueError("fisher_diagonal: no examples")
  if labels is not None and len(labels) != n:
    raise ValueError(f"fisher_diagonal: {len(labels)} labels for {n} examples")
  b = min(batch_size, n)
  total = _f32_zeros(params)
  for s in range(0, n, b):
    m = min(b, n - s)
    x = _pad_rows(jax.tree.map(lambda a: a[s:s + m], inputs), b)
    y = None if labels is None else _pad_rows(jnp.asarray(labels[s:s + m]), b)
    w = (jnp.arange(b) < m).astype(jnp.float32)
    total = jax.tree.map(jnp.add, total,
                         _fisher_batch_jit(apply, params, x, y, w, tuple(model_args)))
  return jax.tree.map(lambda a: a / n, total)


def fisher_norm(fisher: PyTree, exclude: ExcludeFn = None) -> jax.Array:
  """Global L2 norm of a Fisher over its mergeable leaves (the reference's
  ``_l2_norm_of_fisher``)."""
  sq = [jnp.sum(jnp.square(f.astype(jnp.float32))) for p, f in flatten(fisher)[0]
        if is_mergeable(p, f, exclude)]
  return jnp.sqrt(sum(sq[1:], sq[0]) if sq else jnp.float32(0.0))


def fisher_merge(models: Sequence[PyTree], fishers: Sequence[PyTree], *,
                 coefficients: Optional[Sequence[float]] = None, normalize: bool = True,
                 floor: float = FISHER_FLOOR, exclude: ExcludeFn = None) -> PyTree:
  """Fisher-weighted average of ``models`` (see the module docstring).

  Args:
    models: fine-tuned models ``θ_t`` (same structure, shapes, dtypes).
    fishers: one diagonal Fisher per model (e.g. from :func:`fisher_diagonal`), same
      structure and shapes as the models (any float dtype).
    coefficients: model weights ``c_t`` (default ``1/T`` each).
    normalize: divide each ``c_t`` by the global L2 norm of ``F_t`` (the reference's
      default), so that models whose Fisher is larger overall do not dominate.
    floor: lower bound on every Fisher entry (a parameter that no model's data moves is
      averaged with the coefficients instead of divided by zero).
    exclude: predicate on leaf paths; excluded and non-float leaves come from ``models[0]``.

  Returns:
    The merged model, each leaf in its own dtype.

  Raises:
    ValueError: mismatched pytrees or shapes, a wrong number of Fishers or coefficients,
      or a negative floor.
  """
  check_task_vectors(list(models), what="model")
  if len(fishers) != len(models):
    raise ValueError(f"need one Fisher per model: {len(fishers)} for {len(models)} models")
  for t, f in enumerate(fishers):
    f32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), f)
    check_like(jax.tree.map(lambda a: jnp.zeros(jnp.shape(a), jnp.float32), models[0]),
               [f32], what=f"Fisher of model {t} (as float32)", ref_name="model 0")
  if floor < 0:
    raise ValueError(f"floor must be >= 0, got {floor}")
  t_count = len(models)
  coeffs = jnp.full((t_count,), 1.0 / t_count, jnp.float32) if coefficients is None \
      else jnp.asarray(coefficients, jnp.float32)
  if coeffs.shape != (t_count,):
    raise ValueError(f"need one coefficient per model ({t_count}), got {coeffs.shape}")
  if normalize:
    coeffs = coeffs / jnp.stack([jnp.maximum(fisher_norm(f, exclude), 1e-30)
                                 for f in fishers])
  fisher_leaves = [[x for _, x in flatten(f)[0]] for f in fishers]
  index = {p: j for j, (p, _) in enumerate(flatten(models[0])[0])}

  def leaf(path, x0, xs):
    j = index[path]
    ws = [c * jnp.maximum(fl[j].astype(jnp.float32), floor)
          for c, fl in zip(coeffs, fisher_leaves)]
    num = sum(w * x.astype(jnp.float32) for w, x in zip(ws, xs))
    return (num / sum(ws)).astype(leaf_dtype(x0))
  return map_mergeable(leaf, models[0], list(models), exclude)
