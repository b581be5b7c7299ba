"""Streaming (out-of-core) merges of checkpoints, chunk by chunk.

Inputs and output: single ``.safetensors`` files, Hugging Face sharded safetensors
directories (``model-0000k-of-0000N.safetensors`` + ``model.safetensors.index.json``; the
output keeps the input's shard split and index, and the directory's other files), or orbax
pytree checkpoints (see :mod:`._io`).

Layout of the work: the mergeable leaves (floating, not excluded) are cut into flat pieces
and packed, in file order, into chunks of ``chunk_bytes`` per model with one dtype; every
chunk is one fixed-size flat buffer per model, so each merge kernel is compiled once per
dtype. A reader thread fills the next chunk's buffers (memory-mapped reads: page faults
plus one copy, no dtype conversion) while the current chunk is merged. Non-mergeable leaves
are copied through. Peak memory is about ``3 × (T + 1) × chunk_bytes`` (the chunk being
merged, the one being read, the outputs) plus the merge temporaries, not the models' size;
the default chunk is a quarter of the largest leaf (1-64 MiB).

The per-chunk math is that of the in-memory merges (:func:`task_vector`,
:func:`weight_average` and the TIES leaf primitives called as they are; the leaf formulas
of :func:`task_arithmetic` and :func:`apply_task_vector` restated so that each product is
rounded on its own, as eagerly, instead of being fused into a multiply-add) inside one
jitted kernel per chunk. Element-wise math does not depend on the packing, so results
equal the eager in-memory merge bit for bit.

TIES passes over the inputs (safetensors output):

1. thresholds: a sample (random contiguous blocks, about 1/128 of the entries, read through
   the memory map) gives each task's bracket, then one pass runs the exact select of
   :mod:`._topk` (counts + the few entries inside the bracket). ``trim="per_leaf"`` runs
   one select per leaf and task in the same pass. A missed bracket costs extra passes,
   never exactness.
2. write: trim, elect, disjoint mean/sum and ``θ0 + λ·τ``, summing the elected signs on the
   way. TIES's majority-sign fallback only matters where the elected sum is exactly 0 with
   kept entries; those entries are written for a non-positive majority and recorded with
   their value for a positive one, and patched in place once the majority is known.

So global TIES reads the inputs about 2.01 times (task arithmetic and weight averaging
once). Orbax output cannot be patched in place, so there a sign pass precedes the write.
The TIES options ``keep`` and ``disjoint`` are those of
:func:`~saft_jax.merging.ties_merged_vector`, with the same results.
"""
from __future__ import annotations

import mmap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _io, _ties, _topk
from ._basic import task_lams, weight_average
from ._task_vectors import ExcludeFn, is_mergeable, task_vector

METHODS = ("weight_average", "task_arithmetic", "ties")
_MIN_CHUNK, _MAX_CHUNK = 1 << 20, 64 << 20
_SAMPLE_BLOCK = 256  # contiguous entries per sampled block


def _check_layouts(pre, fts, names):
  for i, r in enumerate(fts):
    if r.paths != pre.paths and set(r.paths) != set(pre.paths):
      missing = [p for p in pre.paths if p not in r.shapes]
      extra = [p for p in r.paths if p not in pre.shapes]
      where = f"missing leaf {missing[0]!r}" if missing else f"unexpected leaf {extra[0]!r}"
      raise ValueError(f"checkpoint {names[i]!r} does not match the pretrained one: {where}")
    for p in pre.paths:
      if r.shapes[p] != pre.shapes[p]:
        raise ValueError(f"checkpoint {names[i]!r}: leaf {p!r} has shape {r.shapes[p]}, "
                         f"pretrained has {pre.shapes[p]}")
      if r.dtypes[p] != pre.dtypes[p]:
        raise ValueError(f"checkpoint {names[i]!r}: leaf {p!r} has dtype {r.dtypes[p]}, "
                         f"pretrained has {pre.dtypes[p]}")


# ------------------------------------------------------------------------------ the plan
@dataclass
class _Piece:
  path: str
  start: int  # flat element range of the leaf
  stop: int
  off: int  # position in the chunk buffer


@dataclass
class _Chunk:
  dtype: np.dtype
  size: int  # buffer length (elements), fixed per dtype
  pieces: List[_Piece] = field(default_factory=list)

  @property
  def used(self) -> int:
    return self.pieces[-1].off + self.pieces[-1].stop - self.pieces[-1].start if self.pieces else 0


