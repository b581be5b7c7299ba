"""Global-batch vs per-shard (m-sharpness) perturbations on 8 fake CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from saft_jax import optim
import optim_testlib as tl

LR = 0.1
N_DEV = 8


@pytest.fixture(scope="module")
def mesh():
  assert len(jax.devices()) == N_DEV
  return jax.make_mesh((N_DEV,), ("data",))


def _step(tx):
  def step(p, s, batch):
    gf = lambda q: jax.grad(tl.mlp_loss)(q, batch)  # noqa: E731
    return tx.update(gf(p), s, p, grad_fn=gf)
  return jax.jit(step)


@pytest.mark.parametrize("name", ["sam", "asam"])
def test_sharded_global_batch_step_equals_single_device(mesh, name):
  params, batch = tl.mlp_params(), tl.mlp_batch(16)
  tx = tl.make(name, base=optax.sgd(LR))
  state = tx.init(params)
  u_single, _ = _step(tx)(params, state, batch)
  sb = jax.device_put(batch, NamedSharding(mesh, P("data")))
  sp = jax.device_put(params, NamedSharding(mesh, P()))
  assert len(sb["x"].sharding.device_set) == N_DEV
  u_sharded, _ = _step(tx)(sp, jax.device_put(state, NamedSharding(mesh, P())), sb)
  np.testing.assert_allclose(tl.flat(u_sharded), tl.flat(u_single), rtol=1e-5, atol=1e-7)


def _np_eps(name, g, x, wvec):
  if name == "sam":
    return 0.05 * g / np.linalg.norm(g)
  t = np.where(wvec > 0, np.abs(x) + 0.01, 1.0)  # asam defaults rho=0.5, eta=0.01
  return 0.5 * t * t * g / np.linalg.norm(t * g)


@pytest.mark.parametrize("name,axis_type", [("sam", "explicit"), ("asam", "explicit"),
                                            ("sam", "auto")])
def test_per_shard_perturbation_matches_hand_reference(mesh, name, axis_type):
  if axis_type == "auto":
    mesh = jax.make_mesh((N_DEV,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  params, batch = tl.mlp_params(), tl.mlp_batch(16)
  tx = tl.make(name, base=optax.sgd(LR), axis_name="data")
  step = jax.jit(optim.per_shard_update(tx, tl.mlp_loss, mesh, "data"))
  loss, u, _ = step(params, tx.init(params), batch)  # step places the batch

  # reference: loop over the 8 shards, one ε per shard, average the gradients
  wvec = np.concatenate([np.full(v.size, 0.0 if "bias" in str(path[-1]) else 1.0)
                         for path, v in jax.tree_util.tree_leaves_with_path(params)])
  x = tl.flat(params)
  gl = jax.jit(jax.grad(tl.mlp_loss))
  g_adv, losses = [], []
  for i in range(N_DEV):
    bi = jax.tree.map(lambda v: v[2 * i:2 * i + 2], batch)
    gi = tl.flat(gl(params, bi))
    e = _np_eps(name, gi, x, wvec)
    g_adv.append(tl.flat(gl(tl.unflat((x + e).astype(np.float32), params), bi)))
    losses.append(float(tl.mlp_loss(params, bi)))
  want = -LR * np.mean(g_adv, axis=0)
  np.testing.assert_allclose(tl.flat(u), want, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(float(loss), np.mean(losses), rtol=1e-5)
  # and per-shard ε really differs from the global-batch ε
  u_global, _ = _step(tl.make(name, base=optax.sgd(LR)))(params, tx.init(params), batch)
  assert np.abs(tl.flat(u_global) - want).max() > 1e-4


@pytest.mark.parametrize("name", sorted(optim.TRANSFORMS))
def test_every_transform_runs_per_shard_and_stays_replicated(mesh, name):
  params, batch = tl.mlp_params(), tl.mlp_batch(16)
  tx = tl.make(name, axis_name="data")
  step = jax.jit(optim.per_shard_update(tx, tl.mlp_loss, mesh, "data"))
  sb = jax.device_put(batch, NamedSharding(mesh, P("data")))
  state = tx.init(params)
  for _ in range(2):  # check_vma would reject shard-dependent outputs
    loss, u, state = step(params, state, sb)
    params = optax.apply_updates(params, u)
  assert np.isfinite(float(loss))
  assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(u))


def test_per_shard_update_rejects_unknown_axis(mesh):
  with pytest.raises(ValueError, match="not in the mesh"):
    optim.per_shard_update(optim.sam(optax.sgd(LR)), tl.mlp_loss, mesh, "batch")
