"""Joint loss grid vs a loop, loss along a line of a quadratic vs the parabola, barriers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saft_jax import analysis


def _mlp(rng, scale=1.0):
  return {"W1": (scale * rng.normal(size=(4, 6))).astype(np.float32),
          "W2": (scale * rng.normal(size=(6, 3))).astype(np.float32)}


def ce_loss(p, batch):
  x, y = batch["x"], batch["y"]
  logits = jnp.tanh(x @ p["W1"]) @ p["W2"]
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def np_ce(p, x, y):
  logits = np.tanh(x.astype(np.float64) @ p["W1"]) @ p["W2"]
  lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return -np.mean(lp[np.arange(len(y)), y])


@pytest.mark.parametrize("all_task", [False, True])
def test_joint_grid_matches_loop(all_task):
  rng = np.random.default_rng(0)
  theta0 = _mlp(rng)
  taus = [_mlp(rng, 0.5) for _ in range(3)]
  data = [{"x": rng.normal(size=(n, 4)).astype(np.float32), "y": rng.integers(0, 3, n)}
          for n in (10, 7)]
  # Task 0 split in unequal batches (weighted mean), task 1 as a single batch.
  batches = [[{k: v[:6] for k, v in data[0].items()}, {k: v[6:] for k, v in data[0].items()}],
             data[1]]
  a1, a2 = np.array([-1.0, 0.0, 2.0], np.float32), np.array([0.5, 1.5], np.float32)
  kw = dict(fixed_task_vectors=[taus[2]], fixed_coefs=[0.7]) if all_task else {}
  res = analysis.joint_loss_grid([ce_loss, ce_loss], theta0, taus[:2], (a1, a2),
                                 batches=batches, chunk_size=4, **kw)
  assert res.joint.shape == (3, 2) and res.per_task.shape == (2, 3, 2)
  for i, b1 in enumerate(a1):
    for j, b2 in enumerate(a2):
      lam = 0.7 if all_task else 0.0
      p = {k: theta0[k].astype(np.float64) + b1 * taus[0][k] + b2 * taus[1][k] + lam * taus[2][k]
           for k in theta0}
      ref = [np_ce(p, d["x"], d["y"]) for d in data]
      np.testing.assert_allclose(res.per_task[:, i, j], ref, rtol=1e-5)
      assert res.joint[i, j] == pytest.approx(sum(ref), rel=1e-5)


def _quad(rng):
  # L(θ) = ½ θᵀAθ − bᵀθ on a two-leaf pytree, A symmetric indefinite.
  n = 7
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  spec = np.array([3.0, 1.0, 0.5, -0.2, -1.0, -2.0, -4.0])
  a = (q * spec) @ q.T
  a = 0.5 * (a + a.T)
  b = rng.normal(size=n)
  split = lambda v: {"u": v[:3].reshape(3, 1).astype(np.float32), "v": v[3:].astype(np.float32)}
  flat = lambda p: jnp.concatenate([p["u"].reshape(-1), p["v"]])
  aj, bj = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  loss = lambda p: 0.5 * flat(p) @ (aj @ flat(p)) - bj @ flat(p)
  np_loss = lambda v: 0.5 * v @ a @ v - b @ v
  return a, q, spec, split, loss, np_loss


def test_line_of_quadratic_is_the_parabola():
  rng = np.random.default_rng(1)
  a, q, spec, split, loss, np_loss = _quad(rng)
  va = rng.normal(size=7)
  vb = va + 2.0 * q[:, -1] + 0.3 * q[:, 0]   # d mostly along the most negative direction
  va = va.astype(np.float32).astype(np.float64)
  vb = vb.astype(np.float32).astype(np.float64)
  alphas = np.linspace(-0.5, 1.5, 9)
  got = analysis.loss_along_line(loss, split(va), split(vb), alphas)
  want = [np_loss((1 - t) * va + t * vb) for t in alphas]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  res = analysis.loss_barrier(loss, split(va), split(vb), num_points=11)
  d = vb - va
  dad = d @ a @ d
  assert dad < 0
  t = np.linspace(0, 1, 11)
  np.testing.assert_allclose(res.excess, -0.5 * t * (1 - t) * dad, atol=1e-4)
  assert res.barrier == pytest.approx(-dad / 8, rel=1e-4)
  assert res.barrier_alpha == pytest.approx(0.5)
  # JTL linearity: deviation −½ α(1−α) dᵀAd (d = θ1 − θ2), bounded via the Hessian's
  # largest-magnitude eigenvalue found by power iteration.
  jtl = analysis.jtl_linearity(loss, split(vb), split(va), alphas=[0.25, 0.5])
  np.testing.assert_allclose(jtl.excess, [-0.5 * 0.25 * 0.75 * dad, -dad / 8], rtol=1e-3)
  lam = float(analysis.top_hessian_eigenvalue(loss, split(va), method="power", num_iters=100))
  assert abs(lam) == pytest.approx(4.0, rel=1e-3)
  assert np.all(np.abs(jtl.excess) <= 0.5 * np.array([0.1875, 0.25]) * abs(lam) * (d @ d) + 1e-5)
  # Merged-to-task barriers: one per task model, α = 0 is the merged model.
  bars = analysis.merged_to_task_barriers(loss, split(va), [split(vb), split(va)], 5)
  assert len(bars) == 2 and bars[1].barrier == pytest.approx(0.0, abs=1e-5)
  assert bars[0].endpoint_losses[0] == pytest.approx(np_loss(va), rel=1e-4, abs=1e-4)


def test_bad_inputs():
  rng = np.random.default_rng(2)
  p, tau = _mlp(rng), _mlp(rng)
  loss = lambda q: jnp.sum(q["W1"])
  with pytest.raises(ValueError, match="task_vectors\\[1\\]"):
    analysis.joint_loss_grid(loss, p, [tau, {"W1": tau["W1"]}])
  with pytest.raises(ValueError, match="empty"):
    analysis.joint_loss_grid(loss, p, [tau, tau], [])
  with pytest.raises(ValueError, match="1-D"):
    analysis.loss_barrier(loss, p, tau, alphas=np.zeros((2, 2)))
  with pytest.raises(ValueError, match="num_points"):
    analysis.loss_barrier(loss, p, tau, num_points=1)
  with pytest.raises(ValueError, match="one entry per loss"):
    analysis.joint_loss_grid([loss, loss], p, [tau, tau], [0.0], batches=[{"x": np.ones(2)}])
