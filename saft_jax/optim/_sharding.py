"""Per-shard (m-sharpness) gradient computation with ``jax.shard_map``.

Default data parallelism needs nothing from this module: under ``jax.jit``
with the batch sharded over a mesh, ``grad_fn`` closes over the global batch
and every transform computes ONE perturbation from the global-batch gradient.
For per-shard perturbations (one ε per shard, as in the original JAX SAM code;
"m-sharpness" with m = per-shard batch size), build the transform with
``axis_name=`` and run its ``update`` inside ``jax.shard_map`` — which is what
``per_shard_update`` does.

Writing the ``shard_map`` yourself: take the clean gradient with respect to
params marked *varying* over the axis
(``jax.lax.pcast(params, axis, to="varying")``). With respect to replicated
params JAX sums the gradient over the axis, which is not the shard-local
gradient. The transforms mark the perturbed params varying before calling
``grad_fn`` themselves.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import optax

from saft_jax.optim import _base


def per_shard_update(
    tx: optax.GradientTransformationExtraArgs,
    loss_fn: Callable[[Any, Any], jax.Array],
    mesh: Mesh,
    axis_name: str = "data",
    *,
    batch_spec: Any = None,
) -> Callable[[Any, Any, Any], tuple[jax.Array, Any, Any]]:
  """Builds ``step(params, opt_state, batch) -> (loss, updates, opt_state)``.

  Inside ``jax.shard_map`` over ``axis_name`` each shard computes its local
  clean gradient, its own perturbation and its local perturbed gradient; the
  transform (which MUST be built with the same ``axis_name``, e.g.
  ``sam(base, axis_name="data")``) ``pmean``-s the driving gradient before the
  base optimizer, so params, updates and optimizer state stay replicated.
  ``loss`` is the mean of the shard losses. Inputs are placed with
  ``jax.device_put`` (params/state replicated, batch per ``batch_spec``), so
  the step works on Auto and Explicit meshes. Apply the updates with
  ``optax.apply_updates`` and wrap the whole step in ``jax.jit``::

      tx = saft_jax.optim.asam(base, axis_name="data")
      shard_step = per_shard_update(tx, loss_fn, mesh, "data")

      @jax.jit
      def train_step(params, opt_state, batch):
        loss, updates, opt_state = shard_step(params, opt_state, batch)
        return optax.apply_updates(params, updates), opt_state, loss

  Args:
    tx: a transform of this package built with ``axis_name=axis_name``.
    loss_fn: ``(params, batch) -> scalar`` mean loss over the (local) batch.
    mesh: device mesh containing ``axis_name``.
    axis_name: the data-parallel mesh axis.
    batch_spec: ``PartitionSpec`` (prefix) of the batch; default: leading
      axis split over ``axis_name``. Params and state are replicated.
  """
  if axis_name not in mesh.axis_names:
    raise ValueError(f"per_shard_update: axis {axis_name!r} is not in the mesh axes "
                     f"{mesh.axis_names}.")
  if not callable(loss_fn):
    raise TypeError("per_shard_update: loss_fn must be callable (params, batch) -> loss.")
  bspec = P(axis_name) if batch_spec is None else batch_spec

  def local(params, opt_state, batch):
    # gradients w.r.t. varying params stay shard-local (w.r.t. replicated
    # params JAX would psum them over the axis)
    local_params = _base.to_varying(params, axis_name)
    loss, g = jax.value_and_grad(loss_fn)(local_params, batch)
    grad_fn = lambda p: jax.grad(loss_fn)(_base.to_varying(p, axis_name), batch)  # noqa: E731
    updates, opt_state = tx.update(g, opt_state, params, grad_fn=grad_fn)
    return jax.lax.pmean(loss, axis_name), updates, opt_state

  mapped = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), bspec),
                         out_specs=(P(), P(), P()))

  def step(params, opt_state, batch):
    # place the inputs as the specs say (required on Explicit-axis meshes;
    # a no-op when they already are)
    rep = NamedSharding(mesh, P())
    params, opt_state = jax.device_put((params, opt_state), rep)
    batch = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)),
                         batch, _broadcast_spec(bspec, batch))
    return mapped(params, opt_state, batch)

  return step


def _broadcast_spec(spec, tree):
  if isinstance(spec, P):
    return jax.tree.map(lambda _: spec, tree)
  return jax.tree.map(lambda s, sub: jax.tree.map(lambda _: s, sub), spec, tree,
                      is_leaf=lambda x: isinstance(x, P))
