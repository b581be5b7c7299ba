"""Streaming (out-of-core) merges of checkpoints, chunk by chunk.

Inputs and output: single ``.safetensors`` files, Hugging Face sharded safetensors
directories (``model-0000k-of-0000N.safetensors`` + ``model.safetensors.index.json``; the
output keeps the input's shard split and index, and the directory's other files), or orbax
pytree checkpoints (see :mod:`._io`).

Layout of the work: the mergeable leaves (floating, not excluded) are cut into flat pieces
and packed, in file order, into chunks of ``chunk_bytes`` per model with one dtype; every
chunk is one fixed-size flat row per model, so each merge kernel is compiled once per
dtype. On CPU a full chunk of safetensors inputs is not read at all: its rows are device
arrays aliasing the memory-mapped files, and the kernels read the page cache in place
(:class:`._chunks._Mapped`; pages of chunks done are unmapped again). Other chunks (partly
filled, split over shard files, orbax inputs, accelerators) are read into reused buffers
(``os.preadv``: one copy from the page cache, no dtype conversion): in the merge loop for
safetensors on CPU, else by a reader thread one chunk ahead. XLA runs a chunk's kernels
asynchronously, and the merge loop finishes and writes the previous chunk meanwhile
(:func:`_write_pass`; measured on a 2-core Zen 4, medians of 3 × 11 merges of 7 × 90 MB:
task arithmetic 110-132 → 89-101 ms, TIES 390-470 → 347-372 ms). Non-mergeable leaves are
copied through. Peak memory is about ``3-4 × (T + 1) × chunk_bytes`` (the chunk being
merged, the one being finished, with a reader thread the one being read, the outputs) plus
the merge temporaries, not the models' size;
the default chunk is a quarter of the largest leaf (1-64 MiB), and on CPU at most
``8 MiB / (T + 1)`` (at least 1 MiB), so the chunk being merged stays in cache while the
next one is read (:func:`_default_chunk`).

The per-chunk math is that of the in-memory merges (:func:`task_vector`,
:func:`weight_average` and the TIES leaf primitives called as they are; the leaf formulas
of :func:`task_arithmetic` and :func:`apply_task_vector` restated so that each product is
rounded on its own, as eagerly, instead of being fused into a multiply-add) inside one
jitted kernel per chunk. Element-wise math does not depend on the packing, so results
equal the eager in-memory merge bit for bit.

TIES (global or per leaf) is in :mod:`._streaming_ties`: over safetensors inputs, one fused
pass from sampled threshold brackets, then exact fixes patched in place; over orbax inputs,
select passes and a sign pass before the write pass.
"""
from __future__ import annotations

import os
import time
from typing import Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import _io, _ties, _topk
from ._basic import task_lams, weight_average
from ._chunks import (_ZERO, _BufferPool, _load_chunk, _Mapped, _plan, _prefetched, _product,
                      _split)
from ._streaming_ties import _Ties, _sample_size, _selectors
from ._task_vectors import ExcludeFn, is_mergeable, task_vector

METHODS = ("weight_average", "task_arithmetic", "ties")
_MIN_CHUNK, _MAX_CHUNK = 1 << 20, 64 << 20
_SPILL_SHARE = 0.25  # TIES spill cap, as a share of the inputs' bytes (else 2 passes)
# On CPU, every model's chunk together: the two chunk buffers (merged, being read) then fit
# the last-level cache. Measured with 7 models of 22.5M float32 on a 2-core Zen 4 (32 MiB
# L3), medians of 30 merges: task arithmetic 129 ms at 1.14 MiB per model vs 142 ms at the
# leaf rule's 2.25 MiB (CPU time 185 vs 203 ms); 0.75, 1 and 1.5 MiB alike, 0.5 MiB slower
# (per-chunk overhead); TIES unchanged (472 vs 473 ms).
_CACHE_CHUNKS = 8 << 20


