"""Progress lines with rate and ETA for byte-sized work, and the process's peak memory."""
from __future__ import annotations

import contextlib
import logging
import resource
import sys
import threading
import time
from typing import Callable, Optional

logger = logging.getLogger("saft_jax.workflow")


def human_bytes(n: float) -> str:
  """``1536`` -> ``"1.5 KiB"``."""
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} GiB"


def format_eta(seconds: float) -> str:
  """``75`` -> ``"0:01:15"``."""
  seconds = max(0, int(round(seconds)))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ByteProgress:
  """Logs ``"<label>: 42% of 1.2 GiB, 80.0 MiB/s, ETA 0:00:09"`` at most every
  ``every`` seconds (and once at the end).

  Args:
    label: the line's prefix.
    total: bytes of the whole job.
    every: seconds between lines.
  """

  def __init__(self, label: str, total: int, every: float = 5.0):
    self.label, self.total, self.every = label, max(int(total), 1), every
    self._t0 = time.time()
    self._last = -float("inf")
    self.done = 0

  def line(self, done: int) -> str:
    elapsed = max(time.time() - self._t0, 1e-9)
    frac = min(done / self.total, 1.0)
    rate = done / elapsed
    eta = (self.total - done) / rate if rate > 0 else float("nan")
    eta_text = format_eta(eta) if eta == eta else "?"
    return (f"{self.label}: {100 * frac:3.0f}% of {human_bytes(self.total)}, "
            f"{human_bytes(rate)}/s, ETA {eta_text}")

  def update(self, done: int, *, force: bool = False) -> None:
    self.done = done
    now = time.time()
    if force or now - self._last >= self.every:
      self._last = now
      logger.info(self.line(done))


def _read_bytes() -> Optional[int]:
  """Bytes this process has read so far (Linux ``/proc/self/io`` rchar), or None."""
  try:
    with open("/proc/self/io") as f:
      for line in f:
        if line.startswith("rchar:"):
          return int(line.split()[1])
  except OSError:
    return None
  return None


@contextlib.contextmanager
def watch_reads(progress: ByteProgress, poll: float = 1.0,
                read_bytes: Callable[[], Optional[int]] = _read_bytes):
  """Updates ``progress`` from the bytes the process reads while the block runs (for work
  such as a streaming merge that reports nothing itself); a no-op where the counter is
  unavailable."""
  start = read_bytes()
  if start is None:
    yield
    return
  stop = threading.Event()

  def run():
    while not stop.wait(poll):
      progress.update(min(read_bytes() - start, progress.total))

  thread = threading.Thread(target=run, daemon=True)
  thread.start()
  try:
    yield
  finally:
    stop.set()
    thread.join()
    progress.update(progress.total, force=True)


def peak_memory_mib() -> float:
  """Peak resident memory of this process so far, in MiB."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
