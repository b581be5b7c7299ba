"""Offline task suite built from scikit-learn's handwritten digits (no download).

Design:
  * Source: ``sklearn.datasets.load_digits`` (1797 grey 8x8 images, values
    0..16, labels 0..9), shipped inside scikit-learn.
  * One seeded permutation (``seed``, default 0) of the 1797 rows is cut into
      - ``test``: 20% (359 rows), *shared by every task* (same rows, each task
        applies its own transform / label map);
      - ``pretrain``: 25% of the rest (360 rows), used only by the pretext data
        set for θ0 (disjoint from every task split);
      - the task pool (the remaining 1078 rows): ``val`` = 10% of the pool (108),
        the same rows for every task, ``train`` = the rest (970 rows).
  * Eight tasks (mirroring the paper's eight), each a fixed image transform plus
    a label map:

      ============  ===========================  =======  =========
      task          image                        label    classes
      ============  ===========================  =======  =========
      ``digits``    identity                     y        10
      ``rot90``     ``np.rot90`` (90° ccw)       y        10
      ``flip``      left-right mirror            y        10
      ``invert``    ``16 - x``                   y        10
      ``permute``   fixed pixel permutation      y        10
      ``parity``    identity                     y % 2    2
      ``ge5``       identity                     y >= 5   2
      ``mod3``      identity                     y % 3    3
      ============  ===========================  =======  =========

    The ``permute`` permutation of the 64 pixels is
    ``np.random.default_rng([seed, 1]).permutation(64)``.
  * Images are ``[N, 8, 8, 1]`` float32 scaled to [-1, 1] by ``(x / 16 - 0.5) / 0.5``
    (after the transform); labels are int32.
  * Pretext for θ0 (:func:`pretext_task`): *supervised digit classification on
    the disjoint pre-training share* (identity images, 10 classes; 324 train,
    its ``val`` is 10% of that share (36) and its ``test`` the shared test rows). Like CLIP, θ0's
    features then already separate upright digits (``digits``, ``parity``,
    ``ge5``, ``mod3`` are largely solved by a head on frozen features) while the
    geometric / photometric / permuted tasks need fine-tuning, and, with only
    360 pre-training images, even the upright tasks gain from it.
  * Optional training augmentation (:func:`shift_augment`): a random shift of
    each image by -1, 0 or +1 pixel along each axis with edge replication, a
    pure NumPy function of ``(seed, step)`` (used by the effective-noise sweep).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import numpy as np

from saft_jax.data.loader import Task

TEST_FRACTION = 0.2
PRETRAIN_FRACTION = 0.25
VAL_FRACTION = 0.1


def _identity(x: np.ndarray, seed: int) -> np.ndarray:
  del seed
  return x


def _rot90(x: np.ndarray, seed: int) -> np.ndarray:
  del seed
  return np.rot90(x, k=1, axes=(1, 2))


def _flip(x: np.ndarray, seed: int) -> np.ndarray:
  del seed
  return x[:, :, ::-1]


def _invert(x: np.ndarray, seed: int) -> np.ndarray:
  del seed
  return 16.0 - x


def pixel_permutation(seed: int = 0) -> np.ndarray:
  """The fixed permutation of the 64 pixels used by the ``permute`` task."""
  return np.random.default_rng([int(seed), 1]).permutation(64)


def _permute(x: np.ndarray, seed: int) -> np.ndarray:
  n = x.shape[0]
  return x.reshape(n, 64)[:, pixel_permutation(seed)].reshape(n, 8, 8)


# name -> (image transform on raw [N, 8, 8] values 0..16, label map, classes)
TASKS: dict[str, tuple[Callable, Callable, int]] = {
    "digits": (_identity, lambda y: y, 10),
    "rot90": (_rot90, lambda y: y, 10),
    "flip": (_flip, lambda y: y, 10),
    "invert": (_invert, lambda y: y, 10),
    "permute": (_permute, lambda y: y, 10),
    "parity": (_identity, lambda y: y % 2, 2),
    "ge5": (_identity, lambda y: (y >= 5).astype(y.dtype), 2),
    "mod3": (_identity, lambda y: y % 3, 3),
}


def load_raw_digits() -> tuple[np.ndarray, np.ndarray]:
  """The raw digits: images ``[1797, 8, 8]`` float32 in 0..16, labels int32."""
  from sklearn.datasets import load_digits  # ships with scikit-learn, no download
  d = load_digits()
  return d.images.astype(np.float32), d.target.astype(np.int32)


def normalize(raw: np.ndarray) -> np.ndarray:
  """Raw 0..16 images ``[N, 8, 8]`` -> ``[N, 8, 8, 1]`` float32 in [-1, 1]."""
  return (((raw / 16.0) - 0.5) / 0.5).astype(np.float32)[..., None]


def split_indices(n: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Row indices of ``test``, ``pretrain``, ``train``, ``val`` (see module doc)."""
  perm = np.random.default_rng(int(seed)).permutation(n)
  n_test = int(round(TEST_FRACTION * n))
  rest = perm[n_test:]
  n_pre = int(round(PRETRAIN_FRACTION * len(rest)))
  pool = rest[n_pre:]
  n_val = int(round(VAL_FRACTION * len(pool)))
  return {"test": np.sort(perm[:n_test]), "pretrain": np.sort(rest[:n_pre]),
          "val": np.sort(pool[:n_val]), "train": np.sort(pool[n_val:])}


