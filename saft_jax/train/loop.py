"""The training loop: ``fit`` (steps, finiteness guard, logging, eval, checkpoints, resume)."""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from saft_jax.train.checkpoint import Checkpointer
from saft_jax.train.progress import MetricsWriter, Progress

logger = logging.getLogger("saft_jax.train")


class NonFiniteLossError(FloatingPointError):
  """The loss, gradient or updated parameters became NaN/Inf at ``step``."""

  def __init__(self, step: int, loss: float, last_checkpoint: int | None):
    self.step, self.loss, self.last_checkpoint = step, loss, last_checkpoint
    super().__init__(f"non-finite training at step {step} (loss={loss}); the bad state was "
                     f"not saved; last good checkpoint: step {last_checkpoint}")


class FitResult(NamedTuple):
  state: Any          # final TrainState
  best_params: Any    # trainable params of the best validation eval (None without eval)
  best_metrics: dict | None
  history: list       # the records written to the JSONL file (this invocation only)


def check_finite(step: int, metrics: dict, ckpt) -> None:
  """Raises :class:`NonFiniteLossError` unless ``metrics["finite"]`` is all true (for a
  stacked step, ``[M]`` flags: the loss reported is the first bad member's)."""
  finite = np.asarray(metrics["finite"]).reshape(-1)
  if not finite.all():
    if ckpt is not None:
      ckpt.wait()
    bad = int(np.argmin(finite))
    raise NonFiniteLossError(step, float(np.asarray(metrics["loss"]).reshape(-1)[bad]),
                             ckpt.latest_step() if ckpt else None)


def next_batch(batches, start: int, step: int, total_steps: int):
  batch = next(batches, None)
  if batch is None:
    raise ValueError(f"batches_fn({start}) ran out of batches at step {step} "
                     f"(total_steps={total_steps})")
  return batch


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)  # survives donation of the state


def fit(train_step: Callable, state, frozen, batches_fn: Callable[[int], Iterable], *,
        total_steps: int, eval_fn: Callable[[Any, Any], dict] | None = None,
        eval_every: int = 0, checkpoint_dir: str | None = None, save_every: int = 1000,
        max_to_keep: int | None = 2, best_metric: str = "accuracy", log_every: int = 50,
        metrics_path: str | None = None, max_steps: int | None = None,
        ckpt_async: bool = True) -> FitResult:
  """Trains ``state`` to ``total_steps``, resuming from ``checkpoint_dir`` if it has one.

  Args:
    train_step: ``(state, frozen, batch) -> (state, metrics)`` (see ``make_train_step``).
    state: the initial :class:`TrainState` (also the restore template: shapes, shardings).
    frozen: the non-trainable argument of the step (frozen leaves, θ0 for FTTS).
    batches_fn: ``batches_fn(start_step)`` yields the batches for steps ``start_step,
      start_step + 1, ...``; data order must be a function of the step so that a resumed
      run sees the same batches.
    eval_fn: ``eval_fn(params, frozen) -> dict`` containing ``best_metric``; run every
      ``eval_every`` steps and at the end; the best (max) result is kept and checkpointed.
    max_steps: stop after this many steps in this call (the run can be resumed).

  Raises:
    NonFiniteLossError: when a step's loss/gradient/params are not finite; no checkpoint
      of that state or later is written.
  """
  ckpt = (Checkpointer(checkpoint_dir, save_every=save_every, max_to_keep=max_to_keep,
                       best_metric=best_metric, async_save=ckpt_async)
          if checkpoint_dir else None)
  best_params, best_metrics = None, None
  try:
    if ckpt is not None and ckpt.latest_step() is not None:
      state = ckpt.restore(state)
      logger.info("resumed from step %d", int(state.step))
      if (best := ckpt.restore_best(state.params)) is not None:
        best_params, best_metrics, _ = best
    start = int(state.step)
    stop = total_steps if max_steps is None else min(total_steps, start + max_steps)
    writer = MetricsWriter(metrics_path)
    progress = Progress(total_steps, start, log_every, writer)
    batches = iter(batches_fn(start))
    pending = None  # the previous step's metrics, checked one step late (no sync stall)

    check = lambda step, metrics: check_finite(step, metrics, ckpt)

    for step in range(start, stop):
      batch = next_batch(batches, start, step, total_steps)
      state, metrics = train_step(state, frozen, batch)
      if pending is not None:
        check(*pending)
      pending = (step, metrics)
      progress.record(metrics, jax.tree.leaves(batch)[0].shape[0])
      done = step + 1
      do_eval = eval_fn is not None and ((eval_every and done % eval_every == 0)
                                         or done == total_steps)
      do_save = ckpt is not None and (ckpt.should_save(done) or done == stop)
      if progress.due(done) or do_eval or do_save or done == stop:
        check(step, metrics)
        pending = None
      if progress.due(done):
        progress.emit(done)
      if do_eval:
        result = eval_fn(state.params, frozen)
        if best_metric not in result:
          raise ValueError(f"eval_fn result lacks best_metric {best_metric!r}: {sorted(result)}")
        writer.write("eval", done, result)
        logger.info("eval step %d: %s", done, {k: round(float(v), 5) for k, v in result.items()})
        if best_metrics is None or result[best_metric] > best_metrics[best_metric]:
          best_params, best_metrics = _copy(state.params), dict(result)
          if ckpt is not None:
            ckpt.save_best(done, state.params, result)
      if do_save:
        ckpt.save(state, force=done == stop)
    if ckpt is not None:
      ckpt.wait()
  finally:
    if ckpt is not None:
      ckpt.close()
  return FitResult(state, best_params, best_metrics, writer.history)
