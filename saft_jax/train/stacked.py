"""``fit_stacked``: M independent runs trained as one program (``make_stacked_train_step``).

Every leaf of the state has a leading member axis. Each member keeps its own best
validation parameters (``jnp.where`` per member, so members peak at different steps).
The orbax checkpoint holds ``{"state", "best_params", "best_score"}``, so a killed
group resumes with its best-so-far intact.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from saft_jax.train.checkpoint import Checkpointer
from saft_jax.train.loop import check_finite, next_batch
from saft_jax.train.mesh import mesh_of, replicate
from saft_jax.train.progress import MetricsWriter, Progress

logger = logging.getLogger("saft_jax.train")


class StackedFitResult(NamedTuple):
  state: Any          # final stacked TrainState
  best_params: Any    # stacked trainable params of each member's best validation eval
  best_score: np.ndarray  # [M] best value of ``best_metric`` per member
  history: list


def _pick(better, new, old):
  def one(n, o):
    mask = jnp.reshape(better, better.shape + (1,) * (n.ndim - 1))
    return jnp.where(mask, n, o)
  return jax.tree.map(one, new, old)


def _like_state(x, mesh):
  """``x`` replicated on ``mesh`` (the state's mesh; multi-process: a global array that
  can be saved by orbax and combined with the state), or as is without a mesh."""
  return jnp.asarray(x) if mesh is None else replicate(np.asarray(x), mesh)


def _step_of(state) -> int:
  return int(np.asarray(state.step).reshape(-1)[0])  # every member is at the same step


def fit_stacked(train_step: Callable, state, frozen, batches_fn: Callable[[int], Iterable], *,
                total_steps: int, eval_fn: Callable[[Any, Any], dict], eval_every: int,
                checkpoint_dir: str | None = None, save_every: int = 1000,
                best_metric: str = "accuracy", log_every: int = 50,
                metrics_path: str | None = None, max_steps: int | None = None,
                ckpt_async: bool = True) -> StackedFitResult:
  """Trains a stacked state to ``total_steps`` (resuming from ``checkpoint_dir``).

  Args:
    train_step: a :func:`make_stacked_train_step` step; metrics are ``[M]`` arrays.
    batches_fn: ``batches_fn(start_step)`` yields stacked batches ``[M, B, ...]``.
    eval_fn: ``eval_fn(params, frozen) -> dict`` of ``[M]`` arrays holding ``best_metric``;
      run every ``eval_every`` steps and at the end.
    max_steps: stop after this many steps in this call (the run can be resumed).

  Raises:
    saft_jax.train.NonFiniteLossError: a member's loss/gradient/params became
      non-finite (the loss reported is that member's); the bad state is never saved.
  """
  members = jax.tree.leaves(state.params)[0].shape[0]
  mesh = mesh_of(state)
  carry = {"state": state, "best_params": jax.tree.map(jnp.copy, state.params),
           "best_score": _like_state(np.full((members,), -np.inf, np.float32), mesh)}
  ckpt = (Checkpointer(checkpoint_dir, save_every=save_every, max_to_keep=1,
                       best_metric=best_metric, async_save=ckpt_async)
          if checkpoint_dir else None)
  try:
    if ckpt is not None and ckpt.latest_step() is not None:
      carry = ckpt.restore(carry)
      logger.info("resumed %d stacked runs from step %d", members, _step_of(carry["state"]))
    state = carry["state"]
    start = _step_of(state)
    stop = total_steps if max_steps is None else min(total_steps, start + max_steps)
    writer = MetricsWriter(metrics_path)
    progress = Progress(total_steps, start, log_every, writer)
    batches = iter(batches_fn(start))

    check = lambda step, metrics: check_finite(step, metrics, ckpt)

    for step in range(start, stop):
      batch = next_batch(batches, start, step, total_steps)
      state, metrics = train_step(state, frozen, batch)
      progress.record({k: jnp.mean(v) for k, v in metrics.items()},
                      members * jax.tree.leaves(batch)[0].shape[1])
      done = step + 1
      do_eval = (eval_every and done % eval_every == 0) or done == total_steps
      do_save = ckpt is not None and (ckpt.should_save(done) or done == stop)
      if progress.due(done) or do_eval or do_save or done == stop:
        check(step, metrics)
      if progress.due(done):
        progress.emit(done)
      if do_eval:
        result = eval_fn(state.params, frozen)
        if best_metric not in result:
          raise ValueError(f"eval_fn result lacks best_metric {best_metric!r}: {sorted(result)}")
        score = _like_state(np.asarray(result[best_metric], np.float32), mesh)
        better = score > carry["best_score"]
        carry = {"best_params": _pick(better, state.params, carry["best_params"]),
                 "best_score": jnp.where(better, score, carry["best_score"])}
        writer.write("eval", done, result)
        logger.info("eval step %d: mean %s %.4f", done, best_metric, float(jnp.mean(score)))
      carry["state"] = state
      if do_save:
        ckpt.save(carry, force=done == stop, step=done)
    if ckpt is not None:
      ckpt.wait()
  finally:
    if ckpt is not None:
      ckpt.close()
  return StackedFitResult(state, carry["best_params"], np.asarray(carry["best_score"]),
                          writer.history)
