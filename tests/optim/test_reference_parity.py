"""Parity with the authors' reference implementations (SSAM-F/D, PGN, SAGM, ASAM).

Every expected value is computed here in NumPy from the reference's rule, as
its PyTorch / JAX code writes it (file and function named in each test); no
saft_jax function is used for an expected value.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saft_jax import optim
import optim_testlib as tl

LR = 0.1


# ----------------------------------------------------------------------------- helpers


def _quad(shapes, seed):
  """params (float32 tree of the given shapes), SPD A, b (float64)."""
  rng = np.random.default_rng(seed)
  leaves = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
  n = sum(int(np.prod(s)) for s in leaves)
  m = rng.normal(size=(n, n))
  a = m @ m.T / n + np.eye(n)
  b = rng.normal(size=n)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))
  return params, a, b


def _run(tx, params, gf, steps, record=True, **update_kw):
  """Runs jit(update) steps; returns per step (x_t, update, ε seen by grad_fn, state)."""
  seen = []

  def rec_gf(p):
    jax.debug.callback(lambda q: seen.append(tl.flat(q)), p)
    return gf(p)

  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(gf(p), s, p, grad_fn=rec_gf if record else gf,
                                        **update_kw))
  out = []
  for _ in range(steps):
    x = tl.flat(params)
    u, state = step(params, state)
    jax.effects_barrier()
    out.append((x, tl.flat(u), seen[-1] - x if record else None, state))
    params = optax.apply_updates(params, u)
  return out, state


def _np_topk(scores, k):
  """torch.topk(scores, k) as a bool mask (scores have no ties here)."""
  m = np.zeros(scores.size, bool)
  m[np.argsort(-scores, kind="stable")[:k]] = True
  return m


def _mask_vec(state):
  return tl.flat(state.perturb_state.mask) > 0


# ----------------------------------------------------------------------------- SSAM-F
# Reference: Mi-Peng/Sparse-Sharpness-Aware-Minimization, solver/sam.py, class SSAMF.
#   first_step:  scale = rho / (grad_norm + 1e-7); e_w = p.grad * scale * mask
#   step:        super().step(...)  then, on refresh, update_mask(...)   (after the step)
#   update_mask: fisher = sum_i grad_i**2; keep_num = int(n * (1 - sparsity)); topk
#   init_mask:   zeros


def _np_ssam_f(a, b, x, rho, sparsity, freq, steps, normalize, fisher_of):
  n = x.size
  k = int(n * (1 - sparsity))
  mask = np.zeros(n, bool)
  out = []
  for t in range(steps):
    g = tl.np_grad(a, b, x)
    if normalize == "full":
      e = rho * g / (np.linalg.norm(g) + 1e-12) * mask
    else:
      gm = g * mask
      e = rho * gm / (np.linalg.norm(gm) + 1e-12)
    u = -LR * tl.np_grad(a, b, x + e)
    out.append((e, u, mask.copy()))
    if t % freq == 0:
      mask = _np_topk(fisher_of(x, g), k)
    x = x + u
  return out


@pytest.mark.parametrize("normalize", ["full", "masked"])
def test_ssam_f_matches_reference_rule_and_refresh_order(normalize):
  params, a, b = _quad({"dense": {"kernel": (4, 3), "bias": (3,)}, "ln": {"scale": (3,)}},
                       seed=21)
  rho, sparsity, freq = 0.4, 0.5, 2
  tx = optim.ssam_f(optax.sgd(LR), rho, sparsity, update_freq=freq, normalize=normalize)
  got, _ = _run(tx, params, tl.quad_grad_fn(a, b), 6)
  want = _np_ssam_f(a, b, tl.flat(params), rho, sparsity, freq, 6, normalize,
                    lambda x, g: g * g)
  for t, ((_, u, e, st), (e_ref, u_ref, _)) in enumerate(zip(got, want)):
    np.testing.assert_allclose(e, e_ref, rtol=1e-4, atol=1e-6, err_msg=f"step {t}")
    np.testing.assert_allclose(u, u_ref, rtol=2e-5, atol=1e-6, err_msg=f"step {t}")
  assert np.all(got[0][2] == 0)  # empty initial mask: step 0 is a plain step
  norms = [np.linalg.norm(e) for _, _, e, _ in got[1:]]
  if normalize == "full":  # the released code: ‖ε‖ = ρ ‖g⊙m‖/‖g‖ < ρ
    assert max(norms) < 0.97 * rho
  else:  # the paper's sparse maximization: ‖ε‖ = ρ
    np.testing.assert_allclose(norms, rho, rtol=1e-5)


def test_ssam_f_mask_is_refreshed_after_the_step():
  """Step 1's perturbation lives on top-k(g_0²), not on top-k(g_1²)."""
  params, a, b = _quad({"dense": {"kernel": (4, 3), "bias": (3,)}}, seed=22)
  rho, sparsity = 0.3, 0.5
  tx = optim.ssam_f(optax.sgd(LR), rho, sparsity, update_freq=1)
  got, _ = _run(tx, params, tl.quad_grad_fn(a, b), 2)
  k = int(15 * (1 - sparsity))
  g0 = tl.np_grad(a, b, got[0][0])
  g1 = tl.np_grad(a, b, got[1][0])
  after, before = _np_topk(g0 * g0, k), _np_topk(g1 * g1, k)
  assert not np.array_equal(after, before)  # the order is observable here
  support = np.abs(got[1][2]) > 0
  np.testing.assert_array_equal(support, after)
  np.testing.assert_array_equal(_mask_vec(got[0][3]), after)  # state: next step's mask


