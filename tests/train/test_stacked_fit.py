"""fit_stacked: per-member best checkpoints, resume after an interruption, non-finite errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saft_jax import train


def _setup(lrs=(0.1, 0.3)):
  """Two members fitting w to a target by SGD; member m's batch is its target."""
  def loss_fn(w, frozen, batch):
    return jnp.sum((w["w"] - batch) ** 2), {}

  tx = optax.sgd(0.1)
  step = train.make_stacked_train_step(loss_fn, tx, frozen_axes=None)
  state = train.init_train_state({"w": jnp.zeros(3)}, tx)
  state = jax.tree.map(lambda x: jnp.stack([x, x]), state)
  targets = np.array([[1.0, 2.0, 3.0], [-1.0, 0.0, 1.0]], np.float32)

  def batches_fn(start):
    for _ in range(start, 100):
      yield jnp.asarray(targets)

  return step, state, batches_fn, targets


def test_best_params_are_per_member(tmp_path):
  step, state, batches_fn, _ = _setup()
  # member 0 scores best at step 2, member 1 at step 4 (scripted scores)
  scores = {2: [0.9, 0.1], 4: [0.5, 0.8], 6: [0.2, 0.3]}
  seen = {}

  def eval_fn(params, frozen):
    k = sorted(scores)[len(seen)]
    seen[k] = np.asarray(params["w"]).copy()
    return {"accuracy": np.array(scores[k])}

  res = train.fit_stacked(step, state, None, batches_fn, total_steps=6, eval_fn=eval_fn,
                          eval_every=2, checkpoint_dir=str(tmp_path / "c"), save_every=2,
                          ckpt_async=False)
  np.testing.assert_allclose(res.best_params["w"][0], seen[2][0])
  np.testing.assert_allclose(res.best_params["w"][1], seen[4][1])
  np.testing.assert_allclose(res.best_score, [0.9, 0.8])


def test_resume_equals_uninterrupted(tmp_path):
  step, state, batches_fn, targets = _setup()

  def eval_fn(params, frozen):  # closer to the target is better
    return {"accuracy": -np.sum((np.asarray(params["w"]) - targets) ** 2, -1)}

  kw = dict(total_steps=8, eval_fn=eval_fn, eval_every=2, save_every=2, ckpt_async=False)
  full = train.fit_stacked(step, state, None, batches_fn,
                           checkpoint_dir=str(tmp_path / "a"), **kw)
  _, state2, _, _ = _setup()
  part = train.fit_stacked(step, state2, None, batches_fn, checkpoint_dir=str(tmp_path / "b"),
                           max_steps=5, **kw)
  assert int(np.asarray(part.state.step)[0]) == 5
  _, state3, _, _ = _setup()
  resumed = train.fit_stacked(step, state3, None, batches_fn,
                              checkpoint_dir=str(tmp_path / "b"), **kw)
  np.testing.assert_allclose(resumed.best_params["w"], full.best_params["w"], rtol=1e-6)
  np.testing.assert_allclose(resumed.state.params["w"], full.state.params["w"], rtol=1e-6)
  np.testing.assert_allclose(resumed.best_score, full.best_score, rtol=1e-6)


def test_non_finite_member_raises():
  step, state, _, _ = _setup()

  def batches_fn(start):
    for _ in range(start, 10):
      yield jnp.asarray([[1.0, 1.0, 1.0], [np.nan, 0.0, 0.0]], jnp.float32)

  with pytest.raises(train.NonFiniteLossError, match="non-finite"):
    train.fit_stacked(step, state, None, batches_fn, total_steps=3,
                      eval_fn=lambda p, f: {"accuracy": np.zeros(2)}, eval_every=0)
