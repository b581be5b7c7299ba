"""FSDP: parameters split over a ``model`` mesh axis give the data-only mesh's numbers.

Every comparison is against a data-only mesh, never against the same sharded run.
"""
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from saft_jax import data, models, optim, train
from saft_jax.experiment import config as config_lib, runner, suites
from train_helpers import assert_trees_close, init_mlp, model_loss

# An MLP large enough that its kernels reach MIN (and small enough to compile fast).
SIZES, MIN, B = (6, 32, 24, 4), 128, 16


def _mesh(shape):
  return train.make_mesh(shape, ("data", "model") if len(shape) == 2 else ("data",))


def _batch(seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, SIZES[0])).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32) + 2 * (x[:, 1] > 0).astype(np.int32)
  return {"x": x, "y": y}


def _specs(tree):
  return [leaf.sharding.spec for leaf in jax.tree.leaves(tree)]


# ---------------------------------------------------------------------------------------
# (a) the sharding rule
# ---------------------------------------------------------------------------------------

def test_param_sharding_rule():
  mesh = _mesh((4, 2))
  tree = {
      "fc": jnp.zeros((64, 256)),            # largest dim (last) divisible by 2
      "proj": jnp.zeros((256, 64)),          # largest dim first
      "square": jnp.zeros((128, 128)),       # tie: the last dim
      "odd_big": jnp.zeros((1001, 64)),      # largest dim not divisible: the next one
      "none_divisible": jnp.zeros((129, 127)),
      "conv": jnp.zeros((3, 3, 64, 96)),     # 4-D: largest dim 96
      "small": jnp.zeros((8, 8)),            # below min_size: replicated
      "vector": jnp.zeros((100_000,)),       # 1-D: replicated however large
      "scalar": jnp.zeros(()),
      "abstract": jax.ShapeDtypeStruct((32, 512), jnp.float32),
  }
  specs = jax.tree.map(lambda s: s.spec, train.param_sharding(tree, mesh, min_size=1024))
  assert specs == {
      "fc": P(None, "model"), "proj": P("model", None), "square": P(None, "model"),
      "odd_big": P(None, "model"), "none_divisible": P(), "conv": P(None, None, None, "model"),
      "small": P(), "vector": P(), "scalar": P(), "abstract": P(None, "model")}
  shardings = train.param_sharding(tree, mesh, min_size=1024)
  assert all(s.mesh == mesh for s in jax.tree.leaves(shardings))


def test_param_sharding_axis_size_threshold_and_leading_axes():
  # Model axis 4: 6 is not divisible, 12 is; 1002 % 4 != 0 but 1000 % 4 == 0.
  mesh = _mesh((2, 4))
  tree = {"a": jnp.zeros((12, 6)), "b": jnp.zeros((6, 1002)), "c": jnp.zeros((1000, 6))}
  specs = jax.tree.map(lambda s: s.spec, train.param_sharding(tree, mesh, min_size=64))
  assert specs == {"a": P("model", None), "b": P(), "c": P("model", None)}
  # The threshold counts elements (>= min_size is split).
  assert train.param_spec((16, 8), 4, min_size=128) == P("model", None)
  assert train.param_spec((16, 8), 4, min_size=129) == P()
  # Stacked trees: the member axis is never split and does not count.
  assert train.param_spec((8, 64, 256), 2, min_size=1024,
                          leading_axes=1) == P(None, None, "model")
  assert train.param_spec((4096, 4, 4), 2, min_size=1024, leading_axes=1) == P()
  assert train.param_spec((4096, 64), 2, min_size=16, leading_axes=1) == P()  # 1-D per member


def test_data_only_mesh_replicates_everything():
  tree = {"fc": jnp.zeros((64, 256)), "b": jnp.zeros((256,))}
  for mesh in (_mesh((8,)), train.make_mesh((8, 1), ("data", "model"))):
    shardings = train.param_sharding(tree, mesh, min_size=1)
    assert all(s.spec == P() for s in jax.tree.leaves(shardings))


