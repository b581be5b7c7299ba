"""Streaming TIES's single fused pass (sampled brackets, estimate-then-fix) and its
fallbacks equal the in-memory TIES bit for bit, on models large enough to be sampled."""
import time

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from saft_jax import merging as m
from saft_jax.merging import _chunks, _streaming, _streaming_ties, _topk

T = 3


def _models(rng, kind):
  """Pretrained + T fine-tuned flat dicts, more entries than the direct-select size."""
  shapes = {"a": (600, 500), "b": (70_001,), "c": (300, 200), "z": (5000,)}
  pre = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  pre["c"] = pre["c"].astype(ml_dtypes.bfloat16)
  pre["b"] = pre["b"].astype(np.float16)
  fts = []
  for _ in range(T):
    ft = {}
    for k, v in pre.items():
      if kind == "grid":  # a grid of magnitudes: ties at every threshold
        d = rng.integers(-60, 61, v.shape) / 1024
      else:
        d = 0.01 * rng.normal(size=v.shape)
      ft[k] = (v.astype(np.float32) + d).astype(v.dtype)
    ft["z"] = pre["z"].copy()  # exact zeros in every task vector
    fts.append(ft)
  assert sum(v.size for v in pre.values()) > _topk.DIRECT_SIZE
  return pre, fts


def _check(tmp_path, pre, fts, chunk_bytes=None, **kw):
  save_file(pre, str(tmp_path / "pre.safetensors"))
  for i, ft in enumerate(fts):
    save_file(ft, str(tmp_path / f"ft{i}.safetensors"))
  out = str(tmp_path / "out.safetensors")
  stats = m.stream_merge(str(tmp_path / "pre.safetensors"),
                         [str(tmp_path / f"ft{i}.safetensors") for i in range(T)], out,
                         "ties", lam=0.7, chunk_bytes=chunk_bytes, overwrite=True, **kw)
  theta0 = {k: jnp.asarray(v) for k, v in pre.items()}
  tvs = [m.task_vector(theta0, {k: jnp.asarray(v) for k, v in ft.items()}) for ft in fts]
  ref = m.ties(theta0, tvs, 0.7, **kw)
  with safe_open(out, "numpy") as f:
    for k in pre:
      got = f.get_tensor(k)
      assert got.dtype == np.asarray(ref[k]).dtype
      np.testing.assert_array_equal(got, np.asarray(ref[k]), err_msg=f"{kw} {k}")
  return stats


@pytest.mark.parametrize("kind", ["normal", "grid"])
def test_fused_ties_equals_in_memory(tmp_path, kind):
  rng = np.random.default_rng(11)
  pre, fts = _models(rng, kind)
  cases = [dict(k=0.2, trim="global"),
           dict(k=0.3, trim="global", keep="reference", disjoint="sum"),
           dict(k=0.2, trim="per_leaf")]
  for kw in cases:
    # 200 kB chunks: leaves cut across chunk boundaries, several dtypes
    stats = _check(tmp_path, pre, fts, chunk_bytes=200_000, **kw)
    # one read of the inputs, then fixes (per leaf, the small leaves' thresholds are
    # selected exactly before the pass)
    assert stats["passes"] == 1, (kw, stats)


def test_fused_ties_falls_back_when_a_bracket_misses(tmp_path, monkeypatch):
  rng = np.random.default_rng(12)
  pre, fts = _models(rng, "normal")
  # brackets far below every answer: the fused pass cannot finish the select
  monkeypatch.setattr(_topk, "sample_bracket", lambda blocks, n, n_keep, z=6.0,
                      estimate=False: (0, 2, 1) if estimate else (0, 2))
  stats = _check(tmp_path, pre, fts, chunk_bytes=400_000, k=0.2, trim="global")
  assert stats["passes"] >= 3, stats  # fused pass, radix select passes, write pass


def test_fused_ties_falls_back_when_the_spill_is_too_large(tmp_path, monkeypatch):
  rng = np.random.default_rng(13)
  pre, fts = _models(rng, "normal")
  monkeypatch.setattr(_streaming, "_SPILL_SHARE", 1e-6)
  stats = _check(tmp_path, pre, fts, chunk_bytes=400_000, k=0.2, trim="global")
  assert stats["passes"] == 2, stats  # thresholds known after the first pass


