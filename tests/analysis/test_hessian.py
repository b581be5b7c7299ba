"""Top Hessian eigenvalues: quadratic with known spectrum, dense-Hessian reference, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from saft_jax import analysis


def _quadratic(seed=0, spectrum=None):
  rng = np.random.default_rng(seed)
  params = {"a": rng.normal(size=(3, 4)).astype(np.float32),
            "b": rng.normal(size=(6,)).astype(np.float32)}
  n = 18
  if spectrum is None:
    spectrum = np.concatenate([[10.0, 5.0, 4.0], rng.uniform(0.1, 3.0, n - 3)])
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  a = (q * spectrum) @ q.T
  a = 0.5 * (a + a.T)
  aj = jnp.asarray(a, jnp.float32)

  def loss(p):
    v = ravel_pytree(p)[0]
    return 0.5 * v @ (aj @ v)

  return params, loss, a, q, np.asarray(spectrum)


def test_power_and_lanczos_recover_top_eigenvalue():
  params, loss, a, q, spec = _quadratic()
  lam_p, vec_p = analysis.top_hessian_eigenvalue(loss, params, method="power", num_iters=60,
                                                 return_eigenvectors=True)
  assert float(lam_p) == pytest.approx(10.0, rel=1e-4)
  v = ravel_pytree(vec_p)[0]
  top = q[:, np.argmax(spec)]
  assert abs(float(np.dot(np.asarray(v), top))) == pytest.approx(1.0, abs=1e-4)
  top3 = analysis.top_hessian_eigenvalue(loss, params, method="lanczos", num_iters=18, k=3)
  assert float(top3[0]) == pytest.approx(10.0, rel=1e-5)
  np.testing.assert_allclose(top3, [10.0, 5.0, 4.0], rtol=1e-4)
  top3p = analysis.top_hessian_eigenvalue(loss, params, method="power", num_iters=200, k=3)
  np.testing.assert_allclose(top3p, [10.0, 5.0, 4.0], rtol=1e-3)
  # Fewer Lanczos steps than the dimension still find a well-separated top eigenvalue.
  lam_short = analysis.top_hessian_eigenvalue(loss, params, num_iters=10,
                                              key=jax.random.PRNGKey(3))
  assert float(lam_short) == pytest.approx(10.0, rel=1e-3)


def test_lanczos_breakdown_and_more_iters_than_dim():
  # Spectrum with repeated eigenvalues: the Krylov space is invariant after 3 steps.
  spec = np.array([7.0] * 6 + [2.0] * 6 + [-1.0] * 6)
  params, loss, *_ = _quadratic(1, spec)
  vals = analysis.top_hessian_eigenvalue(loss, params, num_iters=40, k=2)
  assert np.all(np.isfinite(vals))
  np.testing.assert_allclose(vals, [7.0, 7.0], rtol=1e-4)


def test_mlp_matches_dense_hessian():
  rng = np.random.default_rng(4)
  params = {"w1": rng.normal(size=(3, 5)).astype(np.float32),
            "w2": rng.normal(size=(5, 2)).astype(np.float32)}
  x = rng.normal(size=(16, 3)).astype(np.float32)
  y = rng.integers(0, 2, 16)

  def loss(p):
    logits = jnp.tanh(x @ p["w1"]) @ p["w2"]
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(16), y])

  flat, unravel = ravel_pytree(params)
  dense = np.asarray(jax.hessian(lambda f: loss(unravel(f)))(flat), np.float64)
  ref = np.linalg.eigvalsh(0.5 * (dense + dense.T))[::-1]
  vals = analysis.top_hessian_eigenvalue(loss, params, num_iters=20, k=2)
  np.testing.assert_allclose(vals, ref[:2], rtol=2e-3, atol=1e-5)


def test_hvp_matches_dense():
  params, loss, a, *_ = _quadratic()
  v = jax.tree.map(jnp.ones_like, params)
  out = ravel_pytree(analysis.hvp(loss, params, v))[0]
  np.testing.assert_allclose(out, a.sum(1), rtol=1e-4, atol=1e-4)


def test_bad_input():
  params, loss, *_ = _quadratic()
  with pytest.raises(ValueError, match="method"):
    analysis.top_hessian_eigenvalue(loss, params, method="arnoldi")
  with pytest.raises(ValueError, match="Krylov"):
    analysis.top_hessian_eigenvalue(loss, params, num_iters=4, k=5)
  with pytest.raises(TypeError, match=r"\['step'\]"):
    analysis.top_hessian_eigenvalue(loss, {**params, "step": np.int32(1)})
