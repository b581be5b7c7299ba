"""Learning-rate schedules of the fine-tuning protocols: linear warm-up, then a cosine
(vision protocol) or linear (NLP protocol) decay to 0."""
from __future__ import annotations

import jax.numpy as jnp


def warmup_cosine_schedule(peak_lr: float, total_steps: int, warmup_steps: int, *,
                           warmup_offset: int = 1):
  """Linear warm-up to ``peak_lr`` then cosine decay to 0 at ``total_steps``.

  With ``t`` the 0-based update count, ``w = warmup_steps`` and ``T = total_steps``::

    lr(t) = peak_lr * (t + warmup_offset) / w                  for t < w
    lr(t) = peak_lr * 0.5 * (1 + cos(pi * (t - w) / (T - w)))  for w <= t <= T
    lr(t) = 0                                                  for t > T

  ``warmup_offset=1`` is the reference code's convention (the first update already
  uses ``peak_lr / w``); ``warmup_offset=0`` matches
  ``optax.warmup_cosine_decay_schedule(0, peak_lr, w, T, 0)``.

  References:
    Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023 (``cosine_lr`` in
    the released task_vectors code, inherited from open_clip).
  """
  return _warmup_then(peak_lr, total_steps, warmup_steps, warmup_offset,
                      lambda frac: 0.5 * (1.0 + jnp.cos(jnp.pi * frac)))


def warmup_linear_schedule(peak_lr: float, total_steps: int, warmup_steps: int, *,
                           warmup_offset: int = 1):
  """Linear warm-up to ``peak_lr`` then linear decay to 0 at ``total_steps``.

  With ``t`` the 0-based update count, ``w = warmup_steps`` and ``T = total_steps``::

    lr(t) = peak_lr * (t + warmup_offset) / w          for t < w
    lr(t) = peak_lr * (T - t) / (T - w)                for w <= t <= T
    lr(t) = 0                                          for t > T

  With ``w = 0`` the first update uses ``peak_lr`` (no warm-up). This is the NLP
  fine-tuning schedule (Hugging Face ``get_linear_schedule_with_warmup``, which uses
  ``warmup_offset=0``); ``warmup_offset`` is as in :func:`warmup_cosine_schedule`.
  """
  return _warmup_then(peak_lr, total_steps, warmup_steps, warmup_offset, lambda frac: 1.0 - frac)


SCHEDULES = {"cosine": warmup_cosine_schedule, "linear": warmup_linear_schedule}


def make_schedule(kind: str, peak_lr: float, total_steps: int, warmup_steps: int, *,
                  warmup_offset: int = 1):
  """The schedule named ``kind`` (``"cosine"`` or ``"linear"``, see :data:`SCHEDULES`)."""
  if kind not in SCHEDULES:
    raise ValueError(f"unknown schedule {kind!r}; known: {', '.join(SCHEDULES)}")
  return SCHEDULES[kind](peak_lr, total_steps, warmup_steps, warmup_offset=warmup_offset)


def _warmup_then(peak_lr, total_steps, warmup_steps, warmup_offset, decay):
  """Linear warm-up, then ``peak_lr * decay(frac)`` with ``frac`` = (t - w) / (T - w) in [0, 1]."""
  if total_steps <= 0 or warmup_steps < 0 or warmup_steps >= total_steps:
    raise ValueError(f"need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, "
                     f"total_steps={total_steps}")
  if warmup_offset not in (0, 1):
    raise ValueError(f"warmup_offset must be 0 or 1, got {warmup_offset}")
  w, total = float(warmup_steps), float(total_steps)

  def schedule(count):
    t = jnp.asarray(count, jnp.float32)
    warm = peak_lr * (t + warmup_offset) / max(w, 1.0)
    frac = jnp.clip((t - w) / (total - w), 0.0, 1.0)
    return jnp.where(t < w, warm, peak_lr * decay(frac)).astype(jnp.float32)

  return schedule