def _linear_problem(seed=23):
  """Least squares on a dense layer: per-example gradients in closed form."""
  rng = np.random.default_rng(seed)
  xs = rng.normal(size=(6, 3)) * np.array([3.0, 0.3, 1.0])
  ys = rng.normal(size=(6, 2))
  params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}}
  return params, xs, ys


def _np_per_example_grads(x, xs, ys):
  """Flat per-example gradients [B, n] of 0.5‖x_i W + b − y_i‖² (leaf order: bias, kernel)."""
  w, bias = x[2:].reshape(3, 2), x[:2]
  r = xs @ w + bias - ys  # [B, 2]
  dk = xs[:, :, None] * r[:, None, :]  # [B, 3, 2]
  return np.concatenate([r, dk.reshape(len(xs), -1)], axis=1)


def test_ssam_f_per_example_fisher_matches_reference_estimator():
  params, xs, ys = _linear_problem()
  rho, sparsity = 0.2, 0.5
  xs32, ys32 = jnp.asarray(xs, jnp.float32), jnp.asarray(ys, jnp.float32)

  def ex_loss(p, x, y):
    r = x @ p["dense"]["kernel"] + p["dense"]["bias"] - y
    return 0.5 * jnp.sum(r * r)

  gf = jax.grad(lambda p: jnp.mean(jax.vmap(ex_loss, (None, 0, 0))(p, xs32, ys32)))
  pe = lambda p: jax.vmap(jax.grad(ex_loss), (None, 0, 0))(p, xs32, ys32)  # noqa: E731
  n, k = 8, int(8 * (1 - sparsity))

  def np_grad(x):
    return _np_per_example_grads(x, xs, ys).mean(0)

  # NumPy reference (SSAMF.update_mask: Σ_i grad_i²), refresh after every step
  def simulate(fisher_of, steps):
    x, mask, out = tl.flat(params), np.zeros(n, bool), []
    for _ in range(steps):
      g = np_grad(x)
      e = rho * g / np.linalg.norm(g) * mask
      u = -LR * np_grad(x + e)
      out.append(u)
      mask = _np_topk(fisher_of(x, g), k)
      x = x + u
    return out

  per_ex = lambda x, g: (_np_per_example_grads(x, xs, ys) ** 2).sum(0)  # noqa: E731
  batch = lambda x, g: g * g  # noqa: E731
  x0 = tl.flat(params)
  g0 = np_grad(x0)
  assert not np.array_equal(_np_topk(per_ex(x0, g0), k), _np_topk(batch(x0, g0), k))

  tx = optim.ssam_f(optax.sgd(LR), rho, sparsity, update_freq=1, fisher="per_example")
  got, _ = _run(tx, params, gf, 3, record=False, per_example_grad_fn=pe)
  for t, ((_, u, _, _), u_ref) in enumerate(zip(got, simulate(per_ex, 3))):
    np.testing.assert_allclose(u, u_ref, rtol=2e-5, atol=1e-6, err_msg=f"step {t}")
  np.testing.assert_array_equal(_mask_vec(got[0][3]), _np_topk(per_ex(x0, g0), k))

  tx_b = optim.ssam_f(optax.sgd(LR), rho, sparsity, update_freq=1)  # batch Fisher
  got_b, _ = _run(tx_b, params, gf, 3, record=False)
  for t, ((_, u, _, _), u_ref) in enumerate(zip(got_b, simulate(batch, 3))):
    np.testing.assert_allclose(u, u_ref, rtol=2e-5, atol=1e-6, err_msg=f"step {t}")
  assert np.abs(got[1][1] - got_b[1][1]).max() > 1e-4  # the two estimators differ


