"""TIES and the exact top-k threshold against sort-based NumPy references."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import merging_testlib as lib
from saft_jax import merging as m
from saft_jax.merging import _topk


def _tvs(rng, kind, t=3):
  shapes = {"blocks_0": {"w": (7, 5), "b": (5,)}, "blocks_1": {"w": (4, 6)}, "s": ()}
  def leaf(shape):
    if kind == "grid":  # small integers / 4: many exact zeros and ties, exact sums
      return jnp.asarray(rng.integers(-3, 4, size=shape) / 4.0, jnp.float32)
    return jnp.asarray(rng.normal(size=shape), jnp.float32)
  return [jax.tree.map(leaf, shapes, is_leaf=lambda x: isinstance(x, tuple))
          for _ in range(t)]


@pytest.mark.parametrize("trim", ["global", "per_leaf"])
@pytest.mark.parametrize("kind", ["normal", "grid"])
def test_ties_matches_numpy_reference(trim, kind):
  rng = np.random.default_rng(1 if kind == "normal" else 2)
  tvs = _tvs(rng, kind)
  jfn = jax.jit(m.ties_merged_vector, static_argnames=("k", "trim"))
  for k in (0.1, 0.2, 0.35, 1.0):
    got = lib.np_flat(jfn(tvs, k=k, trim=trim))
    ref = lib.ref_ties_vectors([lib.np_flat(t) for t in tvs], k, trim)
    for p in ref:
      np.testing.assert_allclose(got[p], ref[p], rtol=1e-6, atol=1e-7, err_msg=f"{p} k={k}")


def test_ties_majority_sign_fills_zero_sums():
  # Entry 0: +1 and -1 cancel (elected sum 0). Elsewhere the positive sign dominates,
  # so the majority sign is +1 and entry 0 averages only the positive value.
  a = {"w": jnp.asarray([1.0, 2.0, 3.0, 0.5], jnp.float32)}
  b = {"w": jnp.asarray([-1.0, 1.0, 1.0, 0.5], jnp.float32)}
  merged = m.ties_merged_vector([a, b], k=1.0)
  np.testing.assert_allclose(np.asarray(merged["w"]), [1.0, 1.5, 2.0, 0.5])
  neg = m.ties_merged_vector([m.negate_task_vector(a), m.negate_task_vector(b)], k=1.0)
  np.testing.assert_allclose(np.asarray(neg["w"]), [-1.0, -1.5, -2.0, -0.5])


def test_ties_keeps_all_ties_at_threshold():
  # k = 0.25 of 8 entries -> n_keep = 2; the 2nd largest magnitude (2.0) appears 3 times.
  x = {"w": jnp.asarray([2.0, -2.0, 0.5, 2.0, 1.0, 0.0, 3.0, -0.1], jnp.float32)}
  (trimmed,) = m.ties_trim([x], k=0.25)
  np.testing.assert_array_equal(np.asarray(trimmed["w"]),
                                [2.0, -2.0, 0.0, 2.0, 0.0, 0.0, 3.0, 0.0])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kth_largest_bits_is_exact(dtype):
  rng = np.random.default_rng(3)
  arrays = [rng.normal(size=s).astype(np.float32) for s in [(50,), (7, 9), (3,)]]
  arrays[0][:10] = 0.0
  arrays[0][10] = -0.0
  arrays[1][0, :4] = 1.5
  arrays[1][1, :2] = -1.5
  arrays[2][0] = np.inf
  arrays = [a.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
            for a in arrays]
  allv = np.sort(np.abs(np.concatenate([a.astype(np.float32).ravel() for a in arrays])))[::-1]
  for n_keep in [1, 2, 5, 17, 60, len(allv) - 1, len(allv)]:
    bits = m.kth_largest_bits([jnp.asarray(a) for a in arrays], n_keep)
    assert float(_topk.bits_to_float(bits)) == allv[n_keep - 1], n_keep
    hist = _topk.kth_largest_bits_histogram(lambda: iter(arrays), n_keep)
    assert hist == int(bits), n_keep


def test_keep_count_contract():
  assert m.keep_count(0.2, 10) == 2
  assert m.keep_count(0.01, 10) == 1  # at least one entry
  assert m.keep_count(1.0, 7) == 7
