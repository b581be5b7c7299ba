"""SAM-family methods that change the perturbation or the driving gradient.

Friendly-SAM, GSAM, SAGM and PGN. Each costs two gradient evaluations per
step, like SAM, and is built on ``_core.sharpness_transform``.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from saft_jax.optim import _base
from saft_jax.optim._core import normalized_direction, sharpness_transform

F32 = _base.F32


class FriendlySAMState(NamedTuple):
  """Perturbation state of Friendly-SAM: EMA ``m`` of past clean gradients."""

  momentum: Any


def friendly_sam(
    base_optimizer: optax.GradientTransformation,
    rho: float = 0.05,
    sigma: float = 1.0,
    lmbda: float = 0.9,
    *,
    eps: float = _base.DEFAULT_EPS,
    mask: Any = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Friendly-SAM (F-SAM): perturb along the batch-specific gradient part.

  The full-gradient component is estimated by an EMA of past clean gradients,
  ``m_t = λ m_{t-1} + (1-λ) g_t`` (``m_0 = g_0``), and removed from the
  ascent direction: ``d_t = g_t − σ m_{t-1}`` (``d_0 = g_0``),
  ``ε = ρ d / ‖d‖``. The driving gradient is ``grad_fn(θ + ε)``.
  Follows the reference implementation (nblt/F-SAM): the direction uses the
  EMA *before* it is updated with the current gradient.

  Args:
    base_optimizer: optax transformation fed with the perturbed gradient.
    rho: radius, > 0.
    sigma: weight of the removed full-gradient estimate, >= 0.
    lmbda: EMA decay in [0, 1).
    eps: norm guard. mask, axis_name: as in ``sam`` (the EMA is updated with
      the ``pmean``-ed gradient so it stays replicated across shards).

  References:
    Li et al., Friendly Sharpness-Aware Minimization, CVPR 2024.
    https://arxiv.org/abs/2403.12350
  """
  _base.check_positive("friendly_sam: rho", rho)
  _base.check_positive("friendly_sam: eps", eps)
  _base.check_positive("friendly_sam: sigma", sigma, allow_zero=True)
  _base.check_fraction("friendly_sam: lmbda", lmbda)

  def init(params):
    return FriendlySAMState(jax.tree.map(lambda p: jnp.zeros(p.shape, F32), params))

  def perturb(g, params, pstate, count):
    del params
    first = count == 0
    s, lam = _base.f32(sigma), _base.f32(lmbda)
    m = pstate.momentum
    d = jax.tree.map(lambda gi, mi: jnp.where(first, gi.astype(F32),
                                              gi.astype(F32) - s * mi), g, m)
    gs = _base.pmean(g, axis_name)
    new_m = jax.tree.map(
        lambda gi, mi: jnp.where(first, gi.astype(F32),
                                 lam * mi + (1 - lam) * gi.astype(F32)), gs, m)
    return normalized_direction(d, rho, eps), FriendlySAMState(new_m), None

  return sharpness_transform("friendly_sam", base_optimizer, perturb=perturb,
                             init_perturb=init, mask=mask, axis_name=axis_name)


