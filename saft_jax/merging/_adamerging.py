"""AdaMerging: merge coefficients learned by entropy minimization on unlabeled test inputs.

    θ(λ) = θ0 + Σ_t clip(λ_t, 0, 1) τ_t                 (task-wise: one λ per task)
    θ(λ)^l = θ0^l + Σ_t clip(λ_{l,t}, 0, 1) τ_t^l       (layer-wise: one λ per leaf and task)

``λ`` starts at ``0.3`` everywhere and is trained by an optax optimizer (default
``optax.adam(1e-3)``) on ``Σ_t mean_x H(softmax(apply_t(θ(λ), x)))``, the prediction
entropy of each task's own model head on a batch of that task's unlabeled inputs; the
clip is inside the forward pass (the raw ``λ`` is what the optimizer updates), and the
returned coefficients are the clipped ones. One step uses one batch per task, so the
merge is one gradient computation through all tasks' forward passes. Works for any
``apply(params, x)``, including a linearized (FTTS) model.

Reference implementation followed: the authors' ``EnnengYang/AdaMerging``
(``src/main_task_wise_adamerging.py``, ``src/main_layer_wise_adamerging.py``): prior
``0.3``, ``torch.clamp(λ, 0, 1)`` in the forward pass, the pre-trained model's coefficient
fixed at 1, Adam with ``lr = 1e-3``, ``betas = (0.9, 0.999)``, 500 steps, a "layer" being
one parameter tensor, the loss ``softmax_entropy(logits).mean(0)`` summed over tasks.
Deliberate differences: a step draws one batch of ``batch_size`` (default 32) examples per
task without replacement from that task's inputs (the reference sums the mean entropies of
two shuffled test batches of 16 — the same 32 examples up to a factor 2 in the loss, which
Adam does not see); non-float and excluded leaves keep ``θ0`` and have no coefficient
(the reference merges every tensor). ``jnp.clip``'s gradient is ``0.5`` on the boundary
(``torch.clamp``: ``1``).

References:
  Yang, E. et al. "AdaMerging: Adaptive Model Merging for Multi-Task Learning." ICLR 2024.
  arXiv:2310.02575.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._task_vectors import (ExcludeFn, PyTree, check_task_vectors, flatten, is_mergeable,
                            leaf_dtype)

GRANULARITIES = ("task", "layer")
PRIOR = 0.3
STEPS = 500
LEARNING_RATE = 1e-3


def softmax_entropy(logits: jax.Array) -> jax.Array:
  """Entropy of ``softmax(logits)`` along the last axis (float32)."""
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def num_layers(pretrained: PyTree, exclude: ExcludeFn = None) -> int:
  """Number of coefficient rows of layer-wise AdaMerging: the mergeable leaves."""
  return sum(is_mergeable(p, x, exclude) for p, x in flatten(pretrained)[0])


def init_coefficients(pretrained: PyTree, num_tasks: int, granularity: str = "layer",
                      prior: float = PRIOR, exclude: ExcludeFn = None) -> jax.Array:
  """Initial raw ``λ``: ``[T]`` (task-wise) or ``[L, T]`` (layer-wise), all ``prior``."""
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
  shape = (num_tasks,) if granularity == "task" else (num_layers(pretrained, exclude),
                                                      num_tasks)
  return jnp.full(shape, prior, jnp.float32)


def merge_with_coefficients(pretrained: PyTree, tvs: Sequence[PyTree], lambdas: jax.Array,
                            *, exclude: ExcludeFn = None) -> PyTree:
  """``θ0 + Σ_t λ_t τ_t`` with ``λ`` ``[T]`` or ``[L, T]`` (one row per mergeable leaf, in
  leaf order); no clipping here. Differentiable in ``lambdas``; float32 then cast."""
  lambdas = jnp.asarray(lambdas, jnp.float32)
  ref, treedef = flatten(pretrained)
  flat = [flatten(t)[0] for t in tvs]
  out, row = [], 0
  for j, (p, x0) in enumerate(ref):
    if not is_mergeable(p, x0, exclude):
      out.append(x0)
      continue
    lam = lambdas if lambdas.ndim == 1 else lambdas[row]
    row += 1
    acc = x0.astype(jnp.float32)
    for t, f in enumerate(flat):
      acc = acc + lam[t] * f[j][1].astype(jnp.float32)
    out.append(acc.astype(leaf_dtype(x0)))
  return jax.tree_util.tree_unflatten(treedef, out)


def entropy_loss(raw: jax.Array, applies: Sequence[Callable], pretrained: PyTree,
                 tvs: Sequence[PyTree], batches: Sequence, *,
                 clip: Tuple[float, float] = (0.0, 1.0), exclude: ExcludeFn = None,
                 model_args: Optional[Sequence[tuple]] = None) -> jax.Array:
  """``Σ_t mean_x H(apply_t(θ(clip(raw)), x, *model_args[t]))`` over one batch per task."""
  merged = merge_with_coefficients(pretrained, tvs, jnp.clip(raw, *clip), exclude=exclude)
  model_args = model_args or [()] * len(applies)
  losses = [jnp.mean(softmax_entropy(apply(merged, x, *args)))
            for apply, x, args in zip(applies, batches, model_args)]
  return sum(losses[1:], losses[0])


def _step(applies, tx, clip, exclude, raw, opt_state, pretrained, tvs, batches, model_args):
  loss, g = jax.value_and_grad(entropy_loss)(raw, applies, pretrained, tvs, batches,
                                             clip=clip, exclude=exclude, model_args=model_args)
  updates, opt_state = tx.update(g, opt_state, raw)
  return optax.apply_updates(raw, updates), opt_state, loss


# One executable per (applies, optimizer, clip, exclude, shapes): all static, by identity.
_step_jit = jax.jit(_step, static_argnums=(0, 1, 2, 3))
_DEFAULT_OPTIMIZER = optax.adam(LEARNING_RATE, b1=0.9, b2=0.999)


def _check(applies, pretrained, tvs, inputs, granularity, clip, model_args):
  check_task_vectors(list(tvs), pretrained)
  if len(applies) != len(tvs) or len(inputs) != len(tvs):
    raise ValueError(f"need one apply function and one input array per task vector: "
                     f"{len(applies)} apply, {len(inputs)} inputs, {len(tvs)} task vectors")
  if model_args is not None and len(model_args) != len(tvs):
    raise ValueError(f"need one model_args tuple per task: {len(model_args)} for "
                     f"{len(tvs)} task vectors")
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
  if not clip[0] <= clip[1]:
    raise ValueError(f"clip must be (low, high) with low <= high, got {clip}")
  for t, x in enumerate(inputs):
    if jax.tree_util.tree_leaves(x)[0].shape[0] == 0:
      raise ValueError(f"task {t}: no inputs")


def _sampler(inputs, batch_size: int, seed: int):
  """Yields one batch per task per step, each task's inputs reshuffled every epoch."""
  rng = np.random.default_rng(seed)
  sizes = [jax.tree_util.tree_leaves(x)[0].shape[0] for x in inputs]
  orders = [rng.permutation(n) for n in sizes]
  pos = [0] * len(inputs)
  while True:
    out = []
    for t, (x, n) in enumerate(zip(inputs, sizes)):
      b = min(batch_size, n)
      if pos[t] + b > n:
        orders[t], pos[t] = rng.permutation(n), 0
      idx = orders[t][pos[t]:pos[t] + b]
      pos[t] += b
      out.append(jax.tree.map(lambda a: a[idx], x))
    yield out


