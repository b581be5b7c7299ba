"""Device prefetch: global arrays sharded over the 8 fake CPU devices along `data`."""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import saft_jax.data as data
from saft_jax.data import prefetch


def _batches(k, pulled):
  for i in range(k):
    pulled.append(i)
    yield (np.full((16, 4, 4, 3), i, np.float32) + np.arange(16, dtype=np.float32)[:, None, None,
                                                                                     None],
           np.arange(16, dtype=np.int32) + 100 * i)


def test_prefetch_shards_along_data():
  assert len(jax.devices()) == 8
  mesh = Mesh(np.array(jax.devices()).reshape(8, 1), ("data", "model"))
  pulled = []
  it = data.prefetch_to_mesh(_batches(5, pulled), mesh, depth=3)
  first = next(it)
  assert pulled == [0, 1, 2, 3]  # 3 in flight when the first is consumed, one refilled
  out = [first] + list(it)
  assert len(out) == 5 and pulled == [0, 1, 2, 3, 4]
  for i, (x, y) in enumerate(out):
    assert isinstance(x, jax.Array) and x.shape == (16, 4, 4, 3) and y.dtype == np.int32
    assert x.sharding == NamedSharding(mesh, P("data"))
    assert len(x.addressable_shards) == 8
    for shard in y.addressable_shards:
      rows = shard.index[0]
      assert shard.data.shape == (2,)
      np.testing.assert_array_equal(np.asarray(shard.data), np.arange(16)[rows] + 100 * i)
    np.testing.assert_array_equal(np.asarray(x)[:, 0, 0, 0], np.arange(16) + i)


def test_prefetch_errors():
  mesh = Mesh(np.array(jax.devices()), ("batch",))
  with pytest.raises(ValueError, match="no axis 'data'"):
    next(data.prefetch_to_mesh(iter([np.zeros(8)]), mesh))
  with pytest.raises(ValueError, match="depth"):
    next(data.prefetch_to_mesh(iter([np.zeros(8)]), mesh, axis="batch", depth=0))
  assert prefetch.batch_sharding(mesh, "batch").spec == P("batch")
