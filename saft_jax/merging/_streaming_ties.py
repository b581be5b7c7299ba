"""Streaming TIES: thresholds, the fused write pass and the in-place fixes.

TIES over safetensors inputs (output patchable in place):

0. sample: random contiguous blocks (about 1/128 of the entries, read through the memory
   map) give each task's bracket ``[lo, hi)`` of its threshold's bit pattern and an
   estimate inside it (:func:`._topk.sample_bracket`); ``trim="per_leaf"`` samples each leaf.
   Groups of at most ``_topk.DIRECT_SIZE`` entries (small leaves, per leaf) are read whole
   and selected exactly instead (:func:`_exact_bits`): a one-pattern bracket.
1. one fused pass: per chunk, one kernel writes the merge for the estimated thresholds,
   with a flag word per entry (sign code, "some task's ``|τ|`` in its bracket", per task
   ``|τ| >= hi``); NumPy counts the flags and finishes the exact select of :mod:`._topk`
   from the few ambiguous entries, whose columns (every input) are spilled to an unlinked
   temporary file (a few percent of the inputs).
2. fixes: with the exact thresholds, the spilled entries whose kept status differs between
   estimate and threshold, and the entries whose elected sum is exactly 0 with kept
   entries (TIES's majority-sign fallback, spilled too), are recomputed by the same kernel
   and patched in place where they change.

The main thread scans each chunk's flags (in cache-sized blocks) and gathers its ambiguous
columns while the next chunk's kernel runs; their counts, candidates and spill run on a
worker thread, one chunk behind.

So global TIES reads the inputs once (plus the sample and the spill). A missed bracket or
a spill over ``_streaming._SPILL_SHARE`` of the inputs falls back to radix select passes
and a second write pass, never to a different result. Orbax outputs cannot be patched: a
select pass and a sign pass precede the write pass there. The TIES options ``keep`` and
``disjoint`` are those of :func:`~saft_jax.merging.ties_merged_vector`, with the same
results.
"""
from __future__ import annotations

import os
import statistics
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _ties, _topk
from ._chunks import (_ZERO, _Chunk, _column_batches, _gather_cols, _host_rows,
                      _nrows, _piece_slices, _product, _size, _split)
from ._task_vectors import task_vector

_SAMPLE_BLOCK = 256  # contiguous entries per sampled block
# Bracket half-width: the z-score whose two-sided normal tail, over all the sampled selects of
# a merge, is _MISS_RATE. A miss costs passes (a second write pass), never exactness; wider
# brackets cost work on every merge (the ambiguous entries scale with the width).
_MISS_RATE = 1e-3


def _z_score(n_selects: int) -> float:
  """Half-width in standard errors giving every one of ``n_selects`` brackets together a
  probability of about :data:`_MISS_RATE` of missing (e.g. 3.8 for 6 tasks' global
  thresholds, 5.0 for 1800 per-leaf ones)."""
  return statistics.NormalDist().inv_cdf(1.0 - _MISS_RATE / (2.0 * max(n_selects, 1)))


# ----------------------------------------------------------------------------- kernels
def _taus(buf):
  x0, xs = _split(buf)
  return [task_vector({"w": x0}, {"w": x})["w"] for x in xs]


@jax.jit
def _k_tau_bits(buf):
  """Per task, the ``|τ|`` bit patterns (a tuple: one output per task, no stacking)."""
  return tuple(_topk.abs_bits(tv) for tv in _taus(buf))


_AMB = 4  # flag word: bits 0-1 the sign code, bit 2 ambiguous, then one bit per task


def _word_dtype(t: int):
  """Smallest unsigned dtype holding the flags of ``t`` tasks (uint32 words beyond 29)."""
  return next(d for d in (jnp.uint8, jnp.uint16, jnp.uint32)
              if t + 3 <= 8 * jnp.dtype(d).itemsize or d == jnp.uint32)