def test_ssam_f_per_example_argument_errors():
  params, xs, ys = _linear_problem()
  gf = jax.grad(lambda p: jnp.sum(p["dense"]["kernel"] ** 2))
  tx = optim.ssam_f(optax.sgd(LR), fisher="per_example")
  with pytest.raises(ValueError, match="per_example_grad_fn"):
    tx.update(gf(params), tx.init(params), params, grad_fn=gf)
  bad = lambda p: jax.tree.map(lambda x: x, p)  # no example axis  # noqa: E731
  with pytest.raises(ValueError, match="per_example_grad_fn returned shape"):
    tx.update(gf(params), tx.init(params), params, grad_fn=gf, per_example_grad_fn=bad)
  tx_b = optim.ssam_f(optax.sgd(LR))
  with pytest.raises(ValueError, match="fisher='batch'"):
    tx_b.update(gf(params), tx_b.init(params), params, grad_fn=gf,
                per_example_grad_fn=lambda p: p)
  with pytest.raises(ValueError, match="normalize"):
    optim.ssam_f(optax.sgd(LR), normalize="sparse")
  with pytest.raises(ValueError, match="fisher"):
    optim.ssam_f(optax.sgd(LR), fisher="exact")
  with pytest.raises(ValueError, match="strategy"):
    optim.ssam_d(optax.sgd(LR), growth_strategy="momentum")


def test_ssam_f_reference_rounding_of_the_kept_count():
  # n = 15, sparsity 0.3: int(15 * 0.7) = int(10.5) = 10 (round() would give 10 or 11)
  params, a, b = _quad({"w": {"kernel": (5, 3)}}, seed=24)
  tx = optim.ssam_f(optax.sgd(LR), 0.1, sparsity=0.3, update_freq=1)
  got, _ = _run(tx, params, tl.quad_grad_fn(a, b), 1, record=False)
  assert _mask_vec(got[0][3]).sum() == int(15 * (1 - 0.3)) == 10
  tx = optim.ssam_f(optax.sgd(LR), 0.1, sparsity=0.97, update_freq=1)  # int(0.45) = 0
  got, _ = _run(tx, params, tl.quad_grad_fn(a, b), 2)
  assert _mask_vec(got[0][3]).sum() == 0 and np.all(got[1][2] == 0)


# ----------------------------------------------------------------------------- SSAM-D
# Reference: solver/sam.py, class SSAMD.
#   init_mask:  live_num = n - ceil(n * sparsity), uniformly random
#   DeathRate_Scheduler: drop_rate * (1 + cos(pi * (epoch - T_start) / (T_end - T_start))) / 2
#   update_mask: kept  = int((n - n*s) * (1 - dr))  (topk of (score + 1e-7) * mask)
#                grown = int(min((n - n*s) * dr, n*s))  (topk of (score + 1e-7) * (1 - mask))
#   step: first_step() (perturb with the current mask) -> update_mask -> closure -> second_step


def _np_dr(drop, t, total):
  return drop * (1 + math.cos(math.pi * (float(t - 0) / (total - 0)))) / 2


def test_ssam_d_cosine_drop_rate_values():
  # the reference formula at a few steps (T = 20): 0.5, 0.25 at T/2, 0 at T
  assert _np_dr(0.5, 0, 20) == 0.5
  assert abs(_np_dr(0.5, 10, 20) - 0.25) < 1e-15
  assert abs(_np_dr(0.5, 20, 20)) < 1e-15
  # the counts it implies for n = 60, sparsity 0.5 (L = 30) at t = 0, 2, 4, 6, 8
  kept = [int(30 * (1 - _np_dr(0.5, t, 20))) for t in (0, 2, 4, 6, 8)]
  grown = [int(min(30 * _np_dr(0.5, t, 20), 30.0)) for t in (0, 2, 4, 6, 8)]
  assert kept == [15, 15, 16, 18, 20] and grown == [15, 14, 13, 11, 9]


