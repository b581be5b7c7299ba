"""bf16 parameters (with float32 task vectors) under strict dtype promotion."""
import jax
import jax.numpy as jnp
import numpy as np

from saft_jax import analysis


def test_bf16_params_work_and_keep_dtypes():
  rng = np.random.default_rng(0)
  theta0 = {"W": jnp.asarray(rng.normal(size=(5, 3)), jnp.bfloat16),
            "b": jnp.asarray(rng.normal(size=(3,)), jnp.bfloat16)}
  taus = [{"W": rng.normal(size=(5, 3)).astype(np.float32), "b": np.zeros(3, np.float32)}
          for _ in range(2)]
  x = jnp.asarray(rng.normal(size=(8, 5)), jnp.bfloat16)
  seen = []

  def apply(p, x):
    seen.append(p["W"].dtype)
    return jnp.tanh(x @ p["W"] + p["b"])

  res = analysis.disentanglement_error(apply, theta0, taus, [x, x], [0.0, 1.0], divergence="js")
  assert res.error[0, 0] == 0.0 and np.isfinite(res.divergence).all()
  assert all(d == jnp.bfloat16 for d in seen)  # merged params keep the bf16 leaf dtype
  f0, jv = analysis.linearized_outputs(apply, theta0, taus, x)
  assert f0.dtype == jnp.bfloat16 and jv.shape == (2, 8, 3)

  loss = lambda p: jnp.mean(apply(p, x).astype(jnp.float32) ** 2)
  lam, vec = analysis.top_hessian_eigenvalue(loss, theta0, num_iters=6, return_eigenvectors=True)
  assert np.isfinite(float(lam)) and vec["W"].dtype == jnp.bfloat16
  bar = analysis.loss_barrier(loss, theta0, jax.tree.map(lambda a, t: a + t.astype(a.dtype),
                                                         theta0, taus[0]), 3)
  assert np.isfinite(bar.barrier)
  ctl = analysis.cross_task_linearity(lambda p, x: {"h": apply(p, x)}, theta0, theta0, x)
  np.testing.assert_allclose(ctl.dis_cos, 0.0, atol=1e-2)
