"""Sparse SAM: SSAM-F (Fisher mask) and SSAM-D (dynamic sparse mask).

Both follow the authors' release, ``Mi-Peng/Sparse-Sharpness-Aware-Minimization``
(``solver/sam.py``, classes ``SSAMF`` and ``SSAMD``), with the refresh period
counted in steps instead of epochs. Shared rules:

* Perturbation (``normalize``): ``"full"`` (default) is the released code's
  ``ε = ρ (g ⊙ m) / ‖g‖`` (``first_step``: ``scale = rho / (grad_norm +
  1e-7)``, then ``e_w *= mask``) — the SAM perturbation with the unselected
  entries zeroed, so ``‖ε‖ = ρ ‖g ⊙ m‖/‖g‖ ≤ ρ``. ``"masked"`` is
  ``ε = ρ (g ⊙ m) / ‖g ⊙ m‖``, the first-order maximizer of ``L(θ + ε)`` over
  perturbations supported on the mask with ``‖ε‖ ≤ ρ`` (the sparse inner
  problem solved exactly), so ``‖ε‖ = ρ``. The default follows the code
  because the published SSAM results were produced by it; both rules share
  the direction and differ only in length.
* Order: the perturbation of step ``t`` uses the current mask; on a refresh
  step (``t % update_freq == 0``, step 0 included) the new mask is computed
  *after* that perturbation and used from step ``t + 1`` on, as in the
  reference's ``step`` (SSAM-F refreshes after ``second_step``; SSAM-D after
  ``first_step``).
* Counts use the reference's rounding: SSAM-F keeps ``int(n (1 − s))``
  entries, SSAM-D starts with ``n − ceil(n s)`` and, on a refresh with drop
  rate ``d``, keeps ``int((n − n s)(1 − d))`` old entries and grows
  ``int(min((n − n s) d, n s))`` new ones (``n`` entries, sparsity ``s``).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from saft_jax.optim import _base
from saft_jax.optim._core import normalized_direction, sharpness_transform

F32 = _base.F32
NORMALIZE = ("full", "masked")
FISHER = ("batch", "per_example")
STRATEGIES = ("gradient", "weight", "random")


class SparseSAMState(NamedTuple):
  """Perturbation state of SSAM: the boolean perturbation mask and a key.

  Attributes:
    mask: bool pytree like params; True = perturbed. It is the mask the *next*
      step uses (refreshed after the perturbation of a refresh step).
    key: raw uint32 PRNG key data (SSAM-D's random scores; unused by SSAM-F).
  """

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


def _n_entries(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _top_k_mask(scores: jax.Array, k: int) -> jax.Array:
  """Bool vector with exactly the k largest scores set (k static; ties: lower index)."""
  n = scores.shape[0]
  if k >= n:
    return jnp.ones((n,), bool)
  idx = jnp.argsort(-scores, stable=True)[:k]
  return jnp.zeros((n,), bool).at[idx].set(True)


def _rank_select(scores: jax.Array, k: jax.Array) -> jax.Array:
  """Bool vector of the k largest scores; k may be traced (ties: lower index)."""
  n = scores.shape[0]
  order = jnp.argsort(-scores, stable=True)
  rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  return rank < k


def _check_common(who, rho, sparsity, update_freq, key, eps, normalize):
  _base.check_positive(f"{who}: rho", rho)
  _base.check_positive(f"{who}: eps", eps)
  _base.check_fraction(f"{who}: sparsity", sparsity)
  if _base._concrete(sparsity) is None:  # noqa: SLF001
    raise TypeError(f"{who}: sparsity must be static (static_args in inject_hyperparams).")
  _base.check_choice(f"{who} normalize", normalize, NORMALIZE)
  _base.init_key(key, who)
  return _base.check_period(f"{who}: update_freq", update_freq)


def _direction(g, m, rho, eps, normalize):
  """The sparse perturbation of the current step (see the module docstring)."""
  if normalize == "masked":
    gm = jax.tree.map(lambda gi, mi: jnp.where(mi, gi.astype(F32), 0.0), g, m)
    return normalized_direction(gm, rho, eps)
  e = normalized_direction(g, rho, eps)
  return jax.tree.map(lambda ei, mi: jnp.where(mi, ei, 0.0), e, m)


def _require_per_example_fn(fn, who):
  if fn is None:
    raise ValueError(
        f"{who} with fisher='per_example' needs the extra update argument "
        "per_example_grad_fn=f, f(params) -> per-example grads (each leaf with a "
        "leading example axis), e.g. lambda p: jax.vmap(jax.grad(example_loss), "
        "in_axes=(None, 0))(p, batch).")
  if not callable(fn):
    raise TypeError(f"{who}: per_example_grad_fn must be callable, got {type(fn).__name__}.")


def _per_example_fisher(fn, params, who, axis_name):
  """``Σ_i g_i²`` from ``fn(params)`` (every leaf with a leading example axis)."""
  _require_per_example_fn(fn, who)
  out = fn(_base.to_varying(params, axis_name))
  s_got, s_want = jax.tree.structure(out), jax.tree.structure(params)
  if s_got != s_want:
    raise ValueError(
        f"{who}: per_example_grad_fn returned a pytree with structure {s_got}, "
        f"but the params have structure {s_want}.")
  sizes = set()
  for (path, gi), p in zip(jax.tree_util.tree_leaves_with_path(out), jax.tree.leaves(params)):
    if jnp.ndim(gi) != jnp.ndim(p) + 1 or jnp.shape(gi)[1:] != jnp.shape(p):
      raise ValueError(
          f"{who}: per_example_grad_fn returned shape {jnp.shape(gi)} at "
          f"{jax.tree_util.keystr(path)}; expected (num_examples,) + {jnp.shape(p)}.")
    sizes.add(jnp.shape(gi)[0])
  if len(sizes) > 1:
    raise ValueError(f"{who}: per_example_grad_fn leaves disagree on the number of "
                     f"examples: {sorted(sizes)}.")
  fisher = jax.tree.map(lambda x: jnp.sum(jnp.square(x.astype(F32)), axis=0), out)
  return _base.pmean(fisher, axis_name)


def ssam_f(
    base_optimizer: optax.GradientTransformation,
    rho: float = 0.05,
    sparsity: float = 0.5,
    update_freq: int = 10,
    *,
    normalize: str = "full",
    fisher: str = "batch",
    key: Any = 0,
    eps: float = _base.DEFAULT_EPS,
    mask: Any = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """SSAM-F: SAM with a sparse perturbation mask chosen by Fisher information.

  The mask keeps the ``int(n (1 − sparsity))`` entries (globally, over the
  whole tree) with the largest diagonal empirical Fisher ``Σ_i g_i²``. The
  initial mask is empty (step 0 is a plain base step, as in the reference,
  whose mask starts at zeros); it is refreshed after the perturbation of every
  step ``t`` with ``t % update_freq == 0`` and used from step ``t + 1`` on.
  ``normalize`` chooses the perturbation rule (module docstring): the default
  ``"full"``, ``ε = ρ (g⊙m)/‖g‖``, is what the released code computes (and
  so what produced the published numbers); ``"masked"``,
  ``ε = ρ (g⊙m)/‖g⊙m‖``, solves the sparse inner maximization exactly and
  puts the whole radius on the kept entries.

  Fisher estimate (``fisher``):

  * ``"batch"`` (default): ``g²`` of the current clean batch gradient
    (``pmean``-ed over ``axis_name``): free, but the square of a mean, not a
    mean of squares.
  * ``"per_example"``: the reference's estimator, ``Σ_i g_i²`` over
    per-example gradients. Pass ``update(..., per_example_grad_fn=f)`` with
    ``f(params)`` returning every leaf with a leading example axis, e.g.
    ``lambda p: jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(p, xs)``;
    it is called only on refresh steps (inside ``jax.lax.cond``). The
    reference draws ``num_samples`` fresh training examples (batch size 1);
    here the examples are whatever ``f`` closes over (the current batch, or a
    separate Fisher batch).

  Deliberate differences from the reference (``solver/sam.py``, ``SSAMF``):
  the period is in steps, not epochs; the Fisher is evaluated at the step's
  parameters ``θ_t`` (the reference evaluates it after the base update, at
  ``θ_{t+1}``; an optax transform does not know the update that is finally
  applied); the reference's first Fisher sample also contains the leftover
  perturbed gradient (``p.grad`` is not zeroed before its loop), which is not
  reproduced; the norm guard is ``eps`` (reference: ``1e-7``).

  Args:
    base_optimizer: optax transformation fed with ``grad_fn(θ + ε)``.
    rho: radius, > 0.
    sparsity: fraction of entries NOT perturbed, in [0, 1) (static).
    update_freq: mask refresh period in steps (static int).
    normalize: ``"full"`` (reference code, default) or ``"masked"``.
    fisher: ``"batch"`` (default) or ``"per_example"`` (reference estimator).
    key: seed/PRNG key (unused by SSAM-F; kept for a uniform state).
    eps, mask, axis_name: as in ``sam``.

  References:
    Mi et al., Make Sharpness-Aware Minimization Stronger: A Sparsified
    Perturbation Approach, NeurIPS 2022. https://arxiv.org/abs/2210.05177 ;
    code: github.com/Mi-Peng/Sparse-Sharpness-Aware-Minimization,
    ``solver/sam.py`` (``SSAMF``).
  """
  who = "ssam_f"
  update_freq = _check_common(who, rho, sparsity, update_freq, key, eps, normalize)
  _base.check_choice(f"{who} fisher", fisher, FISHER)

  def init(params):
    return SparseSAMState(jax.tree.map(lambda p: jnp.zeros(p.shape, bool), params),
                          _base.init_key(key, who))

  def perturb(g, params, pstate, count, per_example_grad_fn=None):
    if fisher == "batch" and per_example_grad_fn is not None:
      raise ValueError(f"{who}: per_example_grad_fn was passed but fisher='batch'; "
                       "build the transform with fisher='per_example' to use it.")
    e = _direction(g, pstate.mask, rho, eps, normalize)
    n = _n_entries(params)
    k = int(n * (1 - float(sparsity)))  # the reference's rounding (floor)

    def refresh():
      if fisher == "per_example":
        f_tree = _per_example_fisher(per_example_grad_fn, params, who, axis_name)
        f_tree = _base.masked_zero(f_tree, _base.resolve_mask(mask, params, who))
      else:
        f_tree = jax.tree.map(lambda x: jnp.square(x.astype(F32)),
                              _base.pmean(g, axis_name))
      scores, shapes, treedef = _flat(f_tree)
      return _unflat(_top_k_mask(scores, k), shapes, treedef)

    if fisher == "per_example":  # a missing function is an error even off refresh steps
      _require_per_example_fn(per_example_grad_fn, who)
    new_mask = jax.lax.cond(count % update_freq == 0, refresh, lambda: pstate.mask)
    return e, SparseSAMState(new_mask, pstate.key), None

  return sharpness_transform(who, base_optimizer, perturb=perturb, init_perturb=init,
                             mask=mask, axis_name=axis_name,
                             perturb_args=("per_example_grad_fn",))


def drop_rate_schedule(drop_rate: float, step: int, total_steps: int | None) -> float:
  """SSAM-D's drop rate at ``step`` (Python float, the reference's formula).

  ``drop_rate · (1 + cos(π · step / total_steps)) / 2`` — the reference's
  ``DeathRate_Scheduler`` with ``T_start = 0``, ``T_end = total_steps`` and
  steps in place of epochs; ``step`` is clamped to ``total_steps``. With
  ``total_steps=None`` the rate is the constant ``drop_rate``.
  """
  drop_rate = float(drop_rate)
  if total_steps is None:
    return drop_rate
  t = min(int(step), int(total_steps))
  return drop_rate * (1 + math.cos(math.pi * (float(t - 0) / (total_steps - 0)))) / 2


def _refresh_counts(n: int, sparsity: float, dr: float) -> tuple[int, int]:
  """(entries kept from the old mask, entries grown): the reference's rounding."""
  s = float(sparsity)
  kept = int((n - n * s) * (1 - dr))
  grown = int(min((n - n * s) * dr, n * s))
  return kept, grown


