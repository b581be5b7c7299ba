"""Jitted train and eval steps over a device mesh.

``step(state, frozen, batch) -> (state, metrics)``: the batch is sharded on the mesh's
``data`` axis, state and frozen are replicated, the state buffers are donated. On a mesh
with a ``model`` axis (FSDP, :mod:`saft_jax.train.fsdp`) state and frozen keep the
shardings they come with (the new state gets the old state's shardings); the batch is
still sharded on ``data`` only.
The optimizer is always called as ``tx.update(grads, opt_state, params, grad_fn=grad_fn)``
where ``grad_fn(params)`` is the gradient of the mean loss on the SAME batch (over all
micro-batches), so sharpness-aware transforms see the full-batch gradient at both points.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from saft_jax.train import fsdp
from saft_jax.train import mesh as mesh_lib
from saft_jax.train.state import TrainState

LossFn = Callable[[Any, Any, Any], tuple[jax.Array, Any]]


def cast_floating(tree: Any, dtype) -> Any:
  """Casts the floating leaves of ``tree`` to ``dtype`` (others unchanged)."""
  def cast(x):
    return x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x
  return jax.tree.map(cast, tree)


def _with_compute_dtype(loss_fn: LossFn, compute_dtype) -> LossFn:
  """Casts params/frozen to ``compute_dtype`` INSIDE the differentiated function, so
  gradients come back in the parameters' own dtype (f32); the loss is returned in f32."""
  def wrapped(trainable, frozen, batch):
    if compute_dtype is not None:
      trainable = cast_floating(trainable, compute_dtype)
      frozen = cast_floating(frozen, compute_dtype)
    loss, aux = loss_fn(trainable, frozen, batch)
    if jnp.ndim(loss) != 0:
      raise ValueError(f"loss_fn must return a scalar loss, got shape {jnp.shape(loss)}")
    return loss.astype(jnp.float32), aux
  return wrapped


def _split_micro(batch, accum_steps: int, mesh, data_axis: str):
  """(B, ...) -> (k, B/k, ...); micro-batch j holds examples j, j+k, j+2k, ... so that
  every device's contiguous shard keeps its own examples (no data movement)."""
  def split(x):
    b = x.shape[0]
    if b % accum_steps:
      raise ValueError(f"batch size {b} is not divisible by accum_steps={accum_steps}")
    x = jnp.swapaxes(x.reshape((b // accum_steps, accum_steps) + x.shape[1:]), 0, 1)
    if mesh is not None:
      x = jax.lax.with_sharding_constraint(
          x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, data_axis)))
    return x
  return jax.tree.map(split, batch)


def _mean_loss_and_grad(value_and_grad, params, frozen, batch, accum_steps, mesh, data_axis):
  """Mean (loss, aux, grads) over ``accum_steps`` micro-batches with ``lax.scan``."""
  def one(mb):
    (loss, aux), grads = value_and_grad(params, frozen, mb)
    return loss, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), aux), grads

  if accum_steps == 1:
    return one(batch)
  micro = _split_micro(batch, accum_steps, mesh, data_axis)
  shapes = jax.eval_shape(one, jax.tree.map(lambda x: x[0], micro))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  total, _ = jax.lax.scan(lambda acc, mb: (jax.tree.map(jnp.add, acc, one(mb)), None), zeros, micro)
  return jax.tree.map(lambda t: t / accum_steps, total)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


