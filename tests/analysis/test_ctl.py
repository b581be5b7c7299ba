"""Cross-task linearity: exact zero for models linear in θ, NumPy reference otherwise."""
import jax.numpy as jnp
import numpy as np
import pytest

from saft_jax import analysis


def test_linear_in_params_gives_zero_at_every_layer():
  # Every feature below is a linear function of θ = {W1, W2, b}, so the feature of
  # the interpolated model equals the interpolation of the features: cos = 1.
  rng = np.random.default_rng(0)
  h = rng.normal(size=(4, 3)).astype(np.float32)

  def feats(p, x):
    z1 = x @ p["W1"]
    z2 = (x @ p["W1"] + x @ p["W2"]).reshape(x.shape[0], 2, 2)
    return {"block_0": z1, "block_1": z2, "logits": z1 @ h + p["b"]}

  mk = lambda: {"W1": rng.normal(size=(5, 4)).astype(np.float32),
                "W2": rng.normal(size=(5, 4)).astype(np.float32),
                "b": rng.normal(size=(3,)).astype(np.float32)}
  pi, pj = mk(), mk()
  xs = [rng.normal(size=(13, 5)).astype(np.float32), rng.normal(size=(9, 5)).astype(np.float32)]
  res = analysis.cross_task_linearity(feats, pi, pj, xs, alpha=[0.5, 0.2, 0.9], batch_size=4)
  assert res.names == ("block_0", "block_1", "logits")
  assert res.dis_cos.shape == (3, 3) and res.per_input_set.shape == (2, 3, 3)
  np.testing.assert_allclose(res.dis_cos, 0.0, atol=2e-6)


def test_nonlinear_matches_numpy_reference():
  rng = np.random.default_rng(1)
  mk = lambda: {"W1": rng.normal(size=(5, 6)).astype(np.float32),
                "b1": rng.normal(size=(6,)).astype(np.float32),
                "W2": rng.normal(size=(6, 3)).astype(np.float32)}
  pi, pj = mk(), mk()

  def feats(p, x):
    hdn = jnp.tanh(x @ p["W1"] + p["b1"])
    return [hdn, hdn @ p["W2"]]

  def np_feats(p, x):
    p = {k: v.astype(np.float64) for k, v in p.items()}
    hdn = np.tanh(x.astype(np.float64) @ p["W1"] + p["b1"])
    return [hdn, hdn @ p["W2"]]

  xs = [rng.normal(size=(11, 5)).astype(np.float32), rng.normal(size=(7, 5)).astype(np.float32)]
  res = analysis.cross_task_linearity(feats, pi, pj, xs)  # default alpha = 0.5
  assert res.names == ("0", "1")
  a = 0.5
  pm = {k: a * pi[k].astype(np.float64) + (1 - a) * pj[k] for k in pi}
  per_set = []
  for x in xs:
    fm, fi, fj = np_feats(pm, x), np_feats(pi, x), np_feats(pj, x)
    row = []
    for m, u, v in zip(fm, fi, fj):
      t = a * u + (1 - a) * v
      cos = np.sum(m * t, -1) / (np.linalg.norm(m, axis=-1) * np.linalg.norm(t, axis=-1))
      row.append(1 - cos)
    per_set.append(np.stack(row, -1))
  np.testing.assert_allclose(res.per_input_set[:, 0], [p.mean(0) for p in per_set],
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(res.dis_cos[0], np.concatenate(per_set).mean(0), rtol=1e-4, atol=1e-6)
  assert res.dis_cos[0].min() > 1e-4  # genuinely non-zero here
  assert set(res.as_dict()) == {"0", "1"}


def test_bad_inputs():
  p = {"w": np.ones((2, 2), np.float32)}
  f = lambda p, x: {"a": x @ p["w"]}
  x = np.ones((3, 2), np.float32)
  with pytest.raises(ValueError, match="params_j"):
    analysis.cross_task_linearity(f, p, {"v": np.ones((2, 2), np.float32)}, x)
  with pytest.raises(ValueError, match="empty"):
    analysis.cross_task_linearity(f, p, p, x, alpha=[])
  with pytest.raises(ValueError, match="one callable"):
    analysis.cross_task_linearity([f, f, f], p, p, [x, x])
