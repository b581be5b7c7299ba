"""Training state: step counter, trainable parameters, optimizer state."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from saft_jax.train import fsdp
from saft_jax.train import mesh as mesh_lib


class TrainState(NamedTuple):
  """``step`` counts completed updates; ``params`` holds only the TRAINABLE leaves."""
  step: jax.Array
  params: Any
  opt_state: Any


def init_train_state(params: Any, tx: optax.GradientTransformation, *, mesh=None,
                     model_axis: str = fsdp.MODEL_AXIS,
                     min_size: int = fsdp.MIN_SHARD_SIZE) -> TrainState:
  """Builds a :class:`TrainState`, replicated over ``mesh`` when given.

  On a mesh with ``model_axis`` (FSDP) the params are placed with
  :func:`fsdp.shard_params` and the optimizer state is built directly in the shardings
  of the same rule (moments are split like their parameters); ``min_size`` is the
  rule's threshold (see :func:`fsdp.param_spec`).
  """
  def init(p):
    return TrainState(jnp.zeros((), jnp.int32), p, tx.init(p))
  if mesh is None:
    return jax.jit(init)(params)
  if fsdp.has_model_axis(mesh, model_axis):
    params = fsdp.shard_params(params, mesh, model_axis, min_size=min_size)
    shardings = fsdp.param_sharding(jax.eval_shape(init, params), mesh, model_axis,
                                    min_size=min_size)
    return jax.jit(init, out_shardings=shardings)(params)
  params = mesh_lib.replicate(params, mesh)
  return jax.jit(init, out_shardings=mesh_lib.replicated_sharding(mesh))(params)
