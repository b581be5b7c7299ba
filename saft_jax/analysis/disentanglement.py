"""Weight disentanglement error over a grid of task-vector coefficients.

For two tasks with task vectors τ1, τ2 on top of pre-trained parameters θ0,

    ξ(α1, α2) = Σ_{t∈{1,2}} E_{x~D_t} dist( f_t(x; θ0 + α_t τ_t),
                                            f_t(x; θ0 + α1 τ1 + α2 τ2 [+ Σ_k λ_k τ_k]) )

with `dist` = 1 when the predicted labels (argmax of task t's own head) differ.
The bracketed sum is the *all-task* variant: every other task vector is added to
the merged model at a fixed coefficient λ_k (the single-task reference stays
θ0 + α_t τ_t, as in SPEC §7). Optionally a divergence between the softmax outputs
(symmetric KL or Jensen–Shannon) is averaged the same way.

The grid is evaluated vectorized: `jax.lax.map(..., batch_size=chunk_size)` over the
flattened grid, i.e. `chunk_size` parameter combinations are built and evaluated at
once under `vmap`, chunk after chunk, inside one compiled function per data batch.

For linearized (tangent-space) models, `disentanglement_error_linear` forms every
output as `f0 + Σ_k α_k Jτ_k` from precomputed `f0` and Jacobian-vector products,
so the whole grid costs no further forward passes.

References:
  Ortiz-Jimenez, Favero, Frossard. "Task Arithmetic in the Tangent Space: Improved
  Editing of Pre-Trained Models", NeurIPS 2023 (weight disentanglement, Eq. 4).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from saft_jax.analysis import _tree

PyTree = Any
ApplyFn = Callable[[PyTree, Any], jax.Array]

DIVERGENCES = ("js", "sym_kl")


class DisentanglementResult(NamedTuple):
  """Disentanglement error on the grid `alphas1 × alphas2` (row i ↔ alphas1[i]).

  Attributes:
    alphas1, alphas2: the grid axes (coefficients of τ1 and τ2).
    error: ξ(α1, α2), shape (G1, G2): sum over the two tasks of the disagreement rate.
    per_task: shape (2, G1, G2): the disagreement rate on each task's data.
    divergence: the same sum for the output divergence, or None if not requested.
    per_task_divergence: shape (2, G1, G2), or None.
  """
  alphas1: np.ndarray
  alphas2: np.ndarray
  error: np.ndarray
  per_task: np.ndarray
  divergence: Optional[np.ndarray] = None
  per_task_divergence: Optional[np.ndarray] = None


def default_alphas(lo: float = -2.0, hi: float = 2.0, num: int = 21) -> np.ndarray:
  """The default grid axis: `num` evenly spaced points in [lo, hi] (SPEC §7: [−2, 2])."""
  if num < 1:
    raise ValueError(f"num must be >= 1, got {num}")
  return np.linspace(lo, hi, num, dtype=np.float32)


def _grid_axes(alphas):
  if alphas is None:
    a = default_alphas()
    return a, a
  if isinstance(alphas, (tuple, list)) and len(alphas) == 2 and all(
      np.ndim(a) == 1 for a in alphas):
    return (_tree.check_alphas(alphas[0], "alphas[0]"),
            _tree.check_alphas(alphas[1], "alphas[1]"))
  a = _tree.check_alphas(alphas, "alphas")
  return a, a


def _fixed_coefs(fixed_coefs, num_fixed: int) -> jnp.ndarray:
  if num_fixed == 0:
    return jnp.zeros((0,), jnp.float32)
  if fixed_coefs is None:
    raise ValueError("fixed_coefs is required when fixed task vectors are given")
  c = np.asarray(fixed_coefs, dtype=np.float32)
  if c.ndim == 0:
    c = np.full((num_fixed,), float(c), np.float32)
  if c.shape != (num_fixed,):
    raise ValueError(
        f"fixed_coefs must be a scalar or have one entry per fixed task vector "
        f"({num_fixed}), got shape {c.shape}")
  return jnp.asarray(c)


def _divergence(logp, logq, kind):
  """Per-example divergence between two log-probability arrays (..., C)."""
  p, q = jnp.exp(logp), jnp.exp(logq)
  if kind == "sym_kl":
    return jnp.sum((p - q) * (logp - logq), axis=-1)
  # Jensen–Shannon: ½ KL(p‖m) + ½ KL(q‖m), m = (p + q) / 2.
  logm = jnp.logaddexp(logp, logq) - jnp.log(2.0).astype(logp.dtype)
  kl_pm = jnp.sum(p * (logp - logm), axis=-1)
  kl_qm = jnp.sum(q * (logq - logm), axis=-1)
  return 0.5 * (kl_pm + kl_qm)


def _task_grid_stats(single_fn, merged_fn, own: int, a1, a2, mask, chunk_size, divergence):
  """Disagreement counts (and divergence sums) over the grid for one task's batch.

  single_fn(alpha) -> logits (B, C) of θ0 + alpha τ_own;
  merged_fn(a1, a2) -> logits (B, C) of the merged model.
  """
  own_alphas = a1 if own == 0 else a2
  single = jax.lax.map(single_fn, own_alphas, batch_size=chunk_size)  # (G_own, B, C)
  single_pred = jnp.argmax(single, axis=-1)
  single_logp = jax.nn.log_softmax(single.astype(jnp.float32), axis=-1) if divergence else None
  g1, g2 = a1.shape[0], a2.shape[0]
  i1, i2 = jnp.meshgrid(jnp.arange(g1), jnp.arange(g2), indexing="ij")
  maskf = mask.astype(jnp.float32)

  def point(idx):
    j1, j2 = idx
    logits = merged_fn(a1[j1], a2[j2])
    jo = j1 if own == 0 else j2
    differ = (jnp.argmax(logits, axis=-1) != single_pred[jo]).astype(jnp.float32)
    out = {"dis": jnp.sum(differ * maskf)}
    if divergence:
      logq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      out["div"] = jnp.sum(_divergence(single_logp[jo], logq, divergence) * maskf)
    return out

  stats = jax.lax.map(point, (i1.reshape(-1), i2.reshape(-1)), batch_size=chunk_size)
  return jax.tree.map(lambda s: s.reshape(g1, g2), stats)


def _check_divergence(divergence):
  if divergence is not None and divergence not in DIVERGENCES:
    raise ValueError(f"divergence must be None or one of {DIVERGENCES}, got {divergence!r}")


def _check_chunk(chunk_size):
  if not isinstance(chunk_size, int) or chunk_size <= 0:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _finish(a1, a2, totals, counts, divergence):
  per_task = np.stack([np.asarray(totals[t]["dis"]) / counts[t] for t in range(2)])
  div = per_div = None
  if divergence:
    per_div = np.stack([np.asarray(totals[t]["div"]) / counts[t] for t in range(2)])
    div = per_div.sum(0)
  return DisentanglementResult(np.asarray(a1), np.asarray(a2), per_task.sum(0), per_task,
                               div, per_div)


@functools.lru_cache(maxsize=32)
def _nonlinear_stats_fn(apply_t, t, chunk_size, divergence):
  """Compiled grid statistics for task t (cached so repeated calls do not recompile)."""

  def stats(theta0, taus, fixed, lam, x, mask, a1, a2):
    base = _tree.combine(theta0, fixed, lam)

    def single_fn(alpha):
      return apply_t(_tree.combine(theta0, [taus[t]], alpha[None]), x)

    def merged_fn(b1, b2):
      return apply_t(_tree.combine(base, list(taus), jnp.stack([b1, b2])), x)

    return _task_grid_stats(single_fn, merged_fn, t, a1, a2, mask, chunk_size, divergence)

  return jax.jit(stats)


@functools.lru_cache(maxsize=8)
def _linear_stats_fn(chunk_size, divergence):
  """Compiled grid statistics of the linearized model (cached)."""

  @functools.partial(jax.jit, static_argnums=6)
  def stats(f0_t, jv, mask, lam, a1, a2, own):
    const = f0_t + jnp.tensordot(lam.astype(f0_t.dtype), jv[2:], axes=1)

    def single_fn(alpha):
      return f0_t + alpha.astype(f0_t.dtype) * jv[own]

    def merged_fn(b1, b2):
      return const + b1.astype(f0_t.dtype) * jv[0] + b2.astype(f0_t.dtype) * jv[1]

    return _task_grid_stats(single_fn, merged_fn, own, a1, a2, mask, chunk_size, divergence)

  return stats


def disentanglement_error(
    apply_fns: ApplyFn | Sequence[ApplyFn],
    theta0: PyTree,
    task_vectors: Sequence[PyTree],
    inputs: Sequence[Any],
    alphas=None,
    *,
    fixed_task_vectors: Sequence[PyTree] = (),
    fixed_coefs=None,
    divergence: Optional[str] = None,
    chunk_size: int = 8,
    batch_size: Optional[int] = None,
) -> DisentanglementResult:
  """Disentanglement error ξ(α1, α2) of two task vectors over a coefficient grid.

  Args:
    apply_fns: `apply(params, x) -> logits`, one shared callable or one per task
      (each task uses its own head).
    theta0: pre-trained parameters (pytree).
    task_vectors: `(τ1, τ2)`, pytrees with theta0's structure.
    inputs: `(x1, x2)`: inputs of each task (array or pytree with a leading example
      axis), evaluated with the matching apply function.
    alphas: grid axis (1-D) used for both coefficients, or a pair of 1-D axes.
      Default: 21 points in [−2, 2].
    fixed_task_vectors: other task vectors added to the merged model (all-task variant).
    fixed_coefs: their coefficients λ_k (scalar or one per fixed task vector).
    divergence: None, "js" (Jensen–Shannon) or "sym_kl" (symmetric KL) of softmax outputs.
    chunk_size: grid points evaluated at once under vmap (bounds memory: each holds a
      full parameter copy plus activations).
    batch_size: examples per data batch (None: all at once); the last batch is padded
      and masked.

  Returns:
    A `DisentanglementResult` (NumPy arrays).

  References:
    Ortiz-Jimenez et al., "Task Arithmetic in the Tangent Space", NeurIPS 2023.
  """
  _check_divergence(divergence)
  _check_chunk(chunk_size)
  if not isinstance(task_vectors, (list, tuple)) or len(task_vectors) != 2:
    raise ValueError("task_vectors must be a pair (τ1, τ2)")
  _tree.check_task_vectors(theta0, task_vectors, "task_vectors")
  _tree.check_task_vectors(theta0, list(fixed_task_vectors), "fixed_task_vectors")
  if not isinstance(inputs, (list, tuple)) or len(inputs) != 2:
    raise ValueError("inputs must be a pair (x1, x2): one input set per task")
  if callable(apply_fns):
    apply_fns = (apply_fns, apply_fns)
  if len(apply_fns) != 2 or not all(callable(f) for f in apply_fns):
    raise TypeError("apply_fns must be a callable or a pair of callables")
  a1, a2 = _grid_axes(alphas)
  lam = _fixed_coefs(fixed_coefs, len(fixed_task_vectors))
  fixed = list(fixed_task_vectors)

  totals, counts = [], []
  for t in range(2):
    stats = _nonlinear_stats_fn(apply_fns[t], t, chunk_size, divergence)
    n = _tree.leading_dim(inputs[t], f"inputs[{t}]")
    acc = None
    for xb, mb in _tree.batches_with_mask(inputs[t], n, batch_size):
      s = stats(theta0, list(task_vectors), fixed, lam, xb, mb, a1, a2)
      acc = s if acc is None else jax.tree.map(jnp.add, acc, s)
    totals.append(acc)
    counts.append(float(n))
  return _finish(a1, a2, totals, counts, divergence)


def disentanglement_error_linear(
    f0: Sequence[jax.Array],
    jvps: Sequence[jax.Array],
    alphas=None,
    *,
    masks: Optional[Sequence[jax.Array]] = None,
    fixed_coefs=None,
    divergence: Optional[str] = None,
    chunk_size: int = 64,
    batch_size: Optional[int] = None,
) -> DisentanglementResult:
  """Disentanglement error of a linearized model from precomputed outputs.

  The linearized model's outputs are `f_lin(x; θ0 + Σ_k c_k τ_k) = f0(x) + Σ_k c_k Jτ_k(x)`,
  so the grid needs no forward pass: only weighted sums of these arrays.

  Args:
    f0: `(f0_1, f0_2)`, logits at θ0 on each task's inputs, shapes (N_t, C_t).
    jvps: `(J_1, J_2)`, shapes (K, N_t, C_t) with K >= 2: `J_t[k]` is the Jacobian-vector
      product `J_θ f_t(x; θ0) τ_k` on task t's inputs. k = 0, 1 are τ1, τ2 (the grid
      axes); k >= 2 are other task vectors, added at `fixed_coefs` (all-task variant).
    alphas: as in `disentanglement_error`.
    masks: optional `(m_1, m_2)` boolean (N_t,) arrays: only True examples are counted.
    fixed_coefs: λ_k for k >= 2 (scalar or K − 2 values).
    divergence, chunk_size, batch_size: as in `disentanglement_error`.

  Returns:
    A `DisentanglementResult`.
  """
  _check_divergence(divergence)
  _check_chunk(chunk_size)
  if len(f0) != 2 or len(jvps) != 2:
    raise ValueError("f0 and jvps must each hold two entries (one per task)")
  num_k = None
  for t in range(2):
    if np.ndim(f0[t]) != 2:
      raise ValueError(f"f0[{t}] must have shape (N, C), got {np.shape(f0[t])}")
    if np.ndim(jvps[t]) != 3 or np.shape(jvps[t])[1:] != np.shape(f0[t]):
      raise ValueError(
          f"jvps[{t}] must have shape (K, N, C) = (K,) + f0[{t}].shape = (K,) + "
          f"{np.shape(f0[t])}, got {np.shape(jvps[t])}")
    k = np.shape(jvps[t])[0]
    if k < 2:
      raise ValueError(f"jvps[{t}] needs at least the two grid task vectors, got K={k}")
    if num_k is not None and k != num_k:
      raise ValueError(f"jvps[0] and jvps[1] hold different numbers of task vectors ({num_k}, {k})")
    num_k = k
  a1, a2 = _grid_axes(alphas)
  lam = _fixed_coefs(fixed_coefs, num_k - 2)

  stats = _linear_stats_fn(chunk_size, divergence)

  totals, counts = [], []
  for t in range(2):
    n = np.shape(f0[t])[0]
    if n == 0:
      raise ValueError(f"f0[{t}] has zero examples")
    if masks is None:
      m = jnp.ones((n,), jnp.bool_)
    else:
      m = jnp.asarray(masks[t])
      if m.shape != (n,):
        raise ValueError(f"masks[{t}] must have shape ({n},), got {m.shape}")
      m = m.astype(jnp.bool_)
    data = (jnp.asarray(f0[t]), jnp.moveaxis(jnp.asarray(jvps[t]), 1, 0), m)
    acc = None
    for (fb, jb, mb), valid in _tree.batches_with_mask(data, n, batch_size):
      s = stats(fb, jnp.moveaxis(jb, 0, 1), mb & valid, lam, a1, a2, t)
      acc = s if acc is None else jax.tree.map(jnp.add, acc, s)
    totals.append(acc)
    counts.append(float(jnp.sum(m)))
    if counts[-1] == 0:
      raise ValueError(f"masks[{t}] selects no example")
  return _finish(a1, a2, totals, counts, divergence)


@functools.lru_cache(maxsize=16)
def _jvp_fn(apply_fn):

  @jax.jit
  def one(theta0, taus, xb):
    fn = lambda p: apply_fn(p, xb)
    outs = [jax.jvp(fn, (theta0,), (_tree.tangent_like(theta0, tau),)) for tau in taus]
    return outs[0][0], jnp.stack([o[1] for o in outs])

  return one


def linearized_outputs(
    apply_fn: ApplyFn,
    theta0: PyTree,
    task_vectors: Sequence[PyTree],
    x: Any,
    *,
    batch_size: Optional[int] = None,
):
  """Returns `(f0, jvps)` for `disentanglement_error_linear` on one input set.

  `f0 = apply_fn(theta0, x)` (N, C) and `jvps[k] = J_θ apply_fn(theta0, x) τ_k`
  (K, N, C), one forward-mode `jax.jvp` per task vector.
  """
  _tree.check_task_vectors(theta0, task_vectors, "task_vectors")
  if not task_vectors:
    raise ValueError("task_vectors is empty")

  one = _jvp_fn(apply_fn)
  n = _tree.leading_dim(x, "x")
  f0s, jvs = [], []
  for xb, mb in _tree.batches_with_mask(x, n, batch_size):
    f, j = one(theta0, list(task_vectors), xb)
    k = int(jnp.sum(mb))
    f0s.append(f[:k])
    jvs.append(j[:, :k])
  return jnp.concatenate(f0s, 0), jnp.concatenate(jvs, 1)
