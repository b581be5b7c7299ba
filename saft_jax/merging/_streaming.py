"""Streaming (out-of-core) merges of checkpoints, leaf by leaf.

Peak memory is about ``(T + 1) × chunk`` plus the merge temporaries, where a chunk is a run
of consecutive leaves of at most ``chunk_bytes`` per model (default: the largest leaf), not
the models' total size. The per-leaf math is the very same functions as the in-memory
merges (:func:`task_vector`, :func:`task_arithmetic`, :func:`weight_average`, and the TIES
leaf primitives), run eagerly on each chunk, so results equal the eager in-memory merge bit
for bit.

Global TIES needs each task's threshold over the whole task vector before anything is
written: two streaming passes build exact histograms of the float32 bit patterns (16 high,
then 16 low bits; :func:`._topk.kth_largest_bits_histogram`), which give the same exact
``n_keep``-th largest magnitude as the in-memory bisection. A third pass sums the elected
signs (for TIES's majority-sign fallback), a fourth writes. Per-leaf TIES skips the
histogram passes (the in-memory bisection runs on each leaf). The TIES options ``keep``
(``"exact"``/``"reference"`` keep count) and ``disjoint`` (``"mean"``/``"sum"``) are those of
:func:`~saft_jax.merging.ties_merged_vector`, with the same results.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from . import _io, _ties, _topk
from ._basic import task_arithmetic, weight_average
from ._task_vectors import ExcludeFn, apply_task_vector, is_mergeable, task_vector

METHODS = ("weight_average", "task_arithmetic", "ties")


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


def _chunks(pre, chunk_bytes: int) -> List[List[str]]:
  """Consecutive leaves, at most ``chunk_bytes`` each (never splitting a writer unit)."""
  units = pre.units()
  groups: List[List[str]] = []
  for p in pre.paths:
    if groups and units[groups[-1][-1]] == units[p] and units[p] != p:
      groups[-1].append(p)
    else:
      groups.append([p])
  out, cur, size = [], [], 0
  for g in groups:
    nb = sum(int(np.prod(pre.shapes[p], dtype=np.int64)) * pre.dtypes[p].itemsize for p in g)
    if cur and size + nb > chunk_bytes:
      out.append(cur)
      cur, size = [], 0
    cur, size = cur + g, size + nb
  if cur:
    out.append(cur)
  return out


def stream_merge(pretrained_path: str, finetuned_paths: Sequence[str], out_path: str,
                 method: str = "task_arithmetic", *, lam=1.0, k: float = 0.2,
                 trim: str = "global", keep: str = "exact", disjoint: str = "mean",
                 exclude: ExcludeFn = None,
                 chunk_bytes: Optional[int] = None, overwrite: bool = False) -> Dict:
  """Merge checkpoints on disk into ``out_path`` (same format as the inputs).

  Args:
    pretrained_path: ``θ0`` checkpoint: a ``.safetensors`` file or an orbax pytree
      directory.
    finetuned_paths: the fine-tuned checkpoints (same format, leaves, shapes, dtypes).
    out_path: where to write the merged checkpoint.
    method: ``"weight_average"`` (of the fine-tuned models; ``lam`` unused),
      ``"task_arithmetic"`` (``lam`` scalar or one per task) or ``"ties"`` (``lam``, ``k``,
      ``trim``, ``keep``, ``disjoint``: as :func:`~saft_jax.merging.ties`).
    exclude: predicate on leaf paths never merged (the output keeps ``θ0``'s leaf; for
      weight averaging, the first fine-tuned model's leaf, as :func:`weight_average`).
    chunk_bytes: per-model bytes read at once (default: the largest leaf).
    overwrite: replace an existing ``out_path``.

  Returns:
    A dict of statistics: ``passes`` (reads of every input), ``chunks``, ``seconds``.
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
  nbytes = {p: int(np.prod(pre.shapes[p], dtype=np.int64)) * pre.dtypes[p].itemsize
            for p in pre.paths}
  chunks = _chunks(pre, chunk_bytes or max(nbytes.values(), default=1))
  mergeable = {p: is_mergeable(p, np.zeros((), pre.dtypes[p]), exclude) for p in pre.paths}
  stats = {"passes": 0, "chunks": len(chunks)}

  def load(reader, chunk):
    return {p: jnp.asarray(a) for p, a in reader.read(chunk).items()}

  def read_models(chunk):
    """(θ0 chunk, [θ_t chunk]) as dicts path -> jnp array."""
    return load(pre, chunk), [load(r, chunk) for r in fts]

  def read_tvs(chunk):
    """(θ0 chunk, [τ_t chunk]); each θ_t is dropped as soon as its τ_t exists."""
    theta0 = load(pre, chunk)
    return theta0, [task_vector(theta0, load(r, chunk), exclude=exclude) for r in fts]

  def each_chunk():
    stats["passes"] += 1
    yield from chunks

  thr = None
  majority = None
  if method == "ties":
    tcount = len(fts)
    if trim == "global":
      n = sum(int(np.prod(pre.shapes[p], dtype=np.int64)) for p in pre.paths if mergeable[p])
      n_keep = _topk.keep_count(k, max(n, 1), keep)
      # One pair of histogram passes gives every task's threshold.
      thr = _multi_task_histogram(each_chunk, read_tvs, mergeable, tcount, n_keep)
    total = 0
    for chunk in each_chunk():
      _, tvs = read_tvs(chunk)
      trimmed = _trim_chunk(tvs, chunk, mergeable, thr, k, trim, keep)
      del tvs
      for p in chunk:
        if mergeable[p] and nbytes[p]:
          total += int(_ties.sign_total_leaf(_ties.sum_sign_leaf([t[p] for t in trimmed])))
      del trimmed
    majority = jnp.float32(np.sign(total))

  writer = _io.create_writer(out_path, pre, overwrite=overwrite)
  try:
    for chunk in each_chunk():
      if method == "weight_average":
        _, thetas = read_models(chunk)
        out = weight_average(thetas, exclude=exclude)
        del thetas
      elif method == "task_arithmetic":
        theta0, tvs = read_tvs(chunk)
        out = task_arithmetic(theta0, tvs, lam, exclude=exclude)
        del theta0, tvs
      else:
        theta0, tvs = read_tvs(chunk)
        trimmed = _trim_chunk(tvs, chunk, mergeable, thr, k, trim, keep)
        del tvs
        merged = {}
        for p in chunk:
          x0 = theta0[p]
          if mergeable[p] and nbytes[p]:
            col = [t[p] for t in trimmed]
            sign = _ties.sum_sign_leaf(col)
            merged[p] = _ties.disjoint_leaf(col, sign, majority, disjoint).astype(x0.dtype)
          else:
            merged[p] = jnp.zeros_like(x0)
        out = apply_task_vector(theta0, merged, lam, exclude=exclude)
        del theta0, trimmed, merged
      writer.write({p: np.asarray(out[p]) for p in chunk})
      del out
  except BaseException:
    if hasattr(writer, "_f"):
      writer._f.close()
    raise
  writer.close()
  stats["seconds"] = time.time() - t0
  return stats


def _trim_chunk(tvs, chunk, mergeable, thr, k, trim, keep="exact"):
  """Trimmed task vectors of one chunk (global thresholds given, per-leaf computed)."""
  out = [dict(tv) for tv in tvs]
  leaves = [p for p in chunk if mergeable[p] and tvs[0][p].size]
  if not leaves:
    return out
  if trim == "global":
    for i, tv in enumerate(tvs):
      for p in leaves:
        out[i][p] = _ties.trim_leaf(tv[p], thr[i])
    return out
  groups = [[tv[p]] for p in leaves for tv in tvs]
  n_keeps = [_topk.keep_count(k, tvs[0][p].size, keep) for p in leaves for _ in tvs]
  bits = _topk.kth_largest_bits_groups(groups, n_keeps).reshape(len(leaves), len(tvs))
  for m, p in enumerate(leaves):
    for i, tv in enumerate(tvs):
      out[i][p] = _ties.trim_leaf(tv[p], bits[m, i])
  return out


def _multi_task_histogram(each_chunk, read_tvs, mergeable, tcount, n_keep):
  """Exact global per-task thresholds (int32 bit patterns) in two streaming passes."""
  hist = np.zeros((tcount, 1 << 15), np.int64)
  for chunk in each_chunk():
    _, tvs = read_tvs(chunk)
    for i, tv in enumerate(tvs):
      for p in chunk:
        if mergeable[p] and tv[p].size:
          hist[i] += np.bincount((_topk.np_abs_bits(tv[p]) >> 16).ravel(),
                                 minlength=1 << 15)[: 1 << 15]
    del tvs
  ge = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]
  high = [int(np.nonzero(ge[i] >= n_keep)[0].max()) for i in range(tcount)]
  need = [n_keep - (int(ge[i, high[i] + 1]) if high[i] + 1 < ge.shape[1] else 0)
          for i in range(tcount)]
  hist2 = np.zeros((tcount, 1 << 16), np.int64)
  for chunk in each_chunk():
    _, tvs = read_tvs(chunk)
    for i, tv in enumerate(tvs):
      for p in chunk:
        if mergeable[p] and tv[p].size:
          bits = _topk.np_abs_bits(tv[p]).ravel()
          hist2[i] += np.bincount(bits[(bits >> 16) == high[i]] & 0xFFFF, minlength=1 << 16)
    del tvs
  ge2 = np.cumsum(hist2[:, ::-1], axis=1)[:, ::-1]
  return [jnp.int32((high[i] << 16) | int(np.nonzero(ge2[i] >= need[i])[0].max()))
          for i in range(tcount)]
