"""The uniform task interface: :class:`Task`, :func:`train_batches`, :func:`eval_batches`.

A task is either in memory (``splits``: NumPy arrays, e.g. the offline digits
suite) or streamed (``stream``: a TFDS or folder pipeline built on tf.data).
Both give the same batches:

* ``train_batches`` yields ``(images, labels)`` NumPy batches, NHWC float32 and
  int32, infinitely, dropping each epoch's ragged tail; batch ``s`` is a
  function of ``(seed, s)`` only, so ``start_step`` resumes exactly.
* ``eval_batches`` yields ``(images, labels, mask)``: every example of the split
  exactly once, the last batch zero-padded with ``mask`` False on padding rows.

``batch_size`` is always the *global* batch; with several processes each one
gets its rows ``[p*B/P, (p+1)*B/P)`` of every global batch (see
:mod:`saft_jax.data.splits`). ``process_index``/``process_count`` default to
``jax.process_index()``/``jax.process_count()``.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np

from saft_jax.data import splits as splits_lib

SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
  """A classification task.

  Attributes:
    name: task name.
    num_classes: number of classes.
    image_shape: ``(H, W, C)`` of the batches.
    splits: in-memory ``{split: (images, labels)}`` or ``None`` for streams.
    stream: a streaming source (``num_examples``, ``train_batches``,
      ``eval_batches`` methods; see :mod:`saft_jax.data.pipeline`) or ``None``.
    class_names: optional class names (for zero-shot heads).
    indices: optional ``{split: rows of the underlying source}`` (provenance).
    default_augment: what ``augment=None`` means for this task.
    augment_fn: in-memory augmentation ``f(images, seed, step) -> images``.
  """
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  splits: Optional[Mapping[str, tuple[np.ndarray, np.ndarray]]] = None
  stream: Any = None
  class_names: Optional[tuple[str, ...]] = None
  indices: Optional[Mapping[str, np.ndarray]] = None
  default_augment: bool = False
  augment_fn: Optional[Callable[[np.ndarray, int, int], np.ndarray]] = None

  def __post_init__(self):
    if (self.splits is None) == (self.stream is None):
      raise ValueError(f"task {self.name!r}: give exactly one of `splits` or `stream`")

  def num_examples(self, split: str) -> int:
    """Number of examples in ``split`` ("train", "val" or "test")."""
    _check_split(split)
    if self.splits is not None:
      return int(len(self.splits[split][1]))
    return int(self.stream.num_examples(split))


def _check_split(split: str):
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def train_batches(task: Task, batch_size: int, *, seed: int, start_step: int = 0,
                  augment: Optional[bool] = None, process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Infinite training batches of ``task`` from global step ``start_step`` on.

  Args:
    task: the task.
    batch_size: global batch size (a multiple of ``process_count``).
    seed: data-order / augmentation seed.
    start_step: first global step to yield (resume point).
    augment: training augmentation (``None``: the task's default; CLIP tasks use
      the protocol's random resized crop, the offline tasks none; ``True`` on an
      offline task applies :func:`~saft_jax.data.offline.shift_augment`).
    process_index: this process (default ``jax.process_index()``).
    process_count: number of processes (default ``jax.process_count()``).

  Yields:
    ``(images [B/P, H, W, C] float32, labels [B/P] int32)``.
  """
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  p, count = splits_lib.resolve_process(process_index, process_count)
  rows = splits_lib.host_rows(batch_size, p, count)
  augment = task.default_augment if augment is None else bool(augment)
  splits_lib.steps_per_epoch(task.num_examples("train"), batch_size)  # validates eagerly
  if augment and task.stream is None and task.augment_fn is None:
    raise ValueError(f"task {task.name!r} has no augmentation function")
  if task.stream is not None:
    return task.stream.train_batches(batch_size, seed=seed, start_step=start_step,
                                     augment=augment, rows=rows)
  return _array_train_batches(task, batch_size, seed, start_step, augment, rows)


def _array_train_batches(task, batch_size, seed, start_step, augment, rows):
  images, labels = task.splits["train"]
  n = len(labels)
  for step in itertools.count(start_step):
    idx = splits_lib.batch_indices(n, batch_size, seed, step)
    x = images[idx]
    if augment:
      x = task.augment_fn(x, seed, step)  # on the global batch: host-count independent
    yield x[rows], labels[idx][rows]


def eval_batches(task: Task, split: str, batch_size: int, *,
                 process_index: Optional[int] = None, process_count: Optional[int] = None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Every example of ``split`` once, in order, in padded global batches.

  Args:
    task: the task.
    split: "train", "val" or "test".
    batch_size: global batch size (a multiple of ``process_count``).
    process_index: this process (default ``jax.process_index()``).
    process_count: number of processes (default ``jax.process_count()``).

  Yields:
    ``(images, labels, mask)`` (this process's rows); ``mask`` is bool and False
    on padding rows, so ``sum(correct & mask) / num_examples`` is exact.
  """
  _check_split(split)
  p, count = splits_lib.resolve_process(process_index, process_count)
  rows = splits_lib.host_rows(batch_size, p, count)
  if task.stream is not None:
    return task.stream.eval_batches(split, batch_size, rows=rows)
  images, labels = task.splits[split]
  return _array_eval_batches(images, labels, batch_size, rows)


def pad_batch(images: np.ndarray, labels: np.ndarray, batch_size: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Zero-pads a short batch to ``batch_size`` rows and returns the valid mask."""
  k = len(labels)
  if k > batch_size:
    raise ValueError(f"batch of {k} rows exceeds batch_size {batch_size}")
  mask = np.arange(batch_size) < k
  if k < batch_size:
    images = np.concatenate([images, np.zeros((batch_size - k,) + images.shape[1:], images.dtype)])
    labels = np.concatenate([labels, np.zeros((batch_size - k,), labels.dtype)])
  return images, labels, mask


def _array_eval_batches(images, labels, batch_size, rows):
  for start in range(0, len(labels), batch_size):
    x, y, m = pad_batch(images[start:start + batch_size], labels[start:start + batch_size],
                        batch_size)
    yield x[rows], y[rows], m[rows]
