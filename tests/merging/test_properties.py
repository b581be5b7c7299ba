"""Property tests (hypothesis + chex) of the in-memory merges on random pytrees."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import merging_testlib as lib
from saft_jax import merging as m

SETTINGS = dict(max_examples=8, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(**SETTINGS)
@given(spec=lib.tree_spec, seed=st.integers(0, 2**31 - 1), t=st.integers(1, 3))
def test_roundtrip_lam0_and_weight_average(spec, seed, t):
  theta0, fts = lib.models(spec, seed, t)
  tvs = [m.task_vector(theta0, f) for f in fts]
  chex.assert_trees_all_equal_shapes_and_dtypes(tvs[0], theta0)
  # apply(θ0, task_vector(θ0, θ)) == θ (one rounding of the difference in the leaf dtype).
  lib.assert_close_trees(m.apply_task_vector(theta0, tvs[0]), fts[0])
  # λ = 0 gives θ0 exactly, for every merge with a coefficient.
  chex.assert_trees_all_equal(m.task_arithmetic(theta0, tvs, 0.0), theta0)
  chex.assert_trees_all_equal(m.ties(theta0, tvs, 0.0, k=0.5), theta0)
  chex.assert_trees_all_equal(m.apply_task_vector(theta0, m.magmax_merged_vector(tvs), 0.0),
                              theta0)
  # Weight averaging equals task arithmetic with λ = 1/T.
  lib.assert_close_trees(m.weight_average(fts), m.task_arithmetic(theta0, tvs, 1.0 / t))
  # The integer leaf passes through untouched.
  assert int(m.ties(theta0, tvs, 1.0)["step"]) == 7


@settings(**SETTINGS)
@given(spec=lib.tree_spec, seed=st.integers(0, 2**31 - 1), perm_seed=st.integers(0, 100))
def test_merges_invariant_to_task_order(spec, seed, perm_seed):
  theta0, fts = lib.models(spec, seed, 3)
  tvs = [m.task_vector(theta0, f) for f in fts]
  perm = list(np.random.default_rng(perm_seed).permutation(3))
  ptvs = [tvs[i] for i in perm]
  lams = jnp.asarray([0.2, 0.5, 0.9], jnp.float32)
  lib.assert_close_trees(m.task_arithmetic(theta0, tvs, lams),
                         m.task_arithmetic(theta0, ptvs, lams[jnp.asarray(perm)]))
  lib.assert_close_trees(m.weight_average(fts), m.weight_average([fts[i] for i in perm]))
  for trim in ("global", "per_leaf"):
    lib.assert_close_trees(m.ties(theta0, tvs, 0.7, k=0.4, trim=trim),
                           m.ties(theta0, ptvs, 0.7, k=0.4, trim=trim))
  lib.assert_close_trees(m.magmax(theta0, tvs), m.magmax(theta0, ptvs))


@settings(**SETTINGS)
@given(spec=lib.tree_spec, seed=st.integers(0, 2**31 - 1))
def test_ties_full_k_without_conflicts_is_mean(spec, seed):
  rng = np.random.default_rng(seed)
  theta0, fts = lib.models(spec, seed, 3)
  # Same sign pattern in every task vector: |noise| times one shared random sign.
  signs = jax.tree.map(lambda x: jnp.asarray(rng.choice([-1.0, 1.0], size=x.shape),
                                             jnp.float32), theta0["net"])
  tvs = [{"net": jax.tree.map(
      lambda s, x: (s * (jnp.abs(jnp.asarray(rng.normal(size=x.shape), jnp.float32)) + 0.1)
                    ).astype(x.dtype), signs, theta0["net"]), "step": jnp.int32(0)}
         for _ in range(3)]
  for trim in ("global", "per_leaf"):
    merged = m.ties_merged_vector(tvs, k=1.0, trim=trim)
    mean = m.sum_task_vectors(tvs, 1.0 / 3)
    lib.assert_close_trees(merged, mean)


@settings(**SETTINGS)
@given(spec=lib.tree_spec, seed=st.integers(0, 2**31 - 1))
def test_jit_equals_eager_and_vmap_over_lam(spec, seed):
  theta0, fts = lib.models(spec, seed, 2)
  tvs = [m.task_vector(theta0, f) for f in fts]
  jties = jax.jit(m.ties, static_argnames=("k", "trim"))
  for trim in ("global", "per_leaf"):
    lib.assert_close_trees(jties(theta0, tvs, 0.8, k=0.3, trim=trim),
                           m.ties(theta0, tvs, 0.8, k=0.3, trim=trim))
  lib.assert_close_trees(jax.jit(m.task_arithmetic)(theta0, tvs, 0.4),
                         m.task_arithmetic(theta0, tvs, 0.4))
  # λ search: merged vector once, then vmap over λ.
  merged = jax.jit(m.ties_merged_vector, static_argnames=("k", "trim"))(tvs, k=0.3)
  lams = jnp.asarray([0.0, 0.5, 1.0], jnp.float32)
  batch = jax.jit(jax.vmap(lambda lam: m.apply_task_vector(theta0, merged, lam)))(lams)
  for i, lam in enumerate([0.0, 0.5, 1.0]):
    lib.assert_close_trees(jax.tree.map(lambda x: x[i], batch),
                           m.ties(theta0, tvs, lam, k=0.3))
  ta = jax.vmap(lambda lam: m.task_arithmetic(theta0, tvs, lam))(
      jnp.asarray([[0.1, 0.2], [0.3, 0.4]], jnp.float32))
  lib.assert_close_trees(jax.tree.map(lambda x: x[1], ta),
                         m.task_arithmetic(theta0, tvs, jnp.asarray([0.3, 0.4])))


def test_sharding_is_preserved():
  mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
  sh = NamedSharding(mesh, P("x", None))
  rep = NamedSharding(mesh, P())
  rng = np.random.default_rng(0)

  def model():
    return {"w": jax.device_put(jnp.asarray(rng.normal(size=(16, 4)), jnp.float32), sh),
            "b": jax.device_put(jnp.asarray(rng.normal(size=(4,)), jnp.bfloat16), rep)}
  theta0 = model()
  tvs = [m.task_vector(theta0, model()) for _ in range(3)]
  outs = {
      "ta": m.task_arithmetic(theta0, tvs, 0.3),
      "ties": m.ties(theta0, tvs, 0.5, k=0.2),
      "ties_jit": jax.jit(m.ties, static_argnames=("k", "trim"))(theta0, tvs, 0.5, k=0.2,
                                                                 trim="per_leaf"),
      "wa": jax.jit(m.weight_average)([theta0] + [model() for _ in range(2)]),
      "tv": tvs[0],
  }
  for name, out in outs.items():
    assert out["w"].sharding.is_equivalent_to(sh, 2), (name, out["w"].sharding)
    assert out["w"].dtype == jnp.float32 and out["b"].dtype == jnp.bfloat16, name
    assert out["b"].sharding.is_equivalent_to(rep, 1), (name, out["b"].sharding)
