"""Cheaper SAM variants: LookSAM, MSAM and SAM every k-th step.

LookSAM and ``sam_every_k`` evaluate the second gradient only on every k-th
step, inside ``jax.lax.cond``: under ``jit`` the skipped branch is not run.
(Under ``vmap`` a ``cond`` turns into a select and both branches run.)
XLA:CPU runs a large ``cond`` branch much slower than the same code inline
(measured 2.4x for a ViT gradient), so both also accept a static extra
argument ``sharpness_step: bool`` that picks the kind of step at trace time:
compile the two kinds of step separately (e.g. ``jax.jit(step,
static_argnames="sharpness_step")`` called with ``t % k == 0``) and no
``cond`` is emitted. MSAM never evaluates a second gradient.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from saft_jax.optim import _base
from saft_jax.optim._core import normalized_direction

F32 = _base.F32


class LookSAMState(NamedTuple):
  """State of LookSAM: step count, stored orthogonal direction ``g_v``, base."""

  count: jax.Array
  g_v: Any
  base_state: optax.OptState


class EveryKState(NamedTuple):
  """State of ``sam_every_k``."""

  count: jax.Array
  base_state: optax.OptState


class MSAMState(NamedTuple):
  """State of MSAM.

  Attributes:
    count: int32 steps.
    momentum: float32 momentum ``m`` of the driving gradients.
    scale: float32 scalar ``s`` with the current perturbation ``ε = −s·m``,
      already added to the params the caller holds.
    base_state: base optimizer state.
  """

  count: jax.Array
  momentum: Any
  scale: jax.Array
  base_state: optax.OptState


def _static_flag(flag, who) -> bool:
  if not isinstance(flag, bool):
    raise TypeError(
        f"{who}: sharpness_step must be a static Python bool (mark it static in "
        f"jax.jit), got {type(flag).__name__}.")
  return flag


def _sam_grad(g, params, grad_fn, rho, eps, who, axis_name):
  e = normalized_direction(g, rho, eps)
  return _base.call_grad_fn(grad_fn, _base.add_perturbation(params, e), who, axis_name)


def looksam(
    base_optimizer: optax.GradientTransformation,
    rho: float = 0.05,
    k: int = 5,
    alpha: float = 0.7,
    *,
    eps: float = _base.DEFAULT_EPS,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """LookSAM: a SAM gradient every ``k`` steps, its sharpness direction reused.

  On steps ``t ≡ 0 (mod k)``: ``g_s = ∇L(θ + ρ g/‖g‖)`` and the part of
  ``g_s`` orthogonal to ``g`` is stored,
  ``g_v = g_s − (g·g_s/‖g‖²) g``; the driving gradient is ``g_s``. On the other
  steps no extra gradient is evaluated: ``g_s = g + α (‖g‖/‖g_v‖) g_v``.
  ``update(..., sharpness_step=True/False)`` (static) overrides the
  ``t mod k`` schedule and avoids the ``cond`` (see the module docstring).

  Args:
    base_optimizer: optax transformation fed with ``g_s``.
    rho: radius, > 0. k: period (static int >= 1). alpha: reuse weight >= 0.
    eps: norm guard. axis_name: as in ``sam`` (g_v is ``pmean``-ed).

  References:
    Liu, Mai, Chen, Hsieh and You, Towards Efficient and Scalable
    Sharpness-Aware Minimization, CVPR 2022. https://arxiv.org/abs/2203.02714
  """
  who = "looksam"
  _base.check_positive(f"{who}: rho", rho)
  _base.check_positive(f"{who}: eps", eps)
  _base.check_positive(f"{who}: alpha", alpha, allow_zero=True)
  k = _base.check_period(f"{who}: k", k)
  _base.check_base_optimizer(base_optimizer, who)
  base = optax.with_extra_args_support(base_optimizer)
  e32 = _base.f32(eps)

  def init_fn(params):
    return LookSAMState(jnp.zeros([], jnp.int32),
                        jax.tree.map(lambda p: jnp.zeros(p.shape, F32), params),
                        base.init(params))

  def update_fn(updates, state, params=None, *, grad_fn=None, sharpness_step=None,
                **extra_args):
    grad_fn = _base.require_grad_fn(grad_fn, who)
    _base.require_params(params, who)
    g = updates

    def sam_step(g_v):
      del g_v
      gs = _sam_grad(g, params, grad_fn, rho, eps, who, axis_name)
      gs32 = jax.tree.map(lambda x: x.astype(F32), gs)
      coef = _base.tree_vdot(g, gs32) / (jnp.square(_base.global_norm(g)) + e32)
      gv = jax.tree.map(lambda s, gi: s - coef * gi.astype(F32), gs32, g)
      return _base.cast_like(gs, g), _base.pmean(gv, axis_name)

    def reuse_step(g_v):
      ratio = _base.global_norm(g) / (_base.global_norm(g_v) + e32)
      a = _base.f32(alpha) * ratio
      gs = jax.tree.map(lambda gi, v: (gi.astype(F32) + a * v).astype(gi.dtype), g, g_v)
      return gs, g_v

    if sharpness_step is None:
      drive, g_v = jax.lax.cond(state.count % k == 0, sam_step, reuse_step, state.g_v)
    else:
      drive, g_v = (sam_step if _static_flag(sharpness_step, who) else reuse_step)(state.g_v)
    drive = _base.pmean(drive, axis_name)
    new_updates, base_state = base.update(drive, state.base_state, params, **extra_args)
    return new_updates, LookSAMState(_base.count_inc(state.count), g_v, base_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sam_every_k(
    base_optimizer: optax.GradientTransformation,
    rho: float = 0.05,
    k: int = 2,
    *,
    eps: float = _base.DEFAULT_EPS,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """SAM on every k-th step (``t ≡ 0 mod k``), the base optimizer otherwise.

  Off-steps feed the clean gradient to the base optimizer and evaluate no
  extra gradient, so the average cost is ``1 + 1/k`` gradients per step.
  ``update(..., sharpness_step=True/False)`` (static) overrides the
  ``t mod k`` schedule and avoids the ``cond`` (see the module docstring).

  References:
    Foret et al., ICLR 2021 (SAM); the periodic schedule is studied in
    Liu et al., CVPR 2022 (LookSAM, "SAM-k") and Jiang et al., An Adaptive
    Policy to Employ Sharpness-Aware Minimization, ICLR 2023.
  """
  who = "sam_every_k"
  _base.check_positive(f"{who}: rho", rho)
  _base.check_positive(f"{who}: eps", eps)
  k = _base.check_period(f"{who}: k", k)
  _base.check_base_optimizer(base_optimizer, who)
  base = optax.with_extra_args_support(base_optimizer)

  def init_fn(params):
    return EveryKState(jnp.zeros([], jnp.int32), base.init(params))

  def update_fn(updates, state, params=None, *, grad_fn=None, sharpness_step=None,
                **extra_args):
    grad_fn = _base.require_grad_fn(grad_fn, who)
    _base.require_params(params, who)
    on = lambda: _base.cast_like(  # noqa: E731
        _sam_grad(updates, params, grad_fn, rho, eps, who, axis_name), updates)
    off = lambda: updates  # noqa: E731
    if sharpness_step is None:
      drive = jax.lax.cond(state.count % k == 0, on, off)
    else:
      drive = (on if _static_flag(sharpness_step, who) else off)()
    drive = _base.pmean(drive, axis_name)
    new_updates, base_state = base.update(drive, state.base_state, params, **extra_args)
    return new_updates, EveryKState(_base.count_inc(state.count), base_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def msam(
    base_optimizer: optax.GradientTransformation,
    rho: float = 0.3,
    beta: float = 0.9,
    *,
    eps: float = _base.DEFAULT_EPS,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Momentum-SAM: perturb along the negative momentum, one gradient per step.

  As in the paper's implementation, the parameters the caller holds stay
  perturbed, ``θ̃_t = θ_t + ε_t`` with ``ε_t = −ρ m_t/‖m_t‖``, so the gradient
  the caller computes at its params *is* the perturbed gradient and
  ``grad_fn`` is never called. One step: ``θ_{t+1} = θ_t + u_t`` with
  ``u_t = base(∇L(θ̃_t); θ_t)``, ``m_{t+1} = β m_t + ∇L(θ̃_t)``, and the
  returned update is ``u_t + ε_{t+1} − ε_t``. Before evaluating or
  merging, remove the perturbation with ``unperturbed_params(params, state)``.
  ``m_0 = 0`` so ``ε_0 = 0``. ``m`` is MSAM's own momentum (the base
  optimizer's state is opaque to it).

  Args:
    base_optimizer: optax transformation (e.g. SGD-momentum or AdamW).
    rho: radius, > 0 (the paper uses larger values than SAM, e.g. 0.3-3).
    beta: momentum decay in [0, 1).
    eps: norm guard. axis_name: shard_map axis; grads are ``pmean``-ed.

  References:
    Becker, Altrock and Risse, Momentum-SAM: Sharpness Aware Minimization
    without Computational Overhead, 2024. https://arxiv.org/abs/2401.12033
  """
  who = "msam"
  _base.check_positive(f"{who}: rho", rho)
  _base.check_positive(f"{who}: eps", eps)
  _base.check_fraction(f"{who}: beta", beta)
  _base.check_base_optimizer(base_optimizer, who)
  base = optax.with_extra_args_support(base_optimizer)

  def init_fn(params):
    return MSAMState(jnp.zeros([], jnp.int32),
                     jax.tree.map(lambda p: jnp.zeros(p.shape, F32), params),
                     jnp.zeros([], F32), base.init(params))

  def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
    del grad_fn  # accepted, never needed: one gradient per step
    _base.require_params(params, who)
    g = _base.pmean(updates, axis_name)
    s_old = state.scale
    clean = jax.tree.map(lambda p, m: (p.astype(F32) + s_old * m).astype(p.dtype),
                         params, state.momentum)
    u, base_state = base.update(g, state.base_state, clean, **extra_args)
    b = _base.f32(beta)
    m_new = jax.tree.map(lambda m, gi: b * m + gi.astype(F32), state.momentum, g)
    s_new = _base.f32(rho) / (_base.global_norm(m_new) + _base.f32(eps))
    out = jax.tree.map(
        lambda ui, mo, mn: (ui.astype(F32) + s_old * mo - s_new * mn).astype(ui.dtype),
        u, state.momentum, m_new)
    return out, MSAMState(_base.count_inc(state.count), m_new, s_new, base_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
