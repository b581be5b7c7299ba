"""Device mesh and data placement: batch sharded on the ``data`` axis, params replicated
(params split over a ``model`` axis: :mod:`saft_jax.train.fsdp`)."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(shape: Sequence[int] = (-1,), axis_names: Sequence[str] = (DATA_AXIS,),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over ``devices`` (default: all global devices, process-major order).

  ``shape`` may contain one ``-1``. Devices keep ``jax.devices()`` order, so each
  process owns a contiguous block of the ``data`` axis, which is what
  :func:`shard_batch` assumes for process-local batches.
  """
  devices = list(jax.devices() if devices is None else devices)
  if len(shape) != len(axis_names):
    raise ValueError(f"mesh shape {tuple(shape)} and axis_names {tuple(axis_names)} differ in length")
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"at most one -1 in mesh shape, got {tuple(shape)}")
  if -1 in shape:
    rest = int(np.prod([s for s in shape if s != -1]))
    if rest <= 0 or len(devices) % rest:
      raise ValueError(f"mesh shape {tuple(shape)} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // rest
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
                     f"have {len(devices)}")
  return Mesh(np.asarray(devices, dtype=object).reshape(shape), tuple(axis_names))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, data_axis: str = DATA_AXIS) -> NamedSharding:
  if data_axis not in mesh.axis_names:
    raise ValueError(f"mesh has no axis {data_axis!r} (axes: {mesh.axis_names})")
  return NamedSharding(mesh, P(data_axis))


def place_leaf(x: Any, sharding: NamedSharding, *, reshard: bool = True) -> jax.Array:
  """One leaf placed with ``sharding``.

  Single process: ``jax.device_put``. Several processes: every process passes the same
  full value and gets a global array (``jax.make_array_from_callback``). A leaf that is
  already a global array is resharded with ``jax.device_put`` (``reshard``), or returned
  as it is.
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if not reshard or x.sharding == sharding:
      return x
    return jax.device_put(x, sharding)
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf fully replicated on ``mesh`` (all processes pass the same values);
  leaves that are already global arrays are kept as they are."""
  sharding = replicated_sharding(mesh)
  return jax.tree.map(lambda x: place_leaf(x, sharding, reshard=False), tree)


def to_host(tree: Any) -> Any:
  """NumPy copies of the leaves of ``tree``, also of arrays spanning several processes.

  A replicated global array gives its local copy; an array sharded over processes is
  gathered (``process_allgather``), so every process gets the full value. Every process
  must call this with the same tree (the gather is a collective).
  """
  def get(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(get, tree)


def mesh_of(tree: Any) -> Mesh | None:
  """The mesh of the first leaf of ``tree`` placed with a ``NamedSharding``, else None."""
  for leaf in jax.tree.leaves(tree):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
      return sharding.mesh
  return None


def shard_batch(local_batch: Any, mesh: Mesh, data_axis: str = DATA_AXIS) -> Any:
  """Builds global arrays sharded on ``data_axis`` from this process's slice of the batch.

  Each process passes its own ``global_batch / process_count`` examples (leading axis);
  process ``i``'s examples become rows ``[i*n, (i+1)*n)`` of the global batch.
  """
  sharding = batch_sharding(mesh, data_axis)

  def put(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return x  # already a global array (e.g. from a prefetching pipeline)
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  return jax.tree.map(put, local_batch)
