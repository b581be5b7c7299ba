"""The exact k-th largest magnitude select (sampled bracket + radix passes) and its two
engines against a NumPy sort reference."""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from saft_jax import merging as m
from saft_jax.merging import _topk


def _ref_bits(arrays, n_keep):
  a = np.sort(np.concatenate([np.abs(np.asarray(x, np.float32)).ravel() for x in arrays]))
  if n_keep > a.size:
    return 0
  return int(a[::-1][n_keep - 1:n_keep].view(np.int32)[0])


def _data(kind, rng):
  if kind == "normal":
    return [rng.normal(size=300_000).astype(np.float32)]
  if kind == "leaves":  # several arrays of different scales
    return [rng.normal(size=(700, 500)).astype(np.float32),
            5 * rng.normal(size=1000).astype(np.float32), np.zeros((0,), np.float32)]
  if kind == "zeros":  # 75 % exact zeros (and a -0.0): the answer is often 0
    z = rng.normal(size=400_000).astype(np.float32)
    z[:300_000] = 0
    z[5] = -0.0
    return [z]
  if kind == "grid":  # 7 distinct magnitudes: every answer is a heavy tie
    return [(rng.integers(-3, 4, size=500_000) / 4).astype(np.float32)]
  if kind == "bf16":
    return [rng.normal(size=400_000).astype(ml_dtypes.bfloat16)]
  if kind == "f16":
    return [rng.normal(size=400_000).astype(np.float16)]
  if kind == "columns":  # column scales over 6 decades: strided/clustered layouts
    s = np.logspace(-3, 3, 400)[None].astype(np.float32)
    a = rng.normal(size=(1000, 400)).astype(np.float32) * s
    a[3, 7] = np.inf
    return [a]
  raise ValueError(kind)


KINDS = ["normal", "leaves", "zeros", "grid", "bf16", "f16", "columns"]


