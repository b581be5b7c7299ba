"""Dimensionless quantities that place a fine-tuning run next to the paper's CLIP setting.

The offline suite is a small analogue of CLIP ViT-B/32 fine-tuning only where these
quantities match (see README, "The offline suite"):

* the ASAM radius per coordinate ``ρ/√d``: ASAM's ball is one global norm over all
  ``d`` trainable parameters (in ``T⁻¹``-scaled coordinates), so the mean relative
  perturbation of one coordinate is about ``ρ/√d``. Matching it to ViT-B/32 at the
  paper's ``ρ = 0.5`` gives :func:`dimension_matched_rho`;
* the learning rate relative to the weight scale, ``lr / rms(θ0)``;
* the fine-tuned models' relative distance ``‖τ‖/‖θ0‖`` and their accuracy gain over θ0.

Pure functions; :func:`config_quantities` and :func:`task_vector_quantities` are what
``saft reproduce`` records under ``meta.json["regime"]``.
"""
from __future__ import annotations

import functools
import math

import jax
import numpy as np

from saft_jax import models

PAPER_ASAM_RHO = 0.5     # SPEC §3 / §5: the paper's ASAM radius for CLIP ViT-B/32
PAPER_LR = 1e-5          # SPEC §5


def num_params(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


@functools.lru_cache(maxsize=None)
def vision_param_count(cfg: models.VisionConfig) -> int:
  """Parameters of a vision tower (from shapes only: nothing is allocated)."""
  shapes = jax.eval_shape(lambda k: models.init_vision_params(cfg, k), jax.random.key(0))
  return num_params(shapes)


def dimension_matched_rho(d: int, *, rho_ref: float = PAPER_ASAM_RHO,
                          d_ref: int | None = None) -> float:
  """ASAM ρ giving a ``d``-parameter model the per-coordinate radius ``rho_ref/√d_ref``.

  ``d_ref`` defaults to CLIP ViT-B/32's image tower (87.8M parameters).
  """
  if d <= 0:
    raise ValueError(f"d must be positive, got {d}")
  d_ref = vision_param_count(models.VIT_B_32) if d_ref is None else d_ref
  return rho_ref * math.sqrt(d / d_ref)


def rms(tree) -> float:
  leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]
  return float(math.sqrt(sum(np.sum(x * x) for x in leaves) / max(num_params(leaves), 1)))


def global_norm(tree) -> float:
  return float(math.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2)
                             for x in jax.tree.leaves(tree))))


def config_quantities(params0, config) -> dict:
  """ρ per coordinate and lr relative to the weight scale, with ViT-B/32's values."""
  d, d_ref = num_params(params0), vision_param_count(models.VIT_B_32)
  scale = rms(params0)
  return dict(
      num_params=d, asam_rho=config.optim.asam_rho,
      asam_rho_per_coordinate=config.optim.asam_rho / math.sqrt(d),
      paper_asam_rho_per_coordinate=PAPER_ASAM_RHO / math.sqrt(d_ref),
      dimension_matched_rho=dimension_matched_rho(d, d_ref=d_ref),
      vit_b32_num_params=d_ref, lr=config.optim.lr, rms_theta0=scale,
      lr_over_rms_theta0=config.optim.lr / scale, steps=config.steps,
      batch_size=config.batch_size)


def task_vector_quantities(params0, tvs) -> dict:
  """``‖τ‖/‖θ0‖`` over task vectors: mean, min, max."""
  if not tvs:
    raise ValueError("no task vectors")
  norm0 = global_norm(params0)
  rel = np.array([global_norm(tv) / norm0 for tv in tvs])
  return dict(relative_distance_mean=float(rel.mean()), relative_distance_min=float(rel.min()),
              relative_distance_max=float(rel.max()))