class _FollowInputs:
  """``fn(state_or_params, frozen, batch)`` jitted on a mesh with a model axis, with the
  input shardings of the first two arguments taken from the arguments themselves.

  Leaves already placed on ``mesh`` keep their sharding; other leaves of the first
  argument get :func:`fsdp.param_sharding`'s, other leaves of ``frozen`` are replicated.
  With ``returns_state`` the output is ``(new_state, metrics)`` and the new state gets
  the input state's shardings (so donated buffers are reused); metrics are replicated.
  One executable is compiled per distinct set of input shardings.
  """

  def __init__(self, fn, mesh, batch_sharding, *, returns_state: bool, donate: bool,
               model_axis: str, leading_axes: int):
    self._fn, self._mesh, self._batch = fn, mesh, batch_sharding
    self._returns_state, self._donate = returns_state, donate
    self._model_axis, self._leading = model_axis, leading_axes
    self._compiled = {}

  def shardings(self, first, frozen):
    """``(first_shardings, frozen_shardings)`` the call would use for these arguments."""
    mesh, axis = self._mesh, self._model_axis
    rule = lambda x: fsdp.leaf_sharding(x, mesh, axis, leading_axes=self._leading)
    repl = mesh_lib.replicated_sharding(mesh)
    return (fsdp.shardings_like(first, mesh, rule),
            fsdp.shardings_like(frozen, mesh, lambda _: repl))

  def __call__(self, first, frozen, batch):
    first_sh, frozen_sh = self.shardings(first, frozen)
    key = (jax.tree.structure(first_sh), tuple(jax.tree.leaves(first_sh)),
           jax.tree.structure(frozen_sh), tuple(jax.tree.leaves(frozen_sh)))
    jitted = self._compiled.get(key)
    if jitted is None:
      repl = mesh_lib.replicated_sharding(self._mesh)
      jitted = self._compiled[key] = jax.jit(
          self._fn, in_shardings=(first_sh, frozen_sh, self._batch),
          out_shardings=(first_sh, repl) if self._returns_state else repl,
          donate_argnums=(0,) if self._donate else ())
    return jitted(first, frozen, batch)


def _step_body(loss_fn: LossFn, tx, accum_steps: int, compute_dtype, lr_schedule, mesh,
               data_axis: str):
  """The un-jitted ``step(state, frozen, batch) -> (state, metrics)`` (see make_train_step)."""
  if accum_steps < 1:
    raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
  if not isinstance(tx, optax.GradientTransformationExtraArgs):
    tx = optax.with_extra_args_support(tx)
  value_and_grad = jax.value_and_grad(_with_compute_dtype(loss_fn, compute_dtype), has_aux=True)

  def step(state: TrainState, frozen, batch):
    mean = lambda p: _mean_loss_and_grad(value_and_grad, p, frozen, batch, accum_steps,
                                         mesh, data_axis)
    loss, aux, grads = mean(state.params)
    promotion = jax.config.jax_numpy_dtype_promotion

    def grad_fn(p):  # the user's loss keeps the caller's promotion rules
      with jax.numpy_dtype_promotion(promotion):
        return mean(p)[2]

    # optax's Adam bias correction mixes an int32 count with floats, which "strict"
    # promotion rejects; the update itself runs under standard promotion.
    with jax.numpy_dtype_promotion("standard"):
      updates, opt_state = tx.update(grads, state.opt_state, state.params, grad_fn=grad_fn)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    metrics = dict(aux) if isinstance(aux, dict) else {"aux": aux}
    metrics.update(loss=loss, grad_norm=grad_norm,
                   finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite(params))
    if lr_schedule is not None:
      metrics["lr"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
    return TrainState(state.step + 1, params, opt_state), metrics

  return step


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *, mesh=None,
                    accum_steps: int = 1, donate: bool = True, compute_dtype=None,
                    lr_schedule: Callable | None = None, data_axis: str = mesh_lib.DATA_AXIS,
                    model_axis: str = fsdp.MODEL_AXIS):
  """Builds the jitted ``step(state, frozen, batch) -> (state, metrics)``.

  Args:
    loss_fn: ``loss_fn(trainable, frozen, batch) -> (scalar loss, aux dict of scalars)``;
      the loss must be a MEAN over the examples of ``batch``.
    tx: an optax transform; plain ones are wrapped with ``optax.with_extra_args_support``.
      It is called ``tx.update(grads, opt_state, params, grad_fn=grad_fn)``.
    mesh: a ``jax.sharding.Mesh``; the batch is sharded on ``data_axis``, state and
      frozen are replicated. ``None``: plain ``jax.jit`` (no sharding annotations).
      A mesh with ``model_axis`` (FSDP): state and frozen keep the shardings they are
      passed with (e.g. from :func:`init_train_state` / :func:`fsdp.shard_params`;
      unplaced state leaves get :func:`fsdp.param_sharding`'s, unplaced frozen leaves
      are replicated), and the returned state has the input state's shardings.
    accum_steps: micro-batches per step (gradient accumulation with ``lax.scan``).
    donate: donate the input state's buffers.
    compute_dtype: e.g. ``jnp.bfloat16``: trainable and frozen floating leaves are cast
      to it inside the loss; parameters, optimizer state and gradients stay f32.
    lr_schedule: optional ``count -> lr`` reported as ``metrics["lr"]``.
    data_axis: the mesh axis the batch is sharded on.
    model_axis: the mesh axis parameters may be sharded on (FSDP).

  Returns:
    The jitted step. ``metrics`` holds ``loss``, ``grad_norm`` (clean gradient),
    ``finite`` (loss, gradient and new params finite), the aux means, and ``lr``.
  """
  step = _step_body(loss_fn, tx, accum_steps, compute_dtype, lr_schedule, mesh, data_axis)
  donate_argnums = (0,) if donate else ()
  if mesh is None:
    return jax.jit(step, donate_argnums=donate_argnums)
  if fsdp.has_model_axis(mesh, model_axis):
    return _FollowInputs(step, mesh, mesh_lib.batch_sharding(mesh, data_axis),
                         returns_state=True, donate=donate, model_axis=model_axis,
                         leading_axes=0)
  repl = mesh_lib.replicated_sharding(mesh)
  return jax.jit(step, in_shardings=(repl, repl, mesh_lib.batch_sharding(mesh, data_axis)),
                 out_shardings=(repl, repl), donate_argnums=donate_argnums)


