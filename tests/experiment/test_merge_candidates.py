"""Merge directions the search uses: θ_M = θ0 + λ·D for every supported merge."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saft_jax import merging
from saft_jax.experiment import config as config_lib, runner, search


def _tvs(T=3, seed=0):
  rng = np.random.default_rng(seed)
  return [{"blocks_0": {"attn": {"q": {"kernel": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)}}},
           "ln": {"bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}} for _ in range(T)]


@pytest.mark.parametrize("merge", config_lib.BASIC_MERGES + config_lib.EXTRA_MERGES)
def test_every_merge_gives_finite_directions_of_the_right_structure(merge):
  tvs = _tvs()
  cands = runner.merge_candidates(merge, tvs, seed=0)
  assert cands and sum(c.default for c in cands) == 1
  for c in cands:
    assert jax.tree.structure(c.direction) == jax.tree.structure(tvs[0])
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(c.direction))


def test_directions_match_the_library_merges():
  tvs = _tvs()
  theta0 = jax.tree.map(jnp.zeros_like, tvs[0])
  (wa,) = runner.merge_candidates("weight_average", tvs)
  assert wa.lams == (1 / 3,)
  want = merging.weight_average([merging.apply_task_vector(theta0, tv) for tv in tvs])
  got = merging.apply_task_vector(theta0, wa.direction, wa.lams[0])
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  ties = runner.merge_candidates("ties", tvs)
  assert [c.hparams["k"] for c in ties] == list(runner.TIES_KS)
  for c in ties:
    want = merging.ties(theta0, tvs, lam=0.7, k=c.hparams["k"])
    got = merging.apply_task_vector(theta0, c.direction, 0.7)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  (mm,) = runner.merge_candidates("magmax", tvs)
  stack = np.stack([np.asarray(t["ln"]["bias"]) for t in tvs])
  np.testing.assert_array_equal(np.asarray(mm.direction["ln"]["bias"]),
                                stack[np.argmax(np.abs(stack), 0), np.arange(4)])
  assert mm.lams == search.SINGLE_LAMBDAS
  (ct,) = runner.merge_candidates("consensus_ties", tvs)
  ref = merging.consensus_ties_merged_vector(tvs)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(ct.direction)):
    np.testing.assert_array_equal(a, b)
  (cta,) = runner.merge_candidates("consensus", tvs)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ct.direction),
                                                       jax.tree.leaves(cta.direction)))


@pytest.mark.parametrize("saft", config_lib.SAFTS)
def test_every_sharpness_setting_builds_a_working_optimizer(saft):
  from saft_jax.experiment.finetune import make_optimizer
  cfg = config_lib.ReproduceConfig(steps=10, optim=config_lib.OptimConfig(lr=0.05, warmup_steps=1))
  tx = make_optimizer(cfg, saft, 10)
  params = {"w": {"kernel": jnp.ones((3, 2))}, "b": {"bias": jnp.zeros(2)}}
  loss = lambda p: jnp.sum((jnp.ones(3) @ p["w"]["kernel"] + p["b"]["bias"] - 1.0) ** 2)
  grad_fn = jax.grad(loss)
  with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int32 and floats
    state = tx.init(params)
    for _ in range(3):
      updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn)
      params = jax.tree.map(lambda p, u: p + u, params, updates)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
  assert float(loss(params)) < 8.0  # moved downhill from the initial loss of 8
