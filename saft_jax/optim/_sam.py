"""SAM and ASAM (SPEC §3) as optax transformations."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from saft_jax.optim import _base
from saft_jax.optim._core import normalized_direction, sharpness_transform


def sam(
    base_optimizer: optax.GradientTransformation,
    rho: float = 0.05,
    *,
    eps: float = _base.DEFAULT_EPS,
    mask: Any = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Sharpness-aware minimization (SAM).

  ``ε = ρ g / (‖g‖₂ + eps)`` with one global norm over the whole tree, then
  the base optimizer is applied to the unperturbed params with
  ``g_sam = grad_fn(params + ε)``. Usage::

      tx = sam(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr)))
      grad_fn = jax.grad(lambda p: loss_fn(p, batch))
      g = grad_fn(params)
      updates, state = tx.update(g, state, params, grad_fn=grad_fn)

  Under ``jax.jit`` with the batch sharded over a mesh, ``grad_fn`` sees the
  global batch, so ``ε`` is one global-batch perturbation. Pass ``axis_name``
  only when calling ``update`` inside ``jax.shard_map`` (per-shard ε,
  m-sharpness; see ``per_shard_update``).

  Args:
    base_optimizer: any optax transformation (e.g. clip + AdamW); it receives
      ``g_sam``, so a clip inside it clips the driving gradient.
    rho: perturbation radius, > 0.
    eps: guard of the norm; a zero gradient gives ``ε = 0``.
    mask: optional bool pytree (or ``params -> pytree``); only True leaves are
      perturbed (and counted in the norm). Mask the base optimizer yourself.
    axis_name: shard_map axis for per-shard perturbations (see above).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` requires the
    keyword ``grad_fn``.

  References:
    Foret et al., Sharpness-Aware Minimization for Efficiently Improving
    Generalization, ICLR 2021. https://arxiv.org/abs/2010.01412
  """
  _base.check_positive("sam: rho", rho)
  _base.check_positive("sam: eps", eps)

  def perturb(g, params, pstate, count):
    del params, count
    return normalized_direction(g, rho, eps), pstate, None

  return sharpness_transform("sam", base_optimizer, perturb=perturb, mask=mask,
                             axis_name=axis_name)


def asam(
    base_optimizer: optax.GradientTransformation,
    rho: float = 0.5,
    eta: float = 0.01,
    *,
    weight_predicate: Callable[[tuple, Any], bool] | str | None = None,
    variant: str = "spec",
    eps: float = _base.DEFAULT_EPS,
    mask: Any = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Adaptive SAM (ASAM), the perturbation SAFT uses.

  ``ε = ρ T² g / (‖T g‖₂ + eps)`` with one global norm and ``T = |θ| + η`` on
  weight-like leaves and ``T = 1`` on the others. Follows the ASAM reference
  code (``SamsungLabs/ASAM``, ``asam.py``, ``ASAM.ascent_step``): the same
  ``T`` on the gradient inside the norm and ``T²`` on the perturbation.

  Weight-like leaves (``weight_predicate``):

  * default, ``default_weight_predicate``: every leaf whose last key does not
    contain "bias" — kernels, LayerNorm scales, and also embeddings
    (``class_embedding``, ``positional_embedding``, token tables) and CLIP's
    output projection ``proj/kernel`` (SPEC §3's rule);
  * ``"reference"`` (``reference_weight_predicate``): the reference's
    ``'weight' in name`` on the PyTorch names of open_clip's CLIP, which leaves
    ``class_embedding``, ``positional_embedding`` and the output projections
    at ``T = 1``;
  * any callable ``(key_path, leaf) -> bool``.

  Other differences from the reference: the norm guard is ``eps = 1e-12``
  (reference ``1e-16``); defaults ``ρ = 0.5``, ``η = 0.01`` are the
  reference class defaults (its CIFAR example script passes ``eta=0.0``).

  ``variant="released"`` reproduces the released SAFT PyTorch code
  (``BAIKLAB/SAFT-Merge``, ``linearized_saft/src/sam.py``, ``adaptive=True``,
  the ``davda54/sam`` formulation): ``η = 0`` and every leaf, biases included, is
  scaled, i.e. ``ε = ρ θ² g / (‖θ g‖ + eps)``; ``eta`` and
  ``weight_predicate`` are then ignored. Use it only to reproduce released
  numbers; SPEC §3 follows the ASAM paper (``variant="spec"``).

  Args:
    base_optimizer: any optax transformation; receives ``grad_fn(θ + ε)``.
    rho: radius in the ``T⁻¹``-scaled norm, > 0 (paper default 0.5).
    eta: additive ``η`` of ``T`` on weight leaves, >= 0 (default 0.01).
    weight_predicate: None (default rule), ``"reference"``, or
      ``(key_path, leaf) -> bool``; must select >= 1 leaf.
    variant: ``"spec"`` (default) or ``"released"``.
    eps: guard of the norm (zero gradient gives ``ε = 0``).
    mask: optional bool pytree / callable; only True leaves are perturbed.
    axis_name: shard_map axis for per-shard perturbations.

  References:
    Kwon et al., ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
    Learning of Deep Neural Networks, ICML 2021. https://arxiv.org/abs/2102.11600 ;
    code: github.com/SamsungLabs/ASAM, ``asam.py``.
  """
  _base.check_choice("asam variant", variant, ("spec", "released"))
  _base.check_positive("asam: rho", rho)
  _base.check_positive("asam: eta", eta, allow_zero=True)
  _base.check_positive("asam: eps", eps)
  if isinstance(weight_predicate, str):
    if weight_predicate != "reference":
      raise TypeError(
          f"asam: weight_predicate must be callable (path, leaf) -> bool or the "
          f"string 'reference', got {weight_predicate!r}.")
    weight_predicate = _base.reference_weight_predicate
  elif weight_predicate is not None and not callable(weight_predicate):
    raise TypeError("asam: weight_predicate must be callable (path, leaf) -> bool "
                    "or the string 'reference'.")
  if variant == "released":
    eta = 0.0
    pred = lambda path, leaf: True  # noqa: E731
  else:
    pred = weight_predicate or _base.default_weight_predicate

  def flags_of(params):
    flags = jax.tree_util.tree_map_with_path(lambda p, x: bool(pred(p, x)), params)
    leaves = jax.tree.leaves(flags)
    if leaves and not any(leaves):
      raise ValueError(
          "asam: weight_predicate selects no leaf (T = |θ| + η would apply to "
          "nothing, i.e. plain SAM); check the predicate against your leaf "
          "paths, e.g. jax.tree_util.tree_flatten_with_path(params).")
    return flags

  def perturb(g, params, pstate, count):
    del count
    flags = flags_of(params)
    eta32 = _base.f32(eta)
    # T = 1 (a scalar) on non-weight leaves. No None sentinel: params may be a
    # partitioned tree whose frozen leaves are None (absent), e.g. FTLO training.
    one = jnp.ones((), _base.F32)
    t = jax.tree.map(
        lambda p, w: jnp.abs(p.astype(_base.F32)) + eta32 if w else one,
        params, flags)
    tg = jax.tree.map(lambda gi, ti: ti * gi.astype(_base.F32), g, t)
    denom = _base.global_norm(tg) + _base.f32(eps)
    r = _base.f32(rho)
    e = jax.tree.map(lambda x, ti: ((ti * x) / denom) * r, tg, t)
    return e, pstate, None

  return sharpness_transform("asam", base_optimizer, perturb=perturb, mask=mask,
                             axis_name=axis_name, check_params=flags_of)
