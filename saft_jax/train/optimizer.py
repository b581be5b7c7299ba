"""The base optimizer of the protocol: global-norm clip, then AdamW on a warm-up/decay lr."""
from __future__ import annotations

from typing import Any, Callable

import optax

from saft_jax.train.schedule import make_schedule


def make_base_optimizer(lr: float = 1e-5, total_steps: int = 8000, warmup_steps: int = 500,
                        weight_decay: float = 0.1, clip_norm: float | None = 1.0, *,
                        b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                        weight_decay_mask: Any | Callable | None = None,
                        warmup_offset: int = 1,
                        schedule: str = "cosine") -> optax.GradientTransformationExtraArgs:
  """``clip_by_global_norm(clip_norm)`` followed by AdamW with the protocol schedule.

  ``schedule`` is the decay after the linear warm-up: ``"cosine"`` (the vision
  protocol, :func:`saft_jax.train.schedule.warmup_cosine_schedule`) or ``"linear"``
  (the NLP protocol, :func:`saft_jax.train.schedule.warmup_linear_schedule`).

  The clip acts on whatever gradient is fed to this chain, so when a SAM/ASAM transform
  wraps it, it clips the gradient at the perturbed point (the one that drives AdamW).
  Weight decay is decoupled and scaled by the learning rate (PyTorch ``AdamW``
  semantics) and applies to every leaf the optimizer sees (frozen leaves are not seen).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (extra args such as ``grad_fn`` are
    accepted and ignored).

  References:
    Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019.
  """
  lr_fn = make_schedule(schedule, lr, total_steps, warmup_steps, warmup_offset=warmup_offset)
  parts = []
  if clip_norm is not None:
    if clip_norm <= 0:
      raise ValueError(f"clip_norm must be positive or None, got {clip_norm}")
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.adamw(lr_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=weight_decay_mask))
  return optax.with_extra_args_support(optax.chain(*parts))