@pytest.mark.parametrize("kind", KINDS)
def test_host_select_is_exact(kind):
  rng = np.random.default_rng(KINDS.index(kind))
  arrays = _data(kind, rng)
  n = sum(a.size for a in arrays)
  for n_keep in [1, 2, 17, n // 100, n // 5, n // 2, n - 1, n, n + 3]:
    want = _ref_bits(arrays, n_keep)
    assert _topk.np_kth_largest_bits(arrays, n_keep) == want, n_keep
    # a tiny sample: brackets miss often, the radix passes must recover
    assert _topk.np_kth_largest_bits(arrays, n_keep, sample_size=64, seed=n_keep) == want
    assert _topk.kth_largest_bits_histogram(lambda: iter(arrays), n_keep) == want


@pytest.mark.parametrize("kind", ["normal", "zeros", "grid"])
def test_selector_recovers_from_any_bracket_and_cap(kind):
  rng = np.random.default_rng(7)
  arrays = _data(kind, rng)
  n = sum(a.size for a in arrays)
  for n_keep in [1, n // 5, n]:
    want = _ref_bits(arrays, n_keep)
    brackets = [None, (0, 1), (0, _topk._TOP), (want, want + 1), (want + 1, want + 9),
                (max(want - 9, 0), want), (max(want - 9, 0), want + 9)]
    for bracket in brackets:
      for cap in [None, 10]:
        sel = _topk.KthSelector(n_keep, bracket, cap=cap)
        while True:
          for a in arrays:  # fed in pieces, as the streaming merge does
            for piece in np.array_split(_topk.np_abs_bits(a).ravel(), 3):
              sel.update(piece)
          if sel.end_pass():
            break
          assert sel.passes < 5, (bracket, cap)
        assert sel.result == want, (n_keep, bracket, cap)


@pytest.mark.parametrize("kind", ["grid", "bf16"])
def test_quantized_bracket_over_the_cap_takes_one_pass(kind):
  # Quantized magnitudes (bf16 deltas) put many entries on few patterns inside a bracket:
  # past the cap the selector keeps distinct patterns with counts, not a histogram pass.
  rng = np.random.default_rng(11)
  arrays = _data(kind, rng)
  bits = _topk.np_abs_bits(arrays[0]).ravel()
  n = bits.size
  for n_keep in [n // 5, n // 2]:
    want = _ref_bits(arrays, n_keep)
    distinct = np.unique(bits)
    j = int(np.searchsorted(distinct, want))
    lo = int(distinct[max(j - 3, 0)])
    hi = int(distinct[j + 3]) if j + 3 < distinct.size else want + 1
    inside = np.count_nonzero((bits > lo) & (bits < hi))
    n_distinct = np.count_nonzero((distinct > lo) & (distinct < hi))
    cap = max(n_distinct, inside // 50)
    assert inside > 10 * cap  # the raw patterns would overflow the cap many times over
    sel = _topk.KthSelector(n_keep, (lo, hi), cap=cap)
    for piece in np.array_split(bits, 40):
      sel.update(piece)
    assert sel.end_pass(), (kind, n_keep)
    assert sel.passes == 1 and sel.result == want
    # more distinct patterns than the cap: still exact, through histogram passes
    sel = _topk.KthSelector(n_keep, (lo, hi), cap=max(n_distinct - 1, 1))
    while True:
      sel.update(bits)
      if sel.end_pass():
        break
      assert sel.passes < 5
    assert sel.passes > 1 and sel.result == want


def test_sampled_bracket_holds_the_answer_in_one_pass():
  rng = np.random.default_rng(3)
  for kind in ["normal", "columns", "bf16"]:
    arrays = _data(kind, rng)
    a = arrays[0].ravel()
    n = a.size
    for n_keep in [n // 100, n // 5, n // 2]:
      lo, hi = _topk.sample_bracket(_topk._random_sample([a], n, 1 << 14, 0), n, n_keep)
      want = _ref_bits(arrays, n_keep)
      assert lo <= want < hi, (kind, n_keep)
      # and it is narrow: a few percent of the entries fall strictly inside
      bits = _topk.np_abs_bits(a)
      assert np.count_nonzero((bits > lo) & (bits < hi)) < 0.1 * n


def _clear_xla_caches():
  for f in (_topk._xla_groups, _topk._xla_rows):
    f.clear_cache()


@pytest.fixture(params=["host", "xla1", "xla4"])
def engine(request, monkeypatch):
  """The host engine, and the XLA engine with 1-bit (bisection) and 4-bit radix digits."""
  name = request.param
  monkeypatch.setenv("SAFT_TOPK_ENGINE", "host" if name == "host" else "xla")
  if name != "host":
    monkeypatch.setattr(_topk, "_digit_bits", lambda: int(name[3:]))
  _clear_xla_caches()
  yield name
  _clear_xla_caches()


def test_engines_agree_with_sort(engine):
  rng = np.random.default_rng(5)
  groups = [_data("leaves", rng)[:2], _data("zeros", rng), _data("bf16", rng),
            [np.zeros((0,), np.float32)]]
  n_keeps = [9_000, 100_000, 1, 1]
  want = [_ref_bits(g, k) for g, k in zip(groups, n_keeps)]
  jgroups = [[jnp.asarray(a) for a in g] for g in groups]
  eager = m.kth_largest_bits_groups(jgroups, n_keeps)
  jitted = jax.jit(lambda gs: m.kth_largest_bits_groups(gs, n_keeps))(jgroups)
  assert [int(v) for v in eager] == want
  assert [int(v) for v in jitted] == want
  assert int(m.kth_largest_bits(jgroups[0], 9_000)) == want[0]
  x = jnp.asarray(_data("grid", rng)[0][:60_000].reshape(60, 1000))
  for n_keep in [1, 333, 1000]:
    rows = [_ref_bits([r], n_keep) for r in np.asarray(x)]
    assert [int(v) for v in m.kth_largest_bits_rows(x, n_keep)] == rows
    assert [int(v) for v in jax.jit(m.kth_largest_bits_rows)(x, n_keep)] == rows


def test_ties_is_the_same_on_every_engine(monkeypatch):
  rng = np.random.default_rng(6)
  tvs = [{"a": jnp.asarray(rng.normal(size=(400, 700)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=(3000,)), jnp.bfloat16)} for _ in range(3)]
  outs = []
  for name in ["host", "xla"]:
    monkeypatch.setenv("SAFT_TOPK_ENGINE", name)
    fn = jax.jit(lambda x: m.ties_merged_vector(x, k=0.2))  # a new function: traced anew
    outs.append(jax.tree.map(np.asarray, fn(tvs)))
    thr = m.ties_thresholds(tvs, 0.2)
    flat = [np.concatenate([np.asarray(t["a"], np.float32).ravel(),
                            np.asarray(t["b"], np.float32).ravel()]) for t in tvs]
    n_keep = m.keep_count(0.2, flat[0].size)
    assert [int(v) for v in thr] == [_ref_bits([f], n_keep) for f in flat]
  for key in outs[0]:
    np.testing.assert_array_equal(outs[0][key], outs[1][key])


def test_engine_choice(monkeypatch):
  monkeypatch.setenv("SAFT_TOPK_ENGINE", "auto")
  assert _topk.engine() == ("host" if jax.default_backend() == "cpu" else "xla")
  monkeypatch.setenv("SAFT_TOPK_ENGINE", "gpu")
  with pytest.raises(ValueError, match="SAFT_TOPK_ENGINE"):
    _topk.engine()
