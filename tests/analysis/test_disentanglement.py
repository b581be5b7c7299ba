"""Disentanglement error: closed form (ξ = 0), loop references, linear evaluation, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saft_jax import analysis


def _mlp_params(rng, d=6, h=8, c=4, scale=1.0):
  return {"W1": (scale * rng.normal(size=(d, h))).astype(np.float32),
          "b1": (scale * rng.normal(size=(h,))).astype(np.float32),
          "W2": (scale * rng.normal(size=(h, c))).astype(np.float32)}


def mlp_apply(p, x):
  return jnp.tanh(x @ p["W1"] + p["b1"]) @ p["W2"]


def np_mlp(p, x):
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  return np.tanh(x.astype(np.float64) @ p["W1"] + p["b1"]) @ p["W2"]


def np_comb(theta0, taus, coefs):
  return {k: np.asarray(theta0[k], np.float64) + sum(c * np.asarray(t[k], np.float64)
                                                     for c, t in zip(coefs, taus))
          for k in theta0}


def test_linear_model_disjoint_subspaces_gives_zero():
  # f(x; θ) = x @ W + b is linear in θ. Task 1's inputs live in coords 0..3 and
  # τ1 only changes rows 0..3 of W; task 2's inputs live in coords 4..7 and τ2 only
  # changes rows 4..7. Then x1 @ τ2 = 0 and x2 @ τ1 = 0 exactly, so on D_1 the merged
  # model's output equals f(x; θ0 + α1 τ1) bit for bit (the extra terms are exact
  # zeros), likewise on D_2: the predictions agree and ξ = 0 on the whole grid —
  # even though linearity alone would not make the argmax agree if the τ's overlapped.
  rng = np.random.default_rng(0)
  d, c = 8, 5
  theta0 = {"W": rng.normal(size=(d, c)).astype(np.float32),
            "b": rng.normal(size=(c,)).astype(np.float32)}
  tau1 = {"W": np.zeros((d, c), np.float32), "b": np.zeros((c,), np.float32)}
  tau2 = {"W": np.zeros((d, c), np.float32), "b": np.zeros((c,), np.float32)}
  tau1["W"][:4] = 3 * rng.normal(size=(4, c))
  tau2["W"][4:] = 3 * rng.normal(size=(4, c))
  x1 = np.zeros((40, d), np.float32); x1[:, :4] = rng.normal(size=(40, 4))
  x2 = np.zeros((30, d), np.float32); x2[:, 4:] = rng.normal(size=(30, 4))
  apply = lambda p, x: x @ p["W"] + p["b"]
  res = analysis.disentanglement_error(apply, theta0, [tau1, tau2], [x1, x2],
                                       np.linspace(-2, 2, 9), divergence="js")
  assert res.error.shape == (9, 9)
  np.testing.assert_array_equal(res.error, 0.0)
  np.testing.assert_allclose(res.divergence, 0.0, atol=1e-6)
  # Control: overlapping task vectors do produce disagreement somewhere.
  res2 = analysis.disentanglement_error(apply, theta0, [tau1, tau1], [x1, x2],
                                        np.linspace(-2, 2, 9), divergence="js")
  assert res2.error.max() > 0


@pytest.mark.parametrize("all_task", [False, True])
def test_grid_matches_python_loop(all_task):
  rng = np.random.default_rng(1)
  theta0 = _mlp_params(rng)
  taus = [_mlp_params(rng, scale=0.7) for _ in range(3)]
  heads = [rng.normal(size=(4, 4)).astype(np.float32), rng.normal(size=(4, 3)).astype(np.float32)]
  applies = [lambda p, x, h=h: mlp_apply(p, x) @ h for h in heads]
  xs = [rng.normal(size=(23, 6)).astype(np.float32), rng.normal(size=(17, 6)).astype(np.float32)]
  a1, a2 = np.array([-1.5, 0.0, 0.5, 2.0], np.float32), np.array([-1.0, 1.0, 1.5], np.float32)
  kw = dict(fixed_task_vectors=[taus[2]], fixed_coefs=0.3) if all_task else {}
  res = analysis.disentanglement_error(applies, theta0, taus[:2], xs, (a1, a2),
                                       divergence="sym_kl", chunk_size=5, batch_size=10, **kw)
  for i, b1 in enumerate(a1):
    for j, b2 in enumerate(a2):
      coefs, vecs = [b1, b2], taus[:2]
      if all_task:
        coefs, vecs = coefs + [0.3], taus
      pm = np_comb(theta0, vecs, coefs)
      xi, div = 0.0, 0.0
      for t in range(2):
        ps = np_comb(theta0, [taus[t]], [[b1, b2][t]])
        hs = np.asarray(heads[t], np.float64)
        ls, lm = np_mlp(ps, xs[t]) @ hs, np_mlp(pm, xs[t]) @ hs
        xi += np.mean(ls.argmax(-1) != lm.argmax(-1))
        lp = ls - np.log(np.exp(ls).sum(-1, keepdims=True))
        lq = lm - np.log(np.exp(lm).sum(-1, keepdims=True))
        div += np.mean(np.sum((np.exp(lp) - np.exp(lq)) * (lp - lq), -1))
      assert res.error[i, j] == pytest.approx(xi, abs=1e-7), (i, j)
      assert res.divergence[i, j] == pytest.approx(div, rel=2e-3, abs=1e-5)


def test_linear_eval_matches_explicit_linearized_outputs():
  rng = np.random.default_rng(2)
  theta0 = _mlp_params(rng)
  taus = [_mlp_params(rng, scale=0.5) for _ in range(3)]
  xs = [rng.normal(size=(25, 6)).astype(np.float32), rng.normal(size=(19, 6)).astype(np.float32)]
  f0s, jvps = zip(*[analysis.linearized_outputs(mlp_apply, theta0, taus, x, batch_size=8)
                    for x in xs])
  # Independent check of the jvps with finite differences in float64.
  eps = 1e-5
  for k in range(3):
    fd = (np_mlp(np_comb(theta0, [taus[k]], [eps]), xs[0])
          - np_mlp(np_comb(theta0, [taus[k]], [-eps]), xs[0])) / (2 * eps)
    np.testing.assert_allclose(jvps[0][k], fd, rtol=1e-3, atol=1e-4)
  alphas = np.linspace(-2, 2, 7).astype(np.float32)
  masks = [np.arange(25) % 4 != 0, np.ones(19, bool)]
  res = analysis.disentanglement_error_linear(f0s, jvps, alphas, masks=masks, fixed_coefs=[0.4],
                                              divergence="js", chunk_size=6, batch_size=10)
  for i in [0, 3, 6]:
    for j in [1, 5]:
      xi = 0.0
      for t in range(2):
        f0 = np.asarray(f0s[t], np.float64)
        jv = np.asarray(jvps[t], np.float64)
        single = f0 + alphas[[i, j][t]] * jv[t]
        merged = f0 + alphas[i] * jv[0] + alphas[j] * jv[1] + 0.4 * jv[2]
        m = masks[t]
        xi += np.mean((single.argmax(-1) != merged.argmax(-1))[m])
      assert res.error[i, j] == pytest.approx(xi, abs=1e-7)
  # At α1 = α2 = 0 with no fixed vectors the merged model is θ0: zero error.
  res0 = analysis.disentanglement_error_linear([f[:, :] for f in f0s], [j[:2] for j in jvps],
                                               np.array([0.0, 1.0]))
  assert res0.error[0, 0] == 0.0


def test_bad_inputs():
  rng = np.random.default_rng(3)
  theta0 = _mlp_params(rng)
  tau = _mlp_params(rng)
  xs = [np.ones((4, 6), np.float32)] * 2
  bad = dict(tau); bad["W2"] = np.zeros((8, 5), np.float32)
  with pytest.raises(ValueError, match=r"\['W2'\]"):
    analysis.disentanglement_error(mlp_apply, theta0, [tau, bad], xs)
  missing = {k: v for k, v in tau.items() if k != "b1"}
  with pytest.raises(ValueError, match="b1"):
    analysis.disentanglement_error(mlp_apply, theta0, [tau, missing], xs)
  with pytest.raises(ValueError, match="empty"):
    analysis.disentanglement_error(mlp_apply, theta0, [tau, tau], xs, np.array([]))
  with pytest.raises(ValueError, match="1-D"):
    analysis.disentanglement_error(mlp_apply, theta0, [tau, tau], xs, np.zeros((3, 3)))
  with pytest.raises(ValueError, match="pair"):
    analysis.disentanglement_error(mlp_apply, theta0, [tau], xs)
  with pytest.raises(ValueError, match="fixed_coefs"):
    analysis.disentanglement_error(mlp_apply, theta0, [tau, tau], xs,
                                   fixed_task_vectors=[tau, tau], fixed_coefs=[1.0])
  with pytest.raises(ValueError, match="divergence"):
    analysis.disentanglement_error(mlp_apply, theta0, [tau, tau], xs, divergence="kl")
  with pytest.raises(ValueError, match=r"\(K, N, C\)"):
    analysis.disentanglement_error_linear([np.zeros((3, 2))] * 2, [np.zeros((2, 3, 3))] * 2)
