"""SAM/ASAM against the hand-derived update of SPEC §3 and against optax.contrib.sam."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saft_jax import optim
import optim_testlib as tl

LR = 0.1


def _is_weight_vec(params, pred):
  """Per-entry 1.0 where the leaf is weight-like under pred (NumPy side)."""
  parts = []
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    parts.append(np.full(x.size, 1.0 if pred(path) else 0.0))
  return np.concatenate(parts)


def _run(tx, params, a, b, steps=3):
  gf = tl.quad_grad_fn(a, b)
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(gf(p), s, p, grad_fn=gf))
  out = []
  for _ in range(steps):
    u, state = step(params, state)
    out.append((tl.flat(params), tl.flat(u)))
    params = optax.apply_updates(params, u)
  return out


def test_sam_closed_form():
  params, a, b = tl.quad_problem()
  rho = 0.3
  for x, u in _run(optim.sam(optax.sgd(LR), rho=rho), params, a, b):
    g = tl.np_grad(a, b, x)
    e = rho * g / np.linalg.norm(g)
    want = -LR * tl.np_grad(a, b, x + e)
    np.testing.assert_allclose(u, want, rtol=2e-5, atol=1e-6)
    # and it is not plain SGD (the test can fail)
    assert np.abs(u - (-LR * g)).max() > 1e-3


@pytest.mark.parametrize("eta", [0.01, 0.2])
def test_asam_closed_form_weight_bias_split(eta):
  params, a, b = tl.quad_problem(1)
  rho = 0.5
  w = _is_weight_vec(params, lambda path: "bias" not in str(path[-1]))
  assert 0 < w.sum() < w.size  # the problem has both kinds of leaves
  for x, u in _run(optim.asam(optax.sgd(LR), rho=rho, eta=eta), params, a, b):
    g = tl.np_grad(a, b, x)
    t = np.where(w > 0, np.abs(x) + eta, 1.0)
    e = rho * t * t * g / np.linalg.norm(t * g)
    want = -LR * tl.np_grad(a, b, x + e)
    np.testing.assert_allclose(u, want, rtol=2e-5, atol=1e-6)
    # treating the bias like a weight would give a different update
    t_all = np.abs(x) + eta
    e_all = rho * t_all ** 2 * g / np.linalg.norm(t_all * g)
    assert np.abs(-LR * tl.np_grad(a, b, x + e_all) - want).max() > 1e-4


def test_asam_custom_predicate():
  params, a, b = tl.quad_problem(2)
  rho, eta = 0.5, 0.05
  pred = lambda path, leaf: tl.optim_leaf(path) == "kernel"  # noqa: E731
  w = _is_weight_vec(params, lambda path: str(path[-1].key) == "kernel")
  tx = optim.asam(optax.sgd(LR), rho=rho, eta=eta, weight_predicate=pred)
  for x, u in _run(tx, params, a, b, steps=2):
    g = tl.np_grad(a, b, x)
    t = np.where(w > 0, np.abs(x) + eta, 1.0)
    e = rho * t * t * g / np.linalg.norm(t * g)
    np.testing.assert_allclose(u, -LR * tl.np_grad(a, b, x + e), rtol=2e-5, atol=1e-6)


def test_asam_released_code_variant():
  """Released SAFT code: T = |θ| (η = 0) on every leaf, biases included."""
  params, a, b = tl.quad_problem(3)
  rho = 0.5
  tx = optim.asam(optax.sgd(LR), rho=rho, eta=0.3, variant="released")
  for x, u in _run(tx, params, a, b, steps=2):
    g = tl.np_grad(a, b, x)
    t = np.abs(x)
    e = rho * t * t * g / (np.linalg.norm(t * g) + 1e-12)
    np.testing.assert_allclose(u, -LR * tl.np_grad(a, b, x + e), rtol=2e-5, atol=1e-6)


def test_default_weight_predicate():
  k = jax.tree_util.DictKey
  assert optim.default_weight_predicate((k("dense"), k("kernel")))
  assert optim.default_weight_predicate((k("ln"), k("scale")), None)
  assert optim.default_weight_predicate((k("embed"), k("embedding")))
  assert not optim.default_weight_predicate((k("dense"), k("bias")))
  assert not optim.default_weight_predicate((k("attn"), k("out_bias")))
  # only the LAST key counts
  assert optim.default_weight_predicate((k("bias_block"), k("kernel")))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_sam_matches_optax_contrib_opaque(jit, base):
  params, a, b = tl.quad_problem(4)
  rho = 0.2
  mk = lambda: optax.sgd(LR) if base == "sgd" else optax.adam(0.05)  # noqa: E731
  ours = optim.sam(mk(), rho=rho)
  ref = optax.contrib.sam(
      mk(), optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
      sync_period=2, opaque_mode=True)
  gf = tl.quad_grad_fn(a, b)

  def step_ours(p, s):
    u, s = ours.update(gf(p), s, p, grad_fn=gf)
    return optax.apply_updates(p, u), s

  def step_ref(p, s):
    u, s = ref.update(gf(p), s, p, grad_fn=lambda q, i: gf(q))
    return optax.apply_updates(p, u), s

  if jit:
    step_ours, step_ref = jax.jit(step_ours), jax.jit(step_ref)
  p1, s1, p2, s2 = params, ours.init(params), params, ref.init(params)
  # optax 0.2.8's adam bias correction (float ** int32) is not clean under the
  # strict promotion the test conftest sets: relax it for this comparison only.
  with jax.numpy_dtype_promotion("standard"):
    _compare(step_ours, step_ref, p1, s1, p2, s2, jit, params)


def _compare(step_ours, step_ref, p1, s1, p2, s2, jit, params):
  for _ in range(5):
    p1, s1 = step_ours(p1, s1)
    p2, s2 = step_ref(p2, s2)
    f1, f2 = tl.flat(p1), tl.flat(p2)
    if jit:  # XLA may fuse the two programs differently
      np.testing.assert_allclose(f1, f2, rtol=1e-6, atol=1e-7)
    else:
      np.testing.assert_array_equal(f1, f2)
  assert np.abs(tl.flat(p1) - tl.flat(params)).max() > 1e-2