def _flag_words(tvs, lo, hi, code=None):
  """Per entry, packed flags (one XLA loop, so ``τ`` is computed once per entry): the sign
  code (bits 0-1: 0, 1, 3 for -1, 2 for "depends on the majority"), whether some task's
  ``|τ|`` lies in its bracket ``[lo, hi)`` or the code is 2 (bit 2: an entry the fixes may
  recompute) and whether task ``i``'s ``|τ| >= hi`` (bit ``3 + i``; tasks beyond the first
  word in further words)."""
  dt = _word_dtype(len(tvs))
  width = 8 * jnp.dtype(dt).itemsize
  words = [jnp.zeros(tvs[0].shape, dt) if code is None else code.astype(dt) & 3]
  if code is not None:  # the majority-dependent entries are kept with the ambiguous ones
    words[0] = words[0] | ((code == 2).astype(dt) << 2)
  bit = 3
  for t, tv in enumerate(tvs):
    b = _topk.abs_bits(tv)
    words[0] = words[0] | (((b >= lo[t]) & (b < hi[t])).astype(dt) << 2)
    if bit == width:
      words.append(jnp.zeros(tvs[0].shape, dt))
      bit = 0
    words[-1] = words[-1] | ((b >= hi[t]).astype(dt) << bit)
    bit += 1
  return tuple(words)


def _above_bit(t: int, n_tasks: int):
  """(word, mask) of task ``t``'s above-bracket flag in :func:`_flag_words`."""
  width = 8 * np.dtype(_word_dtype(n_tasks)).itemsize
  j = t + 3
  return j // width, 1 << (j % width)


@jax.jit
def _k_bracket(buf, lo, hi):
  return _flag_words(_taus(buf), lo, hi)


def _np_tau_bits(x0: np.ndarray, x: np.ndarray) -> np.ndarray:
  """``|τ|`` bit patterns of a few entries, in NumPy, rounded as :func:`task_vector` does
  (float32 difference, then the leaf dtype, round to nearest even)."""
  if x0.dtype == np.float32:
    d = np.subtract(x, x0)
  elif x0.dtype == _BF16:
    # bf16 -> float32 is a 16-bit shift; back to bf16, round to nearest even on the bits
    # (as ml_dtypes' cast, NaN aside; 2.4x faster here)
    d = np.subtract(_bf16_to_f32(x), _bf16_to_f32(x0)).view(np.uint32)
    d += np.uint32(0x7FFF) + ((d >> np.uint32(16)) & np.uint32(1))
    d &= np.uint32(0xFFFF0000)
    d = d.view(np.float32)
  else:
    d = (x.astype(np.float32) - x0.astype(np.float32)).astype(x0.dtype).astype(np.float32)
  bits = d.view(np.int32)
  return np.bitwise_and(bits, np.int32(0x7FFFFFFF), out=bits)


_BF16 = np.dtype(jnp.bfloat16)


