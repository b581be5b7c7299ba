"""Train step: sharded == unsharded hand reference; accumulation; FTLO; FTTS; bf16."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saft_jax import train
from train_helpers import (assert_trees_close, init_mlp, make_batch, mlp_apply, model_loss,
                           tiny_sam, xent)

B = 16


def _adamw():
  return optax.adamw(1e-2, weight_decay=0.1)


def _reference_steps(params, batches, base, rho=None):
  """Unsharded reference with plain JAX: grads, optional SAM, base optax update."""
  grad = jax.grad(lambda p, b: model_loss(p, b)[0])
  opt_state = base.init(params)
  for b in batches:
    g = grad(params, b)
    if rho is not None:
      norm = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g)))
      g = grad(jax.tree.map(lambda p, x: p + rho * x / norm, params, g), b)
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam needs it
      updates, opt_state = base.update(g, opt_state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
  return params


@pytest.mark.parametrize("use_sam", [False, True])
def test_sharded_step_matches_unsharded_reference(use_sam):
  mesh = train.make_mesh()
  assert mesh.shape["data"] == 8
  params = init_mlp(0)
  tx = tiny_sam(_adamw(), rho=0.1) if use_sam else _adamw()
  step = train.make_train_step(train.partitioned_loss(model_loss), tx, mesh=mesh)
  trainable, frozen = train.partition(params, lambda path, x: True)
  state = train.init_train_state(trainable, tx, mesh=mesh)
  batches = [make_batch(B, seed=s) for s in range(3)]
  for b in batches:
    state, metrics = step(state, train.replicate(frozen, mesh), train.shard_batch(b, mesh))
  assert state.params["dense0"]["kernel"].sharding.is_fully_replicated
  assert int(state.step) == 3 and bool(metrics["finite"])
  ref = _reference_steps(params, [jax.tree.map(jnp.asarray, b) for b in batches], _adamw(),
                         rho=0.1 if use_sam else None)
  assert_trees_close(state.params, ref, rtol=2e-5, atol=2e-6)
  # The reported loss is the clean full-batch loss at the pre-update params of step 3.
  assert np.isfinite(float(metrics["loss"]))


def test_batch_is_sharded_on_data_axis_and_state_donated():
  mesh = train.make_mesh()
  tx = _adamw()
  step = train.make_train_step(train.partitioned_loss(model_loss), tx, mesh=mesh)
  state = train.init_train_state(init_mlp(0), tx, mesh=mesh)
  batch = train.shard_batch(make_batch(B), mesh)
  assert batch["x"].sharding.spec == jax.sharding.PartitionSpec("data")
  old = state.params["dense0"]["kernel"]
  state, _ = step(state, None, batch)
  assert old.is_deleted()  # donated


@pytest.mark.parametrize("use_sam", [False, True])
def test_accumulation_equals_full_batch(use_sam):
  mesh = train.make_mesh((4, 2), ("data", "replica"))
  params = init_mlp(1)
  tx = tiny_sam(optax.sgd(0.5), rho=0.2) if use_sam else optax.sgd(0.5)
  loss_fn = train.partitioned_loss(model_loss)
  results = []
  for k in (1, 4):
    step = train.make_train_step(loss_fn, tx, mesh=mesh, accum_steps=k)
    state = train.init_train_state(params, tx, mesh=mesh)
    for s in range(2):
      state, metrics = step(state, None, train.shard_batch(make_batch(B, seed=s), mesh))
    results.append((state.params, float(metrics["loss"]), float(metrics["accuracy"])))
  assert_trees_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-6)
  np.testing.assert_allclose(results[0][2], results[1][2], rtol=1e-6)


def test_accumulation_rejects_indivisible_batch():
  tx = optax.sgd(0.1)
  step = train.make_train_step(train.partitioned_loss(model_loss), tx, accum_steps=3)
  state = train.init_train_state(init_mlp(0), tx)
  with pytest.raises(ValueError, match="not divisible by accum_steps=3"):
    step(state, None, jax.tree.map(jnp.asarray, make_batch(B)))


@pytest.mark.parametrize("use_sam", [False, True])
def test_ftlo_partition_freezes_leaves_exactly(use_sam):
  mesh = train.make_mesh()
  params = init_mlp(2)
  mask = {"dense0": {"kernel": True, "bias": False}, "dense1": {"kernel": False, "bias": False}}
  trainable, frozen = train.partition(params, mask)
  assert trainable["dense0"]["bias"] is None and frozen["dense0"]["kernel"] is None
  base = optax.adamw(1e-2, weight_decay=0.5)
  tx = tiny_sam(base, rho=0.1) if use_sam else base
  step = train.make_train_step(train.partitioned_loss(model_loss), tx, mesh=mesh)
  state = train.init_train_state(trainable, tx, mesh=mesh)
  frozen_dev = train.replicate(frozen, mesh)
  for s in range(3):
    state, _ = step(state, frozen_dev, train.shard_batch(make_batch(B, seed=s), mesh))
  full = train.combine(state.params, frozen_dev)
  for path in (("dense0", "bias"), ("dense1", "kernel"), ("dense1", "bias")):
    np.testing.assert_array_equal(np.asarray(full[path[0]][path[1]]),
                                  np.asarray(params[path[0]][path[1]]))
  assert not np.allclose(full["dense0"]["kernel"], params["dense0"]["kernel"])
  # Optimizer state exists only for the trainable leaf (so no decay/moments for frozen).
  n_mu = len(jax.tree.leaves(state.opt_state[0].mu))
  assert n_mu == 1


def test_ftlo_weight_decay_only_on_trainable():
  """Zero loss gradient: the only change is weight decay, and only on trainable leaves."""
  params = init_mlp(3)
  trainable, frozen = train.partition(params, train.mask_from_predicate(
      params, lambda path, x: path.endswith("kernel")))
  tx = optax.adamw(0.1, weight_decay=0.5)
  zero_loss = lambda tr, fr, b: (0.0 * jnp.sum(b["x"]), {})
  step = train.make_train_step(zero_loss, tx)
  state = train.init_train_state(trainable, tx)
  state, _ = step(state, frozen, jax.tree.map(jnp.asarray, make_batch(B)))
  k = params["dense0"]["kernel"]
  np.testing.assert_allclose(state.params["dense0"]["kernel"], k * (1 - 0.1 * 0.5), rtol=1e-6)
  assert state.params["dense0"]["bias"] is None


def test_partition_errors_name_the_leaf():
  params = init_mlp(0)
  with pytest.raises(ValueError, match="dense1/bias"):
    train.partition(params, {"dense0": {"kernel": True, "bias": True}, "dense1": {"kernel": True}})
  with pytest.raises(TypeError, match="dense0/bias"):
    train.partition(params, {"dense0": {"kernel": True, "bias": 1},
                             "dense1": {"kernel": True, "bias": True}})
  t, f = train.partition(params, lambda p, x: "bias" in p)
  assert_trees_close(train.combine(t, f), params, rtol=0, atol=0)


def _ftts_loss():
  apply_fn = lambda p, consts, batch: mlp_apply(p, batch["x"])
  loss_on = lambda out, consts, batch: (xent(out, batch["y"]), {})
  return train.linearized_loss(apply_fn, loss_on)


def test_ftts_gradient_at_zero_equals_model_gradient():
  theta0 = init_mlp(4)
  batch = jax.tree.map(jnp.asarray, make_batch(B))
  loss_fn = _ftts_loss()
  zeros = jax.tree.map(jnp.zeros_like, theta0)
  g_lin = jax.grad(lambda d: loss_fn(d, train.linearized_consts(theta0), batch)[0])(zeros)
  g_ref = jax.grad(lambda p: model_loss(p, batch)[0])(theta0)
  assert_trees_close(g_lin, g_ref, rtol=1e-5, atol=1e-7)


def test_ftts_is_exact_for_a_model_linear_in_params():
  theta0 = init_mlp(5, sizes=(6, 4))  # logits = x W + b: linear in θ, so f_lin == f
  d = jax.tree.map(lambda x: 0.3 * jnp.ones_like(x), theta0)
  batch = jax.tree.map(jnp.asarray, make_batch(B))
  lin = _ftts_loss()(d, train.linearized_consts(theta0), batch)[0]
  direct = model_loss(jax.tree.map(jnp.add, theta0, d), batch)[0]
  np.testing.assert_allclose(lin, direct, rtol=1e-6)
  # ...and for the nonlinear MLP it differs at a finite offset (it really is linearized).
  theta0 = init_mlp(5)
  d = jax.tree.map(lambda x: 0.5 * jnp.ones_like(x), theta0)
  lin = _ftts_loss()(d, train.linearized_consts(theta0), batch)[0]
  direct = model_loss(jax.tree.map(jnp.add, theta0, d), batch)[0]
  assert abs(float(lin) - float(direct)) > 1e-3


def test_ftts_theta0_is_an_argument_not_a_constant():
  mesh = train.make_mesh()
  tx = tiny_sam(optax.adamw(1e-2), rho=0.1)
  step = train.make_train_step(_ftts_loss(), tx, mesh=mesh, donate=False)
  theta_a, theta_b = init_mlp(6), init_mlp(7)
  d0 = jax.tree.map(jnp.zeros_like, theta_a)
  state = train.init_train_state(d0, tx, mesh=mesh)
  batch = train.shard_batch(make_batch(B), mesh)
  sa, ma = step(state, train.replicate(train.linearized_consts(theta_a), mesh), batch)
  sb, mb = step(state, train.replicate(train.linearized_consts(theta_b), mesh), batch)
  assert step._cache_size() == 1
  assert not np.allclose(sa.params["dense0"]["kernel"], sb.params["dense0"]["kernel"])
  # At dθ = 0 the linearized loss is the original loss at θ0.
  np.testing.assert_allclose(float(mb["loss"]), float(model_loss(
      theta_b, jax.tree.map(jnp.asarray, make_batch(B)))[0]), rtol=1e-5)
  # θ0 appears among the jaxpr's inputs, not as a closed-over constant.
  jaxpr = jax.make_jaxpr(step)(state, train.linearized_consts(theta_a), batch)
  assert not any(np.size(c) > 1 for c in jaxpr.consts)


def test_bf16_compute_keeps_f32_params_and_grads():
  tx = optax.sgd(0.1)
  seen = {}

  def loss_fn(tr, fr, batch):
    seen["dtype"] = tr["dense0"]["kernel"].dtype
    return model_loss(tr, batch)

  step = train.make_train_step(loss_fn, tx, compute_dtype=jnp.bfloat16)
  params = init_mlp(8)
  state = train.init_train_state(params, tx)
  state, metrics = step(state, None, jax.tree.map(jnp.asarray, make_batch(B)))
  assert seen["dtype"] == jnp.bfloat16
  assert state.params["dense0"]["kernel"].dtype == jnp.float32
  assert metrics["loss"].dtype == jnp.float32
  # Close to the f32 step (bf16 rounding only).
  ref = _reference_steps(params, [jax.tree.map(jnp.asarray, make_batch(B))], optax.sgd(0.1))
  assert_trees_close(state.params, ref, rtol=0.05, atol=5e-3)


def test_eval_step_and_evaluate():
  mesh = train.make_mesh()
  params = init_mlp(9)

  def metric_fn(p, fr, batch):
    logits = mlp_apply(p, batch["x"])
    return {"correct": jnp.sum(jnp.argmax(logits, -1) == batch["y"]),
            "count": jnp.asarray(batch["y"].shape[0]), "loss_sum": xent(logits, batch["y"]) * 16}

  ev = train.make_eval_step(metric_fn, mesh=mesh)
  batches = [make_batch(16, seed=s) for s in range(3)]
  out = train.evaluate(ev, train.replicate(params, mesh), None,
                       [train.shard_batch(b, mesh) for b in batches])
  x = np.concatenate([b["x"] for b in batches]); y = np.concatenate([b["y"] for b in batches])
  acc = np.mean(np.argmax(np.asarray(mlp_apply(params, jnp.asarray(x))), -1) == y)
  np.testing.assert_allclose(out["accuracy"], acc)
  assert out["count"] == 48


def test_step_with_package_sam_and_asam():
  """The pinned interface works with saft_jax.optim's SAM (same result as the hand SAM)."""
  optim = pytest.importorskip("saft_jax.optim")
  mesh = train.make_mesh()
  params = init_mlp(10)
  batches = [make_batch(B, seed=s) for s in range(2)]
  ref = _reference_steps(params, [jax.tree.map(jnp.asarray, b) for b in batches], _adamw(),
                         rho=0.1)
  finals = []
  for tx in (optim.sam(_adamw(), rho=0.1), optim.asam(_adamw(), rho=0.5)):
    step = train.make_train_step(train.partitioned_loss(model_loss), tx, mesh=mesh)
    state = train.init_train_state(params, tx, mesh=mesh)
    for b in batches:
      state, metrics = step(state, None, train.shard_batch(b, mesh))
    assert bool(metrics["finite"])
    finals.append(state.params)
  # SAM equals the hand-written reference; ASAM (a different ε) does not.
  assert_trees_close(finals[0], ref, rtol=2e-5, atol=2e-6)
  assert not np.allclose(finals[1]["dense0"]["kernel"], ref["dense0"]["kernel"], atol=1e-6)
