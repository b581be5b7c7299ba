"""Parameters sharded over a ``model`` mesh axis (FSDP / ZeRO-3 style).

On a ``("data", "model")`` mesh the batch is sharded on ``data`` only (replicated across
``model``), and every large parameter is split along one of its dimensions over ``model``.
Optimizer state follows the same rule (a moment has its parameter's shape, so it gets
the parameter's sharding). Each device then holds ``1/M`` of the large leaves; XLA
inserts the all-gathers and reduce-scatters the step needs. The rule is a function of
the leaf's shape only, so any tree of the same shapes gets the same shardings.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from saft_jax.train.mesh import place_leaf

MODEL_AXIS = "model"
# Leaves below this many elements (per run for stacked trees) stay replicated: 16 Ki
# elements is 64 KiB in f32, below which an all-gather costs more than it saves.
MIN_SHARD_SIZE = 2 ** 14


def has_model_axis(mesh: Mesh | None, model_axis: str = MODEL_AXIS) -> bool:
  """Whether ``mesh`` has an axis named ``model_axis``."""
  return mesh is not None and model_axis in mesh.axis_names


def param_spec(shape: Sequence[int], axis_size: int, model_axis: str = MODEL_AXIS, *,
               min_size: int = MIN_SHARD_SIZE, leading_axes: int = 0) -> P:
  """The FSDP ``PartitionSpec`` of one leaf of shape ``shape``.

  Args:
    shape: the leaf's shape.
    axis_size: size of the model axis (1: everything replicated).
    model_axis: name of the model axis.
    min_size: leaves with fewer elements (not counting the leading axes) are replicated.
    leading_axes: leading dimensions that are never sharded and do not count (e.g. the
      member axis of a stacked state).

  Returns:
    ``P()`` (replicated) unless the leaf has >= 2 dimensions (after the leading ones)
    and >= ``min_size`` elements; then one entry per dimension, ``model_axis`` on the
    largest dimension divisible by ``axis_size`` (ties: the last such dimension),
    ``P()`` when no dimension is divisible.
  """
  shape = tuple(int(d) for d in shape)
  dims = shape[leading_axes:]
  if axis_size <= 1 or len(dims) < 2 or int(np.prod(dims)) < min_size:
    return P()
  divisible = [i for i, d in enumerate(dims) if d % axis_size == 0]
  if not divisible:
    return P()
  best = max(divisible, key=lambda i: (dims[i], i))
  spec = [None] * len(shape)
  spec[leading_axes + best] = model_axis
  return P(*spec)


def param_sharding(params: Any, mesh: Mesh, model_axis: str = MODEL_AXIS, *,
                   min_size: int = MIN_SHARD_SIZE, leading_axes: int = 0) -> Any:
  """A pytree of ``NamedSharding``s on ``mesh``, one per leaf of ``params``.

  Leaves may be arrays or ``jax.ShapeDtypeStruct``s; the rule is :func:`param_spec`.
  On a mesh without ``model_axis`` every leaf is replicated (data-only meshes behave as
  before).

  Args:
    params: the tree (params, a ``TrainState``, optimizer state, ...).
    mesh: the device mesh.
    model_axis: name of the axis the parameters are split over.
    min_size: see :func:`param_spec`.
    leading_axes: see :func:`param_spec`.

  Returns:
    A tree of the structure of ``params`` holding ``NamedSharding``s.
  """
  return jax.tree.map(lambda x: leaf_sharding(x, mesh, model_axis, min_size=min_size,
                                              leading_axes=leading_axes), params)


def leaf_sharding(x: Any, mesh: Mesh, model_axis: str = MODEL_AXIS, *,
                  min_size: int = MIN_SHARD_SIZE, leading_axes: int = 0) -> NamedSharding:
  """The ``NamedSharding`` of one leaf (array or ``ShapeDtypeStruct``) by :func:`param_spec`
  (replicated on a mesh without ``model_axis``)."""
  size = mesh.shape[model_axis] if has_model_axis(mesh, model_axis) else 1
  return NamedSharding(mesh, param_spec(np.shape(x), size, model_axis, min_size=min_size,
                                        leading_axes=leading_axes))


def place(tree: Any, shardings: Any) -> Any:
  """Places every leaf of ``tree`` with the matching sharding of ``shardings``.

  Single process: ``jax.device_put``. Several processes: every process passes the same
  full values and gets global arrays (``jax.make_array_from_callback``); leaves that are
  already global arrays are resharded with ``jax.device_put``.
  """
  return jax.tree.map(place_leaf, tree, shardings)


def shard_params(tree: Any, mesh: Mesh, model_axis: str = MODEL_AXIS, *,
                 min_size: int = MIN_SHARD_SIZE, leading_axes: int = 0) -> Any:
  """``tree`` placed on ``mesh`` with :func:`param_sharding`'s shardings."""
  return place(tree, param_sharding(tree, mesh, model_axis, min_size=min_size,
                                    leading_axes=leading_axes))


def shardings_like(tree: Any, mesh: Mesh, fallback: Callable[[Any], NamedSharding]) -> Any:
  """The sharding of each leaf of ``tree``: its own when it is a ``NamedSharding`` on
  ``mesh``, else ``fallback(leaf)``."""
  def pick(x):
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
      return sharding
    return fallback(x)
  return jax.tree.map(pick, tree)
