"""Mesh helpers and the distributed start-up helper (no-op / bad input)."""
import jax
import numpy as np
import pytest

from saft_jax import train


def test_make_mesh_shapes_and_errors():
  assert train.make_mesh().shape == {"data": 8}
  m = train.make_mesh((-1, 2), ("data", "model"))
  assert m.shape == {"data": 4, "model": 2}
  assert list(m.devices.flat) == jax.devices()  # process-major order kept
  with pytest.raises(ValueError, match="does not divide"):
    train.make_mesh((3, -1), ("data", "model"))
  with pytest.raises(ValueError, match="needs 4 devices"):
    train.make_mesh((4,))
  with pytest.raises(ValueError, match="no axis 'batch'"):
    train.batch_sharding(m, "batch")


def test_shard_batch_places_rows_on_data_axis():
  m = train.make_mesh((4, 2), ("data", "replica"))
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  g = train.shard_batch({"x": x}, m)["x"]
  np.testing.assert_array_equal(np.asarray(g), x)
  for shard in g.addressable_shards:
    assert shard.data.shape == (4, 3)


def test_maybe_initialize_distributed_is_a_noop_without_config(monkeypatch):
  for k in ("SAFT_COORDINATOR_ADDRESS", "SAFT_NUM_PROCESSES", "SAFT_PROCESS_ID",
            "SAFT_DISTRIBUTED_AUTO"):
    monkeypatch.delenv(k, raising=False)
  assert train.maybe_initialize_distributed() is False
  monkeypatch.setenv("SAFT_COORDINATOR_ADDRESS", "127.0.0.1:1")
  monkeypatch.setenv("SAFT_NUM_PROCESSES", "1")
  assert train.maybe_initialize_distributed() is False  # a single process needs nothing
  monkeypatch.setenv("SAFT_NUM_PROCESSES", "2")
  with pytest.raises(ValueError, match="SAFT_PROCESS_ID"):
    train.maybe_initialize_distributed()