def stacked_batch_sharding(mesh, data_axis: str = mesh_lib.DATA_AXIS):
  """Sharding of a stacked batch ``[members, B, ...]``: ``B`` on ``data_axis``."""
  mesh_lib.batch_sharding(mesh, data_axis)  # validates the axis
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, data_axis))


def make_stacked_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *,
                            frozen_axes: Any = 0, mesh=None, accum_steps: int = 1,
                            donate: bool = True, compute_dtype=None,
                            data_axis: str = mesh_lib.DATA_AXIS,
                            model_axis: str = fsdp.MODEL_AXIS):
  """Like :func:`make_train_step` for ``M`` independent runs trained in one program.

  ``jax.vmap`` of the same step over a leading *member* axis: every leaf of the state
  and of the batch has shape ``[M, ...]`` (member ``m`` sees only its own batch, its own
  gradient norms and SAM perturbation, its own optimizer state), ``frozen`` is mapped
  according to ``frozen_axes`` (a ``vmap`` ``in_axes`` prefix: ``0`` for per-member
  leaves, ``None`` for leaves shared by every member, e.g. θ0). Metrics are ``[M]``.
  On a mesh the per-member batch axis (axis 1) is sharded on ``data_axis``; on a mesh
  with ``model_axis`` the state keeps its input shardings as in :func:`make_train_step`
  (unplaced leaves: :func:`fsdp.param_sharding` with the member axis never sharded).
  """
  step = _step_body(loss_fn, tx, accum_steps, compute_dtype, None, mesh, data_axis)
  stacked = jax.vmap(step, in_axes=(0, frozen_axes, 0))
  donate_argnums = (0,) if donate else ()
  if mesh is None:
    return jax.jit(stacked, donate_argnums=donate_argnums)
  if fsdp.has_model_axis(mesh, model_axis):
    return _FollowInputs(stacked, mesh, stacked_batch_sharding(mesh, data_axis),
                         returns_state=True, donate=donate, model_axis=model_axis,
                         leading_axes=1)
  repl = mesh_lib.replicated_sharding(mesh)
  return jax.jit(stacked, in_shardings=(repl, repl, stacked_batch_sharding(mesh, data_axis)),
                 out_shardings=(repl, repl), donate_argnums=donate_argnums)


