"""Sparse SAM: SSAM-F (Fisher mask) and SSAM-D (dynamic sparse mask)."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from saft_jax.optim import _base
from saft_jax.optim._core import normalized_direction, sharpness_transform

F32 = _base.F32


class SparseSAMState(NamedTuple):
  """Perturbation state of SSAM: the boolean perturbation mask and a key."""

  mask: Any
  key: jax.Array


def _flat(tree) -> tuple[jax.Array, list, Any]:
  leaves, treedef = jax.tree.flatten(tree)
  shapes = [x.shape for x in leaves]
  flat = (jnp.concatenate([jnp.ravel(x) for x in leaves]) if leaves
          else jnp.zeros((0,), F32))
  return flat, shapes, treedef


def _unflat(flat, shapes, treedef):
  out, i = [], 0
  for s in shapes:
    n = int(np.prod(s))
    out.append(flat[i:i + n].reshape(s))
    i += n
  return jax.tree.unflatten(treedef, out)


def _top_k_mask(scores: jax.Array, k: int) -> jax.Array:
  """Bool vector with exactly the k largest scores set (k static)."""
  n = scores.shape[0]
  if k >= n:
    return jnp.ones((n,), bool)
  idx = jnp.argsort(-scores)[:k]
  return jnp.zeros((n,), bool).at[idx].set(True)


def _n_keep(params, sparsity) -> tuple[int, int]:
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  return n, max(1, int(round((1.0 - float(sparsity)) * n))) if n else 0


def _ssam(who, base_optimizer, rho, sparsity, update_freq, key, eps, mask,
          axis_name, refresh, refresh_at_zero):
  _base.check_positive(f"{who}: rho", rho)
  _base.check_positive(f"{who}: eps", eps)
  _base.check_fraction(f"{who}: sparsity", sparsity)
  if _base._concrete(sparsity) is None:  # noqa: SLF001
    raise TypeError(f"{who}: sparsity must be static (static_args in inject_hyperparams).")
  update_freq = _base.check_period(f"{who}: update_freq", update_freq)
  _base.init_key(key, who)

  def init(params):
    raw = _base.init_key(key, who)
    n, k = _n_keep(params, sparsity)
    nxt, sub = _base.split_key(raw)
    leaves, treedef = jax.tree.flatten(params)
    shapes = [p.shape for p in leaves]
    scores = jax.random.uniform(sub, (n,), F32)
    return SparseSAMState(_unflat(_top_k_mask(scores, k), shapes, treedef), nxt)

  def perturb(g, params, pstate, count):
    n, k = _n_keep(params, sparsity)
    gs = _base.pmean(g, axis_name)
    due = count % update_freq == 0
    if not refresh_at_zero:
      due = jnp.logical_and(due, count > 0)
    new_mask, new_key = jax.lax.cond(
        due,
        lambda: refresh(gs, pstate, n, k),
        lambda: (pstate.mask, pstate.key))
    gm = jax.tree.map(lambda gi, m: jnp.where(m, gi.astype(F32), 0.0), g, new_mask)
    return normalized_direction(gm, rho, eps), SparseSAMState(new_mask, new_key), None

  return sharpness_transform(who, base_optimizer, perturb=perturb, init_perturb=init,
                             mask=mask, axis_name=axis_name)


def ssam_f(
    base_optimizer: optax.GradientTransformation,
    rho: float = 0.05,
    sparsity: float = 0.5,
    update_freq: int = 10,
    *,
    key: Any = 0,
    eps: float = _base.DEFAULT_EPS,
    mask: Any = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """SSAM-F: SAM with a sparse perturbation mask chosen by Fisher information.

  Every ``update_freq`` steps the mask keeps the ``(1 − sparsity)`` fraction of
  entries (globally, over the whole tree) with the largest diagonal Fisher
  estimate, and ``ε = ρ (g ⊙ m) / ‖g ⊙ m‖``. The reference code estimates the
  Fisher from per-sample gradients on a separate sample set; inside an optax
  transform only the batch gradient exists, so the empirical Fisher diagonal
  is estimated by ``g²`` of the current (global) batch gradient.

  Args:
    base_optimizer: optax transformation fed with ``grad_fn(θ + ε)``.
    rho: radius, > 0. sparsity: fraction of entries NOT perturbed, in [0, 1).
    update_freq: mask refresh period (static int).
    key: seed/PRNG key (unused by the Fisher rule; kept for a uniform state).
    eps, mask, axis_name: as in ``sam``.

  References:
    Mi et al., Make Sharpness-Aware Minimization Stronger: A Sparsified
    Perturbation Approach, NeurIPS 2022. https://arxiv.org/abs/2210.05177
  """

  def refresh(g, pstate, n, k):
    fisher, shapes, treedef = _flat(jax.tree.map(lambda x: jnp.square(x.astype(F32)), g))
    return _unflat(_top_k_mask(fisher, k), shapes, treedef), pstate.key

  return _ssam("ssam_f", base_optimizer, rho, sparsity, update_freq, key, eps, mask,
               axis_name, refresh, refresh_at_zero=True)


def ssam_d(
    base_optimizer: optax.GradientTransformation,
    rho: float = 0.05,
    sparsity: float = 0.5,
    update_freq: int = 10,
    drop_rate: float = 0.5,
    *,
    key: Any = 0,
    eps: float = _base.DEFAULT_EPS,
    mask: Any = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """SSAM-D: SAM with a dynamic sparse perturbation mask (drop and grow).

  The mask starts random with the given sparsity. Every ``update_freq``
  steps (from the ``update_freq``-th on), ``drop_rate`` of the active entries
  with the smallest ``|g|`` are dropped and as many previously inactive
  entries are grown uniformly at random (PRNG key in the state), so the
  density stays exactly ``1 − sparsity``. ``ε = ρ (g ⊙ m) / ‖g ⊙ m‖``. The
  paper decays the update rate with a cosine; here it is constant.

  References:
    Mi et al., Make Sharpness-Aware Minimization Stronger: A Sparsified
    Perturbation Approach, NeurIPS 2022. https://arxiv.org/abs/2210.05177
  """
  _base.check_fraction("ssam_d: drop_rate", drop_rate, closed_high=True)
  if _base._concrete(drop_rate) is None:  # noqa: SLF001
    raise TypeError("ssam_d: drop_rate must be static (static_args in inject_hyperparams).")

  def refresh(g, pstate, n, k):
    absg, shapes, treedef = _flat(jax.tree.map(lambda x: jnp.abs(x.astype(F32)), g))
    active, _, _ = _flat(pstate.mask)
    n_upd = min(int(round(float(drop_rate) * k)), n - k)
    if n_upd <= 0:
      return pstate.mask, pstate.key
    nxt, sub = _base.split_key(pstate.key)
    drop = jnp.argsort(jnp.where(active, absg, jnp.inf))[:n_upd]
    grow_scores = jnp.where(active, -1.0, jax.random.uniform(sub, (n,), F32))
    grow = jnp.argsort(-grow_scores)[:n_upd]
    new = active.at[drop].set(False).at[grow].set(True)
    return _unflat(new, shapes, treedef), nxt

  return _ssam("ssam_d", base_optimizer, rho, sparsity, update_freq, key, eps, mask,
               axis_name, refresh, refresh_at_zero=False)
