"""RegMean: merge linear layers by the closed form of a regression on their inputs.

For a linear layer ``y = x W`` (``W [d_in, d_out]``) fine-tuned on ``T`` tasks, RegMean
minimizes ``Σ_t ‖X_t W − X_t W_t‖²`` over ``W``, whose solution is

    W* = (Σ_t G_t)⁻¹ Σ_t G_t W_t,        G_t = X_tᵀ X_t / n_t   (the Gram of the inputs),

and merges every other leaf (biases, norms, embeddings, leaves that are not consumed as a
linear-layer kernel) by the plain average. The paper regularizes the Grams by scaling their
off-diagonal entries by ``α`` (``G ← α G + (1 − α) diag(G)``); ``α = 1`` is the exact
least-squares solution, ``α = 0`` the plain average.

How the layer inputs are found (the design of :func:`gram_matrices`): the model is any
pure function ``apply(params, x)``. Its jaxpr is traced once and interpreted; every
``dot_general`` that contracts a 2-D parameter leaf over exactly one of its axes (directly,
after a dtype cast or a transpose, or concatenated with other kernels along the output
axis like a fused q/k/v kernel; possibly inside ``jit``/``custom_jvp``/``custom_vjp``/
``remat`` calls) is a linear layer, and its *other* operand, with the contracted axis last
and every other axis flattened into rows, is the layer's input ``X``. Alternatives that
were rejected: Flax's ``intercept_methods``/``capture_intermediates`` need ``nn.Module``
models (the encoders here are plain functions of nested dicts); per-example gradients with
respect to an additive zero probe on a kernel give ``Σ x δᵀ`` with ``δ`` the cotangent
coming back from the rest of the network, not ``Σ x xᵀ``, unless the model is rewritten
to expose each layer's output. This is the JAX analogue of the
reference's forward hooks on ``nn.Linear``, needs no Flax module (the encoders of this
package are plain functions of nested dicts) and no change to the model. It works for the
linearized (FTTS) model too: call it on ``lambda d, x: linearized_apply(f, θ0, d, x)`` with
the task vector as ``params``; the tangent kernel ``dW`` meets the layer input at θ0
(``x(θ0) · dW``), which is the input of that layer in the linearized model. A leaf used
both as a kernel and in any other way (e.g. a tied embedding), used in dot products with
different contracted axes, or consumed inside ``scan``/``while``/``cond`` is not treated
as a linear layer (it is averaged); so are kernels reached through a ``reshape`` (e.g. a
convolution written as a patch matmul with a 4-D kernel). Use ``linear`` to restrict the
set further.

Reference implementations followed: the authors' ``bloomberg/dataless-model-merging``
(``src/model_merge/avg_merger.py``: ``regmean_mean_params``, ``reduce_non_diag``) and
FusionBench (``fusion_bench/method/regmean/regmean.py``). Conventions kept: the Gram is
the mean of ``xᵀx`` over every input row, tokens included (FusionBench's running mean; the
closed form is invariant to a common scale, and the mean gives every task the same weight
whatever its number of examples); the
off-diagonal scaling multiplies non-diagonal entries by ``α``; non-linear leaves are
averaged; the solve is ``(Σ G)⁻¹ Σ G W``. Deliberate differences: the default
``α = 0.6`` is FusionBench's CLIP-ViT setting (the authors' code defaults to no reduction,
``α = 1``); the solve uses ``jnp.linalg.solve`` in float32 instead of an explicit inverse;
linear layers are found from the jaxpr rather than by module type, and a kernel may be
stored ``[d_in, d_out]`` (``x @ W``) or ``[d_out, d_in]`` (``x @ Wᵀ``) — the axis that is
contracted decides.

References:
  Jin, X., Ren, X., Preotiuc-Pietro, D., Cheng, P. "Dataless Knowledge Fusion by Merging
  Weights of Language Models." ICLR 2023. arXiv:2212.09849.
  Tang, A. et al. "FusionBench: A Comprehensive Benchmark of Deep Model Fusion."
  arXiv:2406.03280.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from ._task_vectors import (ExcludeFn, PyTree, check_task_vectors, flatten, is_mergeable,
                            leaf_dtype)

DEFAULT_ALPHA = 0.6
LinearFn = Optional[Callable[[str, jax.Array], bool]]

# Primitives whose output is the input (for tracking which values are parameter leaves).
_IDENTITY = ("convert_element_type", "copy", "reduce_precision", "sharding_constraint")
# Call-like primitives whose sub-jaxpr inputs are the equation's inputs, one to one.
_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr",
          "core_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
          "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
          "checkpoint": "jaxpr", "remat": "jaxpr"}


class _Recorder:
  """Accumulates ``Σ xᵀx`` per parameter leaf and notes leaves used in other ways.

  A tracked value's origin is ``(leaf indices, concat axis, transposed)``: one parameter
  leaf (axis ``None``), possibly transposed, or leaves concatenated along an axis (a fused
  q/k/v kernel), which all get the Gram of the input they multiply if that axis is not the
  contracted one.
  """

  def __init__(self):
    self.grams: Dict[int, jax.Array] = {}
    self.rows: Dict[int, int] = {}
    self.axis: Dict[int, int] = {}
    self.bad = set()

  def dot(self, params, vals, origins):
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    for side, (own_c, own_b, oth_c) in enumerate(((lc, lb, rc), (rc, rb, lc))):
      if origins[side] is None:
        continue
      leaves, cat, flipped = origins[side]
      w, x = vals[side], vals[1 - side]
      axis = int(own_c[0]) if len(own_c) == 1 else -1
      bad = w.ndim != 2 or axis < 0 or own_b or origins[1 - side] is not None or axis == cat
      axis = 1 - axis if flipped else axis  # the axis of the stored leaf
      if (bad or any(self.axis.setdefault(i, axis) != axis for i in leaves)):
        self.bad.update(leaves)
        continue
      xa = int(oth_c[0])
      rows = jnp.moveaxis(x, xa, -1).reshape(-1, x.shape[xa]).astype(jnp.float32)
      g = rows.T @ rows
      for i in leaves:
        self.grams[i] = g if i not in self.grams else self.grams[i] + g
        self.rows[i] = self.rows.get(i, 0) + rows.shape[0]

  def other_use(self, origins):
    for o in origins:
      if o is not None:
        self.bad.update(o[0])


def _concat_origin(eqn, ins, rec: _Recorder):
  """Origin of a concatenation of single kernels (else mark them as other uses)."""
  dim = eqn.params.get("dimension")
  if all(o is not None and o[1] is None and not o[2] for o in ins) and len(ins) > 1:
    return (tuple(i for o in ins for i in o[0]), int(dim), False)
  rec.other_use(ins)
  return None


def _sub_jaxpr(eqn):
  key = _CALLS.get(eqn.primitive.name)
  sub = eqn.params.get(key) if key else None
  if isinstance(sub, jcore.ClosedJaxpr):
    return sub.jaxpr, sub.consts
  if isinstance(sub, jcore.Jaxpr):
    return sub, ()
  return None


def _bind(eqn, vals):
  """``eqn.primitive.bind`` as ``jax.core.eval_jaxpr`` does it (old and new JAX APIs)."""
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  subfuns = ()
  if isinstance(bind_params, tuple):  # JAX < 0.7: (subfuns, params)
    subfuns, bind_params = bind_params
  with eqn.ctx.manager:
    return eqn.primitive.bind(*subfuns, *vals, **bind_params)


def _interpret(jaxpr, consts, args, origins, rec: _Recorder):
  """Evaluates ``jaxpr`` like ``jax.core.eval_jaxpr`` while recording kernel inputs."""
  env, org = {}, {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  def origin(v):
    return None if isinstance(v, jcore.Literal) else org.get(v)

  for v, c in zip(jaxpr.constvars, consts):
    env[v] = c
  for v, a, o in zip(jaxpr.invars, args, origins):
    env[v] = a
    if o is not None:
      org[v] = o
  for eqn in jaxpr.eqns:
    vals = [read(v) for v in eqn.invars]
    ins = [origin(v) for v in eqn.invars]
    name = eqn.primitive.name
    sub = _sub_jaxpr(eqn) if any(o is not None for o in ins) else None
    if sub is not None and len(sub[0].invars) == len(vals):
      outs, out_org = _interpret(sub[0], sub[1], vals, ins, rec)
    else:
      out_org = None
      if name == "dot_general":
        rec.dot(eqn.params, vals, ins)
      elif name == "concatenate" and any(o is not None for o in ins):
        out_org = _concat_origin(eqn, ins, rec)
      elif name in _IDENTITY and len(ins) == 1:
        out_org = ins[0]
      elif (name == "transpose" and ins[0] is not None and ins[0][1] is None
            and tuple(eqn.params["permutation"]) == (1, 0)):
        out_org = (ins[0][0], None, not ins[0][2])
      else:
        rec.other_use(ins)
      outs = _bind(eqn, vals)
      outs = list(outs) if eqn.primitive.multiple_results else [outs]
      out_org = [out_org] * len(outs)
    for v, val, o in zip(eqn.outvars, outs, out_org):
      if isinstance(v, jcore.DropVar):
        continue
      env[v] = val
      if o is not None:
        org[v] = o
  return [read(v) for v in jaxpr.outvars], [origin(v) for v in jaxpr.outvars]


def layer_input_grams(apply: Callable, params: PyTree, x, linear: LinearFn = None,
                      model_args: tuple = ()
                      ) -> Tuple[Dict[str, jax.Array], Dict[str, int], Dict[str, int]]:
  """``Σ xᵀx`` of the inputs of every linear layer on one batch ``x``; jit-able.

  Returns ``({path: [d, d] float32 Σ xᵀx}, {path: contracted kernel axis},
  {path: number of input rows})`` for the 2-D float leaves selected by
  ``linear(path, leaf)`` (default: all) that the model ``apply(params, x, *model_args)``
  uses only as a linear-layer kernel (see the module docstring).
  """
  leaves, _ = jax.tree_util.tree_flatten(params)
  paths = [p for p, _ in flatten(params)[0]]
  watched = [i for i, (p, w) in enumerate(zip(paths, leaves))
             if jnp.ndim(w) == 2 and jnp.issubdtype(leaf_dtype(w), jnp.floating)
             and (linear is None or linear(p, w))]
  args = (params, x, tuple(model_args))
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)),
                          args)
  closed = jax.make_jaxpr(lambda p, x, m: apply(p, x, *m))(*abstract)
  rest = jax.tree_util.tree_leaves((x, tuple(model_args)))
  origins = [((i,), None, False) if i in watched else None for i in range(len(leaves))]
  rec = _Recorder()
  _interpret(closed.jaxpr, closed.consts, list(leaves) + list(rest),
             origins + [None] * len(rest), rec)
  keep = [i for i in rec.grams if i not in rec.bad]
  return ({paths[i]: rec.grams[i] for i in keep}, {paths[i]: rec.axis[i] for i in keep},
          {paths[i]: rec.rows[i] for i in keep})


def _num_examples(x) -> int:
  leaves = jax.tree_util.tree_leaves(x)
  if not leaves:
    raise ValueError("gram_matrices: empty inputs")
  return int(jnp.shape(leaves[0])[0])


def _grams_and_rows(apply, linear, params, x, model_args):
  grams, _, rows = layer_input_grams(apply, params, x, linear, model_args)
  return grams, {k: jnp.asarray(r, jnp.float32) for k, r in rows.items()}


# One executable per (apply, linear, shapes): both are static (hashed by identity).
_grams_jit = jax.jit(_grams_and_rows, static_argnums=(0, 1))


def gram_matrices(apply: Callable, params: PyTree, inputs, *, batch_size: int = 64,
                  linear: LinearFn = None, model_args: tuple = ()) -> Dict[str, jax.Array]:
  """Per linear layer, the mean ``G = Σ_rows xᵀx / #rows`` over the rows of its inputs.

  A row is one input vector of the layer: one per example for an MLP, one per token for a
  transformer (FusionBench's running mean over ``batch × sequence`` rows).

  Args:
    apply: ``apply(params, x, *model_args)``, any pure JAX function of the parameters
      (plain or linearized model; see the module docstring for how linear layers are
      found).
    params: the model (a fine-tuned ``θ_t``; for a linearized model, the task vector).
    inputs: an array (or pytree of arrays) with ``n`` examples on the leading axis; no
      padding rows (they would enter the Grams).
    batch_size: examples per compiled forward pass (the last chunk may be smaller).
    linear: optional predicate ``linear(path, leaf)`` restricting the kernels considered.
    model_args: extra arguments of ``apply`` (e.g. a task's head), passed as arguments of
      the compiled function, so one executable serves every task.

  Returns:
    ``{leaf path: [d, d] float32}``, ``d`` the size of the kernel's contracted axis
    (:func:`gram_axes` tells which axis that is).
  """
  n = _num_examples(inputs)
  total = None
  for s in range(0, n, batch_size):
    g = _grams_jit(apply, linear, params, jax.tree.map(lambda a: a[s:s + batch_size], inputs),
                   tuple(model_args))
    total = g if total is None else jax.tree.map(jnp.add, total, g)
  grams, rows = total
  return {k: v / rows[k] for k, v in grams.items()}


def gram_axes(apply: Callable, params: PyTree, inputs, *, linear: LinearFn = None,
              model_args: tuple = ()) -> Dict[str, int]:
  """``{leaf path: contracted kernel axis}`` of the linear layers :func:`gram_matrices`
  finds (0 for ``x @ W``, 1 for ``x @ Wᵀ``); traced abstractly on one example."""
  axes = {}

  def grams(p, x, m):
    g, ax, _ = layer_input_grams(apply, p, x, linear, m)
    axes.update(ax)
    return g
  jax.eval_shape(grams, params, jax.tree.map(lambda a: a[:1], inputs), tuple(model_args))
  return axes


def reduce_non_diagonal(gram: jax.Array, alpha: float) -> jax.Array:
  """``α G + (1 − α) diag(G)``: off-diagonal entries scaled by ``α`` (the reference's
  ``reduce_non_diag``)."""
  gram = jnp.asarray(gram, jnp.float32)
  eye = jnp.eye(gram.shape[0], dtype=bool)
  return jnp.where(eye, gram, alpha * gram)


def regmean_leaf(ws: Sequence[jax.Array], grams: Sequence[jax.Array], alpha: float,
                 axis: int = 0) -> jax.Array:
  """``(Σ_t G̃_t)⁻¹ Σ_t G̃_t W_t`` for one kernel (``G̃`` = :func:`reduce_non_diagonal`);
  ``axis`` is the kernel axis the Grams act on (0 for ``x @ W``, 1 for ``x @ Wᵀ``)."""
  gs = [reduce_non_diagonal(g, alpha) for g in grams]
  lhs = sum(gs[1:], gs[0])
  rhs = sum(g @ jnp.moveaxis(w.astype(jnp.float32), axis, 0) for g, w in zip(gs, ws))
  out = jnp.linalg.solve(lhs, rhs)
  return jnp.moveaxis(out, 0, axis).astype(leaf_dtype(ws[0]))


def regmean(models: Sequence[PyTree], grams: Sequence[Dict[str, jax.Array]], *,
            alpha: float = DEFAULT_ALPHA, axes: Optional[Dict[str, int]] = None,
            exclude: ExcludeFn = None) -> PyTree:
  """RegMean merge of ``models`` given each model's layer-input Grams.

  Args:
    models: fine-tuned models ``θ_t`` (or task vectors: the merge commutes with adding
      ``θ0``, since ``(Σ G)⁻¹ Σ G θ0 = θ0`` and the average of ``θ0`` is ``θ0``).
    grams: per model, ``{leaf path: Gram}`` from :func:`gram_matrices` on that model's
      task data; every model must have Grams for the same leaves.
    alpha: off-diagonal scaling in ``[0, 1]`` (1: exact least squares).
    axes: ``{leaf path: contracted kernel axis}`` (default 0, i.e. ``x @ W``); from
      :func:`gram_axes`.
    exclude: predicate on leaf paths: excluded and non-float leaves come from
      ``models[0]``.

  Returns:
    The merged model: RegMean on leaves with Grams, the average on other mergeable leaves.

  Raises:
    ValueError: mismatched pytrees, a Gram list of the wrong length or with different
      leaves per model, a Gram whose size does not match its kernel, or ``alpha`` outside
      ``[0, 1]``.
  """
  check_task_vectors(list(models), what="model")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  if len(grams) != len(models):
    raise ValueError(f"need one Gram dict per model: {len(grams)} for {len(models)} models")
  keys = set(grams[0])
  for t, g in enumerate(grams[1:], 1):
    if set(g) != keys:
      raise ValueError(f"Grams of model {t} cover different leaves than those of model 0: "
                       f"{sorted(keys ^ set(g))[:3]}")
  axes = axes or {}
  ref, treedef = flatten(models[0])
  flat = [flatten(m)[0] for m in models]
  unknown = keys - {p for p, _ in ref}
  if unknown:
    raise ValueError(f"Grams for leaves the models do not have: {sorted(unknown)[:3]}")
  out = []
  for j, (p, x0) in enumerate(ref):
    xs = [f[j][1] for f in flat]
    if not is_mergeable(p, x0, exclude):
      out.append(x0)
    elif p in keys:
      axis = axes.get(p, 0)
      d = jnp.shape(x0)[axis]
      for t, g in enumerate(grams):
        if jnp.shape(g[p]) != (d, d):
          raise ValueError(f"Gram of model {t} for {p!r} has shape {jnp.shape(g[p])}, the "
                           f"kernel {jnp.shape(x0)} needs ({d}, {d}) (axis {axis})")
      out.append(regmean_leaf(xs, [g[p] for g in grams], alpha, axis))
    else:
      mean = sum(x.astype(jnp.float32) for x in xs) / len(xs)
      out.append(mean.astype(leaf_dtype(x0)))
  return jax.tree_util.tree_unflatten(treedef, out)