def ssam_d(
    base_optimizer: optax.GradientTransformation,
    rho: float = 0.05,
    sparsity: float = 0.5,
    update_freq: int = 10,
    drop_rate: float = 0.5,
    *,
    total_steps: int | None = None,
    drop_strategy: str = "gradient",
    growth_strategy: str = "random",
    normalize: str = "full",
    key: Any = 0,
    eps: float = _base.DEFAULT_EPS,
    mask: Any = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """SSAM-D: SAM with a dynamic sparse perturbation mask (drop and grow).

  The mask starts as a uniformly random set of ``n − ceil(n · sparsity)``
  entries. After the perturbation of every step ``t`` with
  ``t % update_freq == 0`` (step 0 included) the mask is refreshed for the
  following steps: with drop rate ``d_t`` it keeps the ``int(L (1 − d_t))``
  active entries with the largest drop score and grows the
  ``int(min(L d_t, n · sparsity))`` inactive entries with the largest growth
  score, ``L = n − n · sparsity`` (the reference's rounding, so the density
  can be one entry below ``1 − sparsity`` after a refresh). Scores
  (``drop_strategy`` / ``growth_strategy``): ``"gradient"`` — ``|g|`` of the
  clean gradient; ``"weight"`` — ``|θ + ε|`` (the reference scores the
  parameters after its ascent step); ``"random"`` — uniform noise from the
  PRNG key in the state. Reference defaults: drop by gradient, grow at random.

  Drop-rate schedule: with ``total_steps`` the reference's cosine decay,
  ``d_t = drop_rate · (1 + cos(π t / total_steps)) / 2`` (``t`` clamped to
  ``total_steps``; see ``drop_rate_schedule``); with ``total_steps=None``
  the constant ``drop_rate`` (the reference has no such mode; pass the
  number of training steps to reproduce it).

  ``normalize`` as in ``ssam_f`` (default ``"full"``, the released code).

  Deliberate differences from the reference (``solver/sam.py``, ``SSAMD``):
  the period and ``total_steps`` are in steps, not epochs; the drop step
  never keeps an inactive entry (the reference's top-k over
  ``score · mask`` could pick one, and then fail its own ``mask <= 1``
  assert, only when asked to keep more entries than are active); the norm
  guard is ``eps`` (reference: ``1e-7``).

  Args:
    base_optimizer: optax transformation fed with ``grad_fn(θ + ε)``.
    rho: radius, > 0. sparsity: fraction NOT perturbed, in [0, 1) (static).
    update_freq: refresh period in steps (static int).
    drop_rate: initial drop rate in [0, 1] (static).
    total_steps: steps of the cosine decay (static int) or None (constant).
    drop_strategy, growth_strategy: ``"gradient"``, ``"weight"`` or ``"random"``.
    normalize: ``"full"`` (reference code, default) or ``"masked"``.
    key: seed/PRNG key of the initial mask and random scores.
    eps, mask, axis_name: as in ``sam`` (scores use the ``pmean``-ed
      gradient and a replicated key, so the mask stays replicated).

  References:
    Mi et al., Make Sharpness-Aware Minimization Stronger: A Sparsified
    Perturbation Approach, NeurIPS 2022. https://arxiv.org/abs/2210.05177 ;
    code: github.com/Mi-Peng/Sparse-Sharpness-Aware-Minimization,
    ``solver/sam.py`` (``SSAMD``).
  """
  who = "ssam_d"
  update_freq = _check_common(who, rho, sparsity, update_freq, key, eps, normalize)
  _base.check_fraction(f"{who}: drop_rate", drop_rate, closed_high=True)
  if _base._concrete(drop_rate) is None:  # noqa: SLF001
    raise TypeError(f"{who}: drop_rate must be static (static_args in inject_hyperparams).")
  if total_steps is not None:
    total_steps = _base.check_period(f"{who}: total_steps", total_steps)
  _base.check_choice(f"{who} drop_strategy", drop_strategy, STRATEGIES)
  _base.check_choice(f"{who} growth_strategy", growth_strategy, STRATEGIES)

  def counts(n, count):
    """(kept, grown) at this step: Python ints or int32 looked up in a table."""
    if total_steps is None:
      return _refresh_counts(n, sparsity, float(drop_rate))
    steps = [min(r * update_freq, total_steps)
             for r in range(total_steps // update_freq + 2)]
    table = np.asarray([_refresh_counts(n, sparsity,
                                        drop_rate_schedule(drop_rate, t, total_steps))
                        for t in steps], np.int32)
    idx = jnp.minimum(count // update_freq, len(steps) - 1)
    return jnp.asarray(table[:, 0])[idx], jnp.asarray(table[:, 1])[idx]

  def init(params):
    raw = _base.init_key(key, who)
    n = _n_entries(params)
    live = n - math.ceil(n * float(sparsity))
    nxt, sub = _base.split_key(raw)
    _, shapes, treedef = _flat(params)
    scores = jax.random.uniform(sub, (n,), F32)
    return SparseSAMState(_unflat(_top_k_mask(scores, live), shapes, treedef), nxt)

  def score(strategy, gs, params, e, sub):
    if strategy == "gradient":
      flat, _, _ = _flat(jax.tree.map(lambda x: jnp.abs(x.astype(F32)), gs))
    elif strategy == "weight":
      flat, _, _ = _flat(jax.tree.map(lambda p, ei: jnp.abs(p.astype(F32) + ei), params, e))
    else:
      flat = jax.random.uniform(sub, (_n_entries(params),), F32)
    return flat

  def perturb(g, params, pstate, count):
    e = _direction(g, pstate.mask, rho, eps, normalize)
    n = _n_entries(params)
    kept, grown = counts(n, count)

    def refresh():
      gs = _base.pmean(g, axis_name)
      active, shapes, treedef = _flat(pstate.mask)
      nxt, sub = _base.split_key(pstate.key)
      k_drop, k_grow = jax.random.split(sub)  # independent drop and growth noise
      drop_s = score(drop_strategy, gs, params, e, k_drop)
      grow_s = score(growth_strategy, gs, params, e, k_grow)
      keep = _rank_select(jnp.where(active, drop_s, -jnp.inf), kept) & active
      grow = _rank_select(jnp.where(active, -jnp.inf, grow_s), grown) & ~active
      return _unflat(keep | grow, shapes, treedef), nxt

    new_mask, new_key = jax.lax.cond(count % update_freq == 0, refresh,
                                     lambda: (pstate.mask, pstate.key))
    return e, SparseSAMState(new_mask, new_key), None

  return sharpness_transform(who, base_optimizer, perturb=perturb, init_perturb=init,
                             mask=mask, axis_name=axis_name)