def test_quantized_deltas_over_the_candidate_cap_stay_one_pass(tmp_path, monkeypatch):
  # Quantized task vectors (bf16 checkpoints: few magnitude levels) put more entries inside
  # a bracket than the selector may hold; counted per distinct pattern, the fused pass still
  # finishes every threshold (a small cap stands in for a large model).
  rng = np.random.default_rng(15)
  pre, fts = _models(rng, "grid")
  monkeypatch.setattr(_topk, "DIRECT_SIZE", 4096)
  stats = _check(tmp_path, pre, fts, chunk_bytes=8192, k=0.2, trim="global")
  assert stats["passes"] == 1, stats


def test_reader_thread_keeps_a_chunk_until_it_is_finished(tmp_path, monkeypatch):
  # Without memory maps (as on an accelerator), a reader thread reads chunks into pool
  # buffers one chunk ahead of the merge loop, and each chunk is finished (its ambiguous
  # columns gathered from its buffer) while the next chunk's kernel runs: its buffer must
  # not be refilled before. A slow gather gives the reader every chance to refill it early.
  class NotMapped(_chunks._Mapped):
    def __init__(self):
      super().__init__()
      self.on = False

  monkeypatch.setattr(_streaming, "_Mapped", NotMapped)
  gather = _streaming_ties._columns

  def slow(idx, rows):
    time.sleep(0.02)
    return gather(idx, rows)

  monkeypatch.setattr(_streaming_ties, "_columns", slow)
  rng = np.random.default_rng(16)
  pre, fts = _models(rng, "normal")
  stats = _check(tmp_path, pre, fts, chunk_bytes=200_000, k=0.2, trim="global")
  assert stats["passes"] == 1 and stats["chunks"] >= 4, stats


def test_estimate_fixes_cover_ties_at_the_threshold(tmp_path, monkeypatch):
  # Estimates forced to each end of the bracket: the fixes must move every entry between
  # estimate and threshold, including entries equal to the bracket's lower end.
  rng = np.random.default_rng(14)
  pre, fts = _models(rng, "grid")
  real = _topk.sample_bracket
  for end in (0, 1):
    def bracket(blocks, n, n_keep, z=6.0, estimate=False, end=end):
      lo, hi = real(blocks, n, n_keep, z)
      return (lo, hi, lo if end == 0 else hi - 1) if estimate else (lo, hi)
    monkeypatch.setattr(_topk, "sample_bracket", bracket)
    stats = _check(tmp_path, pre, fts, chunk_bytes=300_000, k=0.25, trim="global")
    assert stats["passes"] == 1 and stats["fixed"] > 0, stats


def test_bracket_width_spreads_the_miss_rate_over_the_selects():
  """The brackets' z-score gives all of a merge's sampled selects together a two-sided
  normal tail of ``_MISS_RATE``: wider with more selects (per-leaf trim), about 3.8 for
  6 tasks' global thresholds."""
  import math

  from saft_jax.merging import _streaming_ties
  for n in (1, 6, 48, 1800):
    z = _streaming_ties._z_score(n)
    tail = 2 * n * 0.5 * math.erfc(z / math.sqrt(2))  # 2 n (1 - Φ(z))
    assert tail == pytest.approx(_streaming_ties._MISS_RATE, rel=1e-6)
  assert 3.7 < _streaming_ties._z_score(6) < 3.8 < 5.0 < _streaming_ties._z_score(1800) < 5.1


def test_reader_blocks_equal_the_memory_mapped_views(tmp_path):
  """The sample's block reads (``preadv`` per block) give the elements of ``view`` for
  float32 and bfloat16 leaves, in single files and sharded directories."""
  from saft_jax.merging import _io
  rng = np.random.default_rng(0)
  tensors = {"w": rng.normal(size=(40, 50)).astype(np.float32),
             "v": rng.normal(size=(3000,)).astype(ml_dtypes.bfloat16)}
  save_file(tensors, str(tmp_path / "one.safetensors"))
  shards = tmp_path / "sharded"
  shards.mkdir()
  save_file({"w": tensors["w"]}, str(shards / "model-00001-of-00002.safetensors"))
  save_file({"v": tensors["v"]}, str(shards / "model-00002-of-00002.safetensors"))
  (shards / "model.safetensors.index.json").write_text(
      '{"metadata": {}, "weight_map": {"w": "model-00001-of-00002.safetensors", '
      '"v": "model-00002-of-00002.safetensors"}}')
  for path in (tmp_path / "one.safetensors", shards):
    reader = _io.open_checkpoint(str(path))
    for p in ("w", "v"):
      flat = np.asarray(reader.view(p))
      starts = rng.integers(0, flat.size - 7 + 1, 25)
      got = reader.blocks(p, starts, 7)
      assert got.dtype == flat.dtype and got.shape == (25, 7)
      np.testing.assert_array_equal(got, flat[starts[:, None] + np.arange(7)])
      with pytest.raises(ValueError, match="outside tensor"):
        reader.blocks(p, [flat.size - 3], 7)
    reader.close()


