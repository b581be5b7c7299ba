"""Orbax checkpoints: periodic full-state saves and a best-on-validation params copy.

Layout: ``<dir>/state/<step>`` (the :class:`TrainState`, every ``save_every`` steps,
``max_to_keep`` newest kept) and ``<dir>/best/<step>`` (trainable params with their
validation metrics; orbax keeps the single best by ``best_metric``).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def _abstract(tree: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
  """Two ``ocp.CheckpointManager`` s (state / best) behind a small API."""

  def __init__(self, directory: str, *, save_every: int = 1000, max_to_keep: int | None = 2,
               best_metric: str = "accuracy", best_mode: str = "max", async_save: bool = True):
    if save_every < 1:
      raise ValueError(f"save_every must be >= 1, got {save_every}")
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    directory = os.path.abspath(os.fspath(directory))
    self.best_metric = best_metric
    self.best_mode = best_mode
    self._state = ocp.CheckpointManager(
        os.path.join(directory, "state"),
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save))
    self._best = ocp.CheckpointManager(
        os.path.join(directory, "best"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda m: float(m[best_metric]), best_mode=best_mode,
            enable_async_checkpointing=async_save))

  # --- periodic state ---------------------------------------------------------------
  def should_save(self, step: int) -> bool:
    return self._state.should_save(step)

  def save(self, state, *, force: bool = False, step: int | None = None) -> bool:
    """Saves ``state`` under ``step`` (default ``int(state.step)``) if due (or ``force``)."""
    step = int(state.step) if step is None else int(step)
    if step in self._state.all_steps():
      return False
    return self._state.save(step, args=ocp.args.StandardSave(state), force=force)

  def latest_step(self) -> int | None:
    return self._state.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._state.all_steps())

  def restore(self, like, step: int | None = None):
    """Restores the state at ``step`` (default latest) with the structure, dtypes and
    shardings of ``like``; ``None`` if there is no checkpoint."""
    step = self._state.latest_step() if step is None else step
    if step is None:
      return None
    return self._state.restore(step, args=ocp.args.StandardRestore(_abstract(like)))

  # --- best on validation -------------------------------------------------------------
  def is_better(self, value: float, best: float | None) -> bool:
    if best is None:
      return True
    return value > best if self.best_mode == "max" else value < best

  def save_best(self, step: int, params, metrics: dict) -> None:
    if self.best_metric not in metrics:
      raise ValueError(f"eval metrics lack the best metric {self.best_metric!r}: {sorted(metrics)}")
    self._best.save(step, args=ocp.args.StandardSave(params),
                    metrics={k: float(v) for k, v in metrics.items()}, force=True)

  def restore_best(self, like):
    """``(params, metrics, step)`` of the best validation checkpoint, or ``None``."""
    self._best.wait_until_finished()
    step = self._best.best_step()
    if step is None:
      return None
    params = self._best.restore(step, args=ocp.args.StandardRestore(_abstract(like)))
    return params, dict(self._best.metrics(step) or {}), step

  def wait(self) -> None:
    self._state.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    self._state.close()
    self._best.close()