def _default_chunk(largest: int, n_models: int) -> int:
  """Default per-model chunk bytes: a quarter of the largest leaf (``largest`` bytes),
  clipped to 1-64 MiB; on CPU at most ``8 MiB / n_models`` (but at least 1 MiB)."""
  chunk = min(max(largest // 4, _MIN_CHUNK), _MAX_CHUNK)
  if jax.default_backend() == "cpu":
    chunk = min(chunk, max(_CACHE_CHUNKS // max(n_models, 1), _MIN_CHUNK))
  return chunk


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


# ----------------------------------------------------------------------------- kernels
@jax.jit
def _k_weight_average(buf):
  return weight_average([{"w": x} for x in _split(buf)[1]])["w"]


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


# ----------------------------------------------------------------------------- entry point
def _write_pass(items, chunk_iter, sink, copy_src, merge, done=None) -> None:
  """Every leaf in file order: copied ones from ``copy_src``, chunks by ``merge``.

  ``merge(ch, buf)`` starts chunk ``ch``'s kernels and returns a function that finishes
  the chunk (its host work) and returns its merged entries. XLA dispatches asynchronously,
  so chunk ``i``'s kernels run while chunk ``i - 1`` is finished and written and chunk
  ``i + 1`` is loaded: a chunk's rows stay in use until the chunk after it is loaded
  (buffers are reused from the chunk after that on: two pool buffers loaded in line, three
  with a reader thread). ``done()`` is called once a chunk is finished, before it is
  written (the merges unmap its pages there).
  """
  pending = None

  def flush():
    nonlocal pending
    if pending is not None:
      ch, finish = pending
      pending = None
      out = finish()
      if done is not None:
        done()
      for pc in ch.pieces:
        sink.put(pc.path, pc.start, out[pc.off:pc.off + pc.stop - pc.start])

  # The next chunk is asked for only while there is one: the iterator's end of the pass
  # (unmapping every page) comes after the last chunk is finished.
  left = sum(kind == "chunk" for kind, _ in items)
  nxt = next(chunk_iter) if left else None
  for kind, obj in items:
    if kind == "copy":
      flush()
      sink.put(obj, 0, copy_src.view(obj), whole=True)
      continue
    ch, buf = nxt
    assert ch is obj
    started = (ch, merge(ch, buf))
    del buf, nxt  # the chunk's rows are held by `started` only
    left -= 1
    flush()
    pending = started
    nxt = next(chunk_iter) if left else None
  flush()
  next(chunk_iter, None)


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
      clipped to 1-64 MiB, and on CPU at most 8 MiB over all the models, but at least 1
      MiB, so that the chunk being merged stays in cache; orbax chunks hold whole leaves).
    overwrite: replace an existing ``out_path``.

  Returns:
    A dict of statistics: ``passes`` (full reads of every input), ``sample_fraction``
    (share of the entries read to place the TIES brackets), ``chunks``, ``fixed`` (TIES
    entries rewritten in place after the write pass: estimated thresholds corrected, or
    the majority sign), ``patched`` (of those, the entries decided by a positive
    majority sign), ``seconds``.
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
    chunk_bytes = _default_chunk(largest, t + 1)
  mergeable = {p: is_mergeable(p, np.zeros((), pre.dtypes[p]), exclude) for p in pre.paths}
  split = fmt != "orbax"
  items, sizes = _plan(pre, mergeable, max(int(chunk_bytes), 1), split)
  chunks = [ch for kind, ch in items if kind == "chunk"]
  stats = {"passes": 0, "chunks": len(chunks), "sample_fraction": 0.0, "fixed": 0,
           "patched": 0}
  readers = [pre] + fts
  mapped = _Mapped()

  # On CPU, safetensors chunks are mostly mapped in place (nothing to read): loaded where
  # they are used, a reader thread only added hand-overs and contention for the interpreter
  # (measured: task arithmetic 198 -> 161 ms median, CPU time 198 -> 156 ms).
  inline = mapped.on and fmt != "orbax"
  # A chunk's buffer is in use until the next chunk is loaded (see _write_pass): a reader
  # thread, one chunk ahead of the loop, needs a third buffer.
  pool = _BufferPool(2 if inline else 3)

  def each_chunk():
    stats["passes"] += 1
    load = lambda ch: _load_chunk(readers, ch, pool, mapped)
    yield from (((ch, load(ch)) for ch in chunks) if inline else _prefetched(chunks, load))
    mapped.finish()

  ties = None
  if method == "ties":
    budget = (t + 1) * int(chunk_bytes) // 4
    sels, est, direct = _selectors(pre, fts, items, sizes, trim, k, keep, budget,
                                   sample=split)
    n_merge = sum(sizes[p] for p in pre.paths if mergeable[p])
    if split and trim == "global" and n_merge > _topk.DIRECT_SIZE:
      stats["sample_fraction"] = _sample_size(n_merge) / n_merge
    # Safetensors outputs take in-place patches: one fused pass when every select has a
    # bracket, unless the groups selected directly (every entry spilled) would fill half
    # the spill; orbax outputs are written once, exactly, after a sign pass.
    spill_cap = int((t + 1) * sum(nbytes[p] for p in pre.paths if mergeable[p]) * _SPILL_SHARE)
    fused = (split and all(s.bracket() is not None for s in sels.values())
             and (t + 1) * direct <= spill_cap // 2)
    spill_dir = os.path.dirname(os.path.abspath(out_path.rstrip("/\\")))
    ties = _Ties(sels, est, t, trim, lam, disjoint, fused, spill_dir, spill_cap)
    if not fused:
      ties.resolve(each_chunk)
      if fmt == "orbax":
        ties.sign_pass(each_chunk)

  lam_arr = jnp.asarray(lam, jnp.float32)

  def merge(ch, buf):
    out = (_k_weight_average(buf) if method == "weight_average"
           else _k_task_arithmetic(buf, lam_arr, _ZERO))
    return lambda: np.asarray(out)

  if method == "ties":
    merge = ties.write_chunk
  # a finished chunk's pages, unmapped while the next chunk's kernel runs
  release = lambda: mapped.release(1)
  copy_src = fts[0] if method == "weight_average" else pre
  writer = _io.create_writer(out_path, pre, overwrite=overwrite)
  try:
    _write_pass(items, each_chunk(), _Sink(writer, pre), copy_src, merge, release)
    if ties is not None and ties.fused and not ties.end_fused():
      writer.abort()
      ties.resolve(each_chunk)
      writer = _io.create_writer(out_path, pre, overwrite=overwrite)
      _write_pass(items, each_chunk(), _Sink(writer, pre), copy_src, merge, release)
    if ties is not None:
      pool.clear()  # the fixes' buffers take the chunks' place
      ties.fix(writer, readers, chunks, stats)
    writer.close()
  except BaseException:
    writer.abort()
    raise
  finally:
    if ties is not None:
      ties.close()
    mapped.clear()
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