def adamerging(applies: Sequence[Callable], pretrained: PyTree, tvs: Sequence[PyTree],
               inputs: Sequence, *, granularity: str = "layer", prior: float = PRIOR,
               steps: int = STEPS, optimizer: Optional[optax.GradientTransformation] = None,
               batch_size: int = 32, clip: Tuple[float, float] = (0.0, 1.0), seed: int = 0,
               exclude: ExcludeFn = None, model_args: Optional[Sequence[tuple]] = None
               ) -> Tuple[PyTree, jax.Array, list]:
  """Learns AdaMerging coefficients and returns the merged model.

  Args:
    applies: per task, ``apply_t(params, x, *model_args[t]) -> logits`` (the shared model
      with task ``t``'s head), any pure JAX function, plain or linearized; pass the same
      function for every task and the heads in ``model_args`` to compile one program.
    pretrained: ``θ0``.
    tvs: task vectors ``τ_t``.
    inputs: per task, its unlabeled inputs (an array or pytree, examples on the leading
      axis); the papers use the test inputs.
    granularity: ``"layer"`` (one ``λ`` per mergeable leaf and task) or ``"task"``.
    prior: initial ``λ``.
    steps: optimizer steps.
    optimizer: any optax transformation (default ``optax.adam(1e-3)``).
    batch_size: examples per task per step.
    clip: ``λ`` is clipped to this range in the forward pass and in the result.
    seed: seed of the batch sampling.
    exclude: predicate on leaf paths; excluded and non-float leaves keep ``θ0``.
    model_args: per task, extra arguments of its ``apply`` (arguments of the compiled
      step, not captured constants).

  Returns:
    ``(merged, lambdas, losses)``: the merged model at the clipped coefficients, the
    clipped coefficients (``[T]`` or ``[L, T]``) and the loss of every step.
  """
  _check(applies, pretrained, tvs, inputs, granularity, clip, model_args)
  tx = optimizer if optimizer is not None else _DEFAULT_OPTIMIZER
  raw = init_coefficients(pretrained, len(tvs), granularity, prior, exclude)
  tvs, applies, clip = list(tvs), tuple(applies), tuple(float(c) for c in clip)
  model_args = [tuple(a) for a in model_args] if model_args is not None else [()] * len(tvs)
  opt_state = tx.init(raw)
  losses = []
  sampler = _sampler(inputs, batch_size, seed)
  with jax.numpy_dtype_promotion("standard"):
    for _ in range(steps):
      raw, opt_state, loss = _step_jit(applies, tx, clip, exclude, raw, opt_state, pretrained,
                                       tvs, next(sampler), model_args)
      losses.append(loss)
  lambdas = jnp.clip(raw, *clip)
  merged = merge_with_coefficients(pretrained, tvs, lambdas, exclude=exclude)
  return merged, lambdas, [float(l) for l in losses]
