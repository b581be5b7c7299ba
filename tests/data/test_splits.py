"""Split arithmetic: protocol validation split, own splits, host shares, step order."""
import numpy as np
import pytest

from saft_jax.data import splits


@pytest.mark.parametrize("n,expected", [(100, 10), (60000, 5000), (73257, 5000), (49999, 4999),
                                        (7, 0)])
def test_protocol_val_size_and_disjoint(n, expected):
  tr, va = splits.protocol_val_split(n)
  assert len(va) == expected
  assert len(np.intersect1d(tr, va)) == 0
  assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(n))
  # Independent recomputation of the documented rule: seed 0, first k of the permutation.
  ref = np.sort(np.random.default_rng(0).permutation(n)[:min(n // 10, 5000)])
  assert np.array_equal(va, ref)
  tr2, va2 = splits.protocol_val_split(n)
  assert np.array_equal(va, va2) and np.array_equal(tr, tr2)


def test_eurosat_bounds():
  a, b = splits.own_split_bounds(27000, (0.8, 0.1, 0.1))
  assert (a, b - a, 27000 - b) == (21600, 2700, 2700)
  a, b = splits.own_split_bounds(31500, (0.6, 0.2, 0.2))
  assert (a, b - a, 31500 - b) == (18900, 6300, 6300)
  parts = splits.own_split(27000, (0.8, 0.1, 0.1))
  assert [len(parts[k]) for k in ("train", "val", "test")] == [21600, 2700, 2700]
  assert np.array_equal(np.sort(np.concatenate(list(parts.values()))), np.arange(27000))
  with pytest.raises(ValueError, match="sum"):
    splits.own_split_bounds(10, (0.5, 0.1, 0.1))


def test_host_rows_partition_global_batch():
  batch = np.arange(48)
  for count in (1, 2, 4, 8):
    shares = [batch[splits.host_rows(48, p, count)] for p in range(count)]
    assert all(len(s) == 48 // count for s in shares)
    assert np.array_equal(np.concatenate(shares), batch)
  with pytest.raises(ValueError, match="divisible"):
    splits.host_rows(10, 0, 4)
  with pytest.raises(ValueError, match="process_index"):
    splits.host_rows(8, 4, 4)


def test_batch_indices_epochs_are_permutations():
  n, b = 23, 5  # 4 steps per epoch, 3 examples dropped per epoch
  for epoch in range(3):
    got = np.concatenate([splits.batch_indices(n, b, 7, epoch * 4 + k) for k in range(4)])
    assert len(np.unique(got)) == 20
    assert np.array_equal(got, np.random.default_rng([7, epoch]).permutation(n)[:20])
  assert not np.array_equal(splits.batch_indices(n, b, 7, 0), splits.batch_indices(n, b, 8, 0))
  with pytest.raises(ValueError, match="exceeds"):
    splits.batch_indices(3, 5, 0, 0)