def _eval_body(metric_fn, compute_dtype):
  def eval_step(params, frozen, batch):
    if compute_dtype is not None:
      params, frozen = cast_floating(params, compute_dtype), cast_floating(frozen, compute_dtype)
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), metric_fn(params, frozen, batch))
  return eval_step


def make_eval_step(metric_fn: Callable[[Any, Any, Any], dict], *, mesh=None, compute_dtype=None,
                   data_axis: str = mesh_lib.DATA_AXIS, model_axis: str = fsdp.MODEL_AXIS):
  """Jitted ``eval_step(params, frozen, batch) -> dict`` of per-batch SUMS
  (e.g. ``{"correct": ..., "count": ..., "loss_sum": ...}``) from
  ``metric_fn(trainable, frozen, batch)``. On a mesh with ``model_axis``, params and
  frozen keep the shardings they are passed with (see :func:`make_train_step`)."""
  eval_step = _eval_body(metric_fn, compute_dtype)
  if mesh is None:
    return jax.jit(eval_step)
  if fsdp.has_model_axis(mesh, model_axis):
    return _FollowInputs(eval_step, mesh, mesh_lib.batch_sharding(mesh, data_axis),
                         returns_state=False, donate=False, model_axis=model_axis,
                         leading_axes=0)
  repl = mesh_lib.replicated_sharding(mesh)
  return jax.jit(eval_step, in_shardings=(repl, repl, mesh_lib.batch_sharding(mesh, data_axis)),
                 out_shardings=repl)


def make_stacked_eval_step(metric_fn: Callable[[Any, Any, Any], dict], *, frozen_axes: Any = 0,
                           mesh=None, compute_dtype=None, data_axis: str = mesh_lib.DATA_AXIS,
                           model_axis: str = fsdp.MODEL_AXIS):
  """:func:`make_eval_step` vmapped over a leading member axis (see
  :func:`make_stacked_train_step`); every output is ``[M]``."""
  stacked = jax.vmap(_eval_body(metric_fn, compute_dtype), in_axes=(0, frozen_axes, 0))
  if mesh is None:
    return jax.jit(stacked)
  if fsdp.has_model_axis(mesh, model_axis):
    return _FollowInputs(stacked, mesh, stacked_batch_sharding(mesh, data_axis),
                         returns_state=False, donate=False, model_axis=model_axis,
                         leading_axes=1)
  repl = mesh_lib.replicated_sharding(mesh)
  return jax.jit(stacked, in_shardings=(repl, repl, stacked_batch_sharding(mesh, data_axis)),
                 out_shardings=repl)


def evaluate(eval_step, params, frozen, batches) -> dict:
  """Sums ``eval_step`` outputs over ``batches``; adds ``accuracy = correct / count`` and
  ``loss = loss_sum / count`` when those keys exist."""
  totals = None
  for batch in batches:
    out = eval_step(params, frozen, batch)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  if totals is None:
    raise ValueError("evaluate: no evaluation batches")
  # Scalars for one run; [M] arrays for a stacked eval step (one value per member).
  result = {k: float(v) if jnp.ndim(v) == 0 else np.asarray(v, np.float64)
            for k, v in totals.items()}
  if "count" in result and np.all(np.asarray(result["count"]) > 0):
    if "correct" in result:
      result["accuracy"] = result["correct"] / result["count"]
    if "loss_sum" in result:
      result["loss"] = result["loss_sum"] / result["count"]
  return result
