"""Suites of the main job: the tasks, θ0, the frozen heads and the encoder.

A :class:`Suite` is everything the fine-tune/merge grid needs, independent of
where it came from:

* ``offline`` — scikit-learn's digits turned into eight tasks
  (:mod:`saft_jax.data.offline`), a small ViT pre-trained once on a pretext
  (supervised digits on a disjoint share) as θ0, and per-task linear heads
  fitted on θ0's features (the analogue of CLIP's zero-shot heads). θ0 and the
  heads are cached in the run directory.
* ``clip`` — a CLIP checkpoint on disk (:func:`saft_jax.models.load_clip`), the
  paper's eight TFDS/folder tasks and zero-shot heads from the text tower.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from saft_jax import data as data_lib
from saft_jax import models
from saft_jax import train as train_lib
from saft_jax.experiment import heads as heads_lib
from saft_jax.experiment.evaluate import head_logits, pad_head
from saft_jax.experiment.store import load_tree, save_tree

logger = logging.getLogger("saft_jax.experiment")

# The offline suite's encoder: a small CLIP-style ViT on 8x8 grey digits.
OFFLINE_VISION = models.VisionConfig(image_size=8, patch_size=2, width=64, layers=4, heads=4,
                                     output_dim=64, in_channels=1)
# Batches of θ0's pre-training and of the heads' features: the whole global batch in
# every process (a replicated computation), not the process's rows.
WHOLE_BATCH = dict(process_index=0, process_count=1)


@dataclasses.dataclass(eq=False)  # hashed by identity: compiled programs are cached per suite
class Suite:
  """Tasks, θ0, frozen heads and the encoder of one experiment suite.

  Attributes:
    name: suite name.
    tasks: ``{name: saft_jax.data.Task}``.
    params0: θ0, the pre-trained encoder parameters (nested dict).
    heads: ``{task: [D, C] frozen head}`` applied to L2-normalized features.
    vision: the encoder's :class:`saft_jax.models.VisionConfig`.
    compute_dtype: activation dtype of the encoder.
  """
  name: str
  tasks: dict
  params0: Any
  heads: dict
  vision: models.VisionConfig
  compute_dtype: Any = jnp.float32

  def features_fn(self) -> Callable:
    """``features(params, images) -> [B, D]`` image features (not normalized)."""
    vision, dtype = self.vision, self.compute_dtype
    return lambda params, images: models.encode_image(vision, params, images,
                                                      compute_dtype=dtype)

  @functools.cached_property
  def jitted_features(self) -> Callable:
    """:meth:`features_fn` under ``jax.jit``, built once per suite (so one compilation
    serves every task whose batches have the same shape)."""
    return jax.jit(self.features_fn())

  @functools.cached_property
  def eval_heads(self) -> dict:
    """``{task: padded head}``: every head padded to the largest class count
    (:func:`saft_jax.experiment.evaluate.pad_head`), so one compiled evaluator serves
    every task; logits of the real classes, argmax and accuracy equal the unpadded
    head's."""
    width = max(np.shape(h)[-1] for h in self.heads.values())
    return {t: pad_head(h, width) for t, h in self.heads.items()}


def features_of(suite: Suite, params, task, split: str, batch_size: int):
  """All features and labels of ``task``'s ``split`` (NumPy).

  Every process computes all of them on its own devices (not only its rows), so that
  what is fitted on them is the same on every host.
  """
  fn = suite.jitted_features
  feats, labels = [], []
  for images, y, mask in data_lib.eval_batches(task, split, batch_size, **WHOLE_BATCH):
    feats.append(np.asarray(fn(params, images))[mask])
    labels.append(np.asarray(y)[mask])
  return np.concatenate(feats), np.concatenate(labels)


def pretrain_offline_encoder(cfg, steps: int, *, batch_size: int = 64, lr: float = 1e-3,
                             seed: int = 0):
  """θ0 of the offline suite: the ViT plus a linear probe trained on the pretext.

  A replicated computation: every process trains on the whole global batches on its
  own devices, and process 0's result is broadcast, so every host has the same θ0,
  equal to a single-process run's.
  """
  task = data_lib.pretext_task(seed)
  key = jax.random.key(seed)
  params = {"encoder": models.init_vision_params(cfg, key),
            "probe": jnp.zeros((cfg.output_dim, task.num_classes), jnp.float32)}

  def loss_fn(trainable, frozen, batch):
    images, labels = batch
    logits = head_logits(models.encode_image(cfg, trainable["encoder"], images),
                         trainable["probe"]) * 10.0
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), {}

  tx = train_lib.make_base_optimizer(lr, steps, warmup_steps=max(1, steps // 10),
                                     weight_decay=0.05, clip_norm=1.0)
  state = train_lib.init_train_state(params, tx)
  step = train_lib.make_train_step(loss_fn, tx)
  batches = data_lib.train_batches(task, batch_size, seed=seed, augment=True, **WHOLE_BATCH)
  for _ in range(steps):
    state, metrics = step(state, None, next(batches))
  logger.info("pretext pre-training: %d steps, final loss %.4f", steps, float(metrics["loss"]))
  return train_lib.broadcast_from_primary(state.params["encoder"])


def build_offline_suite(config, cache_dir: str) -> Suite:
  """The offline suite; θ0 and the heads are computed once and cached in ``cache_dir``.

  θ0 is keyed by the encoder and its pre-training steps (``suite.json``); the heads of
  the tasks fitted so far are kept in ``heads.msgpack``, and a task that is missing
  there gets its head fitted on the cached θ0 and added, so runs on different task
  sets (``saft finetune`` on one task, ``saft eval`` on several) share one θ0.
  """
  tasks = data_lib.offline_suite(config.tasks)
  cfg = OFFLINE_VISION
  key = dict(vision=dataclasses.asdict(cfg), pretrain_steps=config.pretrain_steps)
  theta_path = os.path.join(cache_dir, "theta0.msgpack")
  heads_path = os.path.join(cache_dir, "heads.msgpack")
  key_path = os.path.join(cache_dir, "suite.json")
  cached, = train_lib.primary_flags([
      os.path.exists(key_path) and os.path.exists(theta_path) and os.path.exists(heads_path)
      and {k: v for k, v in json.load(open(key_path)).items() if k in key} == key])
  if cached:  # every process reads the shared cache (written by process 0)
    params0 = jax.tree.map(jnp.asarray, load_tree(theta_path))
    heads = {t: jnp.asarray(h) for t, h in load_tree(heads_path).items()}
  else:
    params0, heads = pretrain_offline_encoder(cfg, config.pretrain_steps), {}
    params0 = jax.tree.map(jnp.asarray, params0)
    if train_lib.is_primary():
      save_tree(theta_path, params0)
  missing = [name for name, m in zip(tasks, train_lib.primary_flags(
      [t not in heads for t in tasks])) if m]
  if missing:
    suite = Suite("offline", tasks, params0, {}, cfg)
    for name in missing:
      f, y = features_of(suite, params0, tasks[name], "train", config.eval_batch_size)
      heads[name] = heads_lib.fit_linear_head(jnp.asarray(f), jnp.asarray(y),
                                              tasks[name].num_classes)
    heads.update(jax.tree.map(jnp.asarray, train_lib.broadcast_from_primary(
        {name: heads[name] for name in missing})))
    if train_lib.is_primary():
      save_tree(heads_path, heads)
      with open(key_path, "w") as f:
        json.dump(dict(key, tasks=sorted(heads)), f, indent=1)
  return Suite("offline", tasks, params0, {t: heads[t] for t in tasks}, cfg,
               jnp.dtype(config.compute_dtype))
