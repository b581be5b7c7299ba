"""Vectorized merge evaluation equals a plain loop over λ."""
import jax
import jax.numpy as jnp
import numpy as np

from saft_jax.experiment import evaluate


def _features(p, x):
  return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def _setup():
  k = jax.random.split(jax.random.key(0), 6)
  p0 = {"w1": jax.random.normal(k[0], (5, 7)), "b1": jax.random.normal(k[1], (7,)),
        "w2": jax.random.normal(k[2], (7, 4))}
  d = jax.tree.map(lambda a: 0.5 * jax.random.normal(k[3], a.shape), p0)
  head = jax.random.normal(k[4], (4, 3))
  x = jax.random.normal(k[5], (16, 5))
  y = jnp.asarray(np.arange(16) % 3, jnp.int32)
  mask = jnp.asarray(np.arange(16) < 13)
  return p0, d, head, x, y, mask


def _acc_loop(logits_fn, y, mask):
  pred = np.asarray(jnp.argmax(logits_fn(), -1))
  m = np.asarray(mask)
  return np.sum((pred == np.asarray(y)) & m) / m.sum()


def test_grid_counter_equals_loop():
  p0, d, head, x, y, mask = _setup()
  lams = [0.0, 0.3, 1.0, 1.7]
  got = evaluate.grid_accuracy(evaluate.make_grid_counter(_features, chunk=2),
                               p0, d, lams, head, [(x, y, mask)])
  for lam, g in zip(lams, got):
    p = jax.tree.map(lambda a, b: a + lam * b, p0, d)
    feats = _features(p, x)
    feats = feats / jnp.linalg.norm(feats, axis=-1, keepdims=True)
    assert g == _acc_loop(lambda: feats @ head, y, mask)


def test_linear_counter_equals_explicit_linearization():
  p0, d, head, x, y, mask = _setup()
  lams = [0.0, 0.5, 2.0]
  got = evaluate.grid_accuracy(evaluate.make_linear_grid_counter(_features),
                               p0, d, lams, head, [(x, y, mask), (x, y, mask)])
  # explicit Jacobian-vector product by finite differences of the linear model
  jac = jax.jacfwd(lambda p: _features(p, x))(p0)
  jd = sum(jnp.tensordot(jac[n], d[n], axes=d[n].ndim) for n in d)
  for lam, g in zip(lams, got):
    feats = _features(p0, x) + lam * jd
    feats = feats / jnp.linalg.norm(feats, axis=-1, keepdims=True)
    assert g == _acc_loop(lambda: feats @ head, y, mask)


def test_empty_split_is_an_error():
  p0, d, head, *_ = _setup()
  import pytest
  with pytest.raises(ValueError, match="empty"):
    evaluate.grid_accuracy(evaluate.make_grid_counter(_features), p0, d, [0.1], head, [])


def test_suite_eval_heads_share_one_program_and_keep_accuracy():
  """``task_accuracy`` pads every head to the suite's largest class count: tasks with 10, 3
  and 2 classes share one compiled counter, with the accuracy of their unpadded heads."""
  import dataclasses

  from saft_jax import data
  from saft_jax import models
  from saft_jax.experiment import runner, suites
  tasks = data.offline_suite(("digits", "mod3", "parity"))
  vision = dataclasses.replace(suites.OFFLINE_VISION, layers=1, width=16, heads=2,
                               output_dim=8)
  params0 = models.init_vision_params(vision, jax.random.key(0))
  rng = np.random.default_rng(0)
  heads = {n: jnp.asarray(rng.normal(size=(vision.output_dim, t.num_classes)), jnp.float32)
           for n, t in tasks.items()}
  suite = suites.Suite("offline", tasks, params0, heads, vision)
  direction = jax.tree.map(lambda p: 0.3 * jnp.ones_like(p), params0)
  counter = evaluate.make_grid_counter(suite.features_fn())
  lams = [0.0, 0.5, 1.0]
  for name in tasks:
    got = runner.task_accuracy(counter, suite, direction, lams, name, "val", 64)
    want = evaluate.grid_accuracy(evaluate.make_grid_counter(suite.features_fn()), params0,
                                  direction, lams, heads[name],
                                  data.eval_batches(tasks[name], "val", 64))
    np.testing.assert_array_equal(got, want)
    assert suite.eval_heads[name]["w"].shape == (vision.output_dim, 10)
  assert counter._cache_size() == 1  # one compilation for the three class counts
