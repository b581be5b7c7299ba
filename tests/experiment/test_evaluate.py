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