@pytest.mark.parametrize("strategies", [("gradient", "gradient"), ("weight", "gradient")])
def test_ssam_d_matches_reference_mask_updates(strategies):
  """Deterministic scores: the whole mask sequence and every update match."""
  drop_s, grow_s = strategies
  shapes = {"dense": {"kernel": (8, 6), "bias": (6,)}, "ln": {"scale": (6,)}}
  params, a, b = _quad(shapes, seed=25)
  n, s, rho, freq, total, drop = 60, 0.5, 0.3, 2, 20, 0.5
  tx = optim.ssam_d(optax.sgd(LR), rho, s, update_freq=freq, drop_rate=drop,
                    total_steps=total, drop_strategy=drop_s, growth_strategy=grow_s, key=5)
  mask = _mask_vec(tx.init(params))
  assert mask.sum() == n - math.ceil(n * s)
  got, _ = _run(tx, params, tl.quad_grad_fn(a, b), 9)
  x = tl.flat(params)
  drops = []
  for t, (xt, u, e, st) in enumerate(got):
    np.testing.assert_allclose(xt, x, rtol=1e-5, atol=1e-6)
    g = tl.np_grad(a, b, x)
    e_ref = rho * g / np.linalg.norm(g) * mask
    np.testing.assert_allclose(e, e_ref, rtol=1e-4, atol=1e-6, err_msg=f"step {t}")
    u_ref = -LR * tl.np_grad(a, b, x + e_ref)
    np.testing.assert_allclose(u, u_ref, rtol=2e-5, atol=1e-6, err_msg=f"step {t}")
    if t % freq == 0:
      dr = _np_dr(drop, t, total)
      kept = int((n - n * s) * (1 - dr))
      grown = int(min((n - n * s) * dr, n * s))
      assert kept <= mask.sum()  # not the reference's degenerate case
      death = np.abs(x + e_ref) if drop_s == "weight" else np.abs(g)
      keep = _np_topk((death + 1e-7) * mask, kept)
      grow = _np_topk((np.abs(g) + 1e-7) * (~mask), grown)
      drops.append(int(mask.sum()) - kept)
      mask = keep | grow
    np.testing.assert_array_equal(_mask_vec(st), mask, err_msg=f"mask after step {t}")
    x = x + u_ref
  assert drops == [15, 15, 13, 11, 9]  # cosine-decayed; a constant rate drops 15 each time


def test_ssam_d_constant_rate_without_total_steps_and_random_growth():
  shapes = {"dense": {"kernel": (8, 6), "bias": (6,)}, "ln": {"scale": (6,)}}
  params, a, b = _quad(shapes, seed=26)
  n, s = 60, 0.3
  tx = optim.ssam_d(optax.sgd(LR), 0.2, s, update_freq=3, drop_rate=0.4, key=1)
  mask = _mask_vec(tx.init(params))
  assert mask.sum() == n - math.ceil(n * s) == 42
  got, _ = _run(tx, params, tl.quad_grad_fn(a, b), 4, record=False)
  for t, (x, _, _, st) in enumerate(got):
    new = _mask_vec(st)
    if t % 3:
      np.testing.assert_array_equal(new, mask)
      continue
    g = np.abs(tl.np_grad(a, b, x))
    kept, grown = int((n - n * s) * 0.6), int(min((n - n * s) * 0.4, n * s))
    assert (kept, grown) == (25, 16)
    assert (new & mask).sum() == kept and (new & ~mask).sum() == grown
    assert g[mask & ~new].max() <= g[mask & new].min()  # dropped: smallest |g|
    mask = new


