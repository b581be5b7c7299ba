"""Exact linearization (FTTS) and vectorized evaluation of linearized merges."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saft_jax import models as M

import hf_utils as H  # noqa: E402
from saft_jax.linearize import (combine_linear_outputs, linear_merge_apply, linear_merge_outputs,
                                linearize, linearized_apply)

CFG = M.VisionConfig(image_size=8, patch_size=4, width=16, layers=1, heads=2, output_dim=6,
                     in_channels=1, act="gelu")


def f(p, x):
  return M.encode_image(CFG, p, x)


@pytest.fixture(scope="module")
def setup():
  p0 = H.random_params(M.init_vision_params, CFG, seed=0)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 8, 8, 1)), jnp.float32)
  tvs = [H.random_like(p0, seed=s) for s in (2, 3, 4)]
  return p0, x, tvs


def test_zero_offset_is_f0(setup):
  p0, x, _ = setup
  zeros = jax.tree.map(jnp.zeros_like, p0)
  out = jax.jit(linearized_apply, static_argnums=0)(f, p0, zeros, x)
  # two compiled programs (jvp and plain): equal up to XLA's fusion choices (1 ulp)
  np.testing.assert_allclose(out, jax.jit(f)(p0, x), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(linearize(f, p0)(zeros, x), out)


def test_linear_model_is_its_own_linearization():
  lin_model = lambda p, x: x @ p["w"] + p["b"]
  p0 = {"w": jnp.arange(12.0).reshape(4, 3) / 7, "b": jnp.ones(3)}
  dp = {"w": jnp.full((4, 3), 0.3), "b": jnp.array([1.0, -2.0, 0.5])}
  x = jnp.arange(8.0).reshape(2, 4)
  p1 = jax.tree.map(jnp.add, p0, dp)
  np.testing.assert_allclose(jax.jit(linearized_apply, static_argnums=0)(lin_model, p0, dp, x),
                             lin_model(p1, x),
                             rtol=1e-6)


def test_directional_derivative_matches_finite_difference(setup):
  p0, x, tvs = setup
  jf = jax.jit(f)
  lin = jax.jit(linearized_apply, static_argnums=0)
  jtau = lin(f, p0, tvs[0], x) - jf(p0, x)
  eps = 1e-2
  plus = jf(jax.tree.map(lambda a, t: a + eps * t, p0, tvs[0]), x)
  minus = jf(jax.tree.map(lambda a, t: a - eps * t, p0, tvs[0]), x)
  fd = (plus - minus) / (2 * eps)  # central difference: O(eps^2) truncation
  np.testing.assert_allclose(jtau, fd, rtol=2e-2, atol=2e-3 * float(jnp.max(jnp.abs(fd))))


def test_gradient_is_jt_grad_loss(setup):
  p0, x, tvs = setup
  y = jnp.linspace(-1, 1, 30).reshape(5, 6)

  def loss(dp):
    return jnp.sum((linearized_apply(f, p0, dp, x) - y) ** 2)

  g = jax.jit(jax.grad(loss))(tvs[1])

  @jax.jit
  def reference(dp):
    out = linearized_apply(f, p0, dp, x)
    _, vjp = jax.vjp(lambda p: f(p, x), p0)
    return vjp(2 * (out - y))[0]

  ref = reference(tvs[1])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g, ref)


def test_vectorized_merge_equals_separate_evaluations(setup):
  p0, x, tvs = setup
  lams = jnp.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.3, 0.3, 0.3], [1.0, -0.5, 2.0]])
  f0, jt = jax.jit(linear_merge_outputs, static_argnums=0)(f, p0, tvs, x)
  outs = combine_linear_outputs(f0, jt, lams)
  assert outs.shape == (4, 5, 6)
  lin = jax.jit(linearized_apply, static_argnums=0)
  merge = jax.jit(lambda row: jax.tree.map(lambda *ts: sum(l * t for l, t in zip(row, ts)),
                                            *tvs))
  for row, out in zip(lams, outs):
    np.testing.assert_allclose(out, lin(f, p0, merge(row), x), rtol=1e-4, atol=1e-5)
  single = jax.jit(linear_merge_apply, static_argnums=0)(f, p0, tvs, lams[3], x)
  np.testing.assert_allclose(single, outs[3], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="coeffs"):
    combine_linear_outputs(f0, jt, jnp.ones((2, 2)))


def test_params0_is_an_argument_and_errors(setup):
  p0, x, tvs = setup
  lin = linearize(f, p0)
  lin(tvs[0], x)
  lin.params0 = jax.tree.map(lambda a: a * 2, p0)
  lin(tvs[0], x)
  assert lin.jitted._cache_size() == 1  # new θ0, same compiled function
  bad = jax.tree.map(lambda a: a.astype(jnp.bfloat16), tvs[0])
  with pytest.raises(TypeError, match=r"dparams\['blocks_0'\].*bfloat16"):
    linearized_apply(f, p0, bad, x)
  with pytest.raises(ValueError, match="structure"):
    linearized_apply(f, p0, {"w": 1.0}, x)
