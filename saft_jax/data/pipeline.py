"""Streaming tf.data source shared by the TFDS and folder-of-images tasks.

A :class:`StreamSource` has named *pools* (a function returning a tf.data
dataset of ``{"image": encoded bytes, "label": int}`` in a fixed order) and a
split map ``split -> (pool, indices or None)``; indices are positions in the
pool's order (see :mod:`saft_jax.data.splits` for how they are drawn).

Training order (a function of ``(seed, step)``): epoch ``e`` shuffles the
(still encoded) training records with ``Dataset.shuffle(buffer, seed=f(seed, e))``
(deterministic: the pool order is fixed and tf.data runs with
``deterministic=True``), groups them into global batches of ``B`` (dropping the
tail), skips the batches before ``start_step`` (they are read but not decoded),
keeps this process's rows, then decodes and applies the train transform with a
per-example seed ``(f(seed, e), pool index)``. With ``shuffle_buffer >= n`` the
epoch order is a uniform permutation; a smaller buffer (default 10000) is a
local shuffle, as usual for tf.data.

Evaluation reads the split in pool order; with several processes every process
decodes each global batch and keeps its rows (simple and exact; the train
stream, in contrast, drops other processes' rows before decoding).

TensorFlow is imported inside the methods only.
"""
from __future__ import annotations

import itertools
from typing import Callable, Mapping

import numpy as np

from saft_jax.data import loader
from saft_jax.data import preprocess
from saft_jax.data import splits as splits_lib

DEFAULT_SHUFFLE_BUFFER = 10_000


def _options():
  import tensorflow as tf
  options = tf.data.Options()
  options.deterministic = True
  return options


def _decode(image_bytes):
  import tensorflow as tf
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


class StreamSource:
  """Split-aware tf.data streams with CLIP preprocessing (see module doc).

  Args:
    name: task name (for messages).
    pools: ``{pool: fn() -> tf.data.Dataset of {"image": bytes, "label": int}}``.
    split_map: ``{split: (pool, sorted index array or None for the whole pool)}``.
    image_size: output side (224 for CLIP).
    shuffle_buffer: tf.data shuffle buffer of the training stream.
  """

  def __init__(self, name: str, pools: Mapping[str, Callable], split_map: Mapping,
               image_size: int = 224, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER):
    self.name = name
    self._pools = dict(pools)
    self._split_map = dict(split_map)
    self.image_size = int(image_size)
    self.shuffle_buffer = int(shuffle_buffer)
    self._sizes: dict[str, int] = {}

  def pool_size(self, pool: str) -> int:
    """Number of records in ``pool`` (cardinality, else counted once)."""
    if pool not in self._sizes:
      ds = self._pools[pool]()
      n = int(ds.cardinality().numpy())
      if n < 0:  # unknown
        n = int(ds.reduce(np.int64(0), lambda c, _: c + 1).numpy())
      self._sizes[pool] = n
    return self._sizes[pool]

  def num_examples(self, split: str) -> int:
    pool, idx = self._lookup(split)
    return self.pool_size(pool) if idx is None else len(idx)

  def split_indices(self, split: str):
    """``(pool, sorted pool positions or None for the whole pool)`` of ``split``."""
    return self._lookup(split)

  def _lookup(self, split):
    if split not in self._split_map:
      raise ValueError(f"task {self.name!r} has no {split!r} split; it has "
                       f"{sorted(self._split_map)}")
    return self._split_map[split]

  def records(self, split: str):
    """tf.data of ``(pool index int64, encoded image, label int32)`` for ``split``."""
    import tensorflow as tf
    pool, idx = self._lookup(split)
    ds = self._pools[pool]().enumerate()
    if idx is not None:
      mask = np.zeros(self.pool_size(pool), bool)
      mask[np.asarray(idx)] = True
      table = tf.constant(mask)
      ds = ds.filter(lambda i, ex: tf.gather(table, i))
    ds = ds.map(lambda i, ex: (i, ex["image"], tf.cast(ex["label"], tf.int32)))
    return ds.with_options(_options())

  def train_batches(self, batch_size: int, *, seed: int, start_step: int, augment: bool,
                    rows: slice):
    """See :func:`saft_jax.data.loader.train_batches` (``rows``: this process's rows)."""
    n = self.num_examples("train")
    spe = splits_lib.steps_per_epoch(n, batch_size)
    epoch0, skip0 = divmod(int(start_step), spe)
    local = rows.stop - rows.start
    for epoch in itertools.count(epoch0):
      ds = self._epoch(epoch, batch_size, seed, skip0 if epoch == epoch0 else 0, augment,
                       rows, local)
      yield from ds.as_numpy_iterator()

  def _epoch(self, epoch, batch_size, seed, skip, augment, rows, local):
    import tensorflow as tf
    eseed = splits_lib.epoch_seed(seed, epoch)
    size = self.image_size
    ds = self.records("train").shuffle(self.shuffle_buffer, seed=eseed,
                                       reshuffle_each_iteration=False)
    ds = ds.batch(batch_size, drop_remainder=True).skip(skip)
    ds = ds.map(lambda i, x, y: (i[rows.start:rows.stop], x[rows.start:rows.stop],
                                 y[rows.start:rows.stop])).unbatch()

    def transform(i, x, y):
      image = _decode(x)
      if augment:
        ex_seed = tf.stack([tf.constant(eseed, tf.int64), i])
        image = preprocess.train_preprocess(image, ex_seed, size)
      else:
        image = preprocess.eval_preprocess(image, size)
      return image, y

    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local, drop_remainder=True).prefetch(2)
    return ds.with_options(_options())

  def eval_batches(self, split: str, batch_size: int, *, rows: slice):
    """See :func:`saft_jax.data.loader.eval_batches` (``rows``: this process's rows)."""
    import tensorflow as tf
    size = self.image_size
    ds = self.records(split).map(
        lambda i, x, y: (preprocess.eval_preprocess(_decode(x), size), y),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size).prefetch(2).with_options(_options())
    for images, labels in ds.as_numpy_iterator():
      x, y, m = loader.pad_batch(images, labels, batch_size)
      yield x[rows], y[rows], m[rows]