def test_ssam_d_mask_is_refreshed_after_the_step():
  """Step 0 perturbs on the initial mask; the refreshed mask is used from step 1."""
  params, a, b = _quad({"dense": {"kernel": (6, 5)}}, seed=27)
  tx = optim.ssam_d(optax.sgd(LR), 0.3, 0.5, update_freq=2, drop_rate=0.5, key=3)
  init = _mask_vec(tx.init(params))
  got, _ = _run(tx, params, tl.quad_grad_fn(a, b), 2)
  np.testing.assert_array_equal(np.abs(got[0][2]) > 0, init)
  after0 = _mask_vec(got[0][3])
  assert not np.array_equal(after0, init)  # refreshed at step 0 ...
  np.testing.assert_array_equal(np.abs(got[1][2]) > 0, after0)  # ... used at step 1


def test_ssam_d_full_and_masked_normalization():
  params, a, b = _quad({"dense": {"kernel": (6, 5)}}, seed=28)
  rho = 0.3
  for normalize in ("full", "masked"):
    tx = optim.ssam_d(optax.sgd(LR), rho, 0.5, update_freq=2, normalize=normalize, key=3)
    mask = _mask_vec(tx.init(params))
    got, _ = _run(tx, params, tl.quad_grad_fn(a, b), 1)
    x, _, e, _ = got[0]
    g = tl.np_grad(a, b, x)
    gm = g * mask
    want = (rho * gm / np.linalg.norm(g) if normalize == "full"
            else rho * gm / np.linalg.norm(gm))
    np.testing.assert_allclose(e, want, rtol=1e-4, atol=1e-6)
  assert np.linalg.norm(rho * gm / np.linalg.norm(g)) < 0.9 * rho


# ----------------------------------------------------------------------------- PGN
# Reference: zhaoyang-0204/gnp, training/training_core.py, get_gnp_gradient:
#   norm_perturbations=True (config default): g = (1-α) * grad/‖grad‖ + α * grad_noised


def test_pgn_normalized_clean_gradient_option():
  params, a, b = tl.quad_problem(8)
  rho, alpha = 0.3, 0.7
  tx = optim.pgn(optax.sgd(LR), rho, alpha, clean_gradient="normalized")
  got, _ = _run(tx, params, tl.quad_grad_fn(a, b), 3, record=False)
  for x, u, _, _ in got:
    g = tl.np_grad(a, b, x)
    dual = g / np.linalg.norm(g)
    want = (1 - alpha) * dual + alpha * tl.np_grad(a, b, x + rho * dual)
    np.testing.assert_allclose(u, -LR * want, rtol=2e-5, atol=1e-6)
    raw = (1 - alpha) * g + alpha * tl.np_grad(a, b, x + rho * dual)
    assert np.abs(raw - want).max() > 1e-2  # differs from the default (paper) rule
  with pytest.raises(ValueError, match="clean_gradient"):
    optim.pgn(optax.sgd(LR), clean_gradient="unit")


# ----------------------------------------------------------------------------- SAGM
# Reference: Wang-pengfei/SAGM, domainbed/sagm/sagm.py:
#   perturb_weights:    scale = rho / (grad_norm + 1e-12) - alpha; e_w = p.grad * scale
#   gradient_decompose: p.grad = 0.5 * old_g + 0.5 * g_p


