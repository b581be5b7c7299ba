"""Putting host batches onto a device mesh as global, batch-sharded arrays.

Each process passes *its own* rows of every global batch (see
:func:`saft_jax.data.splits.host_rows`); :func:`prefetch_to_mesh` turns them into
global ``jax.Array`` s sharded as ``NamedSharding(mesh, P(axis))`` with
``jax.make_array_from_process_local_data`` and keeps ``depth`` batches in
flight, so host-to-device copies overlap the step that consumes the previous
batch (as ``flax.jax_utils.prefetch_to_device`` does for pmap).
"""
from __future__ import annotations

import collections
from typing import Any, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def batch_sharding(mesh: Mesh, axis: str = "data") -> NamedSharding:
  """The sharding of a batch: leading dimension over mesh axis ``axis``."""
  if axis not in mesh.axis_names:
    raise ValueError(f"mesh has no axis {axis!r}; its axes are {mesh.axis_names}")
  return NamedSharding(mesh, P(axis))


def to_global(batch: Any, sharding: NamedSharding) -> Any:
  """Turns a pytree of process-local NumPy rows into global sharded arrays."""
  def put(x):
    x = np.asarray(x)
    if x.ndim == 0:
      raise ValueError("batch leaves need a leading batch dimension, got a scalar")
    return jax.make_array_from_process_local_data(sharding, x)
  return jax.tree.map(put, batch)


def prefetch_to_mesh(batches: Iterable[Any], mesh: Mesh, *, depth: int = 2,
                     axis: str = "data") -> Iterator[Any]:
  """Yields the batches as global arrays sharded along ``axis``, ``depth`` ahead.

  Args:
    batches: iterable of pytrees (e.g. ``(images, labels)``) of this process's
      rows; the local batch must divide evenly over the local devices of ``axis``.
    mesh: the device mesh.
    depth: number of batches transferred ahead of the consumer (>= 1).
    axis: mesh axis that shards the batch dimension.

  Yields:
    The same pytrees with ``jax.Array`` leaves of the global batch shape.
  """
  if depth < 1:
    raise ValueError(f"depth must be >= 1, got {depth}")
  sharding = batch_sharding(mesh, axis)
  queue = collections.deque()
  it = iter(batches)
  for batch in it:
    queue.append(to_global(batch, sharding))
    if len(queue) >= depth:
      break
  while queue:
    current = queue.popleft()
    for batch in it:  # refill before handing out, so `depth` transfers stay in flight
      queue.append(to_global(batch, sharding))
      break
    yield current
