"""Data-driven merges (Fisher merging, RegMean, AdaMerging): closed forms and errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saft_jax import merging as m
from saft_jax.linearize import linearized_apply


def _mlp(params, x):
  """A 2-layer MLP ``x -> logits``; kernels are ``[d_in, d_out]``."""
  h = jnp.tanh(x @ params["l1"]["kernel"] + params["l1"]["bias"])
  return h @ params["l2"]["kernel"] + params["l2"]["bias"]


def _mlp_params(key, d=5, h=4, c=3):
  k1, k2, k3 = jax.random.split(key, 3)
  return {"l1": {"kernel": jax.random.normal(k1, (d, h)), "bias": 0.1 * jnp.ones((h,))},
          "l2": {"kernel": jax.random.normal(k2, (h, c)), "bias": jax.random.normal(k3, (c,))}}


# ------------------------------------------------------------------------------- RegMean
def test_regmean_single_linear_layer_is_least_squares_on_union():
  """α = 1: the merged W minimizes Σ_t ‖X_t W − X_t W_t‖² (lstsq on the stacked inputs)."""
  rng = np.random.default_rng(0)
  d, k, sizes = 6, 3, (20, 35, 12)
  xs = [rng.normal(size=(n, d)).astype(np.float32) * (t + 1) for t, n in enumerate(sizes)]
  ws = [rng.normal(size=(d, k)).astype(np.float32) for _ in sizes]
  apply = lambda p, x: x @ p["w"]
  grams = [m.gram_matrices(apply, {"w": jnp.asarray(w)}, jnp.asarray(x), batch_size=8)
           for w, x in zip(ws, xs)]
  # The Grams are averaged over examples; the least-squares fit with equal task weights
  # weighs each task's rows by 1/n_t.
  merged = m.regmean([{"w": jnp.asarray(w)} for w in ws], grams, alpha=1.0)["w"]
  a = np.concatenate([x / np.sqrt(len(x)) for x in xs])
  b = np.concatenate([x @ w / np.sqrt(len(x)) for x, w in zip(xs, ws)])
  expected = np.linalg.lstsq(a, b, rcond=None)[0]
  np.testing.assert_allclose(np.asarray(merged), expected, rtol=1e-4, atol=1e-4)
  for g, x in zip(grams, xs):
    np.testing.assert_allclose(np.asarray(g["w"]), x.T @ x / len(x), rtol=1e-5, atol=1e-4)


def test_regmean_alpha_zero_diagonal_and_other_leaves_averaged():
  """α = 0 keeps only diag(G): a per-input-row weighted average; biases are averaged."""
  rng = np.random.default_rng(1)
  models = [{"w": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32),
             "b": jnp.asarray(rng.normal(size=(2,)), jnp.float32)} for _ in range(2)]
  grams = [{"w": jnp.asarray(np.diag(rng.uniform(1, 3, 4)) + 0.5, jnp.float32)}
           for _ in range(2)]
  out = m.regmean(models, grams, alpha=0.0)
  d = [np.diag(np.asarray(g["w"])) for g in grams]
  want = (sum(di[:, None] * np.asarray(mm["w"]) for di, mm in zip(d, models))
          / (d[0] + d[1])[:, None])
  np.testing.assert_allclose(np.asarray(out["w"]), want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out["b"]), (models[0]["b"] + models[1]["b"]) / 2,
                             rtol=1e-6)
  g = m.reduce_non_diagonal(jnp.ones((3, 3)), 0.25)
  np.testing.assert_allclose(np.asarray(g), np.where(np.eye(3), 1.0, 0.25))


def test_gram_matrices_find_layers_inputs_for_plain_and_linearized_models():
  params = _mlp_params(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (7, 5))
  grams = m.gram_matrices(_mlp, params, x, batch_size=3)
  assert set(grams) == {"l1/kernel", "l2/kernel"}
  h = np.tanh(np.asarray(x @ params["l1"]["kernel"] + params["l1"]["bias"]))
  np.testing.assert_allclose(np.asarray(grams["l1/kernel"]), np.asarray(x.T @ x) / 7,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(grams["l2/kernel"]), h.T @ h / 7, rtol=1e-4, atol=1e-5)
  # Linearized at θ0 = params, called on the task vector: the layer inputs are those at θ0.
  tv = jax.tree.map(lambda a: 0.5 * a, params)
  lin = m.gram_matrices(lambda d, x: linearized_apply(_mlp, params, d, x), tv, x)
  for k in grams:
    np.testing.assert_allclose(np.asarray(lin[k]), np.asarray(grams[k]), rtol=1e-4, atol=1e-5)
  # Transposed ([d_out, d_in]) kernels: the Gram acts on axis 1.
  tparams = {"w": params["l1"]["kernel"].T}
  apply_t = lambda p, x: x @ p["w"].T
  assert m.gram_axes(apply_t, tparams, x) == {"w": 1}
  g = m.gram_matrices(apply_t, tparams, x)
  np.testing.assert_allclose(np.asarray(g["w"]), np.asarray(x.T @ x) / 7, rtol=1e-5, atol=1e-5)


def test_gram_matrices_skip_leaves_used_otherwise():
  """A kernel also used elementwise (tied) is not a linear layer; a 1-D leaf never is."""
  def apply(p, x):
    return x @ p["w"] + jnp.sum(p["w"]) + p["e"][0]
  p = {"w": jnp.ones((3, 2)), "e": jnp.ones((4, 2)), "v": jnp.ones(3)}
  assert m.gram_matrices(apply, p, jnp.ones((2, 3))) == {}


def test_regmean_errors():
  a = {"w": jnp.ones((3, 2))}
  g = {"w": jnp.eye(3)}
  with pytest.raises(ValueError, match="one Gram dict per model"):
    m.regmean([a, a], [g])
  with pytest.raises(ValueError, match="structure"):
    m.regmean([a, {"v": jnp.ones((3, 2))}], [g, g])
  with pytest.raises(ValueError, match="shape"):
    m.regmean([a, {"w": jnp.ones((2, 2))}], [g, g])
  with pytest.raises(ValueError, match="needs"):
    m.regmean([a, a], [{"w": jnp.eye(2)}, {"w": jnp.eye(2)}])
  with pytest.raises(ValueError, match="different leaves"):
    m.regmean([a, a], [g, {}])
  with pytest.raises(ValueError, match="alpha"):
    m.regmean([a, a], [g, g], alpha=1.5)


# ------------------------------------------------------------------------------- Fisher
def test_fisher_diagonal_matches_a_per_example_loop():
  params = _mlp_params(jax.random.key(2))
  x = jax.random.normal(jax.random.key(3), (5, 5))
  labels = np.array([0, 2, 1, 1, 0])

  def grad_sq(i, c):
    g = jax.grad(lambda p: jax.nn.log_softmax(_mlp(p, x[i:i + 1])[0])[c])(params)
    return jax.tree.map(jnp.square, g)

  # Exact Fisher: Σ_c p(c|x) (∇ log p(c|x))², averaged over the examples.
  want = jax.tree.map(jnp.zeros_like, params)
  emp = jax.tree.map(jnp.zeros_like, params)
  for i in range(5):
    probs = jax.nn.softmax(_mlp(params, x[i:i + 1])[0])
    for c in range(3):
      want = jax.tree.map(lambda a, g: a + probs[c] * g / 5, want, grad_sq(i, c))
    emp = jax.tree.map(lambda a, g: a + g / 5, emp, grad_sq(i, labels[i]))
  got = m.fisher_diagonal(_mlp, params, x, batch_size=2)
  got_emp = m.fisher_diagonal(_mlp, params, x, labels, batch_size=3)
  for a, b in zip(jax.tree.leaves(got) + jax.tree.leaves(got_emp),
                  jax.tree.leaves(want) + jax.tree.leaves(emp)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


def test_fisher_diagonal_of_a_linearized_model_at_its_expansion_point():
  """f_lin(θ0) = f(θ0) with the same Jacobian, so the Fishers agree there."""
  params = _mlp_params(jax.random.key(7))
  x = jax.random.normal(jax.random.key(8), (6, 5))
  lin = lambda p, x, p0: linearized_apply(_mlp, p0, jax.tree.map(jnp.subtract, p, p0), x)
  a = m.fisher_diagonal(_mlp, params, x, batch_size=4)
  b = m.fisher_diagonal(lin, params, x, batch_size=4, model_args=(params,))
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-4, atol=1e-7)


def test_fisher_merge_equal_fishers_is_the_average():
  rng = np.random.default_rng(4)
  models = [{"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
             "n": jnp.arange(3)} for _ in range(3)]
  f = {"w": jnp.asarray(rng.uniform(0, 2, size=(3, 2)), jnp.float32), "n": jnp.zeros(3)}
  for normalize in (True, False):
    out = m.fisher_merge(models, [f, f, f], normalize=normalize)
    np.testing.assert_allclose(np.asarray(out["w"]), np.mean([mm["w"] for mm in models], 0),
                               rtol=1e-5, atol=1e-6)
    assert out["n"].dtype == models[0]["n"].dtype


def test_fisher_merge_weights_floor_and_normalization():
  a, b = {"w": jnp.array([1.0, 1.0, 1.0])}, {"w": jnp.array([3.0, 3.0, 3.0])}
  fa, fb = {"w": jnp.array([1.0, 0.0, 0.0])}, {"w": jnp.array([3.0, 0.0, 2.0])}
  out = np.asarray(m.fisher_merge([a, b], [fa, fb], normalize=False)["w"])
  # entry 0: (1·1 + 3·3)/(1 + 3); entry 1: both floored -> average; entry 2: b dominates.
  np.testing.assert_allclose(out[:2], [2.5, 2.0], rtol=1e-6)
  assert out[2] == pytest.approx((1e-6 * 1 + 2 * 3) / (1e-6 + 2), rel=1e-6)
  # normalize: c_t / ‖F_t‖ — scaling one model's Fisher does not change the merge.
  n1 = m.fisher_merge([a, b], [fa, fb])["w"]
  n2 = m.fisher_merge([a, b], [fa, jax.tree.map(lambda x: 10 * x, fb)])["w"]
  np.testing.assert_allclose(np.asarray(n1)[[0, 2]], np.asarray(n2)[[0, 2]], rtol=1e-5)


def test_fisher_merge_errors():
  a = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match="one Fisher per model"):
    m.fisher_merge([a, a], [a])
  with pytest.raises(ValueError, match="shape"):
    m.fisher_merge([a, a], [a, {"w": jnp.ones(2)}])
  with pytest.raises(ValueError, match="structure"):
    m.fisher_merge([a, {"v": jnp.ones(3)}], [a, a])
  with pytest.raises(ValueError, match="coefficient"):
    m.fisher_merge([a, a], [a, a], coefficients=[1.0])
  with pytest.raises(ValueError, match="labels"):
    m.fisher_diagonal(lambda p, x: x * p["w"], a, jnp.ones((4, 3)), labels=[0, 1])


# ---------------------------------------------------------------------------- AdaMerging
def _peak(a, center):
  return 5.0 / (1.0 + 10.0 * jnp.square(a - center))


def _margin_task(center):
  """One-leaf toy task: logits [m(θ), 0] with a positive margin m peaked at θ = center;
  the binary entropy decreases with the margin, so the optimum is λ* = center for θ0 = 0
  and τ = 1."""
  def apply(p, x):
    margin = _peak(p["a"], center) + 0.0 * x
    return jnp.stack([margin, jnp.zeros_like(margin)], axis=-1)
  return apply


def test_adamerging_task_wise_reaches_the_known_optimum():
  theta0 = {"a": jnp.zeros(())}
  tvs = [{"a": jnp.ones(())}, {"a": jnp.zeros(())}]  # the second task vector is inert
  apply = _margin_task(0.7)
  inputs = [jnp.zeros((8,)), jnp.zeros((8,))]
  merged, lams, losses = m.adamerging([apply, apply], theta0, tvs, inputs, granularity="task",
                                      steps=300, optimizer=optax.adam(0.02), batch_size=4)
  assert lams.shape == (2,)
  assert float(lams[0]) == pytest.approx(0.7, abs=1e-2)
  assert float(lams[1]) == pytest.approx(0.3)  # zero gradient: stays at the prior
  assert float(merged["a"]) == pytest.approx(0.7, abs=1e-2)
  assert losses[-1] < losses[0]


def test_adamerging_layer_wise_per_leaf_optima_and_clipping():
  theta0 = {"a": jnp.zeros(()), "b": jnp.zeros(())}
  tvs = [{"a": jnp.ones(()), "b": jnp.ones(())}]

  def apply(p, x):
    ma = _peak(p["a"], 0.2) + 0.0 * x
    mb = 2.0 * p["b"] + 0.0 * x   # margin grows with b: optimum clipped at λ = 1
    return jnp.stack([ma + mb, jnp.zeros_like(ma)], axis=-1)
  merged, lams, _ = m.adamerging([apply], theta0, tvs, [jnp.zeros((4,))], granularity="layer",
                                 steps=400, optimizer=optax.adam(0.02))
  assert lams.shape == (2, 1)
  assert float(lams[0, 0]) == pytest.approx(0.2, abs=2e-2)
  assert float(lams[1, 0]) == 1.0
  assert float(merged["b"]) == 1.0


def test_adamerging_defaults_follow_the_paper_and_linearized_models_work():
  """Prior 0.3 and Adam(1e-3): one step moves every coefficient by about lr."""
  params = _mlp_params(jax.random.key(5))
  tvs = [jax.tree.map(lambda a: 0.1 * a, _mlp_params(jax.random.key(6 + t))) for t in range(2)]
  x = jax.random.normal(jax.random.key(9), (6, 5))
  lin = lambda p, x: linearized_apply(_mlp, params, jax.tree.map(jnp.subtract, p, params), x)
  for apply in (_mlp, lin):
    _, lams, losses = m.adamerging([apply, apply], params, tvs, [x, x], steps=1)
    assert lams.shape == (4, 2) and len(losses) == 1
    np.testing.assert_allclose(np.abs(np.asarray(lams) - 0.3), 1e-3, rtol=1e-2)


def test_adamerging_errors():
  p = {"a": jnp.zeros(2)}
  f = lambda p, x: x
  with pytest.raises(ValueError, match="one apply function"):
    m.adamerging([f], p, [p, p], [jnp.ones((2, 2))] * 2, steps=1)
  with pytest.raises(ValueError, match="granularity"):
    m.adamerging([f], p, [p], [jnp.ones((2, 2))], granularity="block", steps=1)
  with pytest.raises(ValueError, match="shape"):
    m.adamerging([f], p, [{"a": jnp.zeros(3)}], [jnp.ones((2, 2))], steps=1)