def _make_task(name, raw, labels, idx, transform, label_map, num_classes, seed):
  splits, indices = {}, {}
  for split, rows in idx.items():
    splits[split] = (normalize(transform(raw[rows], seed)),
                     np.asarray(label_map(labels[rows]), np.int32))
    indices[split] = rows
  return Task(name=name, num_classes=num_classes, image_shape=(8, 8, 1),
              splits=splits, indices=indices, default_augment=False,
              augment_fn=shift_augment)


def offline_suite(tasks: Optional[Iterable[str]] = None, seed: int = 0) -> dict[str, Task]:
  """The offline digits tasks as in-memory :class:`Task` objects.

  Args:
    tasks: names to build (default: all of :data:`TASKS`, in that order).
    seed: seed of the splits and of the ``permute`` permutation.

  Returns:
    ``{name: Task}`` with ``train``/``val``/``test`` splits.
  """
  names = list(TASKS) if tasks is None else list(tasks)
  unknown = [t for t in names if t not in TASKS]
  if unknown:
    raise ValueError(f"unknown offline task(s) {unknown}; known: {sorted(TASKS)}")
  raw, labels = load_raw_digits()
  idx = split_indices(len(labels), seed)
  task_idx = {k: idx[k] for k in ("train", "val", "test")}
  return {t: _make_task(t, raw, labels, task_idx, *TASKS[t], seed) for t in names}


def pretext_task(seed: int = 0) -> Task:
  """Pre-training data for θ0: 10-way digits on the disjoint pre-training share."""
  raw, labels = load_raw_digits()
  idx = split_indices(len(labels), seed)
  pre = idx["pretrain"]
  perm = np.random.default_rng([int(seed), 2]).permutation(len(pre))
  n_val = int(round(VAL_FRACTION * len(pre)))
  pidx = {"train": np.sort(pre[perm[n_val:]]), "val": np.sort(pre[perm[:n_val]]),
          "test": idx["test"]}
  return _make_task("pretext", raw, labels, pidx, _identity, lambda y: y, 10, seed)


def shift_augment(images: np.ndarray, seed: int, step: int) -> np.ndarray:
  """Shifts each image by (dy, dx) in {-1, 0, 1}^2, edge-replicating the border.

  A pure function of ``(images, seed, step)``: row ``i`` of global batch
  ``step`` always gets the same shift, whatever the number of processes.

  Args:
    images: ``[B, H, W, C]`` batch.
    seed: run seed.
    step: global step of the batch.

  Returns:
    The shifted batch, same shape and dtype.
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
  b, h, w, _ = images.shape
  shifts = np.random.default_rng([int(seed), int(step), 3]).integers(-1, 2, size=(b, 2))
  padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  out = np.empty_like(images)
  for i, (dy, dx) in enumerate(shifts):
    out[i] = padded[i, 1 - dy:1 - dy + h, 1 - dx:1 - dx + w]
  return out
