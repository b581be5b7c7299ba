"""Folder-of-images tasks (GTSRB, or any data set prepared by hand).

Layout::

  root/
    train/<class_name>/*.png|jpg|jpeg   (required)
    val/<class_name>/...                (optional; else 10% of train, ≤ 5000, seed 0)
    test/<class_name>/...               (optional; required to evaluate on test)

Class ``k`` is the ``k``-th class directory of ``train/`` in sorted order; the
other splits must use the same class names. Files are listed in sorted order,
which fixes the pool order that split indices and the training shuffle refer to.
Decoding and CLIP preprocessing are those of :mod:`saft_jax.data.pipeline`.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from saft_jax.data import splits as splits_lib
from saft_jax.data.loader import Task

EXTENSIONS = (".png", ".jpg", ".jpeg")
LAYOUT = ("expected layout: <root>/train/<class_name>/*.png|jpg (and optionally "
          "<root>/val/<class_name>/..., <root>/test/<class_name>/...)")


def list_split(root: str, split: str, class_names: Optional[list[str]] = None
               ) -> tuple[list[str], np.ndarray, list[str]]:
  """Sorted ``(paths, labels int32, class_names)`` of ``root/split``."""
  base = os.path.join(root, split)
  found = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))
  if class_names is None:
    class_names = found
  unknown = sorted(set(found) - set(class_names))
  if unknown:
    raise ValueError(f"{base}: class folders {unknown} are not in train/ ({LAYOUT})")
  paths, labels = [], []
  for k, cls in enumerate(class_names):
    d = os.path.join(base, cls)
    if not os.path.isdir(d):
      continue
    for f in sorted(os.listdir(d)):
      if f.lower().endswith(EXTENSIONS):
        paths.append(os.path.join(d, f))
        labels.append(k)
  if not paths:
    raise FileNotFoundError(f"no images under {base!r}; {LAYOUT}")
  return paths, np.asarray(labels, np.int32), class_names


def _pool(paths, labels):
  def make():
    import tensorflow as tf
    ds = tf.data.Dataset.from_tensor_slices({"path": paths, "label": labels})
    return ds.map(lambda ex: {"image": tf.io.read_file(ex["path"]), "label": ex["label"]})
  return make


def folder_task(root: str, *, name: Optional[str] = None, image_size: int = 224,
                num_classes: Optional[int] = None, shuffle_buffer: int = 10_000) -> Task:
  """A streamed task read from ``root`` (layout in the module docstring).

  Args:
    root: dataset folder.
    name: task name (default: the folder's base name).
    image_size: output side.
    num_classes: expected number of classes (checked when given).
    shuffle_buffer: training shuffle buffer.

  Returns:
    A :class:`~saft_jax.data.Task` with train/val(/test) splits.
  """
  from saft_jax.data.pipeline import StreamSource
  name = name or os.path.basename(os.path.normpath(root))
  if not os.path.isdir(os.path.join(root, "train")):
    raise FileNotFoundError(f"folder dataset {name!r} is not prepared: {root!r} has no "
                            f"train/ directory; {LAYOUT}")
  paths, labels, classes = list_split(root, "train")
  if num_classes is not None and len(classes) != num_classes:
    raise ValueError(f"folder dataset {name!r}: expected {num_classes} classes in "
                     f"{root}/train, found {len(classes)}")
  pools = {"train": _pool(paths, labels)}
  split_map = {}
  if os.path.isdir(os.path.join(root, "val")):
    pools["val"] = _pool(*list_split(root, "val", classes)[:2])
    split_map["train"], split_map["val"] = ("train", None), ("val", None)
  else:
    tr, va = splits_lib.protocol_val_split(len(paths))
    split_map["train"], split_map["val"] = ("train", tr), ("train", va)
  if os.path.isdir(os.path.join(root, "test")):
    pools["test"] = _pool(*list_split(root, "test", classes)[:2])
    split_map["test"] = ("test", None)
  source = StreamSource(name, pools, split_map, image_size, shuffle_buffer)
  return Task(name=name, num_classes=len(classes), image_shape=(image_size, image_size, 3),
              stream=source, class_names=tuple(classes), default_augment=True)
