"""Exact k-th largest magnitude without sorting.

Non-negative float32 values order exactly like their int32 bit patterns, so the k-th largest
``|x|`` is found by bisection on the integer bit pattern: each step is one counting pass
(``count(bits >= mid)``) over every array involved, and 31 steps pin the exact value
(the bit pattern of a finite non-negative float lies in ``[0, 0x7F800000]``). Counting
passes are element-wise compare + reduce, which XLA fuses; nothing is sorted or gathered.

Contract (shared by every caller, in-memory and streaming):

- ``n_keep = int(k * n)`` (Python float product truncated), at least 1, where ``n`` is the
  number of entries considered (``keep="exact"``, the default). ``keep="reference"`` gives
  the count of the TIES reference code instead: its ``kthvalue(n - int(n·k))`` with ``>=``
  keeps the ``int(k·n) + 1`` largest (all ``n`` when ``k = 1``).
- The threshold ``t`` is the exact ``n_keep``-th largest ``|x|`` (in float32; bf16/f16 are
  converted exactly). The kept set is ``|x| >= t``: entries tied with the threshold are all
  kept, so more than ``n_keep`` entries may survive when values repeat at the threshold.
- NaN magnitudes are not supported (they compare as larger than ``inf``).

A NumPy two-pass histogram refinement (16 high bits, then 16 low bits) gives the very same
bit pattern; the streaming merge uses it so that a global threshold costs two reads of the
checkpoints instead of 31.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_INF_BITS = 0x7F800000
_N_STEPS = 31  # ceil(log2(_INF_BITS + 2))


KEEP_MODES = ("exact", "reference")


def check_keep(keep: str) -> None:
  if keep not in KEEP_MODES:
    raise ValueError(f"keep must be one of {KEEP_MODES}, got {keep!r}")


def keep_count(k: float, n: int, keep: str = "exact") -> int:
  """Number of entries kept of ``n``; validates ``0 < k <= 1``.

  ``keep="exact"``: ``max(1, int(k * n))``. ``keep="reference"``: ``min(int(k * n) + 1, n)``
  (at least 1), the count of the TIES reference's ``kthvalue(n - int(n * k))`` threshold.
  """
  check_keep(keep)
  if not isinstance(k, (int, float, np.floating)) or not 0.0 < float(k) <= 1.0:
    raise ValueError(f"k must be a fraction in (0, 1], got {k!r}")
  m = int(float(k) * n)
  if keep == "reference":
    return max(1, min(m + 1, n))
  return max(1, m)


def abs_bits(x: jax.Array) -> jax.Array:
  """int32 bit pattern of ``|x|`` as float32 (monotone in ``|x|``)."""
  return jax.lax.bitcast_convert_type(jnp.abs(x.astype(jnp.float32)), jnp.int32)


def kth_largest_bits_groups(groups: Sequence[Sequence[jax.Array]],
                            n_keeps: Sequence[int]) -> jax.Array:
  """Per group, the bit pattern of the exact ``n_keep``-th largest ``|x|`` over its arrays.

  Args:
    groups: ``G`` groups, each a list of arrays counted together (e.g. all leaves of one
      task vector for a global threshold, or one leaf for a per-tensor threshold).
    n_keeps: ``G`` ranks (1 = largest); Python ints or int32 scalars.

  Returns:
    int32 array of shape ``(G,)``. All groups share one ``lax.fori_loop`` of 31 fused
    counting passes, so the compiled program has one loop whatever ``G`` is. Memory: one
    int32 copy of the inputs (the stacked bit patterns) while it runs.
  """
  groups = [[a for a in g if a.size] for g in groups]
  n_keeps = jnp.stack([jnp.asarray(n, jnp.int32) for n in n_keeps])
  return _kth_bits_jit(groups, n_keeps)


@jax.jit
def _kth_bits_jit(groups, n_keeps):
  # Jitted on its own so eager callers reuse one compiled loop per shape signature.
  # Layout for few, large kernels: each group's |x| bit patterns are flattened into one
  # vector, and groups of equal total size are stacked into one (n_groups, size) matrix,
  # so a counting pass is one fused compare+reduce per distinct size (one in global mode),
  # not one per leaf.
  flat = [jnp.concatenate([abs_bits(a).ravel() for a in g]) if g
          else jnp.zeros((0,), jnp.int32) for g in groups]
  buckets = {}
  for i, f in enumerate(flat):
    buckets.setdefault(f.shape[0], []).append(i)
  mats = [(jnp.asarray(idx, jnp.int32), jnp.stack([flat[i] for i in idx]))
          for idx in buckets.values()]
  order = jnp.asarray([i for idx in buckets.values() for i in idx], jnp.int32)
  g = len(groups)

  def count_ge(t):
    counts = [jnp.sum(mat >= t[idx][:, None], axis=1, dtype=jnp.int32) for idx, mat in mats]
    return jnp.zeros((g,), jnp.int32).at[order].set(jnp.concatenate(counts))

  # Invariant: count_ge(lo) >= n_keep  and  count_ge(hi) < n_keep (or hi is past +inf).
  def body(_, lohi):
    lo, hi = lohi
    mid = lo + (hi - lo) // 2
    ok = count_ge(mid) >= n_keeps
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = jax.lax.fori_loop(0, _N_STEPS, body,
                            (jnp.zeros((g,), jnp.int32),
                             jnp.full((g,), _INF_BITS + 1, jnp.int32)))
  return lo


def kth_largest_bits(arrays: Sequence[jax.Array], n_keep) -> jax.Array:
  """Bit pattern (int32 scalar) of the exact ``n_keep``-th largest ``|x|`` over all arrays."""
  return kth_largest_bits_groups([arrays], [n_keep])[0]


@jax.jit
def kth_largest_bits_rows(x: jax.Array, n_keep) -> jax.Array:
  """Per row of ``x.reshape(-1, x.shape[-1])``, the bit pattern of the exact ``n_keep``-th
  largest ``|x|`` (``1 <= n_keep <= x.shape[-1]``, the same rank for every row).

  Returns int32 of shape ``(rows,)``: one bisection of 31 fused counting passes over all rows
  at once (no sort), the same contract as :func:`kth_largest_bits_groups`.
  """
  bits = abs_bits(x).reshape(-1, x.shape[-1])
  n = jnp.asarray(n_keep, jnp.int32)
  rows = bits.shape[0]

  def body(_, lohi):
    lo, hi = lohi
    mid = lo + (hi - lo) // 2
    ok = jnp.sum(bits >= mid[:, None], axis=1, dtype=jnp.int32) >= n
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = jax.lax.fori_loop(0, _N_STEPS, body,
                            (jnp.zeros((rows,), jnp.int32),
                             jnp.full((rows,), _INF_BITS + 1, jnp.int32)))
  return lo


def bits_to_float(bits) -> jax.Array:
  return jax.lax.bitcast_convert_type(jnp.asarray(bits, jnp.int32), jnp.float32)


def topk_mask(x: jax.Array, thr_bits) -> jax.Array:
  """Boolean mask ``|x| >= threshold`` (ties at the threshold kept)."""
  return abs_bits(x) >= thr_bits


def np_abs_bits(x: np.ndarray) -> np.ndarray:
  return np.abs(np.asarray(x).astype(np.float32)).view(np.int32)


def kth_largest_bits_histogram(chunks: Callable[[], Iterable[np.ndarray]], n_keep: int) -> int:
  """Same result as :func:`kth_largest_bits`, by two histogram passes in NumPy.

  Args:
    chunks: a callable returning a fresh iterable over the arrays (called twice, so
      arrays can be streamed from disk one at a time).
    n_keep: rank of the wanted value (1 = largest).
  """
  hist = np.zeros(1 << 15, np.int64)
  for a in chunks():
    hist += np.bincount((np_abs_bits(a) >> 16).ravel(), minlength=1 << 15)[: 1 << 15]
  ge = np.cumsum(hist[::-1])[::-1]  # ge[b] = #(high bits >= b)
  b = int(np.nonzero(ge >= n_keep)[0].max())
  above = int(ge[b + 1]) if b + 1 < ge.size else 0
  need = n_keep - above
  hist2 = np.zeros(1 << 16, np.int64)
  for a in chunks():
    bits = np_abs_bits(a).ravel()
    sel = bits[(bits >> 16) == b] & 0xFFFF
    hist2 += np.bincount(sel, minlength=1 << 16)
  ge2 = np.cumsum(hist2[::-1])[::-1]
  low = int(np.nonzero(ge2 >= need)[0].max())
  return (b << 16) | low
