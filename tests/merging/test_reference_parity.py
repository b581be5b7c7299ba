"""Parity with the authors' reference implementations, rule by rule.

Every expected value is computed here in NumPy by a literal port of the reference code
(cited per helper), never by calling ``saft_jax`` for it. Arrays are tiny.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saft_jax import merging as m

f32 = lambda x: jnp.asarray(x, jnp.float32)


def _np(x):
  return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


# ----------------------------------------------------------- TIES (ties_utils.py)
def ref_topk_values_mask(mat, k):
  """``topk_values_mask`` (tall_masks / ties-merging): per row, ``kthvalue(d - int(d·K))``
  of ``|M|`` and keep ``|M| >= kth``; ``K = 1`` keeps all (its ``K == 100`` branch)."""
  d = mat.shape[1]
  kk = d - int(d * k)
  if kk == 0:
    return mat.copy()
  kth = np.sort(np.abs(mat), axis=1)[:, kk - 1:kk]
  return mat * (np.abs(mat) >= kth)


def ref_ties_flat(flat, k, merge_func):
  """``ties_merging`` on a ``(T, d)`` matrix: trim, ``resolve_sign``, ``disjoint_merge``."""
  trimmed = ref_topk_values_mask(flat, k)
  sign = np.sign(trimmed.sum(0))
  sign[sign == 0] = np.sign(sign.sum())
  keep = np.where(sign[None] > 0, trimmed > 0, trimmed < 0)
  sel = trimmed * keep
  if merge_func == "sum":
    return sel.sum(0)
  return sel.sum(0) / np.maximum((sel != 0).sum(0), 1)


def _flat_stack(tvs, keys):
  return np.stack([np.concatenate([_np(t[p]).ravel() for p in keys]) for t in tvs])


def _unflat(vec, like, keys):
  out, o = {}, 0
  for p in keys:
    n = like[p].size
    out[p] = vec[o:o + n].reshape(like[p].shape)
    o += n
  return out


def _tvs(kind, t=3, seed=0):
  rng = np.random.default_rng(seed)
  shapes = {"w": (7, 5), "b": (5,), "u": (4, 6)}

  def leaf(shape):
    if kind == "grid":  # many exact ties and zeros
      return f32(rng.integers(-3, 4, size=shape) / 4.0)
    return f32(rng.normal(size=shape))
  return [{p: leaf(s) for p, s in shapes.items()} for _ in range(t)]


@pytest.mark.parametrize("kind", ["normal", "grid"])
@pytest.mark.parametrize("k", [0.1, 0.2, 0.35, 1.0])
def test_ties_reference_keep_count_global(kind, k):
  tvs = _tvs(kind)
  keys = sorted(tvs[0])
  flat = _flat_stack(tvs, keys)
  for disjoint in ("mean", "sum"):
    got = m.ties_merged_vector(tvs, k=k, keep="reference", disjoint=disjoint)
    ref = _unflat(ref_ties_flat(flat, k, disjoint), tvs[0], keys)
    for p in keys:
      np.testing.assert_allclose(_np(got[p]), ref[p], rtol=1e-6, atol=1e-6,
                                 err_msg=f"{p} k={k} {disjoint}")


def test_ties_reference_keeps_one_more_without_ties():
  # No ties: the reference keeps exactly int(k·d) + 1 entries per task, the default int(k·d).
  tvs = _tvs("normal", t=2, seed=4)
  d = sum(x.size for x in tvs[0].values())  # 35 + 5 + 24 = 64
  for k in (0.1, 0.2, 0.5):
    for keep, n in (("reference", int(k * d) + 1), ("exact", int(k * d))):
      trimmed = m.ties_trim(tvs, k=k, keep=keep)
      for tr in trimmed:
        assert sum(int((np.asarray(x) != 0).sum()) for x in tr.values()) == n, (k, keep)
    ref = ref_topk_values_mask(_flat_stack(tvs, sorted(tvs[0])), k)
    assert ((ref != 0).sum(1) == int(k * d) + 1).all()
  # Ties at the threshold: all kept, as the reference's >=.
  x = {"w": f32([2.0, -2.0, 0.5, 2.0, 1.0, 0.0, 3.0, -0.1])}
  (tr,) = m.ties_trim([x], k=0.125, keep="reference")  # int(1) + 1 = 2nd largest = 2.0
  np.testing.assert_array_equal(np.asarray(tr["w"]), [2.0, -2.0, 0, 2.0, 0, 0, 3.0, 0])
  np.testing.assert_array_equal(np.asarray(tr["w"]),
                                ref_topk_values_mask(_np(x["w"])[None], 0.125)[0])


@pytest.mark.parametrize("kind", ["normal", "grid"])
def test_ties_reference_keep_count_per_leaf(kind):
  # Per tensor: the reference's count rule applied to each leaf, then elect + merge.
  tvs = _tvs(kind, seed=5)
  keys = sorted(tvs[0])
  for k in (0.2, 0.35):
    trimmed = {p: ref_topk_values_mask(np.stack([_np(t[p]).ravel() for t in tvs]), k)
               for p in keys}
    sign = {p: np.sign(trimmed[p].sum(0)) for p in keys}
    maj = np.sign(sum(s.sum() for s in sign.values()))
    for disjoint in ("mean", "sum"):
      got = m.ties_merged_vector(tvs, k=k, trim="per_leaf", keep="reference",
                                 disjoint=disjoint)
      for p in keys:
        s = np.where(sign[p] == 0, maj, sign[p])
        keep = np.where(s[None] > 0, trimmed[p] > 0, trimmed[p] < 0)
        sel = trimmed[p] * keep
        ref = sel.sum(0) if disjoint == "sum" else sel.sum(0) / np.maximum(keep.sum(0), 1)
        np.testing.assert_allclose(_np(got[p]).ravel(), ref, rtol=1e-6, atol=1e-6,
                                   err_msg=f"{p} k={k} {disjoint}")


def test_ties_options_are_validated_and_jittable():
  tvs = _tvs("normal")
  with pytest.raises(ValueError, match="keep"):
    m.ties_merged_vector(tvs, keep="paper")
  with pytest.raises(ValueError, match="disjoint"):
    m.ties(tvs[0], tvs, 1.0, disjoint="max")
  fn = jax.jit(m.ties_merged_vector, static_argnames=("k", "trim", "keep", "disjoint"))
  a = fn(tvs, k=0.2, keep="reference", disjoint="sum")
  b = m.ties_merged_vector(tvs, k=0.2, keep="reference", disjoint="sum")
  for p in a:
    np.testing.assert_allclose(np.asarray(a[p]), np.asarray(b[p]), rtol=1e-6, atol=1e-7)
  assert m.keep_count(0.2, 10, "reference") == 3 and m.keep_count(1.0, 7, "reference") == 7


# ------------------------------------------------ TALL masks / Consensus (tall_masks)
def ref_tall_masks(flat_tvs, merged, lam):
  """``generate_task_masks`` with ``θ0 = 0``: ``|θ0 − θ_t| > λ |θ_MTL − θ_t|``."""
  flat_ptm = np.zeros(flat_tvs.shape[1])
  flat_ft = flat_ptm + flat_tvs
  flat_multi = flat_ptm + merged
  return np.abs(flat_ptm - flat_ft) > np.abs(flat_multi - flat_ft) * lam


def test_consensus_ties_uses_disjoint_sum_as_reference():
  tvs = _tvs("normal", t=4, seed=7)
  keys = sorted(tvs[0])
  flat = _flat_stack(tvs, keys)
  lam, k_votes = 0.4, 2
  merged = ref_ties_flat(flat, 0.2, "sum")  # reset_thresh=20, merge_func="dis-sum"
  votes = ref_tall_masks(flat, merged, lam).sum(0)
  ref = _unflat(merged * (votes >= k_votes), tvs[0], keys)
  got = m.consensus_ties_merged_vector(tvs, k=k_votes, tall_lambda=lam, ties_k=0.2,
                                       keep="reference", strict=True)
  for p in keys:
    np.testing.assert_allclose(_np(got[p]), ref[p], rtol=1e-6, atol=1e-6, err_msg=p)
  # The disjoint mean (the old τ_MTL) is a different vector.
  mean = m.consensus_merged_vector(
      tvs, k_votes, lam, m.ties_merged_vector(tvs, k=0.2, keep="reference"), strict=True)
  assert not all(np.allclose(_np(mean[p]), ref[p]) for p in keys)
  # Task-arithmetic Consensus (reference: topk_values_mask with K=100, then sum).
  merged = flat.sum(0)
  votes = ref_tall_masks(flat, merged, lam).sum(0)
  ref = _unflat(merged * (votes >= k_votes), tvs[0], keys)
  got = m.consensus_merged_vector(tvs, k_votes, lam, strict=True)
  for p in keys:
    np.testing.assert_allclose(_np(got[p]), ref[p], rtol=1e-6, atol=1e-6, err_msg=p)


def test_tall_masks_strict_is_the_reference_comparison():
  t1, t2 = f32([1.0, 0.0, 2.0, 0.0]), f32([0.0, 0.0, -1.0, 3.0])
  tvs = [{"w": t1}, {"w": t2}]
  flat = np.stack([_np(t1), _np(t2)])
  for lam in (0.0, 0.5):
    ref = ref_tall_masks(flat, flat.sum(0), lam)
    got = m.tall_masks(tvs, lam, strict=True)
    for i in range(2):
      np.testing.assert_array_equal(np.asarray(got[i]["w"]), ref[i])
  # The default >= differs only on equality: entry 1 (all zero) votes with >=.
  assert bool(m.tall_masks(tvs, 0.5)[0]["w"][1]) and not bool(
      m.tall_masks(tvs, 0.5, strict=True)[0]["w"][1])


# ------------------------------------------------------------- Breadcrumbs
def ref_middle_keep(t, beta, gamma):
  """``TaskVectorMiddleKeep`` (remove_first=True): per row along the last axis, zero the
  ``int(c·γ)`` largest ``|x|``, then keep the ``int(c·β)`` largest of what remains."""
  if t.ndim == 0:
    return t
  c = t.shape[-1]

  def topk_idx(a, k):
    return np.argsort(-a, axis=-1, kind="stable")[..., :k]
  mask = np.ones(t.shape)
  np.put_along_axis(mask, topk_idx(np.abs(t), int(c * gamma)), 0.0, axis=-1)
  t = mask * t
  mask = np.zeros(t.shape)
  np.put_along_axis(mask, topk_idx(np.abs(t), int(c * beta)), 1.0, axis=-1)
  return mask * t


def ref_band_rows(t, drop_top, drop_bottom):
  """Per row: drop the int(c·top) largest and the int(c·bottom) smallest magnitudes."""
  c = t.shape[-1]
  rank = np.argsort(np.argsort(-np.abs(t), axis=-1, kind="stable"), axis=-1)
  return (rank >= int(c * drop_top)) & (rank < c - int(c * drop_bottom))


def _crumb_tvs(t=2, seed=0):
  rng = np.random.default_rng(seed)
  scale = np.array([1.0, 10.0, 100.0, 1000.0])[:, None]  # very different rows
  return [{"w": f32(rng.normal(size=(4, 10)) * scale), "b": f32(rng.normal(size=10)),
           "c": f32(rng.normal(size=(2, 3, 10))), "s": f32(rng.normal())} for _ in range(t)]


def test_breadcrumbs_ranks_rows_by_default():
  tvs = _crumb_tvs()
  masks = m.breadcrumbs_masks(tvs, drop_top=0.1, drop_bottom=0.5)
  for tv, mk in zip(tvs, masks):
    for p in ("w", "b", "c"):
      np.testing.assert_array_equal(np.asarray(mk[p]), ref_band_rows(_np(tv[p]), 0.1, 0.5),
                                    err_msg=p)
      assert np.asarray(mk[p]).reshape(-1, 10).sum(1).tolist() == [4] * (
          _np(tv[p]).size // 10)  # ranks 2..5 of every row
    assert bool(mk["s"])  # 0-d leaves are left whole
  # The whole-leaf ranking is another mask (the small rows lose everything).
  leaf = m.breadcrumbs_masks(tvs, 0.1, 0.5, granularity="leaf")[0]["w"]
  x = _np(tvs[0]["w"]).ravel()
  np.testing.assert_array_equal(np.asarray(leaf).ravel(), ref_band_rows(x, 0.1, 0.5))
  assert not np.array_equal(np.asarray(leaf), np.asarray(masks[0]["w"]))
  with pytest.raises(ValueError, match="granularity"):
    m.breadcrumbs_masks(tvs, granularity="tensor")


@pytest.mark.parametrize("beta,gamma", [(0.2, 0.1), (0.3, 0.0), (0.5, 0.2), (0.0, 0.1)])
def test_breadcrumbs_keep_fraction_matches_middle_keep(beta, gamma):
  tvs = _crumb_tvs(t=3, seed=1)
  theta0 = jax.tree.map(jnp.zeros_like, tvs[0])
  alpha = 0.4
  out = m.breadcrumbs_merge(theta0, tvs, alpha, drop_top=gamma, keep_fraction=beta)
  for p in tvs[0]:
    ref = alpha * sum(ref_middle_keep(_np(tv[p]), beta, gamma) for tv in tvs)
    np.testing.assert_allclose(_np(out[p]), ref, rtol=1e-6, atol=1e-5, err_msg=p)


# ------------------------------------------------------------- Iso-C / Iso-CTS
def ref_iso_c(tvs, keys):
  """``iso_c`` of iso-merging ``src/utils/iso.py``."""
  out = {}
  for key in keys:
    tv = [_np(t[key]) for t in tvs]
    v = sum(tv) / len(tv)
    if v.ndim == 2 and "text_projection" not in key:
      v = v * len(tv)
      u, s, vh = np.linalg.svd(v, full_matrices=False)
      v = u @ np.diag(np.full_like(s, s.mean())) @ vh
    out[key] = v
  return out


def ref_iso_cts(tvs, keys, frac):
  """``iso_cts`` of iso-merging ``src/utils/iso.py`` (zero-padded blocks and all)."""
  out, t = {}, len(tvs)
  for key in keys:
    shape = tvs[0][key].shape
    if not (len(shape) == 2 and "text_projection" not in key):
      out[key] = sum(_np(tv[key]) for tv in tvs) / t
      continue
    combined = sum(_np(tv[key]) for tv in tvs)
    common = int(min(shape) * frac)
    common = min(shape) - round((min(shape) - common) / t) * t
    u, s, v = np.linalg.svd(combined, full_matrices=False)
    cu, cs, cv = u[:, :common], s[:common], v[:common, :]
    n = int((min(shape) - common) / t)
    for i, tv in enumerate(tvs):
      w = _np(tv[key])
      w_ts = w - cu @ cu.T @ w
      ut, st, vt = np.linalg.svd(w_ts, full_matrices=False)
      if i == 0:
        uu, ss, vv = np.zeros_like(ut), np.zeros_like(st), np.zeros_like(vt)
      uu[:, i * n:(i + 1) * n] = ut[:, :n]
      ss[i * n:(i + 1) * n] = st[:n]
      vv[i * n:(i + 1) * n, :] = vt[:n, :]
    uu[:, t * n:t * n + common] = cu
    ss[t * n:t * n + common] = cs
    vv[t * n:t * n + common, :] = cv
    a, _, b = np.linalg.svd(uu, full_matrices=False)
    uu = a @ b
    a, _, b = np.linalg.svd(vv, full_matrices=False)
    vv = a @ b
    out[key] = uu @ np.diag(np.full_like(ss, ss.mean())) @ vv
  return out


def test_iso_c_means_non_matrix_leaves():
  rng = np.random.default_rng(0)
  tvs = [{"w": f32(rng.normal(size=(6, 4))), "b": f32(rng.normal(size=4)),
          "s": f32(rng.normal()), "text_projection": f32(rng.normal(size=(3, 2)))}
         for _ in range(4)]
  keys = sorted(tvs[0])
  ref = ref_iso_c(tvs, keys)
  got = m.iso_c_merged_vector(tvs, non_matrix=lambda p: "text_projection" in p)
  for p in keys:
    np.testing.assert_allclose(_np(got[p]), ref[p], rtol=1e-5, atol=1e-5, err_msg=p)
  # Without the name rule a 2-D text_projection is a matrix like any other.
  got = m.iso_c_merged_vector(tvs)
  assert not np.allclose(_np(got["text_projection"]), ref["text_projection"])
  np.testing.assert_allclose(_np(got["b"]), ref["b"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(32, 40), (40, 32)])
def test_iso_cts_fills_exactly_min_dim_directions(shape):
  rng = np.random.default_rng(1)
  tvs = [{"w": f32(rng.normal(size=shape)), "b": f32(rng.normal(size=shape[1]))}
         for _ in range(3)]
  ref = ref_iso_cts(tvs, ["w", "b"], 0.8)
  got = m.iso_cts_merged_vector(tvs, 0.8)
  np.testing.assert_allclose(_np(got["w"]), ref["w"], rtol=1e-4, atol=2e-4)
  np.testing.assert_allclose(_np(got["b"]), ref["b"], rtol=1e-6, atol=1e-6)
  # 26 common + 3 × 2 task-specific = 32 directions, all with the same singular value.
  assert m.iso_cts_sizes(32, 3, 0.8) == (26, 2)
  sv = np.linalg.svd(_np(got["w"]), compute_uv=False)
  np.testing.assert_allclose(sv, np.full(32, sv.mean()), rtol=1e-4)


def test_iso_cts_sizes_follow_the_reference_formula():
  for r in (1, 2, 5, 10, 14, 32, 768):
    for t in (1, 2, 3, 4, 8):
      for f in (0.5, 0.8, 1.0):
        c = r - round((r - int(r * f)) / t) * t
        if c < 0:
          with pytest.raises(ValueError, match="Iso-CTS"):
            m.iso_cts_sizes(r, t, f)
          continue
        common, per_task = m.iso_cts_sizes(r, t, f)
        assert (common, per_task) == (c, int((r - c) / t)), (r, t, f)
        assert common + t * per_task == r
  assert m.iso_cts_sizes(10, 4, 0.8) == (10, 0)  # round(0.5) = 0: Iso-C on that leaf


# ------------------------------------------------------------------ LiNeS
def ref_lines_scaling(keys, alpha, beta, num_blocks):
  """``LiNeS_scaling`` of wang-kee/LiNeS ``src/eval/eval.py``."""
  key_blocks = [f".{i}." for i in range(num_blocks)]
  scal = {}
  for k in keys:
    for layer, block in enumerate(key_blocks):
      if block in k:
        scal[k] = alpha + beta * (layer / (num_blocks - 1))
        break
  return {k: scal.get(k, alpha) for k in keys}


_TORCH_KEYS = ["model.visual.conv1.weight", "model.visual.transformer.resblocks.0.ln_1.weight",
               "model.visual.transformer.resblocks.11.mlp.c_fc.weight",
               "model.visual.transformer.resblocks.5.sub.2.weight",  # two indices
               "model.visual.transformer.resblocks.13.attn.out_proj.weight",  # past L
               "model.visual.ln_post.weight"]


def test_lines_reference_layer_rule():
  tv = {k: f32([1.0, -2.0]) for k in _TORCH_KEYS}
  theta0 = jax.tree.map(jnp.zeros_like, tv)
  ref = ref_lines_scaling(_TORCH_KEYS, 0.3, 0.6, 12)
  out = m.lines(theta0, tv, 0.3, 0.6, num_layers=12, layer_fn=m.reference_layer_fn(12))
  for k in _TORCH_KEYS:
    np.testing.assert_allclose(_np(out[k]), ref[k] * np.array([1.0, -2.0]), rtol=1e-6,
                               err_msg=k)
  # Default rule: the leftmost index (block 5, not 2); an index past L is unindexed (α) as
  # in the reference, or an error on request.
  out = m.lines(theta0, tv, 0.3, 0.6, num_layers=12)
  five = "model.visual.transformer.resblocks.5.sub.2.weight"
  np.testing.assert_allclose(_np(out[five])[0], 0.3 + 0.6 * 5 / 11, rtol=1e-6)
  for k in _TORCH_KEYS:
    if k != five:
      np.testing.assert_allclose(_np(out[k])[0], ref[k], rtol=1e-6, err_msg=k)
  with pytest.raises(ValueError, match="outside"):
    m.lines(theta0, tv, 0.3, 0.6, num_layers=12, out_of_range="error")
  # Our own paths: the block index comes first, ln_1 is a sub-module.
  assert m.default_layer_index("visual/blocks_3/ln_1/scale") == 3


def test_lines_multitask_alpha_is_l1_ratio_over_tasks():
  tvs = _tvs("normal", t=3, seed=9)
  merged = m.ties_merged_vector(tvs, k=0.2)
  flat = _flat_stack(tvs, sorted(tvs[0]))
  mflat = np.concatenate([_np(merged[p]).ravel() for p in sorted(tvs[0])])
  ref = np.abs(flat.sum(0)).sum() / np.abs(mflat).sum() / 3
  np.testing.assert_allclose(float(m.lines_multitask_alpha(tvs, merged)), ref, rtol=1e-5)


# ---------------------------------------------------------- Model Stock, MagMax
def test_model_stock_three_models_mean_pairwise_cosine():
  rng = np.random.default_rng(3)
  theta0 = {"w": f32(rng.normal(size=(3, 4))), "b": f32(rng.normal(size=4))}
  tvs = [jax.tree.map(lambda x: f32(rng.normal(size=x.shape) + 0.5), theta0) for _ in range(3)]
  out = m.model_stock(theta0, tvs)
  for p in theta0:
    offs = [_np(t[p]).ravel() for t in tvs]  # mergekit: offsets w_i − w_0, mean pairwise cos
    cos = [a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
           for i, a in enumerate(offs) for b in offs[i + 1:]]
    c, n = np.mean(cos), 3
    t = n * c / (1 + (n - 1) * c)
    ref = _np(theta0[p]) + t * np.mean([_np(tv[p]) for tv in tvs], axis=0)
    np.testing.assert_allclose(_np(out[p]), ref, rtol=1e-5, atol=1e-6, err_msg=p)


def test_magmax_tie_rules():
  tvs = [{"w": f32([1.0, -2.0, 3.0, 0.5])}, {"w": f32([-1.0, 2.0, 3.0, -4.0])},
         {"w": f32([1.0, 2.0, -3.0, 1.0])}]
  best = _np(tvs[0]["w"])  # merge_max_abs: torch.where(|cur| >= |best|, cur, best)
  for tv in tvs[1:]:
    cur = _np(tv["w"])
    best = np.where(np.abs(cur) >= np.abs(best), cur, best)
  np.testing.assert_array_equal(_np(m.magmax_merged_vector(tvs, tie="last")["w"]), best)
  np.testing.assert_array_equal(_np(m.magmax_merged_vector(tvs)["w"]), [1.0, 2.0, 3.0, -4.0])
