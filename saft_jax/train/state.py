"""Training state: step counter, trainable parameters, optimizer state."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from saft_jax.train import mesh as mesh_lib


class TrainState(NamedTuple):
  """``step`` counts completed updates; ``params`` holds only the TRAINABLE leaves."""
  step: jax.Array
  params: Any
  opt_state: Any


def init_train_state(params: Any, tx: optax.GradientTransformation, *, mesh=None) -> TrainState:
  """Builds a :class:`TrainState` (replicated over ``mesh`` when given)."""
  def init(p):
    return TrainState(jnp.zeros((), jnp.int32), p, tx.init(p))
  if mesh is None:
    return jax.jit(init)(params)
  params = mesh_lib.replicate(params, mesh)
  return jax.jit(init, out_shardings=mesh_lib.replicated_sharding(mesh))(params)