def test_shard_params_places_values():
  mesh = _mesh((4, 2))
  tree = {"w": jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32),
          "b": np.ones((32,), np.float32)}
  placed = train.shard_params(tree, mesh, min_size=1)
  assert placed["w"].sharding.spec == P("model", None)
  assert placed["b"].sharding.spec == P()
  assert placed["w"].addressable_shards[0].data.shape == (32, 32)  # half per device
  np.testing.assert_array_equal(np.asarray(placed["w"]), np.asarray(tree["w"]))
  np.testing.assert_array_equal(np.asarray(placed["b"]), tree["b"])


# ---------------------------------------------------------------------------------------
# (b) train steps on ("data", "model") meshes equal the data-only mesh
# ---------------------------------------------------------------------------------------

def _tx(kind):
  base = optax.adamw(1e-2, weight_decay=0.1)
  if kind == "adamw":
    return base
  if kind == "sam":
    return optim.sam(base, rho=0.1)
  return optim.asam(base, rho=0.5)


def _train(mesh, tx, steps=3, accum_steps=1):
  params = init_mlp(0, SIZES)
  step = train.make_train_step(train.partitioned_loss(model_loss), tx, mesh=mesh,
                               accum_steps=accum_steps)
  state = train.init_train_state(params, tx, mesh=mesh, min_size=MIN)
  eval_step = train.make_eval_step(
      lambda p, f, b: {"loss_sum": model_loss(p, b)[0] * b["x"].shape[0]}, mesh=mesh)
  for s in range(steps):
    state, metrics = step(state, None, train.shard_batch(_batch(s), mesh))
  evaluated = train.evaluate(eval_step, state.params, None, [train.shard_batch(_batch(9), mesh)])
  return state, metrics, evaluated


@pytest.mark.parametrize("kind", ["adamw", "sam", "asam"])
def test_fsdp_steps_equal_data_only(kind):
  tx = _tx(kind)
  ref_state, ref_metrics, ref_eval = _train(_mesh((8,)), tx)
  assert all(s == P() for s in _specs(ref_state))
  for shape in ((4, 2), (2, 4)):
    mesh = _mesh(shape)
    state, metrics, evaluated = _train(mesh, tx)
    # Params and every optimizer-state leaf keep the rule's shardings after the steps.
    rule = train.param_sharding(state, mesh, min_size=MIN)
    assert _specs(state) == [s.spec for s in jax.tree.leaves(rule)]
    # dense0 (6, 32), dense1 (32, 24) split on their 32; dense2 (24, 4) is below MIN.
    assert _specs(state.params) == [P(), P(None, "model"), P(), P("model", None), P(), P()]
    # Optimizer state (Adam moments, SAM's state) follows its parameters' shardings.
    by_shape = {x.shape: x.sharding.spec for x in jax.tree.leaves(state.params)}
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.shape in by_shape]
    assert all(x.sharding.spec == by_shape[x.shape] for x in moments)
    assert sum("model" in x.sharding.spec for x in moments) >= 4  # mu and nu of 2 kernels
    assert int(state.step) == 3 and bool(metrics["finite"])
    assert_trees_close(state.params, ref_state.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=1e-5)
    np.testing.assert_allclose(evaluated["loss_sum"], ref_eval["loss_sum"], rtol=1e-5)


def test_fsdp_state_is_donated_and_accumulation_matches():
  tx = _tx("sam")
  mesh = _mesh((4, 2))
  step = train.make_train_step(train.partitioned_loss(model_loss), tx, mesh=mesh)
  state = train.init_train_state(init_mlp(0, SIZES), tx, mesh=mesh, min_size=MIN)
  old = state.params["dense0"]["kernel"]
  state, _ = step(state, None, train.shard_batch(_batch(0), mesh))
  assert old.is_deleted()
  ref, _, _ = _train(_mesh((8,)), tx, steps=2)
  got, _, _ = _train(mesh, tx, steps=2, accum_steps=2)
  assert_trees_close(got.params, ref.params, rtol=1e-5, atol=1e-6)