@pytest.mark.parametrize("t", [3, 31])  # one uint16 flag word; two uint32 words
@pytest.mark.parametrize("trim", ["global", "per_leaf"])
def test_flag_scan_equals_direct_counts(monkeypatch, t, trim):
  """The blocked scan of the fused pass's flag words gives, per threshold group and task,
  the count above the bracket, the ambiguous offsets, the elected signs' sum and the
  majority-dependent offsets that direct NumPy on ``|τ|`` gives (blocks cut across the
  leaves, brackets ending at 2**31 or closed)."""
  from saft_jax.merging import _chunks, _streaming_ties as st
  monkeypatch.setattr(st, "_SCAN_BLOCK", 777)
  rng = np.random.default_rng(t)
  n = 5000
  bits = rng.integers(0, 1 << 12, (t, n)).astype(np.int32)  # |τ| bit patterns
  code = rng.choice(np.array([0, 1, 3, 2], np.int8), n, p=[0.3, 0.3, 0.3, 0.1])
  chunk = _chunks._Chunk(np.dtype(np.float32), n, 0)
  for i, (a, b) in enumerate([(0, 1234), (1234, 1235), (1235, 4000), (4000, n)]):
    chunk.pieces.append(_chunks._Piece(f"p{i}", 0, b - a, a))
  groups = st._groups(chunk, trim)

  class Sel:
    def __init__(self, br):
      self.br = br

    def bracket(self):
      return self.br

  sels, lo, hi = {}, np.zeros((t, n), np.int64), np.zeros((t, n), np.int64)
  for key, a, b in groups:
    for i in range(t):
      l0 = int(rng.integers(0, 1 << 11))
      br = [(l0, l0 + 500), (l0, 1 << 31), None][i % 3]
      sels[(i, key)] = Sel(br)
      lo[i, a:b], hi[i, a:b] = (st._MAX_BITS, st._MAX_BITS) if br is None else (
          br[0], min(br[1], st._MAX_BITS))
  tvs = [jnp.asarray(bits[i]).view(jnp.float32) for i in range(t)]
  words = [np.asarray(w) for w in st._flag_words(
      tvs, jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32), jnp.asarray(code))]
  got = st._scan(sels, chunk, words, trim, t)

  inside = ((bits >= lo) & (bits < hi)).any(0) | (code == 2)
  np.testing.assert_array_equal(got.idx, np.flatnonzero(inside))
  np.testing.assert_array_equal(got.major, np.flatnonzero(code == 2))
  assert got.signs == np.count_nonzero(code == 1) - np.count_nonzero(code == 3)
  for g, (key, a, b) in enumerate(groups):
    for i in range(t):
      br = sels[(i, key)].bracket()
      want = 0 if br is None or br[1] >= 1 << 31 else np.count_nonzero(bits[i, a:b] >= br[1])
      assert got.above[g, i] == want, (key, i)
  assert got.above.any()


def test_host_tau_bits_round_bf16_like_ml_dtypes():
  """The host |τ| bit patterns of bf16 leaves (integer shifts and round-to-nearest-even on
  the bits) equal ml_dtypes' casts for random bit patterns (halfway cases, subnormals,
  overflow to inf included), and the direct select (a histogram for bf16 patterns) equals a sort."""
  from saft_jax.merging import _streaming_ties as st
  rng = np.random.default_rng(5)
  bf = ml_dtypes.bfloat16
  u = rng.integers(0, 1 << 16, (2, 300_000), dtype=np.uint16)
  u[:, :4] = [[0x0001, 0x3F80, 0x7F7F, 0x8000], [0x8001, 0x3F81, 0xFF7F, 0x0000]]
  x0, x = u[0].view(bf), u[1].view(bf)
  with np.errstate(over="ignore", invalid="ignore"):
    d = x.astype(np.float32) - x0.astype(np.float32)
    want = np.bitwise_and(d.astype(bf).astype(np.float32).view(np.int32), 0x7FFFFFFF)
    got = st._np_tau_bits(x0, x)
  ok = ~np.isnan(d)
  assert ok.sum() > 250_000
  np.testing.assert_array_equal(got[ok], want[ok])
  bits = got[ok & np.isfinite(d)]
  desc = np.sort(bits)[::-1]
  for n_keep in [1, 2, 1000, bits.size // 5, bits.size, bits.size + 1]:
    expect = 0 if n_keep > bits.size else int(desc[n_keep - 1])
    assert _topk.select_direct(bits, n_keep) == expect, n_keep
