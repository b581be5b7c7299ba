"""The two-gradient skeleton shared by SAM, ASAM and most of the SAM family.

One step of every transform built here:

1. ``eps, pstate, aux = perturb(g, params, pstate, count)`` from the clean
   gradient ``g`` (the ``updates`` argument of ``update``);
2. ``g_adv = grad_fn(params + eps)`` — the only extra gradient evaluation;
3. ``d = combine(g, g_adv, aux)`` (plain SAM: ``d = g_adv``), ``pmean``-ed over
   ``axis_name`` for per-shard (m-sharpness) training;
4. ``base_optimizer.update(d, base_state, params)`` — applied to the
   *unperturbed* params.

The perturbation and the restore are element-wise ops that XLA fuses into the
second gradient's computation; no parameter copy is kept in the state.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from saft_jax.optim import _base


class SharpnessState(NamedTuple):
  """State of a two-gradient sharpness-aware transform.

  Attributes:
    count: int32 number of ``update`` calls so far.
    perturb_state: variant-specific state (momentum, masks, PRNG key) or ().
    base_state: state of the base optimizer.
  """

  count: jax.Array
  perturb_state: Any
  base_state: optax.OptState


Perturb = Callable[[Any, Any, Any, jax.Array], tuple[Any, Any, Any]]
Combine = Callable[[Any, Any, Any], Any]


def normalized_direction(g: Any, rho: Any, eps: float) -> Any:
  """SAM's ``ε = ρ g / (‖g‖₂ + eps)`` in float32 (global norm over the tree).

  Computed as ``(g / (‖g‖ + eps)) * ρ`` — the operation order of
  ``optax.contrib.sam`` with ``normalize()`` and ``sgd(ρ)`` — so that the
  two agree bit for bit on float32 trees.
  """
  denom = _base.global_norm(g) + _base.f32(eps)
  rho = _base.f32(rho)
  return jax.tree.map(lambda x: (x.astype(_base.F32) / denom) * rho, g)


def sharpness_transform(
    who: str,
    base_optimizer: optax.GradientTransformation,
    *,
    perturb: Perturb,
    combine: Combine | None = None,
    init_perturb: Callable[[Any], Any] | None = None,
    mask: Any = None,
    axis_name: str | None = None,
    check_params: Callable[[Any], None] | None = None,
    perturb_args: tuple[str, ...] = (),
) -> optax.GradientTransformationExtraArgs:
  """Builds a transform from a perturbation rule (see the module docstring).

  Args:
    who: name used in error messages.
    base_optimizer: any optax transformation; receives the driving gradient.
    perturb: ``(g, params, pstate, count) -> (eps, pstate, aux)``; ``g`` has
      frozen leaves (``mask``) zeroed; ``eps`` leaves may be float32.
    combine: ``(g, g_adv, aux) -> driving gradient``; default ``g_adv``.
    init_perturb: ``params -> pstate``; default ``()``.
    mask: None, or a bool pytree / ``params -> bool pytree``; False leaves are
      never perturbed (their driving gradient still reaches the base
      optimizer: mask the base optimizer too, e.g. ``optax.masked``).
    axis_name: set when ``update`` runs inside ``jax.shard_map`` over this axis:
      grads and grad_fn are shard-local (one ε per shard, m-sharpness) and the
      driving gradient is ``pmean``-ed over the axis before the base optimizer.
    check_params: optional validation of params (trace time).
    perturb_args: names of extra ``update`` keyword arguments that belong to
      ``perturb`` (e.g. SSAM-F's ``per_example_grad_fn``): they are passed to
      ``perturb`` as keywords (None when absent) and not forwarded to the
      base optimizer.
  """
  _base.check_base_optimizer(base_optimizer, who)
  base = optax.with_extra_args_support(base_optimizer)

  def init_fn(params):
    _base.resolve_mask(mask, params, who)
    if check_params is not None:
      check_params(params)
    pstate = () if init_perturb is None else init_perturb(params)
    return SharpnessState(jnp.zeros([], jnp.int32), pstate, base.init(params))

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
    grad_fn = _base.require_grad_fn(grad_fn, who)
    _base.require_params(params, who)
    if check_params is not None:
      check_params(params)
    flags = _base.resolve_mask(mask, params, who)
    g = _base.masked_zero(updates, flags)
    own = {k: extra_args.pop(k, None) for k in perturb_args}
    eps, pstate, aux = perturb(g, params, state.perturb_state, state.count, **own)
    eps = _base.masked_zero(eps, flags)
    g_adv = _base.call_grad_fn(grad_fn, _base.add_perturbation(params, eps), who,
                                axis_name)
    drive = g_adv if combine is None else combine(updates, g_adv, aux)
    drive = _base.pmean(_base.cast_like(drive, updates), axis_name)
    new_updates, base_state = base.update(drive, state.base_state, params, **extra_args)
    return new_updates, SharpnessState(_base.count_inc(state.count), pstate, base_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
