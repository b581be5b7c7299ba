"""Progress reporting: periodic log lines (loss, rate, ETA) and a JSONL metrics file."""
from __future__ import annotations

import datetime
import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np

logger = logging.getLogger("saft_jax.train")


def _scalar(x) -> Any:
  x = np.asarray(x)
  return x.item() if x.size == 1 else x.tolist()


class MetricsWriter:
  """Appends one JSON object per event to ``path`` (process 0 only); keeps a history."""

  def __init__(self, path: str | None):
    self.path = path if jax.process_index() == 0 else None
    self.history: list[dict] = []
    if self.path:
      os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

  def write(self, event: str, step: int, values: dict) -> dict:
    record = {"event": event, "step": int(step), "time": time.time()}
    record.update({k: _scalar(v) for k, v in values.items()})
    self.history.append(record)
    if self.path:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


class Progress:
  """Averages train metrics over a window and emits a line every ``log_every`` steps.

  Rates are measured from the end of the first recorded step, so the compilation of the
  first step does not distort steps/s, examples/s and the ETA.
  """

  def __init__(self, total_steps: int, start_step: int, log_every: int, writer: MetricsWriter):
    self.total, self.log_every, self.writer = total_steps, log_every, writer
    self._sums, self._n, self._examples = None, 0, 0
    self._t0, self._s0 = None, start_step

  def due(self, done: int) -> bool:
    return self.log_every > 0 and (done % self.log_every == 0 or done == self.total)

  def record(self, metrics: dict, batch_size: int) -> None:
    """Accumulates on device (no host sync)."""
    m = {k: v for k, v in metrics.items() if k != "finite"}
    self._sums = m if self._sums is None else jax.tree.map(lambda a, b: a + b, self._sums, m)
    self._n += 1
    if self._t0 is None:  # the first step (compilation): start the clock after it
      self._t0, self._s0 = time.perf_counter(), self._s0 + 1
    else:
      self._examples += batch_size

  def emit(self, done: int) -> dict:
    elapsed = max(time.perf_counter() - (self._t0 or time.perf_counter()), 1e-9)
    steps = done - self._s0
    rate = steps / elapsed if steps > 0 else None
    values = {k: float(v) / max(self._n, 1) for k, v in (self._sums or {}).items()}
    values.update(steps_per_sec=rate, examples_per_sec=self._examples / elapsed if rate else None,
                  eta_sec=(self.total - done) / rate if rate else None)
    if done == self.total:
      values["eta_sec"] = 0.0
    eta = "?" if values["eta_sec"] is None else datetime.timedelta(seconds=int(values["eta_sec"]))
    logger.info("step %d/%d | loss %.4f | %s steps/s | %s examples/s | ETA %s",
                done, self.total, values.get("loss", float("nan")),
                "?" if rate is None else f"{rate:.2f}",
                "?" if rate is None else f"{values['examples_per_sec']:.1f}", eta)
    self._sums, self._n, self._examples = None, 0, 0
    self._t0, self._s0 = time.perf_counter(), done
    return self.writer.write("train", done, values)
