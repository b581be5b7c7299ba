"""Each successor method on a small case computed by hand or in closed form."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saft_jax import merging as m

f32 = lambda x: jnp.asarray(x, jnp.float32)


def test_slerp_orthogonal_unit_vectors():
  a, b = {"w": f32([1.0, 0.0, 0.0])}, {"w": f32([0.0, 1.0, 0.0])}
  for t in (0.0, 0.25, 0.5, 1.0):
    out = m.slerp(a, b, t)["w"]
    ang = t * math.pi / 2
    np.testing.assert_allclose(np.asarray(out), [math.cos(ang), math.sin(ang), 0.0], atol=1e-6)
  # Parallel vectors fall back to linear interpolation.
  out = m.slerp({"w": f32([1.0, 2.0])}, {"w": f32([2.0, 4.0])}, 0.5)["w"]
  np.testing.assert_allclose(np.asarray(out), [1.5, 3.0], rtol=1e-6)


def test_dare_is_deterministic_unbiased_and_rescaled():
  x = {"w": jnp.linspace(-1.0, 1.0, 64, dtype=jnp.float32).reshape(8, 8)}
  key = jax.random.key(3)
  a, b = m.dare(x, 0.7, key), m.dare(x, 0.7, key)
  assert jnp.array_equal(a["w"], b["w"])
  kept = np.asarray(a["w"]) != 0
  np.testing.assert_allclose(np.asarray(a["w"])[kept], np.asarray(x["w"])[kept] / 0.3,
                             rtol=1e-6)
  n = 4000
  samples = jax.vmap(lambda k: m.dare(x, 0.7, k)["w"])(jax.random.split(key, n))
  mean = np.asarray(samples.mean(0))
  # E[dare(x)] = x; std of the mean = |x| sqrt(p/(1-p)) / sqrt(n).
  sd = np.abs(np.asarray(x["w"])) * math.sqrt(0.7 / 0.3) / math.sqrt(n)
  assert np.all(np.abs(mean - np.asarray(x["w"])) <= 5 * sd + 1e-7)
  assert abs(float((samples == 0).mean()) - 0.7) < 0.01
  # DARE with p = 0 then TIES with k = 1 is plain TIES with k = 1.
  tvs = [x, {"w": -0.5 * x["w"] + 0.1}]
  np.testing.assert_allclose(np.asarray(m.dare_ties_merged_vector(tvs, 0.0, key)["w"]),
                             np.asarray(m.ties_merged_vector(tvs, k=1.0)["w"]))


def test_breadcrumbs_keeps_middle_band():
  mags = np.arange(1, 21, dtype=np.float32)
  signs = np.where(np.arange(20) % 3 == 0, -1.0, 1.0).astype(np.float32)
  perm = np.random.default_rng(0).permutation(20)
  x = {"w": f32((mags * signs)[perm])}
  (mask,) = m.breadcrumbs_masks([x], drop_top=0.1, drop_bottom=0.5)
  # Of 20 entries: the 2 largest (19, 20) and the 10 smallest (1..10) are dropped.
  kept = set(np.abs(np.asarray(x["w"])[np.asarray(mask["w"])]).astype(int).tolist())
  assert kept == set(range(11, 19))
  theta0 = {"w": jnp.zeros(20, jnp.float32)}
  out = m.breadcrumbs_merge(theta0, [x], 0.5, drop_top=0.1, drop_bottom=0.5)
  np.testing.assert_allclose(np.asarray(out["w"]),
                             np.where(np.asarray(mask["w"]), 0.5 * np.asarray(x["w"]), 0.0))


def test_magmax_picks_largest_magnitude():
  tvs = [{"w": f32([1.0, -5.0, 0.2])}, {"w": f32([-3.0, 2.0, 0.1])},
         {"w": f32([2.0, 4.0, -0.3])}]
  np.testing.assert_allclose(np.asarray(m.magmax_merged_vector(tvs)["w"]), [-3.0, -5.0, -0.3])
  out = m.magmax({"w": f32([1.0, 1.0, 1.0])}, tvs, 0.5)
  np.testing.assert_allclose(np.asarray(out["w"]), [-0.5, -1.5, 0.85])


def test_tall_masks_and_consensus():
  t1, t2, t3 = f32([1.0, 0.1, 2.0, 0.0]), f32([1.0, 0.0, -2.0, 0.1]), f32([1.0, 3.0, 0.0, 0.0])
  tvs = [{"w": t1}, {"w": t2}, {"w": t3}]
  mtl = t1 + t2 + t3  # [3, 3.1, 0, 0.1]
  masks = m.tall_masks(tvs, tall_lambda=0.5)
  for tv, mk in zip(tvs, masks):  # |τ_t| >= 0.5 |τ_MTL − τ_t|, by hand below
    np.testing.assert_array_equal(np.asarray(mk["w"]),
                                  np.abs(tv["w"]) >= 0.5 * np.abs(mtl - tv["w"]))
  np.testing.assert_array_equal(np.asarray(masks[0]["w"]), [True, False, True, False])
  np.testing.assert_array_equal(np.asarray(masks[1]["w"]), [True, False, True, True])
  np.testing.assert_array_equal(np.asarray(masks[2]["w"]), [True, True, True, False])
  # Votes: [3, 1, 3, 1] (0 >= 0.5·0 counts) -> k = 2 keeps entries 0 and 2 (τ_MTL = 0).
  cons = m.consensus_merged_vector(tvs, k=2, tall_lambda=0.5)
  np.testing.assert_allclose(np.asarray(cons["w"]), [3.0, 0.0, 0.0, 0.0], atol=1e-7)


def test_model_stock_closed_form_ratio():
  # cos(τ1, τ2) = 0.5 -> t = 2·0.5 / (1 + 0.5) = 2/3.
  tv1 = {"w": f32([1.0, 0.0])}
  tv2 = {"w": f32([0.5, math.sqrt(3) / 2])}
  theta0 = {"w": f32([10.0, -1.0])}
  out = m.model_stock(theta0, [tv1, tv2])
  mean = (np.array([1.0, 0.0]) + np.array([0.5, math.sqrt(3) / 2])) / 2
  np.testing.assert_allclose(np.asarray(out["w"]), np.array([10.0, -1.0]) + 2 / 3 * mean,
                             rtol=1e-6)
  assert abs(float(m.model_stock_ratio(0.5, 2)) - 2 / 3) < 1e-7


def test_lines_scales_by_layer_depth():
  assert m.default_layer_index("params/blocks_3/mlp/kernel") == 3
  assert m.default_layer_index("layers/3/w") == 3
  assert m.default_layer_index("visual.transformer.resblocks.3.attn.in_proj_weight") == 3
  assert m.default_layer_index("conv1/kernel") is None
  tv = {"embed": f32([1.0]), "blocks_0": f32([1.0]), "blocks_1": f32([1.0]),
        "blocks_2": f32([1.0]), "blocks_4": f32([1.0])}
  theta0 = jax.tree.map(jnp.zeros_like, tv)
  out = m.lines(theta0, tv, alpha=0.2, beta=0.8)  # L = 5: scale = 0.2 + 0.8 l / 4
  for name, scale in {"embed": 0.2, "blocks_0": 0.2, "blocks_1": 0.4, "blocks_2": 0.6,
                      "blocks_4": 1.0}.items():
    np.testing.assert_allclose(float(out[name][0]), scale, rtol=1e-6)
  out = m.lines(theta0, tv, 0.2, 0.8, num_layers=3,
                layer_fn=lambda p: {"blocks_4": 2}.get(p, 0))
  np.testing.assert_allclose(float(out["blocks_4"][0]), 1.0, rtol=1e-6)


def test_tsv_m_rank_one_tasks():
  # Four rank-1 task matrices with orthonormal singular vectors: TSV-M keeps one
  # triplet per task (r = 4 / 4) and the merge is exactly their sum.
  q1, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))
  q2, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(4, 4)))
  sig = [3.0, 2.0, 1.5, 0.5]
  tvs = [{"w": f32(sig[i] * np.outer(q1[:, i], q2[:, i])), "b": f32([float(i)])}
         for i in range(4)]
  out = m.tsv_merged_vector(tvs)
  np.testing.assert_allclose(np.asarray(out["w"]), sum(np.asarray(t["w"]) for t in tvs),
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(out["b"]), [1.5])  # non-matrix leaves: mean
  # Two non-orthogonal rank-1 tasks in 2-D at angle a: the polar factor rotates u1, u2
  # symmetrically to a/2 ∓ π/4 (closed form), singular values are kept.
  a = 0.6
  u1, u2 = np.array([1.0, 0.0]), np.array([math.cos(a), math.sin(a)])
  e = np.eye(2)
  tvs = [{"w": f32(3.0 * np.outer(u1, e[0]))}, {"w": f32(2.0 * np.outer(u2, e[1]))}]
  w1 = np.array([math.cos(a / 2 - math.pi / 4), math.sin(a / 2 - math.pi / 4)])
  w2 = np.array([math.cos(a / 2 + math.pi / 4), math.sin(a / 2 + math.pi / 4)])
  np.testing.assert_allclose(np.asarray(m.tsv_merged_vector(tvs)["w"]),
                             3.0 * np.outer(w1, e[0]) + 2.0 * np.outer(w2, e[1]), atol=1e-5)


def test_iso_c_flat_spectrum():
  rng = np.random.default_rng(0)
  tvs = [{"w": f32(rng.normal(size=(5, 3))), "b": f32(rng.normal(size=3))} for _ in range(3)]
  d = sum(np.asarray(t["w"], np.float64) for t in tvs)
  u, s, vh = np.linalg.svd(d, full_matrices=False)
  out = m.iso_c_merged_vector(tvs)
  np.testing.assert_allclose(np.asarray(out["w"]), s.mean() * u @ vh, atol=1e-5)
  np.testing.assert_allclose(np.linalg.svd(np.asarray(out["w"]), compute_uv=False),
                             [s.mean()] * 3, rtol=1e-5)
  # Non-matrix leaves: the mean of the task vectors (the reference's sum(tvs) / len(tvs)).
  np.testing.assert_allclose(np.asarray(out["b"]), sum(np.asarray(t["b"]) for t in tvs) / 3,
                             rtol=1e-6)


def test_iso_cts_diagonal_case():
  # τ1 = diag(3, 0, 1, 0), τ2 = diag(0, 2, 0, 0.5); Δ = diag(3, 2, 1, 0.5).
  # Common space (fraction 0.5): e1, e2 with σ = 3, 2. Each task's residual is rank 1
  # (e3 with 1, e4 with 0.5), one triplet per task. Flat spectrum: mean = 1.625 -> 1.625 I.
  tvs = [{"w": f32(np.diag([3.0, 0.0, 1.0, 0.0]))}, {"w": f32(np.diag([0.0, 2.0, 0.0, 0.5]))}]
  out = m.iso_cts_merged_vector(tvs, common_space_fraction=0.5)
  np.testing.assert_allclose(np.asarray(out["w"]), 1.625 * np.eye(4), atol=1e-5)
  # With the whole spectrum as common space Iso-CTS is Iso-C.
  np.testing.assert_allclose(np.asarray(m.iso_cts_merged_vector(tvs, 1.0)["w"]),
                             np.asarray(m.iso_c_merged_vector(tvs)["w"]), atol=1e-5)


def test_analysis_helpers():
  rng = np.random.default_rng(0)
  tvs = [{"a": f32(rng.normal(size=(3, 2))), "b": f32(rng.normal(size=4)),
          "n": jnp.int32(1)} for _ in range(3)]
  flat = np.stack([np.concatenate([np.asarray(t["a"]).ravel(), np.asarray(t["b"])])
                   for t in tvs])
  nrm = np.linalg.norm(flat, axis=1)
  np.testing.assert_allclose(np.asarray(m.cosine_similarity_matrix(tvs)),
                             flat @ flat.T / np.outer(nrm, nrm), rtol=1e-5)
  conflicts = np.mean((flat > 0).any(0) & (flat < 0).any(0))
  np.testing.assert_allclose(float(m.sign_conflict_rate(tvs)), conflicts, rtol=1e-6)
  norms = m.leaf_norms(tvs[0])
  assert set(norms) == {"a", "b"}
  np.testing.assert_allclose(float(norms["a"]), np.linalg.norm(np.asarray(tvs[0]["a"])),
                             rtol=1e-6)
  np.testing.assert_allclose(float(m.global_norm(tvs[0])), nrm[0], rtol=1e-6)