def test_fsdp_stacked_step_equals_data_only():
  tx = _tx("asam")
  members = 2
  loss_fn = train.partitioned_loss(model_loss)
  batches = [jax.tree.map(lambda *xs: np.stack(xs), _batch(2 * s), _batch(2 * s + 1))
             for s in range(2)]
  results = []
  for shape in ((8,), (4, 2)):
    mesh = _mesh(shape)
    step = train.make_stacked_train_step(loss_fn, tx, mesh=mesh)
    state = train.init_train_state(init_mlp(0, SIZES), tx)
    state = jax.tree.map(lambda x: jnp.broadcast_to(x, (members,) + x.shape), state)
    state = (train.shard_params(state, mesh, min_size=MIN, leading_axes=1) if len(shape) == 2
             else train.replicate(state, mesh))
    put = lambda b: jax.tree.map(lambda x: jax.device_put(
        x, train.stacked_batch_sharding(mesh)), b)
    before = _specs(state)
    for b in batches:
      state, metrics = step(state, None, put(b))
    assert _specs(state) == before
    results.append(state)
  # Per member: dense0 (6, 32) and dense1 (32, 24) split on their 32, the member axis never.
  assert _specs(results[1].params) == [P(), P(None, None, "model"), P(), P(None, "model", None),
                                       P(), P()]
  assert_trees_close(results[1].params, results[0].params, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_process_data_only(tmp_path):
  """2 processes x 2 devices on a (2, 2) ("data", "model") mesh (params placed with
  ``make_array_from_callback``, orbax checkpoint and resume, gathered with ``to_host``)
  equal 1 process x 4 devices on the data-only mesh."""
  from test_multihost import _free_port, _run_all

  worker = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "fsdp_multihost_worker.py")
  single, multi = str(tmp_path / "single.npz"), str(tmp_path / "multi.npz")
  addr = f"127.0.0.1:{_free_port()}"
  _run_all([[sys.executable, worker, single, str(tmp_path / "ck1"), "1", "0", "4", "1"],
            [sys.executable, worker, multi, str(tmp_path / "ck2"), "2", "0", "2", "2", addr],
            [sys.executable, worker, multi, str(tmp_path / "ck2"), "2", "1", "2", "2", addr]])
  a, b = np.load(single), np.load(multi)
  assert sorted(a.files) == sorted(b.files) and len(a.files) == 6
  for k in a.files:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert not np.allclose(a["['dense0']['kernel']"], init_mlp(0, SIZES)["dense0"]["kernel"])


# ---------------------------------------------------------------------------------------
# (c) the config option
# ---------------------------------------------------------------------------------------

def _config(**kw):
  base = dict(suite="offline", tasks=("digits", "parity"), steps=4, batch_size=16,
              eval_every=2, checkpoint_every=4, pretrain_steps=10, eval_batch_size=64,
              async_checkpoint=False, stack_runs=1,
              optim=config_lib.OptimConfig(lr=1e-3, warmup_steps=1))
  base.update(kw)
  return config_lib.ReproduceConfig(**base)


def test_model_axis_override_and_mesh():
  cfg = config_lib.apply_overrides(_config(), ["model_axis=2"])
  assert cfg.model_axis == 2
  mesh = runner.make_run_mesh(cfg)
  assert mesh.axis_names == ("data", "model") and dict(mesh.shape) == {"data": 4, "model": 2}
  assert runner.make_run_mesh(config_lib.replace(cfg, model_axis=8)).shape["data"] == 1
  assert runner.make_run_mesh(config_lib.replace(cfg, mesh_shape=2, model_axis=4)).shape[
      "model"] == 4
  default = runner.make_run_mesh(_config())
  assert default.axis_names == ("data",) and default.size == 8  # unchanged without the option


@pytest.mark.parametrize("text,message", [
    ("0", "model_axis must be a positive int"),
    ("-2", "model_axis must be a positive int"),
    ("two", "--set model_axis: expected an int"),
    ("1.5", "--set model_axis: expected an int"),
])
def test_model_axis_bad_values(text, message):
  with pytest.raises(ValueError, match=message):
    config_lib.apply_overrides(_config(), [f"model_axis={text}"])


