"""Shared helpers for the merging tests: random pytrees and a NumPy TIES reference."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from hypothesis import strategies as st

SHAPES = [(), (3,), (2, 3), (2, 1, 3)]
DTYPES = ["float32", "bfloat16"]

leaf_spec = st.tuples(st.sampled_from(SHAPES), st.sampled_from(DTYPES))
tree_spec = st.recursive(
    leaf_spec,
    lambda ch: st.one_of(
        st.lists(ch, min_size=1, max_size=3),
        st.dictionaries(st.sampled_from(["a", "b", "blocks_0", "layers_1"]), ch,
                        min_size=1, max_size=3)),
    max_leaves=5)


def build(spec, rng, scale=1.0, like=None):
  """A pytree of jnp arrays following ``spec`` (random normal values)."""
  if isinstance(spec, list):
    return [build(s, rng, scale) for s in spec]
  if isinstance(spec, dict):
    return {k: build(v, rng, scale) for k, v in spec.items()}
  shape, dtype = spec
  return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32).astype(dtype)


def models(spec, seed, t=3):
  """(θ0, [θ_t]) with an extra int leaf shared by all models."""
  rng = np.random.default_rng(seed)
  theta0 = {"net": build(spec, rng), "step": jnp.int32(7)}
  fts = [{"net": jax.tree.map(lambda x: (x.astype(jnp.float32) + jnp.asarray(
      rng.normal(size=x.shape) * 0.1, jnp.float32)).astype(x.dtype), theta0["net"]),
          "step": jnp.int32(7)} for _ in range(t)]
  return theta0, fts


def np_flat(tree):
  """Path-string -> float64 NumPy array for float leaves."""
  from saft_jax.merging import path_str
  out = {}
  for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if jnp.issubdtype(x.dtype, jnp.floating):
      out[path_str(p)] = np.asarray(x.astype(jnp.float32), np.float64)
  return out


def ref_ties_vectors(tvs_flat, k, trim):
  """TIES from the published algorithm, with sorting. ``tvs_flat``: list over tasks of
  dicts path -> array (same keys). Returns dict path -> merged float64 array."""
  keys = list(tvs_flat[0])
  t = len(tvs_flat)
  trimmed = [dict() for _ in range(t)]
  for i in range(t):
    if trim == "global":
      allv = np.concatenate([tvs_flat[i][p].ravel() for p in keys])
      n_keep = max(1, int(k * allv.size))
      thr = np.sort(np.abs(allv))[::-1][n_keep - 1]
      for p in keys:
        trimmed[i][p] = np.where(np.abs(tvs_flat[i][p]) >= thr, tvs_flat[i][p], 0.0)
    else:
      for p in keys:
        v = tvs_flat[i][p]
        n_keep = max(1, int(k * v.size))
        thr = np.sort(np.abs(v).ravel())[::-1][n_keep - 1]
        trimmed[i][p] = np.where(np.abs(v) >= thr, v, 0.0)
  stacked = {p: np.stack([trimmed[i][p] for i in range(t)]) for p in keys}
  signs = {p: np.sign(stacked[p].sum(0)) for p in keys}
  majority = np.sign(sum(s.sum() for s in signs.values()))
  out = {}
  for p in keys:
    s = np.where(signs[p] == 0, majority, signs[p])
    x = stacked[p]
    keep = np.where(s[None] > 0, x > 0, x < 0)
    sel = np.where(keep, x, 0.0)
    out[p] = sel.sum(0) / np.maximum(keep.sum(0), 1)
  return out


def tol(dtype):
  return dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-6)


def assert_close_trees(a, b, **kw):
  """Leaf-wise allclose with a dtype-aware tolerance, same structure and dtypes."""
  import chex
  chex.assert_trees_all_equal_shapes_and_dtypes(a, b)
  for (p, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    t = kw or tol(x.dtype)
    np.testing.assert_allclose(np.asarray(x.astype(jnp.float32)) if jnp.issubdtype(
        x.dtype, jnp.floating) else np.asarray(x), np.asarray(y.astype(jnp.float32)) if
        jnp.issubdtype(y.dtype, jnp.floating) else np.asarray(y), err_msg=str(p), **t)
