"""Each SAM-family variant against its published update rule (quadratic, SGD base)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saft_jax import optim
import optim_testlib as tl

LR = 0.1


def _counted(gf):
  calls = []

  def fn(p):
    jax.debug.callback(lambda: calls.append(1))
    return gf(p)

  return fn, calls


def _recording(gf):
  """grad_fn that records (as NumPy) every point it is evaluated at."""
  seen = []

  def fn(p):
    jax.debug.callback(lambda q: seen.append(tl.flat(q)), p)
    return gf(p)

  return fn, seen


def _run(tx, params, a, b, steps, grad_fn=None):
  gf = tl.quad_grad_fn(a, b)
  gfn = gf if grad_fn is None else grad_fn
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(gf(p), s, p, grad_fn=gfn))
  xs, us = [], []
  for _ in range(steps):
    u, state = step(params, state)
    xs.append(tl.flat(params))
    us.append(tl.flat(u))
    params = optax.apply_updates(params, u)
  jax.effects_barrier()
  return xs, us, state, params


def _g(a, b, x):
  return tl.np_grad(a, b, x)


def test_friendly_sam_removes_gradient_ema():
  params, a, b = tl.quad_problem(5)
  rho, sigma, lam = 0.2, 0.8, 0.6
  xs, us, _, _ = _run(optim.friendly_sam(optax.sgd(LR), rho, sigma, lam), params, a, b, 4)
  m = None
  for x, u in zip(xs, us):
    g = _g(a, b, x)
    d = g if m is None else g - sigma * m
    m = g if m is None else lam * m + (1 - lam) * g
    e = rho * d / np.linalg.norm(d)
    np.testing.assert_allclose(u, -LR * _g(a, b, x + e), rtol=2e-5, atol=1e-6)


def test_gsam_subtracts_orthogonal_component():
  params, a, b = tl.quad_problem(6)
  rho, alpha = 0.3, 0.4
  xs, us, _, _ = _run(optim.gsam(optax.sgd(LR), rho, alpha), params, a, b, 3)
  for x, u in zip(xs, us):
    g = _g(a, b, x)
    gp = _g(a, b, x + rho * g / np.linalg.norm(g))
    g_orth = g - (g @ gp) / (gp @ gp) * gp
    np.testing.assert_allclose(u, -LR * (gp - alpha * g_orth), rtol=2e-5, atol=1e-6)


def test_sagm_matches_paper_rule():
  params, a, b = tl.quad_problem(7)
  rho, alpha = 0.3, 0.05
  xs, us, _, _ = _run(optim.sagm(optax.sgd(LR), rho, alpha), params, a, b, 3)
  for x, u in zip(xs, us):
    g = _g(a, b, x)
    gp = _g(a, b, x + rho * g / np.linalg.norm(g) - alpha * g)
    np.testing.assert_allclose(u, -LR * 0.5 * (g + gp), rtol=2e-5, atol=1e-6)


def test_pgn_interpolates_clean_and_sam_gradient():
  params, a, b = tl.quad_problem(8)
  rho, alpha = 0.3, 0.7
  xs, us, _, _ = _run(optim.pgn(optax.sgd(LR), rho, alpha), params, a, b, 3)
  for x, u in zip(xs, us):
    g = _g(a, b, x)
    gp = _g(a, b, x + rho * g / np.linalg.norm(g))
    np.testing.assert_allclose(u, -LR * ((1 - alpha) * g + alpha * gp),
                               rtol=2e-5, atol=1e-6)


def test_looksam_extra_gradient_every_k_and_reuse_rule():
  params, a, b = tl.quad_problem(9)
  rho, alpha, k = 0.3, 0.7, 3
  gf, calls = _counted(tl.quad_grad_fn(a, b))
  xs, us, _, _ = _run(optim.looksam(optax.sgd(LR), rho, k, alpha), params, a, b, 6,
                      grad_fn=gf)
  assert len(calls) == 2  # steps 0 and 3 only
  gv = None
  for t, (x, u) in enumerate(zip(xs, us)):
    g = _g(a, b, x)
    if t % k == 0:
      gs = _g(a, b, x + rho * g / np.linalg.norm(g))
      gv = gs - (g @ gs) / (g @ g) * g
    else:
      gs = g + alpha * np.linalg.norm(g) / np.linalg.norm(gv) * gv
    # g_v is a difference of nearly parallel float32 vectors: looser atol
    np.testing.assert_allclose(u, -LR * gs, rtol=2e-5, atol=3e-5)
    if t % k:
      assert np.abs(u + LR * g).max() > 1e-3  # the reuse term is not negligible


def test_sam_every_k_is_base_optimizer_on_off_steps():
  params, a, b = tl.quad_problem(10)
  rho, k = 0.3, 3
  gf, calls = _counted(tl.quad_grad_fn(a, b))
  xs, us, _, _ = _run(optim.sam_every_k(optax.sgd(LR), rho, k), params, a, b, 6,
                      grad_fn=gf)
  assert len(calls) == 2
  for t, (x, u) in enumerate(zip(xs, us)):
    g = _g(a, b, x)
    want = _g(a, b, x + rho * g / np.linalg.norm(g)) if t % k == 0 else g
    np.testing.assert_allclose(u, -LR * want, rtol=2e-5, atol=1e-6)


def test_msam_one_gradient_momentum_perturbation():
  params, a, b = tl.quad_problem(11)
  rho, beta = 0.2, 0.9
  gf, calls = _counted(tl.quad_grad_fn(a, b))
  tx = optim.msam(optax.sgd(LR), rho, beta)
  _, _, state, held = _run(tx, params, a, b, 4, grad_fn=gf)
  assert len(calls) == 0  # grad_fn is never called
  # reference in clean coordinates: θ_{t+1} = θ_t − lr ∇L(θ_t − ρ m_t/‖m_t‖)
  theta, m = tl.flat(params), np.zeros_like(tl.flat(params))
  for _ in range(4):
    e = -rho * m / np.linalg.norm(m) if np.any(m) else 0.0 * m
    gp = _g(a, b, theta + e)
    theta = theta - LR * gp
    m = beta * m + gp
  clean = tl.flat(optim.unperturbed_params(held, state))
  np.testing.assert_allclose(clean, theta, rtol=2e-5, atol=1e-5)
  # the held params carry the perturbation −ρ m/‖m‖
  np.testing.assert_allclose(tl.flat(held) - clean, -rho * m / np.linalg.norm(m),
                             rtol=1e-4, atol=1e-5)


def test_rwp_perturbation_is_random_and_gradient_free():
  params, a, b = tl.quad_problem(12)
  gamma, mix = 0.05, 0.5
  eps_runs = []
  for bb in (b, -3.0 * b):  # two different gradient fields, same key
    gf, seen = _recording(tl.quad_grad_fn(a, bb))
    xs, us, _, _ = _run(optim.rwp(optax.sgd(LR), gamma, mix, key=7), params, a, bb, 2,
                        grad_fn=gf)
    eps = [s - x for s, x in zip(seen, xs)]
    for x, e, u in zip(xs, eps, us):  # driving gradient: mix·g + (1−mix)·g(θ+ε)
      want = mix * _g(a, bb, x) + (1 - mix) * _g(a, bb, x + e)
      np.testing.assert_allclose(u, -LR * want, rtol=1e-4, atol=1e-5)
    eps_runs.append(eps)
  # the first step's ε does not depend on the gradient (same params, same key)
  np.testing.assert_allclose(eps_runs[0][0], eps_runs[1][0], rtol=1e-5, atol=1e-7)
  assert np.abs(eps_runs[0][0] - eps_runs[0][1]).max() > 0  # fresh noise per step


def test_rwp_noise_scale_is_filter_norm_times_gamma():
  params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (256, 4)) *
                      jnp.array([0.5, 1.0, 2.0, 4.0])}}
  gamma = 0.1
  seen = []

  def gf(p):
    jax.debug.callback(lambda q: seen.append(np.asarray(q)), p["dense"]["kernel"])
    return jax.tree.map(jnp.zeros_like, p)

  tx = optim.rwp(optax.sgd(LR), gamma, key=1)
  tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params, grad_fn=gf)
  jax.effects_barrier()
  w = np.asarray(params["dense"]["kernel"])
  z = (seen[0] - w) / (gamma * np.linalg.norm(w, axis=0, keepdims=True))
  assert abs(z.std() - 1.0) < 0.08 and abs(z.mean()) < 0.1
  np.testing.assert_allclose(z.std(axis=0), 1.0, atol=0.15)  # per filter


# SSAM-F / SSAM-D: see test_reference_parity.py (the authors' mask rules).


def test_swa_averages_selected_iterates():
  params, a, b = tl.quad_problem(14)
  tx = optax.chain(optax.clip_by_global_norm(100.0),
                   optim.swa(optax.sgd(LR), start_step=1, period=2))
  xs, us, state, final = _run(tx, params, a, b, 6)
  iterates = xs[1:] + [tl.flat(final)]  # θ_{t+1} for t = 0..5
  for x, u in zip(xs, us):
    np.testing.assert_allclose(u, -LR * _g(a, b, x), rtol=2e-5, atol=1e-6)
  want = np.mean([iterates[t] for t in (1, 3, 5)], axis=0)
  np.testing.assert_allclose(tl.flat(optim.averaged_params(state)), want, rtol=1e-5)


def test_wa_sam_is_sam_plus_average():
  params, a, b = tl.quad_problem(15)
  rho = 0.3
  xs, us, state, final = _run(optim.wa_sam(optax.sgd(LR), rho), params, a, b, 4)
  for x, u in zip(xs, us):
    g = _g(a, b, x)
    np.testing.assert_allclose(u, -LR * _g(a, b, x + rho * g / np.linalg.norm(g)),
                               rtol=2e-5, atol=1e-6)
  want = np.mean(xs[1:] + [tl.flat(final)], axis=0)
  np.testing.assert_allclose(tl.flat(optim.averaged_params(state)), want, rtol=1e-5)


def test_static_sharpness_step_matches_cond_schedule():
  """sharpness_step=(t % k == 0) as a static arg == the in-graph t mod k schedule."""
  params, a, b = tl.quad_problem(16)
  gf = tl.quad_grad_fn(a, b)
  for tx in (optim.looksam(optax.sgd(LR), 0.3, k=2), optim.sam_every_k(optax.sgd(LR), 0.3, k=2)):
    step = jax.jit(lambda p, s, flag, tx=tx: tx.update(gf(p), s, p, grad_fn=gf,
                                                       sharpness_step=flag),
                   static_argnums=2)
    p_static, s_static = params, tx.init(params)
    _, us, _, _ = _run(tx, params, a, b, 4)
    for t in range(4):
      u, s_static = step(p_static, s_static, t % 2 == 0)
      np.testing.assert_allclose(tl.flat(u), us[t], rtol=1e-6, atol=1e-7)
      p_static = optax.apply_updates(p_static, u)
  with pytest.raises(TypeError, match="sharpness_step"):
    jax.jit(lambda p, s, f: tx.update(gf(p), s, p, grad_fn=gf, sharpness_step=f))(
        params, tx.init(params), True)