def test_model_axis_must_fit_the_devices():
  with pytest.raises(ValueError, match="model_axis=3 does not divide the 8 devices"):
    runner.make_run_mesh(_config(model_axis=3))
  with pytest.raises(ValueError, match="mesh_shape=8 .* model_axis=2 is not the 8 devices"):
    runner.make_run_mesh(_config(model_axis=2, mesh_shape=8))
  with pytest.raises(ValueError, match="needs a device mesh, but mesh_shape=1"):
    _config(model_axis=2, mesh_shape=1)
  with pytest.raises(ValueError, match="positive int"):
    _config(model_axis=True)
  assert runner.fsdp_mesh_shape(_config(model_axis=4), 16) == (4, 4)


def test_reproduce_with_a_bad_model_axis_writes_nothing(tmp_path):
  out = tmp_path / "run"
  with pytest.raises(ValueError, match="model_axis=3 does not divide the 8 devices"):
    runner.reproduce(_config(model_axis=3), str(out))
  assert not out.exists()


# ---------------------------------------------------------------------------------------
# (d) the main job's fine-tuning with model_axis=2 equals model_axis=1
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def suite():
  """Two offline tasks on a one-block offline ViT with a random θ0 and random heads (no
  pre-training: fine-tuning needs only some θ0; one block keeps compiling short)."""
  tasks = data.offline_suite(("parity", "ge5"))  # 2 classes each: one program
  vision = dataclasses.replace(suites.OFFLINE_VISION, layers=1)
  params0 = models.init_vision_params(vision, jax.random.key(0))
  rng = np.random.default_rng(0)
  heads = {name: jnp.asarray(rng.normal(size=(vision.output_dim, task.num_classes)),
                             jnp.float32) for name, task in tasks.items()}
  return suites.Suite("offline", tasks, params0, heads, vision)


def _rel_norm(a, b):
  """‖a − b‖ / ‖b‖ over all leaves."""
  num = sum(float(np.sum((np.asarray(x) - np.asarray(y)) ** 2))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  return (num / sum(float(np.sum(np.asarray(y) ** 2)) for y in jax.tree.leaves(b))) ** 0.5


@pytest.mark.parametrize("stack_runs", [0, 1])
def test_main_job_finetuning_model_axis_equals_data_only(suite, tmp_path, monkeypatch,
                                                         stack_runs):
  """``finetune_all`` (the main job's fine-tuning; stack_runs=0 is the offline default)."""
  placed = []

  def spy(real):
    def wrapped(step, state, *a, **kw):
      placed.append(_specs(state.params))
      return real(step, state, *a, **kw)
    return wrapped

  monkeypatch.setattr(train, "fit", spy(train.fit))
  monkeypatch.setattr(train, "fit_stacked", spy(train.fit_stacked))
  tvs = {}
  for axis in (1, 2):
    # Adam's eps above the float noise of gradients that are zero in exact arithmetic
    # (the attention key bias), which Adam would otherwise scale up to lr-sized steps.
    cfg = _config(model_axis=axis, stack_runs=stack_runs, steps=2,
                  optim=config_lib.OptimConfig(lr=1e-3, warmup_steps=1, eps=1e-5))
    tvs[axis] = runner.finetune_all(suite, cfg, str(tmp_path / f"m{axis}"), "sgd", "asam",
                                    (0,), runner.make_run_mesh(cfg))[0]
  # model_axis=1 replicates; model_axis=2 splits the MLP kernels (64x256, 256x64).
  assert all(s == P() for s in placed[0])
  assert sum("model" in s for s in placed[-1]) == 2 * suite.vision.layers
  for tv2, tv1 in zip(tvs[2], tvs[1]):
    scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(tv1))
    assert scale > 0
    assert _rel_norm(tv2, tv1) < 1e-4  # measured ~3e-6: sharded reductions' rounding
    assert max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(tv2), jax.tree.leaves(tv1))) < 2e-3 * scale