def test_sagm_matches_reference_code_scale():
  params, a, b = tl.quad_problem(7)
  rho, alpha = 0.3, 0.2
  got, _ = _run(optim.sagm(optax.sgd(LR), rho, alpha), params, tl.quad_grad_fn(a, b), 3)
  for x, u, e, _ in got:
    g = tl.np_grad(a, b, x)
    scale = rho / (np.linalg.norm(g) + 1e-12) - alpha
    np.testing.assert_allclose(e, g * scale, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(u, -LR * (0.5 * g + 0.5 * tl.np_grad(a, b, x + g * scale)),
                               rtol=2e-5, atol=1e-6)
    misread = rho / (np.linalg.norm(g) - alpha)  # ρ/(‖g‖ − α): not the reference
    assert abs(misread - scale) > 1e-2


# ----------------------------------------------------------------------------- ASAM
# Reference: SamsungLabs/ASAM, asam.py, ASAM.ascent_step:
#   T = |w| + eta if 'weight' in name else 1;  eps = rho * T² g / (‖T g‖ + 1e-16)

# a CLIP-like tree and the PyTorch (open_clip) name of each leaf
CLIP_SHAPES = {
    "class_embedding": (3,),
    "positional_embedding": (2, 3),
    "conv1": {"kernel": (2, 3)},
    "ln_pre": {"scale": (3,), "bias": (3,)},
    "blocks_0": {"attn": {"q": {"kernel": (3, 3), "bias": (3,)}},
                 "mlp": {"proj": {"kernel": (2, 3), "bias": (3,)}}},
    "proj": {"kernel": (3, 2)},
}
TORCH_NAMES = {
    "class_embedding": "visual.class_embedding",
    "positional_embedding": "visual.positional_embedding",
    "conv1/kernel": "visual.conv1.weight",
    "ln_pre/scale": "visual.ln_pre.weight",
    "ln_pre/bias": "visual.ln_pre.bias",
    "blocks_0/attn/q/kernel": "visual.transformer.resblocks.0.attn.in_proj_weight",
    "blocks_0/attn/q/bias": "visual.transformer.resblocks.0.attn.in_proj_bias",
    "blocks_0/mlp/proj/kernel": "visual.transformer.resblocks.0.mlp.c_proj.weight",
    "blocks_0/mlp/proj/bias": "visual.transformer.resblocks.0.mlp.c_proj.bias",
    "proj/kernel": "visual.proj",
}


def _slash(path):
  return "/".join(tl.optim_leaf((k,)) for k in path)


def test_reference_weight_predicate_is_weight_in_torch_name():
  params, _, _ = _quad(CLIP_SHAPES, seed=29)
  for path, _ in jax.tree_util.tree_leaves_with_path(params):
    want = "weight" in TORCH_NAMES[_slash(path)]
    assert optim.reference_weight_predicate(path) == want, _slash(path)
  # the default rule differs on the embeddings and the output projection
  differ = {_slash(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)
            if optim.default_weight_predicate(p) != optim.reference_weight_predicate(p)}
  assert differ == {"class_embedding", "positional_embedding", "proj/kernel"}


def test_asam_reference_predicate_closed_form():
  params, a, b = _quad(CLIP_SHAPES, seed=30)
  rho, eta = 0.5, 0.05
  w = np.concatenate([np.full(x.size, "weight" in TORCH_NAMES[_slash(p)], float)
                      for p, x in jax.tree_util.tree_leaves_with_path(params)])
  tx = optim.asam(optax.sgd(LR), rho, eta, weight_predicate="reference")
  got, _ = _run(tx, params, tl.quad_grad_fn(a, b), 2)
  for x, u, e, _ in got:
    g = tl.np_grad(a, b, x)
    t = np.where(w > 0, np.abs(x) + eta, 1.0)
    e_ref = rho * t * t * g / (np.linalg.norm(t * g) + 1e-16)
    np.testing.assert_allclose(e, e_ref, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(u, -LR * tl.np_grad(a, b, x + e_ref), rtol=2e-5, atol=1e-6)
    t_def = np.where(w + np.isin(np.arange(x.size), _default_only(params)) > 0,
                     np.abs(x) + eta, 1.0)
    e_def = rho * t_def ** 2 * g / np.linalg.norm(t_def * g)
    assert np.abs(e_def - e_ref).max() > 1e-3  # the default rule gives another ε
  with pytest.raises(TypeError, match="weight_predicate"):
    optim.asam(optax.sgd(LR), weight_predicate="torch")


def _default_only(params):
  """Flat indices of the leaves the default rule scales and the reference does not."""
  idx, i = [], 0
  for p, x in jax.tree_util.tree_leaves_with_path(params):
    if _slash(p) in ("class_embedding", "positional_embedding", "proj/kernel"):
      idx.extend(range(i, i + x.size))
    i += x.size
  return np.asarray(idx)


# ----------------------------------------------------------------------------- options
# The new options keep the contract: NamedTuple states of fixed structure, jit,
# lax.scan, 16-bit params, inject_hyperparams (static args), optax.masked.

def _ex_loss(p, x, y):
  return tl.mlp_loss(p, {"x": x[None], "y": y[None]})


OPTION_CASES = [
    ("ssam_f", {"normalize": "masked"}, False),
    ("ssam_f", {"fisher": "per_example"}, True),
    ("ssam_d", {"total_steps": 5, "normalize": "masked"}, False),
    ("ssam_d", {"total_steps": 5, "drop_strategy": "random", "growth_strategy": "weight"},
     False),
    ("pgn", {"clean_gradient": "normalized"}, False),
    ("asam", {"weight_predicate": "reference"}, False),
]


@pytest.mark.parametrize("name,kw,per_example", OPTION_CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_new_options_keep_the_contract(name, kw, per_example, dtype):
  params, batch = tl.mlp_params(dtype), tl.mlp_batch()
  gf = jax.grad(lambda p: tl.mlp_loss(p, batch))
  extra = {}
  if per_example:
    extra["per_example_grad_fn"] = lambda p: jax.vmap(
        jax.grad(_ex_loss), (None, 0, 0))(p, batch["x"], batch["y"])
  tx = tl.make(name, **kw)

  @jax.jit
  def run(p):
    def body(carry, _):
      q, s = carry
      u, s = tx.update(gf(q), s, q, grad_fn=gf, **extra)
      return (optax.apply_updates(q, u), s), u
    return jax.lax.scan(body, (p, tx.init(p)), None, length=4)

  (new_p, state), us = run(params)
  s0 = tx.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(s0)
  assert [(x.shape, x.dtype) for x in jax.tree.leaves(state)] == \
      [(x.shape, x.dtype) for x in jax.tree.leaves(s0)]
  assert isinstance(state, tuple) and hasattr(state, "_fields")
  assert isinstance(state.perturb_state, tuple)
  for u, p in zip(jax.tree.leaves(us), jax.tree.leaves(params)):
    assert u.dtype == p.dtype and np.all(np.isfinite(np.asarray(u, np.float32)))
  assert max(float(jnp.max(jnp.abs((a - b).astype(jnp.float32))))
             for a, b in zip(jax.tree.leaves(new_p), jax.tree.leaves(params))) > 0


def test_ssam_d_cosine_under_inject_hyperparams():
  params, batch = tl.mlp_params(), tl.mlp_batch()
  gf = jax.grad(lambda p: tl.mlp_loss(p, batch))
  kw = {"update_freq": 2, "total_steps": 6}
  factory = optax.inject_hyperparams(
      optim.ssam_d, static_args=("update_freq", "sparsity", "drop_rate", "key",
                                 "total_steps"))
  inj, direct = factory(optax.sgd(LR), **kw), optim.ssam_d(optax.sgd(LR), **kw)
  p1, s1, p2, s2 = params, inj.init(params), params, direct.init(params)
  step1 = jax.jit(lambda p, s: inj.update(gf(p), s, p, grad_fn=gf))
  step2 = jax.jit(lambda p, s: direct.update(gf(p), s, p, grad_fn=gf))
  for _ in range(5):
    u1, s1 = step1(p1, s1)
    u2, s2 = step2(p2, s2)
    np.testing.assert_allclose(tl.flat(u1), tl.flat(u2), rtol=1e-6, atol=1e-8)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  with pytest.raises(TypeError, match="total_steps"):
    optim.ssam_d(optax.sgd(LR), total_steps=2.5)


def test_ssam_f_per_example_inside_optax_masked():
  """Frozen leaves: wrap both gradient functions with masked_grad_fn."""
  params, batch = tl.mlp_params(), tl.mlp_batch()
  loss = lambda p: tl.mlp_loss(p, batch)  # noqa: E731
  pe_full = lambda p: jax.vmap(jax.grad(_ex_loss), (None, 0, 0))(  # noqa: E731
      p, batch["x"], batch["y"])
  train = {"dense1": {"kernel": True, "bias": False}, "ln": {"scale": False},
           "dense2": {"kernel": True, "bias": True}}
  frozen = jax.tree.map(lambda m: not m, train)
  tx = optax.chain(
      optax.masked(optim.ssam_f(optax.sgd(LR), update_freq=1, fisher="per_example"), train),
      optax.masked(optax.set_to_zero(), frozen))
  state = tx.init(params)
  for _ in range(2):
    u, state = tx.update(jax.grad(loss)(params), state, params,
                         grad_fn=optim.masked_grad_fn(jax.grad(loss), params),
                         per_example_grad_fn=optim.masked_grad_fn(pe_full, params))
    assert np.all(np.asarray(u["ln"]["scale"]) == 0)
    assert np.abs(np.asarray(u["dense2"]["kernel"])).max() > 0
    params = optax.apply_updates(params, u)