def _bf16_to_f32(x: np.ndarray) -> np.ndarray:
  return (np.asarray(x).view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def _ties_parts(buf, thr):
  x0, tvs = _split(buf)[0], _taus(buf)
  trimmed = [_ties.trim_leaf(tv, thr[i]) for i, tv in enumerate(tvs)]
  sign = _ties.sum_sign_leaf(trimmed)
  return x0, tvs, trimmed, sign


def _ties_out(buf, thr, lam, majority, zero, disjoint):
  """Merged entries for the given majority sign, and an int8 code per entry: the elected
  sign, or 2 where the value depends on the majority (elected sum 0, some kept entry)."""
  x0, tvs, trimmed, sign = _ties_parts(buf, thr)
  merged = _ties.disjoint_leaf(trimmed, sign, majority, disjoint).astype(x0.dtype)
  # apply_task_vector's leaf math: (f32(θ0) + λ · f32(merged)).astype(dtype).
  out = (x0.astype(jnp.float32) + _product(lam, merged.astype(jnp.float32), zero)).astype(x0.dtype)
  nonzero = trimmed[0] != 0
  for x in trimmed[1:]:
    nonzero = nonzero | (x != 0)
  code = jnp.where((sign == 0) & nonzero, jnp.int8(2), sign.astype(jnp.int8))
  return out, code, tvs


@jax.jit
def _k_ties_sign_total(buf, thr):
  return _ties.sign_total_leaf(_ties_parts(buf, thr)[3])


@partial(jax.jit, static_argnames=("disjoint",))
def _k_ties(buf, thr, lam, majority, zero, disjoint):
  """:func:`_ties_out`'s merged entries and codes (element-wise only; the sign total is
  summed from the codes in NumPy)."""
  return _ties_out(buf, thr, lam, majority, zero, disjoint)[:2]


@partial(jax.jit, static_argnames=("disjoint",))
def _k_ties_bracket(buf, thr, lo, hi, lam, zero, disjoint):
  """:func:`_k_ties` for majority -1 and thresholds ``thr`` (the sampled estimates), the
  codes packed with the brackets' flags (:func:`_flag_words`): two loops over the chunk."""
  out, code, tvs = _ties_out(buf, thr, lam, jnp.float32(-1.0), zero, disjoint)
  return (out,) + _flag_words(tvs, lo, hi, code)


# ----------------------------------------------------------------------------- thresholds
def _sample_bits(pre, fts, paths, sizes, n_entries: int, rng) -> List[np.ndarray]:
  """Per task, ``(n_blocks, 256)`` sampled ``|τ|`` bit patterns over ``paths``: random
  contiguous blocks (one read of a few pages each, :meth:`SafetensorsReader.blocks`), about
  ``n_entries`` in all. Leaves shorter than a block are not sampled (the bracket is a guess,
  checked exactly)."""
  total = sum(sizes[p] for p in paths)
  per: List[List[np.ndarray]] = [[] for _ in fts]
  for p in paths:
    n = sizes[p]
    nb = int(round(n_entries * n / max(total, 1) / _SAMPLE_BLOCK))
    if n < _SAMPLE_BLOCK or nb == 0:
      continue
    starts = rng.integers(0, n - _SAMPLE_BLOCK + 1, nb)
    x0 = pre.blocks(p, starts, _SAMPLE_BLOCK)
    for t, r in enumerate(fts):
      per[t].append(_np_tau_bits(x0, r.blocks(p, starts, _SAMPLE_BLOCK)))
  return [np.concatenate(b) if b else np.zeros((0, 1), np.int32) for b in per]


def _exact_bits(pre, fts, paths, n_keep: int) -> List[int]:
  """Per task, the exact ``n_keep``-th largest ``|τ|`` bit pattern over the leaves ``paths``
  (a small group, read whole)."""
  x0 = [np.asarray(pre.view(p)) for p in paths]
  return [_topk.select_direct(np.concatenate([_np_tau_bits(a, np.asarray(r.view(p)))
                                              for a, p in zip(x0, paths)]), n_keep)
          for r in fts]


def _sample_size(n: int) -> int:
  return int(min(max(n // 128, 1 << 16), 1 << 23))


_MAX_BITS = 0x7FFFFFFF  # int32 stand-in for the bracket bound 2**31 (no NaN is supported)


def _selectors(pre, fts, items, sizes, trim, k, keep, budget_elems, sample: bool):
  """``{(task, key): KthSelector}`` (key None: global, else the leaf path), for each the
  sampled estimate of its answer (inside its bracket; ``2**31 - 1`` without a sample), and
  the bytes (per model) of the groups small enough to be selected directly."""
  leaves = [pc.path for kind, ch in items if kind == "chunk" for pc in ch.pieces
            if pc.start == 0]
  t = len(fts)
  rng = np.random.default_rng(0)
  sels, est, direct = {}, {}, 0
  groups = [(None, leaves)] if trim == "global" else [(p, [p]) for p in leaves]
  n_all = sum(sizes[p] for p in leaves)
  z = _z_score(t * sum(sum(sizes[p] for p in paths) > _topk.DIRECT_SIZE for _, paths in groups))
  for key, paths in groups:
    n = sum(sizes[p] for p in paths)
    n_keep = _topk.keep_count(k, max(n, 1), keep)
    cap = max(_topk.DIRECT_SIZE, int(budget_elems * n / max(n_all, 1) / t))
    if n <= _topk.DIRECT_SIZE and sample:
      # small groups: exact thresholds now, from the leaves read whole (else every entry
      # would be ambiguous, and spilled, in the fused pass)
      brackets = [(b, b + 1, b) for b in _exact_bits(pre, fts, paths, n_keep)]
    elif n <= _topk.DIRECT_SIZE:
      brackets = [(0, _topk._TOP, _MAX_BITS)] * t  # every entry inside: one exact pass
      cap = max(cap, n)
      direct += sum(sizes[p] * pre.dtypes[p].itemsize for p in paths)
    elif sample:
      brackets = [_topk.sample_bracket(b, n, n_keep, z=z, estimate=True)
                  for b in _sample_bits(pre, fts, paths, sizes, _sample_size(n), rng)]
    else:
      brackets = [None] * t
    for i in range(t):
      b = brackets[i]
      sels[(i, key)] = _topk.KthSelector(n_keep, b and b[:2], cap=cap, n=n)
      est[(i, key)] = _MAX_BITS if b is None else min(b[2], _MAX_BITS)
  return sels, est, direct


def _groups(chunk: _Chunk, trim: str):
  """``(key, start, stop)``: the chunk's ranges of one threshold each (global: all of it)."""
  if trim == "global":
    return [(None, 0, chunk.used)]
  return [(pc.path, pc.off, pc.off + pc.stop - pc.start) for pc in chunk.pieces]


def _chunk_values(chunk: _Chunk, t: int, trim: str, value) -> np.ndarray:
  """int32 ``value(task, key)`` for the chunk's entries: ``(T,)`` (global) or ``(T, size)``."""
  if trim == "global":
    return np.asarray([value(i, None) for i in range(t)], np.int32)
  out = np.zeros((t, chunk.size), np.int32)
  for key, a, b in _groups(chunk, trim):
    for i in range(t):
      out[i, a:b] = value(i, key)
  return out


def _bracket_bounds(sels, chunk, t, trim):
  """Kernel inputs ``lo, hi`` of the current counting pass (an empty bracket where done)."""
  def bound(j):
    def f(i, key):
      br = sels[(i, key)].bracket()
      return _MAX_BITS if br is None else min(br[j], _MAX_BITS)
    return _chunk_values(chunk, t, trim, f)
  return bound(0), bound(1)


_SCAN_BLOCK = 1 << 16  # entries per block of :func:`_scan` (its temporaries stay in L2)


class _Scan(NamedTuple):
  """:func:`_scan`'s results for one chunk."""
  idx: np.ndarray  # int32 chunk offsets of the ambiguous entries (bit 2)
  above: np.ndarray  # (groups, T) int64: per group of :func:`_groups` and task, #(|τ| >= hi)
  signs: int  # Σ of the elected signs (codes 1 and 3)
  major: np.ndarray  # int32 chunk offsets of the entries with code 2 (majority-dependent)


def _scan(sels, chunk: _Chunk, words, trim: str, t: int) -> _Scan:
  """One read of a chunk's flag words (:func:`_flag_words`), block by block, so that the
  dozen NumPy passes of the counts run over cache-resident blocks instead of the whole
  chunk each: the ambiguous offsets, the above-bracket counts of the open counting passes
  (a bracket ending at ``2**31`` has none above), and the sign code's sum and 2s."""
  groups = _groups(chunk, trim)
  w0 = words[0]
  tmp = np.empty(min(_SCAN_BLOCK, max(chunk.used, 1)), w0.dtype)
  flag = np.empty(tmp.size, bool)
  above = np.zeros((len(groups), t), np.int64)
  idx, major, signs = [], [], 0
  for g, (key, a, b) in enumerate(groups):
    tasks = []
    for i in range(t):
      br = sels[(i, key)].bracket()
      if br is not None and br[1] < _topk._TOP:
        tasks.append((i,) + _above_bit(i, t))
    for s0 in range(a, b, _SCAN_BLOCK):
      s1 = min(b, s0 + _SCAN_BLOCK)
      x, tm, fl = w0[s0:s1], tmp[:s1 - s0], flag[:s1 - s0]
      found = np.flatnonzero(np.not_equal(np.bitwise_and(x, _AMB, out=tm), 0, out=fl))
      if found.size:
        idx.append(found + s0)
      for i, w, mask in tasks:
        above[g, i] += np.count_nonzero(np.bitwise_and(words[w][s0:s1], mask, out=tm))
      np.bitwise_and(x, 3, out=tm)  # the sign code: 1: +1, 3: -1, 2: depends on the majority
      signs += _sign_sum(tm)
      if np.count_nonzero(np.equal(tm, 2, out=fl)):
        major.append(np.flatnonzero(fl) + s0)
  cat = lambda parts: (np.concatenate(parts) if parts else np.zeros(0, np.int64)).astype(np.int32)
  return _Scan(cat(idx), above, int(signs), cat(major))


def _columns(idx: np.ndarray, rows: List[np.ndarray]) -> np.ndarray:
  """The ``(R, len(idx))`` columns of a chunk's rows (:func:`._chunks._host_rows`) at the
  offsets ``idx``."""
  cols = np.empty((len(rows), idx.size), rows[0].dtype)
  at = idx.astype(np.intp)  # once, not per row; in range by construction (no bounds checks)
  for r, row in enumerate(rows):  # row by row: sequential reads, not 2-MB strides
    np.take(row, at, out=cols[r], mode="clip")
  return cols


def _bracket_counts(sels, chunk: _Chunk, above: np.ndarray, idx, cols, trim: str) -> None:
  """One chunk of a counting pass, from :func:`_scan` and :func:`_columns`: per task, the
  scan's ``#(|τ| >= hi)``, and only the ambiguous entries get their ``|τ|`` bit patterns
  (in NumPy, from their columns)."""
  t = cols.shape[0] - 1
  groups = _groups(chunk, trim)
  bounds = np.searchsorted(idx, [a for _, a, _ in groups] + [chunk.used])
  bits = _np_tau_bits(cols[0], cols[1:]).view(np.uint32)
  for g, (key, a, b) in enumerate(groups):
    brs = [sels[(i, key)].bracket() for i in range(t)]
    lo = np.asarray([_MAX_BITS if br is None else br[0] for br in brs], np.uint32)
    hi = np.asarray([_MAX_BITS if br is None else br[1] for br in brs], np.uint32)
    # every task's entries in its [lo, hi) at once: one unsigned compare
    bb = bits[:, bounds[g]:bounds[g + 1]]
    ins = bb - lo[:, None] < (hi - lo)[:, None]
    for i in range(t):
      if brs[i] is None:
        continue
      vals = bb[i][ins[i]]
      eq = vals == lo[i]
      sels[(i, key)].add_counts(int(above[g, i]), int(np.count_nonzero(eq)),
                                vals[~eq].view(np.int32))


def _words(words, chunk: _Chunk) -> List[np.ndarray]:
  return [np.asarray(w)[:chunk.used] for w in words]


def _select_chunk(sels, chunk: _Chunk, buf, trim: str) -> None:
  """One chunk of a select pass: while every open global select is a counting pass, from
  the bracket flags (:func:`_bracket_counts`); otherwise (and per leaf, where many small
  leaves are selected directly) the selectors see every bit pattern."""
  t = _nrows(buf) - 1
  if trim == "global" and all(s.bracket() is not None for s in sels.values()
                              if s.result is None):
    words = _words(_k_bracket(buf, *_bracket_bounds(sels, chunk, t, trim)), chunk)
    sc = _scan(sels, chunk, words, trim, t)
    _bracket_counts(sels, chunk, sc.above, sc.idx, _columns(sc.idx, _host_rows(buf)), trim)
    return
  bits = [np.asarray(b) for b in _k_tau_bits(buf)]
  for i in range(t):
    for key, a, b in _groups(chunk, trim):
      sels[(i, key)].update(bits[i][a:b])


# ------------------------------------------------------------------------------- TIES
class _Ties:
  """Global or per-leaf TIES over the chunks: thresholds, the write pass, the fixes after it.

  With brackets and an output patchable in place (``fused``), the write pass is also the
  thresholds' counting pass: it writes the merge for the sampled estimates of the
  thresholds, and spills the ambiguous columns (every input's entries where some task's
  ``|τ|`` lies in its bracket, or whose value depends on the majority sign: a few percent)
  to an unlinked temporary file. Once the exact thresholds are known, only the spilled
  entries whose kept status differs between estimate and threshold, and those depending on
  the majority sign, are recomputed by the same kernel and patched in place where they
  change. A missed bracket or a spill over ``spill_cap`` bytes falls back to select passes
  and a second, exact write pass (after which the majority-dependent entries are read back
  from the inputs if the majority sign is positive).
  """

  def __init__(self, sels, est, t: int, trim: str, lam, disjoint: str, fused: bool,
               spill_dir: str, spill_cap: int):
    self.sels, self.est, self.t, self.trim, self.disjoint = sels, est, t, trim, disjoint
    self.lam = jnp.asarray(lam, jnp.float32)
    self.fused = fused
    self.thr: Optional[Dict] = None  # exact thresholds, once known
    self.majority: Optional[float] = None  # known before the write pass (orbax)
    self.total = 0  # Σ elected signs written (entries depending on the majority excluded)
    self.major: Dict[int, np.ndarray] = {}  # chunk index -> offsets depending on it
    self._spill = tempfile.TemporaryFile(dir=spill_dir, buffering=0) if fused else None
    # The fused pass's counts of the ambiguous entries and the spill run on a worker thread
    # (at most one chunk behind), overlapping the next chunk's kernel and flag scan.
    self._worker = ThreadPoolExecutor(1) if fused else None
    self._pending = None
    self._spilled: List[Tuple[int, int, int]] = []  # (chunk index, columns, file offset)
    self._spill_bytes, self._spill_cap = 0, spill_cap

  def close(self) -> None:
    if self._worker is not None:
      self._worker.shutdown(wait=True)
      self._worker = None
    if self._spill is not None:
      self._spill.close()
      self._spill = None

  def resolve(self, passes: Callable[[], Iterator]) -> None:
    """Select passes until every threshold is known."""
    while any(s.result is None for s in self.sels.values()):
      for ch, buf in passes():
        _select_chunk(self.sels, ch, buf, self.trim)
      for s in self.sels.values():
        s.end_pass()
    self.thr = {key: int(s.result) for key, s in self.sels.items()}

  def sign_pass(self, passes: Callable[[], Iterator]) -> None:
    """The majority sign before the write pass (outputs that cannot be patched)."""
    total = 0
    for ch, buf in passes():
      total += int(_k_ties_sign_total(buf, self._values(ch, self.thr)))
    self.majority = float(np.sign(total))

  def _values(self, chunk, table):
    return _chunk_values(chunk, self.t, self.trim, lambda i, key: table[(i, key)])

  def _keep(self, ci: int, idx: np.ndarray, cols: np.ndarray) -> None:
    """Spill one chunk's ambiguous columns (stops spilling past the cap)."""
    if self._spill is None:
      return
    n = idx.nbytes + cols.nbytes
    if self._spill_bytes + n > self._spill_cap:
      self._spill.close()  # too many: a second write pass instead of fixes
      self._spill = None
      return
    self._spilled.append((ci, idx.size, self._spill_bytes))
    for a in (idx, cols):
      data = memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
      while data:
        data = data[self._spill.write(data):]
    self._spill_bytes += n

  def _count_signs(self, ch: _Chunk, code: np.ndarray) -> None:
    """Sum a chunk's elected signs; record the entries depending on the majority sign."""
    self.total += _sign_sum(code)
    if np.count_nonzero(code == 2):
      self.major[ch.index] = np.flatnonzero(code == 2).astype(np.int32)

  def _fused_counts(self, ch: _Chunk, sc: _Scan, cols) -> None:
    _bracket_counts(self.sels, ch, sc.above, sc.idx, cols, self.trim)
    self._keep(ch.index, sc.idx, cols)

  def _wait(self) -> None:
    if self._pending is not None:
      self._pending.result()
      self._pending = None

  def write_chunk(self, ch: _Chunk, buf):
    """Start chunk ``ch``'s kernel; returns the function that finishes the chunk (see
    :func:`._streaming._write_pass`): the merged chunk (exact, or for the estimates in a
    fused pass), its signs summed."""
    if self.fused:
      lo, hi = _bracket_bounds(self.sels, ch, self.t, self.trim)
      out, *flags = _k_ties_bracket(buf, self._values(ch, self.est), lo, hi, self.lam, _ZERO,
                                    self.disjoint)

      def finish():
        # The brackets the scan reads stay fixed during the pass (the worker only counts).
        sc = _scan(self.sels, ch, _words(flags, ch), self.trim, self.t)
        cols = _columns(sc.idx, _host_rows(buf))  # the buffer is refilled after this
        self.total += sc.signs
        if sc.major.size:
          self.major[ch.index] = sc.major
        self._wait()
        self._pending = self._worker.submit(self._fused_counts, ch, sc, cols)
        return np.asarray(out)
      return finish
    maj = jnp.float32(-1.0 if self.majority is None else self.majority)
    out, code = _k_ties(buf, self._values(ch, self.thr), self.lam, maj, _ZERO, self.disjoint)

    def finish():
      if self.majority is None:
        self._count_signs(ch, np.asarray(code)[:ch.used] & 3)
      return np.asarray(out)
    return finish

  def end_fused(self) -> bool:
    """After a fused write pass: True when the fixes can finish it (else reset for select
    passes and a second write pass)."""
    self._wait()
    for s in self.sels.values():
      s.end_pass()
    if all(s.result is not None for s in self.sels.values()):
      self.thr = {key: int(s.result) for key, s in self.sels.items()}
    if self.thr is not None and self._spill is not None:
      return True
    self.close()
    self.fused, self.total, self.major, self._spilled = False, 0, {}, []
    return False

  def _spilled_fixes(self, chunks: List[_Chunk]):
    """``(chunk index, offsets, columns)`` of the spilled entries whose kept status differs
    between the estimates and the thresholds, for some task."""
    fd = self._spill.fileno()
    r = self.t + 1
    for ci, m, pos in self._spilled:
      ch = chunks[ci]
      idx = np.frombuffer(os.pread(fd, 4 * m, pos), np.int32)
      cols = np.frombuffer(os.pread(fd, r * m * ch.dtype.itemsize, pos + 4 * m),
                           ch.dtype).reshape(r, m)
      bits = _np_tau_bits(cols[0], cols[1:])
      groups = _groups(ch, self.trim)
      bounds = np.searchsorted(idx, [a for _, a, _ in groups] + [ch.used])
      major = self.major.get(ci)
      need = (np.zeros(idx.size, bool) if major is None
              else np.isin(idx, major, assume_unique=True))
      for i in range(self.t):
        for g, (key, _, _) in enumerate(groups):
          a, b = sorted((self.est[(i, key)], self.thr[(i, key)]))
          sl = slice(bounds[g], bounds[g + 1])
          need[sl] |= bits[i, sl].view(np.uint32) - np.uint32(a) < np.uint32(b - a)
      sel = np.flatnonzero(need)
      if sel.size:
        yield ci, idx[sel], cols[:, sel]

  def _fixes(self, readers, chunks: List[_Chunk]):
    """Every chunk's entries to recompute, sorted: ``(chunk index, offsets, columns)``. The
    majority-dependent entries not spilled (after an exact write pass) are read back from
    the inputs."""
    spilled = dict((ci, (o, c)) for ci, o, c in self._spilled_fixes(chunks)) if self.fused else {}
    with ThreadPoolExecutor(_topk._threads(len(readers))) as ex:
      for ci in sorted(set(spilled) | set(self.major)):
        offs, cols = spilled.get(ci, (np.zeros(0, np.int32), None))
        extra = (np.setdiff1d(self.major[ci], offs, assume_unique=True) if ci in self.major
                 else offs[:0])
        if extra.size:
          more = _gather_cols(readers, chunks[ci], extra, ex)
          offs = np.concatenate([offs, extra])
          cols = more if cols is None else np.concatenate([cols, more], axis=1)
          order = np.argsort(offs, kind="stable")
          offs, cols = offs[order], cols[:, order]
        yield ci, offs, cols

  def fix(self, writer, readers, chunks: List[_Chunk], stats: Dict) -> None:
    """Recompute the entries of :meth:`_fixes` as written and with the exact thresholds
    (both majority signs), correct the sign total, then patch the entries that change."""
    if self.majority is not None or (not self.fused and self.total <= 0):
      return  # exact thresholds, and the majority sign written is the right one
    written = self.est if self.fused else self.thr
    results = []
    for gbuf, segs in _column_batches(chunks, self._fixes(readers, chunks), self.t + 1):
      m, size = segs[-1][3], _size(gbuf)
      thr = self._seg_values(chunks, segs, self.thr, size)
      out_m, code = (np.asarray(a)[:m] for a in _k_ties(
          gbuf, thr, self.lam, jnp.float32(-1.0), _ZERO, self.disjoint))
      out_p = np.asarray(_k_ties(gbuf, thr, self.lam, jnp.float32(1.0), _ZERO,
                                 self.disjoint)[0])[:m]
      old, old_code = (np.asarray(a)[:m] for a in _k_ties(
          gbuf, self._seg_values(chunks, segs, written, size), self.lam,
          jnp.float32(-1.0), _ZERO, self.disjoint))
      self.total += _sign_sum(code & 3) - _sign_sum(old_code & 3)
      for ci, offs, c0, c1 in segs:
        results.append((chunks[ci], offs, old[c0:c1], out_m[c0:c1], out_p[c0:c1],
                        code[c0:c1]))
    positive = self.total > 0
    for ch, offs, old, out_m, out_p, code in results:
      new = out_p if positive else out_m
      changed = _bits(new) != _bits(old)
      for pc, sl in _piece_slices(ch, offs):
        c = changed[sl]
        if c.any():
          writer.patch(pc.path, pc.start + offs[sl][c] - pc.off, new[sl][c])
      stats["fixed"] += int(np.count_nonzero(changed))
      if positive:
        stats["patched"] += int(np.count_nonzero(code == 2))

  def _seg_values(self, chunks, segs, table, size):
    if self.trim == "global":
      return np.asarray([table[(i, None)] for i in range(self.t)], np.int32)
    out = np.zeros((self.t, size), np.int32)
    for ci, offs, c0, _ in segs:
      for pc, sl in _piece_slices(chunks[ci], offs):
        for i in range(self.t):
          out[i, c0 + sl.start:c0 + sl.stop] = table[(i, pc.path)]
    return out


def _sign_sum(code: np.ndarray) -> int:
  """Σ of the elected signs of sign codes masked to 2 bits (1: +1, 3: -1; the 2s, which
  depend on the majority, excluded)."""
  return int(np.count_nonzero(code == 1)) - int(np.count_nonzero(code == 3))


def _bits(a: np.ndarray) -> np.ndarray:
  """The raw bits of a float array (compares -0.0 and NaN payloads exactly)."""
  return a.view(np.dtype(f"u{a.dtype.itemsize}"))