def gsam(
    base_optimizer: optax.GradientTransformation,
    rho: float = 0.05,
    alpha: float = 0.1,
    *,
    eps: float = _base.DEFAULT_EPS,
    mask: Any = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Surrogate-gap guided SAM (GSAM).

  With ``g = ∇L(θ)`` and ``g_p = ∇L(θ + ρ g/‖g‖)``, the clean gradient is
  split into its components parallel and orthogonal to ``g_p``,
  ``g_⊥ = g − (g·g_p / ‖g_p‖²) g_p``, and the driving gradient is
  ``g_p − α g_⊥`` (descending ``L_p`` while ascending the surrogate gap along
  the orthogonal direction). The paper also ties ``ρ`` to the learning-rate
  schedule: use ``optax.inject_hyperparams(gsam)(..., rho=schedule)``.

  References:
    Zhuang et al., Surrogate Gap Minimization Improves Sharpness-Aware
    Training, ICLR 2022. https://arxiv.org/abs/2203.08065
  """
  _base.check_positive("gsam: rho", rho)
  _base.check_positive("gsam: eps", eps)
  _base.check_positive("gsam: alpha", alpha, allow_zero=True)

  def perturb(g, params, pstate, count):
    del params, count
    return normalized_direction(g, rho, eps), pstate, None

  def combine(g, gp, aux):
    del aux
    dot = _base.tree_vdot(g, gp)
    coef = dot / (jnp.square(_base.global_norm(gp)) + _base.f32(eps))
    a = _base.f32(alpha)
    return jax.tree.map(
        lambda gi, pi: pi.astype(F32) - a * (gi.astype(F32) - coef * pi.astype(F32)),
        g, gp)

  return sharpness_transform("gsam", base_optimizer, perturb=perturb,
                             combine=combine, mask=mask, axis_name=axis_name)


def sagm(
    base_optimizer: optax.GradientTransformation,
    rho: float = 0.05,
    alpha: float = 0.001,
    *,
    eps: float = _base.DEFAULT_EPS,
    mask: Any = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Sharpness-aware gradient matching (SAGM).

  Minimizes ``L(θ) + L_p(θ)`` and the gap between them. With ``g = ∇L(θ)``
  the perturbation is ``ε = (ρ/(‖g‖ + eps) − α) g`` and the driving gradient
  ``(g + ∇L(θ + ε)) / 2`` (paper Eq. 11). This is exactly the reference
  code: ``perturb_weights`` uses ``scale = rho / (grad_norm + perturb_eps) −
  alpha`` and ``e_w = p.grad * scale`` (``perturb_eps = 1e-12``, our default
  ``eps``), and ``gradient_decompose`` turns the perturbed gradient into
  ``0.5·old_g + 0.5·g_p``.

  Not reproduced from the reference: its ``adaptive=True`` mode
  (``ε *= θ²``; off in its DomainBed setup) and its ρ scheduler (constant
  0.05 in that setup; schedule ``rho`` with ``optax.inject_hyperparams``).
  Defaults ``rho = 0.05``, ``alpha = 0.001`` are the reference's.

  Args:
    base_optimizer: optax transformation fed with the driving gradient.
    rho: radius, > 0. alpha: coefficient of the ``−α g`` descent term, >= 0.
    eps, mask, axis_name: as in ``sam``.

  References:
    Wang et al., Sharpness-Aware Gradient Matching for Domain Generalization,
    CVPR 2023. https://arxiv.org/abs/2303.10353 ; code:
    github.com/Wang-pengfei/SAGM, ``domainbed/sagm/sagm.py``.
  """
  _base.check_positive("sagm: rho", rho)
  _base.check_positive("sagm: eps", eps)
  _base.check_positive("sagm: alpha", alpha, allow_zero=True)

  def perturb(g, params, pstate, count):
    del params, count
    e = normalized_direction(g, rho, eps)
    a = _base.f32(alpha)
    return jax.tree.map(lambda ei, gi: ei - a * gi.astype(F32), e, g), pstate, None

  def combine(g, gp, aux):
    del aux
    return jax.tree.map(lambda gi, pi: 0.5 * (gi.astype(F32) + pi.astype(F32)), g, gp)

  return sharpness_transform("sagm", base_optimizer, perturb=perturb,
                             combine=combine, mask=mask, axis_name=axis_name)


PGN_CLEAN = ("raw", "normalized")


def pgn(
    base_optimizer: optax.GradientTransformation,
    rho: float = 0.05,
    alpha: float = 0.8,
    *,
    clean_gradient: str = "raw",
    eps: float = _base.DEFAULT_EPS,
    mask: Any = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Gradient-norm penalty (PGN): minimizes ``L(θ) + λ‖∇L(θ)‖₂``.

  The penalty's gradient is approximated by a finite difference along
  ``g/‖g‖`` with step ``ρ`` (= ``r`` in the paper), giving the driving gradient
  ``(1 − α) g + α ∇L(θ + ρ g/‖g‖)`` with ``α = λ/ρ``; ``α = 1`` is SAM.

  ``clean_gradient`` chooses the first term:

  * ``"raw"`` (default): ``(1 − α) g`` — the paper's equation, and the
    finite-difference gradient of the stated objective (the reference
    README derives the same form).
  * ``"normalized"``: ``(1 − α) g/(‖g‖ + eps)`` — the reference code's
    default (``config.gnp.norm_perturbations = True`` in
    ``config/base_config.py``; ``get_gnp_gradient`` in
    ``training/training_core.py`` then mixes the unit-norm clean gradient).
    This is not the gradient of ``L + λ‖∇L‖``: the relative weight of the two
    terms changes with ``‖g‖``. The repository's first commit (June 2022)
    defaulted to the raw gradient and the default changed five days later,
    so the code does not settle which rule produced the paper's numbers;
    hence the paper's rule is the default here.

  Other differences from the reference: its ``dual_vector`` has no norm
  guard (a zero gradient gives NaN; here ``eps``); its per-device
  perturbation (``sync_perturbations = False``) is our ``axis_name`` mode,
  and the default here is one global-batch perturbation; its ``r`` / ``λ``
  warm-up strategies are not built in (schedule ``rho`` / ``alpha`` with
  ``optax.inject_hyperparams``).

  Args:
    base_optimizer: optax transformation fed with the driving gradient.
    rho: finite-difference step ``r``, > 0.
    alpha: ``λ/r``, >= 0 (the reference recipes use 0.8).
    clean_gradient: ``"raw"`` (paper, default) or ``"normalized"`` (code).
    eps, mask, axis_name: as in ``sam``.

  References:
    Zhao, Zhang and Hu, Penalizing Gradient Norm for Efficiently Improving
    Generalization in Deep Learning, ICML 2022. https://arxiv.org/abs/2202.03599 ;
    code: github.com/zhaoyang-0204/gnp, ``training/training_core.py``.
  """
  _base.check_positive("pgn: rho", rho)
  _base.check_positive("pgn: eps", eps)
  _base.check_positive("pgn: alpha", alpha, allow_zero=True)
  _base.check_choice("pgn clean_gradient", clean_gradient, PGN_CLEAN)

  def perturb(g, params, pstate, count):
    del params, count
    # aux: ‖g‖ over the perturbed (mask=True) leaves, the norm of the ascent
    return normalized_direction(g, rho, eps), pstate, _base.global_norm(g)

  def combine(g, gp, g_norm):
    a = _base.f32(alpha)
    if clean_gradient == "normalized":
      denom = g_norm + _base.f32(eps)
      g = jax.tree.map(lambda gi: gi.astype(F32) / denom, g)
    return jax.tree.map(lambda gi, pi: (1 - a) * gi.astype(F32) + a * pi.astype(F32),
                        g, gp)

  return sharpness_transform("pgn", base_optimizer, perturb=perturb,
                             combine=combine, mask=mask, axis_name=axis_name)
