"""Random weight perturbation (RWP / m-RWP)."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from saft_jax.optim import _base
from saft_jax.optim._core import sharpness_transform

F32 = _base.F32


class RWPState(NamedTuple):
  """Perturbation state of RWP: raw uint32 PRNG key data."""

  key: jax.Array


def filter_norms(p: jax.Array) -> jax.Array:
  """Norm of each output filter, broadcast to ``p``'s shape (float32).

  Flax kernels keep the output features on the last axis, so a filter is a
  slice ``p[..., j]``. 0-d/1-d leaves (biases, scales) use the whole-leaf norm.
  """
  x = p.astype(F32)
  if x.ndim <= 1:
    return jnp.broadcast_to(jnp.sqrt(jnp.sum(x * x)) + 1e-16, x.shape)
  return jnp.broadcast_to(
      jnp.sqrt(jnp.sum(x * x, axis=tuple(range(x.ndim - 1)), keepdims=True)), x.shape)


def rwp(
    base_optimizer: optax.GradientTransformation,
    gamma: float = 0.01,
    mix: float = 0.5,
    *,
    key: Any = 0,
    mask: Any = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Random weight perturbation, mixed with the clean gradient (m-RWP).

  ``ε ~ N(0, γ² ‖θ_f‖²)`` independently per entry, where ``‖θ_f‖`` is the norm
  of the entry's output filter (whole leaf for 1-d leaves), drawn from a
  PRNG key kept in the state. The perturbation does not depend on the
  gradient. The driving gradient is ``mix · ∇L(θ) + (1 − mix) · ∇L(θ + ε)``;
  ``mix = 0`` is plain RWP (Bisla et al., 2022), ``mix = 0.5`` the paper's
  m-RWP default. Under ``axis_name`` every shard draws the same ε (the key is
  replicated).

  Args:
    base_optimizer: optax transformation fed with the driving gradient.
    gamma: relative noise scale, > 0.
    mix: weight of the clean gradient in [0, 1].
    key: int seed or PRNG key (kept, split every step, in the state).
    mask, axis_name: as in ``sam``.

  References:
    Li, Zhang, Huang, Chen and Huang, Revisiting Random Weight Perturbation for
    Efficiently Improving Generalization, TMLR 2024.
    https://arxiv.org/abs/2404.00357 ; Bisla, Wang and Choromanska,
    Low-Pass Filtering SGD for Recovering Flat Optima in the Deep Learning
    Optimization Landscape, AISTATS 2022.
  """
  _base.check_positive("rwp: gamma", gamma)
  _base.check_fraction("rwp: mix", mix, closed_high=True)
  _base.init_key(key, "rwp")  # validates early

  def init(params):
    del params
    return RWPState(_base.init_key(key, "rwp"))

  def perturb(g, params, pstate, count):
    del g, count
    nxt, sub = _base.split_key(pstate.key)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(sub, max(len(leaves), 1))
    gam = _base.f32(gamma)
    noise = [gam * filter_norms(p) * jax.random.normal(k, p.shape, F32)
             for p, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noise), RWPState(nxt), None

  def combine(g, gp, aux):
    del aux
    a = _base.f32(mix)
    return jax.tree.map(lambda gi, pi: a * gi.astype(F32) + (1 - a) * pi.astype(F32),
                        g, gp)

  return sharpness_transform("rwp", base_optimizer, perturb=perturb, combine=combine,
                             init_perturb=init, mask=mask, axis_name=axis_name)