def _plan(pre, mergeable: Dict[str, bool], chunk_bytes: int, split: bool):
  """Work items in file order: ``("copy", path)`` or ``("chunk", _Chunk)``, and leaf sizes.

  ``split``: leaves are cut into pieces that fill fixed-size chunks (safetensors).
  Otherwise chunks hold whole leaves, and the leaves of one writer unit (an orbax list)
  stay in one chunk.
  """
  sizes = {p: int(np.prod(pre.shapes[p], dtype=np.int64)) for p in pre.paths}
  cap: Dict[np.dtype, int] = {}
  for p in pre.paths:
    dt = np.dtype(pre.dtypes[p])
    cap[dt] = max(cap.get(dt, 1), chunk_bytes // dt.itemsize)
  units = pre.units()
  items: List[Tuple[str, object]] = []
  cur: Optional[_Chunk] = None

  def new_chunk(dt):
    ch = _Chunk(dt, cap[dt])
    items.append(("chunk", ch))
    return ch

  for p in pre.paths:
    n = sizes[p]
    if not mergeable[p] or n == 0:
      cur = None
      items.append(("copy", p))
      continue
    dt = np.dtype(pre.dtypes[p])
    if split:
      start = 0
      while start < n:
        if cur is None or cur.dtype != dt or cur.used >= cur.size:
          cur = new_chunk(dt)
        stop = min(n, start + cur.size - cur.used)
        cur.pieces.append(_Piece(p, start, stop, cur.used))
        start = stop
      continue
    same_unit = (cur is not None and cur.pieces and units[p] != p
                 and units[cur.pieces[-1].path] == units[p])
    if cur is None or cur.dtype != dt or (cur.used + n > cur.size and not same_unit):
      cur = new_chunk(dt)
    cur.pieces.append(_Piece(p, 0, n, cur.used))
    cur.size = max(cur.size, cur.used)
  return items, sizes


# ----------------------------------------------------------------------------- reading
def _aligned_empty(shape, dtype) -> np.ndarray:
  """An uninitialized array in its own anonymous memory map: page-aligned (so
  ``jax.device_put`` aliases it on CPU instead of copying) and handed back to the OS when
  the last array on it is gone (malloc arenas would keep freed chunk buffers resident)."""
  dtype = np.dtype(dtype)
  n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  return np.frombuffer(mmap.mmap(-1, max(n, 1)), np.uint8, n).view(dtype).reshape(shape)


class _BufferPool:
  """Chunk buffers reused round-robin (2 per shape: the chunk being merged and the one
  being read), so steady-state reading neither page-faults fresh memory nor grows the
  allocator's heap. A buffer is refilled only after the kernels reading it have finished:
  the reader thread starts on chunk ``i + 2`` when the merge loop asks for chunk ``i + 1``,
  and the loop waits for chunk ``i``'s results before asking."""

  def __init__(self, depth: int = 2):
    self._depth = depth
    self._bufs: Dict[tuple, List[np.ndarray]] = {}
    self._next: Dict[tuple, int] = {}

  def get(self, shape, dtype) -> np.ndarray:
    key = (tuple(shape), np.dtype(dtype).str)
    bufs = self._bufs.setdefault(key, [])
    i = self._next.get(key, 0)
    self._next[key] = (i + 1) % self._depth
    if i == len(bufs):
      bufs.append(_aligned_empty(shape, dtype))
    return bufs[i]


def _load_chunk(readers, chunk: _Chunk, pool: Optional[_BufferPool] = None):
  """``(R, size)`` buffer of one chunk for each reader (zero padding), as a device array."""
  shape = (len(readers), chunk.size)
  buf = pool.get(shape, chunk.dtype) if pool is not None else _aligned_empty(shape, chunk.dtype)
  if chunk.used < chunk.size:
    buf[:, chunk.used:] = 0
  for r, reader in enumerate(readers):
    whole = (reader.read([pc.path for pc in chunk.pieces]) if reader.format == "orbax"
             else None)
    for pc in chunk.pieces:
      v = (whole[pc.path].reshape(-1)[pc.start:pc.stop] if whole is not None
           else reader.view(pc.path, pc.start, pc.stop))
      np.copyto(buf[r, pc.off:pc.off + v.size], v)
      del v
  return jax.device_put(buf)


def _prefetched(items, load) -> Iterator:
  """``(item, load(item))`` for each item, loading the next item in a reader thread."""
  items = list(items)
  if not items:
    return
  with ThreadPoolExecutor(1) as ex:
    fut = ex.submit(load, items[0])
    for i, it in enumerate(items):
      data = fut.result()
      if i + 1 < len(items):
        fut = ex.submit(load, items[i + 1])
      yield it, data
      del data


# ----------------------------------------------------------------------------- kernels
def _split(buf):
  return buf[0], [buf[t] for t in range(1, buf.shape[0])]


def _taus(buf):
  x0, xs = _split(buf)
  return [task_vector({"w": x0}, {"w": x})["w"] for x in xs]


@jax.jit
def _k_tau_bits(buf):
  """Per task, the ``|τ|`` bit patterns (a tuple: one output per task, no stacking)."""
  return tuple(_topk.abs_bits(tv) for tv in _taus(buf))


@jax.jit
def _k_bracket_codes(buf, lo, hi):
  """Per task, an int8 code of ``|τ|`` against the task's bracket: 0 below ``lo``, 1 equal,
  2 strictly inside ``(lo, hi)``, 3 at or above ``hi``. (Element-wise only: XLA:CPU runs
  several reductions as separate reads, so the counting is left to NumPy on 1-byte codes.)"""
  out = []
  for t, tv in enumerate(_taus(buf)):
    b = _topk.abs_bits(tv)
    out.append((b >= lo[t]).astype(jnp.int8) + (b > lo[t]).astype(jnp.int8)
               + (b >= hi[t]).astype(jnp.int8))
  return tuple(out)


def _np_tau_bits(x0: np.ndarray, x: np.ndarray) -> np.ndarray:
  """``|τ|`` bit patterns of a few entries, in NumPy, rounded as :func:`task_vector` does
  (float32 difference, then the leaf dtype, round to nearest even)."""
  d = x.astype(np.float32) - x0.astype(np.float32)
  return _topk.np_abs_bits(d.astype(x0.dtype))


@jax.jit
def _k_weight_average(buf):
  return weight_average([{"w": buf[t]} for t in range(1, buf.shape[0])])["w"]


def _product(a, b, zero):
  """``a · b`` rounded to float32 on its own, like an eager multiply.

  ``zero`` is a uint32 0 passed at run time: OR-ing it into the bits is an identity the
  compiler cannot see through, so LLVM cannot contract the product with a following
  addition into a fused multiply-add (XLA:CPU does, and optimization barriers and
  ``reduce_precision`` are simplified away), and a jitted chunk rounds exactly like the
  op-by-op (eager) in-memory merge.
  """
  bits = jax.lax.bitcast_convert_type(a * b, jnp.uint32) | zero
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


_ZERO = np.uint32(0)


@jax.jit
def _k_task_arithmetic(buf, lam, zero):
  # task_arithmetic's leaf math: (f32(θ0) + Σ_t λ_t f32(τ_t)).astype(dtype), tasks in order.
  x0, xs = _split(buf)
  lams = task_lams(lam, len(xs))
  acc = None
  for t, x in enumerate(xs):
    v = _product(lams[t], task_vector({"w": x0}, {"w": x})["w"].astype(jnp.float32), zero)
    acc = v if acc is None else acc + v
  return (x0.astype(jnp.float32) + acc).astype(x0.dtype)


def _ties_parts(buf, thr):
  x0, xs = _split(buf)
  tvs = [task_vector({"w": x0}, {"w": x})["w"] for x in xs]
  trimmed = [_ties.trim_leaf(tv, thr[i]) for i, tv in enumerate(tvs)]
  sign = _ties.sum_sign_leaf(trimmed)
  return x0, trimmed, sign


@jax.jit
def _k_ties_sign_total(buf, thr):
  return _ties.sign_total_leaf(_ties_parts(buf, thr)[2])


@partial(jax.jit, static_argnames=("disjoint",))
def _k_ties(buf, thr, lam, majority, zero, disjoint):
  """Merged chunk for the given majority sign, and an int8 code per entry: the elected
  sign, or 2 where the value depends on the majority (elected sum 0, some kept entry).
  Element-wise only; the sign total is summed from the codes in NumPy."""
  x0, trimmed, sign = _ties_parts(buf, thr)
  merged = _ties.disjoint_leaf(trimmed, sign, majority, disjoint).astype(x0.dtype)
  # apply_task_vector's leaf math: (f32(θ0) + λ · f32(merged)).astype(dtype).
  out = (x0.astype(jnp.float32) + _product(lam, merged.astype(jnp.float32), zero)).astype(x0.dtype)
  nonzero = trimmed[0] != 0
  for x in trimmed[1:]:
    nonzero = nonzero | (x != 0)
  code = jnp.where((sign == 0) & nonzero, jnp.int8(2), sign.astype(jnp.int8))
  return out, code


# ----------------------------------------------------------------------------- thresholds
def _sample_bits(pre, fts, paths, sizes, n_entries: int, rng) -> List[np.ndarray]:
  """Per task, ``(n_blocks, 256)`` sampled ``|τ|`` bit patterns over ``paths``: random
  contiguous blocks (a few pages of each memory-mapped file), about ``n_entries`` in all.
  Leaves shorter than a block are not sampled (the bracket is a guess, checked exactly)."""
  total = sum(sizes[p] for p in paths)
  per: List[List[np.ndarray]] = [[] for _ in fts]
  for p in paths:
    n = sizes[p]
    nb = int(round(n_entries * n / max(total, 1) / _SAMPLE_BLOCK))
    if n < _SAMPLE_BLOCK or nb == 0:
      continue
    idx = rng.integers(0, n - _SAMPLE_BLOCK + 1, nb)[:, None] + np.arange(_SAMPLE_BLOCK)
    x0 = np.asarray(pre.view(p))[idx]
    for t, r in enumerate(fts):
      per[t].append(_np_tau_bits(x0, np.asarray(r.view(p))[idx]))
  return [np.concatenate(b) if b else np.zeros((0, 1), np.int32) for b in per]


def _sample_size(n: int) -> int:
  return int(min(max(n // 128, 1 << 16), 1 << 23))


def _selectors(pre, fts, items, sizes, trim, k, keep, budget_elems, sample: bool):
  """``{(task, key): KthSelector}``; key None (global) or the leaf path (per leaf)."""
  leaves = [pc.path for kind, ch in items if kind == "chunk" for pc in ch.pieces
            if pc.start == 0]
  t = len(fts)
  rng = np.random.default_rng(0)
  sels = {}
  groups = [(None, leaves)] if trim == "global" else [(p, [p]) for p in leaves]
  n_all = sum(sizes[p] for p in leaves)
  for key, paths in groups:
    n = sum(sizes[p] for p in paths)
    n_keep = _topk.keep_count(k, max(n, 1), keep)
    cap = max(_topk.DIRECT_SIZE, int(budget_elems * n / max(n_all, 1) / t))
    if n <= _topk.DIRECT_SIZE:
      brackets = [(0, _topk._TOP)] * t  # collect every non-zero entry: one exact pass
      cap = max(cap, n)
    elif sample:
      brackets = [_topk.sample_bracket(b, n, n_keep)
                  for b in _sample_bits(pre, fts, paths, sizes, _sample_size(n), rng)]
    else:
      brackets = [None] * t
    for i in range(t):
      sels[(i, key)] = _topk.KthSelector(n_keep, brackets[i], cap=cap, n=n)
  return sels


def _select_chunk(sels, chunk: _Chunk, buf, host_buf, trim: str) -> None:
  """One chunk of a select pass. While every task's global select is a counting pass, the
  kernel returns 1-byte codes and only the entries inside the brackets get their bit
  patterns (recomputed in NumPy); otherwise the selectors see every bit pattern."""
  t = buf.shape[0] - 1
  br = [sels[(i, None)].bracket() for i in range(t)] if trim == "global" else [None]
  if all(b is not None for b in br):
    lo = jnp.asarray([b[0] for b in br], jnp.int32)
    hi = jnp.asarray([min(b[1], 0x7FFFFFFF) for b in br], jnp.int32)
    codes = _k_bracket_codes(buf, lo, hi)
    m = chunk.used
    for i in range(t):
      code = np.asarray(codes[i])[:m]
      c_hi = int(np.count_nonzero(code == 3)) if br[i][1] < _topk._TOP else 0
      c_eq = int(np.count_nonzero(code == 1))
      idx = np.flatnonzero(code == 2)
      sels[(i, None)].add_counts(c_hi, c_eq, _np_tau_bits(host_buf[0][idx],
                                                          host_buf[i + 1][idx]))
    return
  _feed(sels, [np.asarray(b) for b in _k_tau_bits(buf)], chunk, trim)


def _feed(sels, bits, chunk: _Chunk, trim: str) -> None:
  if trim == "global":
    for i in range(len(bits)):
      s = sels[(i, None)]
      if s.result is None:
        s.update(bits[i][:chunk.used])
    return
  for pc in chunk.pieces:
    for i in range(len(bits)):
      s = sels[(i, pc.path)]
      if s.result is None:
        s.update(bits[i][pc.off:pc.off + pc.stop - pc.start])


def _chunk_thresholds(chunk: _Chunk, thr, t: int, trim: str):
  if trim == "global":
    return jnp.asarray(np.asarray([thr[(i, None)] for i in range(t)], np.int32))
  out = np.zeros((t, chunk.size), np.int32)
  for pc in chunk.pieces:
    for i in range(t):
      out[i, pc.off:pc.off + pc.stop - pc.start] = thr[(i, pc.path)]
  return jnp.asarray(out)


# ----------------------------------------------------------------------------- entry point
def stream_merge(pretrained_path: str, finetuned_paths: Sequence[str], out_path: str,
                 method: str = "task_arithmetic", *, lam=1.0, k: float = 0.2,
                 trim: str = "global", keep: str = "exact", disjoint: str = "mean",
                 exclude: ExcludeFn = None,
                 chunk_bytes: Optional[int] = None, overwrite: bool = False) -> Dict:
  """Merge checkpoints on disk into ``out_path`` (same format and layout as the inputs).

  Args:
    pretrained_path: ``θ0`` checkpoint: a ``.safetensors`` file, a Hugging Face sharded
      safetensors directory (``model.safetensors.index.json`` + shards, any model family),
      or an orbax pytree directory.
    finetuned_paths: the fine-tuned checkpoints (same format, leaves, shapes, dtypes; a
      sharded checkpoint may split its tensors into shards differently).
    out_path: where to write the merged checkpoint (a file, or a directory with the
      pretrained checkpoint's shard split, index and other files).
    method: ``"weight_average"`` (of the fine-tuned models; ``lam`` unused),
      ``"task_arithmetic"`` (``lam`` scalar or one per task) or ``"ties"`` (``lam``, ``k``,
      ``trim``, ``keep``, ``disjoint``: as :func:`~saft_jax.merging.ties`).
    exclude: predicate on leaf paths never merged (the output keeps ``θ0``'s leaf; for
      weight averaging, the first fine-tuned model's leaf, as :func:`weight_average`).
    chunk_bytes: per-model bytes merged at once (default: a quarter of the largest leaf,
      clipped to 1-64 MiB; orbax chunks hold whole leaves).
    overwrite: replace an existing ``out_path``.

  Returns:
    A dict of statistics: ``passes`` (full reads of every input), ``sample_fraction``
    (share of the entries read to place the TIES brackets), ``chunks``, ``patched``
    (TIES entries rewritten for the majority sign), ``seconds``.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if isinstance(finetuned_paths, (str, bytes)) or not list(finetuned_paths):
    raise ValueError("finetuned_paths must be a non-empty list of checkpoint paths")
  if method == "ties":
    _ties.check_trim(trim)
    _ties.check_disjoint(disjoint)
    _topk.keep_count(k, 1, keep)
  t0 = time.time()
  fmt = _io.checkpoint_format(pretrained_path)
  for p in finetuned_paths:
    if _io.checkpoint_format(p) != fmt:
      raise ValueError(f"{p!r} is not a {fmt} checkpoint like the pretrained one")
  pre = _io.open_checkpoint(pretrained_path)
  fts = [_io.open_checkpoint(p) for p in finetuned_paths]
  _check_layouts(pre, fts, list(finetuned_paths))
  t = len(fts)
  nbytes = {p: int(np.prod(pre.shapes[p], dtype=np.int64)) * pre.dtypes[p].itemsize
            for p in pre.paths}
  largest = max(nbytes.values(), default=1)
  if chunk_bytes is None:
    chunk_bytes = min(max(largest // 4, _MIN_CHUNK), _MAX_CHUNK)
  mergeable = {p: is_mergeable(p, np.zeros((), pre.dtypes[p]), exclude) for p in pre.paths}
  split = fmt != "orbax"
  items, sizes = _plan(pre, mergeable, max(int(chunk_bytes), 1), split)
  chunks = [ch for kind, ch in items if kind == "chunk"]
  stats = {"passes": 0, "chunks": len(chunks), "sample_fraction": 0.0, "patched": 0}
  readers = [pre] + fts
  pool = _BufferPool()

  def each_chunk():
    stats["passes"] += 1
    yield from _prefetched(chunks, lambda ch: _load_chunk(readers, ch, pool))

  thr = None
  majority = None
  if method == "ties":
    budget = (t + 1) * int(chunk_bytes) // 4
    sels = _selectors(pre, fts, items, sizes, trim, k, keep, budget, sample=split)
    n_merge = sum(sizes[p] for p in pre.paths if mergeable[p])
    if split and trim == "global" and n_merge > _topk.DIRECT_SIZE:
      stats["sample_fraction"] = _sample_size(n_merge) / n_merge
    while any(s.result is None for s in sels.values()):
      for ch, buf in each_chunk():
        _select_chunk(sels, ch, buf, np.asarray(buf), trim)
      for s in sels.values():
        s.end_pass()
    thr = {key: int(s.result) for key, s in sels.items()}
    if fmt == "orbax":  # no in-place patching: sum the elected signs first
      total = 0
      for ch, buf in each_chunk():
        total += int(_k_ties_sign_total(buf, _chunk_thresholds(ch, thr, t, trim)))
      majority = float(np.sign(total))

  lam_arr = jnp.asarray(lam, jnp.float32)
  writer = _io.create_writer(out_path, pre, overwrite=overwrite)
  sink = _Sink(writer, pre)
  patches = []
  total = 0
  try:
    chunk_iter = each_chunk()
    pending = next(chunk_iter, None)
    for kind, obj in items:
      if kind == "copy":
        p = obj
        src = fts[0] if method == "weight_average" else pre
        sink.put(p, 0, src.view(p), whole=True)
        continue
      ch, buf = pending
      assert ch is obj
      if method == "weight_average":
        out = _k_weight_average(buf)
      elif method == "task_arithmetic":
        out = _k_task_arithmetic(buf, lam_arr, _ZERO)
      else:
        th = _chunk_thresholds(ch, thr, t, trim)
        maj = jnp.float32(-1.0 if majority is None else majority)
        out, code = _k_ties(buf, th, lam_arr, maj, _ZERO, disjoint)
        code = np.asarray(code)[:ch.used]
        n_need = int(np.count_nonzero(code == 2))
        total += int(code.sum(dtype=np.int64)) - 2 * n_need
        if majority is None and n_need:
          alt = np.asarray(_k_ties(buf, th, lam_arr, jnp.float32(1.0), _ZERO, disjoint)[0])
          for pc in ch.pieces:
            sl = slice(pc.off, pc.off + pc.stop - pc.start)
            idx = np.flatnonzero(code[sl] == 2)
            if idx.size:
              patches.append((pc.path, pc.start + idx, alt[sl][idx]))
      out = np.asarray(out)
      for pc in ch.pieces:
        sink.put(pc.path, pc.start, out[pc.off:pc.off + pc.stop - pc.start])
      del out, buf
      pending = next(chunk_iter, None)
    if method == "ties" and majority is None and total > 0:
      for p, idx, vals in patches:
        writer.patch(p, idx, vals)
        stats["patched"] += int(idx.size)
    sink.close()
  except BaseException:
    writer.abort()
    raise
  finally:
    for r in readers:
      r.close()
  stats["seconds"] = time.time() - t0
  return stats


class _Sink:
  """Feeds leaf parts to a writer: streamed for safetensors, whole units for orbax."""

  def __init__(self, writer, template):
    self._w = writer
    self._orbax = writer.format == "orbax"
    self._tpl = template
    if self._orbax:
      self._units = template.units()
      self._members: Dict[str, List[str]] = {}
      for p in template.paths:
        self._members.setdefault(self._units[p], []).append(p)
      self._parts: Dict[str, List[np.ndarray]] = {}
      self._ready: Dict[str, np.ndarray] = {}

  def put(self, p: str, start: int, flat: np.ndarray, whole: bool = False) -> None:
    if not self._orbax:
      if whole:
        self._w.write({p: np.asarray(flat).reshape(self._tpl.shapes[p])})
      else:
        self._w.write_part(p, flat)
      return
    self._parts.setdefault(p, []).append(np.array(flat).reshape(-1))
    n = int(np.prod(self._tpl.shapes[p], dtype=np.int64))
    if sum(a.size for a in self._parts[p]) == n:
      self._ready[p] = np.concatenate(self._parts.pop(p)).reshape(self._tpl.shapes[p])
      u = self._units[p]
      if all(q in self._ready for q in self._members[u]):
        self._w.write({q: self._ready.pop(q) for q in self._members[u]})

  def close(self) -> None:
    self._w.close()
