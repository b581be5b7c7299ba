"""Accuracy of merged models over a grid of merge coefficients, vectorized.

Every merge of :mod:`saft_jax.merging` used by the main job has the form
``θ(λ) = θ0 + λ · D`` where the *direction* ``D`` does not depend on ``λ``
(task arithmetic: ``D = Σ τ_t``; TIES: the trimmed, elected, disjoint mean;
weight averaging: ``D = Σ τ_t`` at ``λ = 1/T``). So a coefficient search is one
compiled call per batch that evaluates all ``λ`` at once:

* plain models: ``lax.map`` over ``λ`` (in chunks, to bound memory) of a
  forward pass at ``θ0 + λ D``;
* linearized (FTTS) models: ``f_lin(x; θ0 + λ D) = f(x; θ0) + λ · J D``, so one
  ``jax.jvp`` per direction and batch gives every ``λ`` for free.
"""
from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

Batch = tuple  # (images, labels, mask): mask marks the real (non-padding) rows


PADDED_LOGIT = -1e9  # logit of a padded class: exp() underflows to exactly 0


def head_logits(features: jax.Array, head) -> jax.Array:
  """Logits of a frozen head on L2-normalized features (SPEC §5).

  ``head`` is a ``[D, C]`` matrix, or a padded head ``{"w": [D, C_max], "valid": [C_max]}``
  (see :func:`pad_head`) whose padded classes get the logit :data:`PADDED_LOGIT`, so the
  softmax and argmax equal those of the unpadded head.
  """
  features = features.astype(jnp.float32)
  features = features / jnp.maximum(
      jnp.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
  if isinstance(head, dict):
    logits = features @ head["w"].astype(jnp.float32)
    return jnp.where(head["valid"], logits, PADDED_LOGIT)
  return features @ head.astype(jnp.float32)


def pad_head(head, num_classes: int) -> dict:
  """``[D, C]`` -> the padded head ``{"w": [D, num_classes], "valid": [num_classes]}``."""
  head = jnp.asarray(head)
  c = head.shape[-1]
  if c > num_classes:
    raise ValueError(f"head has {c} classes, more than the padded size {num_classes}")
  return {"w": jnp.pad(head, ((0, 0), (0, num_classes - c))),
          "valid": jnp.arange(num_classes) < c}


def _correct(logits, labels, mask):
  hits = (jnp.argmax(logits, axis=-1) == labels) & mask
  return jnp.sum(hits.astype(jnp.int32), axis=-1)


def _scaled(params0, direction, lam):
  return jax.tree.map(
      lambda p, d: (p + lam.astype(p.dtype) * d.astype(p.dtype)).astype(p.dtype),
      params0, direction)


def make_grid_counter(features_fn: Callable, *, chunk: int | None = None):
  """Builds ``count(params0, direction, lams, head, images, labels, mask)``.

  Returns the number of correct predictions for every ``λ`` in ``lams`` (shape
  ``[L]``) of the model ``θ0 + λ D`` on one batch. ``params0`` and ``direction``
  are arguments of the compiled function (not captured constants).
  """

  @jax.jit
  def count(params0, direction, lams, head, images, labels, mask):
    def one(lam):
      return _correct(head_logits(features_fn(_scaled(params0, direction, lam),
                                              images), head), labels, mask)
    return jax.lax.map(one, lams, batch_size=chunk)

  return count


def make_linear_grid_counter(features_fn: Callable):
  """Like :func:`make_grid_counter` for the linearized model (FTTS).

  ``features_fn`` is the *non-linear* encoder; the linearized model at
  ``θ0 + λ D`` is ``f(x; θ0) + λ J f(x; θ0) D``, computed with one ``jax.jvp``.
  """

  @jax.jit
  def count(params0, direction, lams, head, images, labels, mask):
    f0, jd = jax.jvp(lambda p: features_fn(p, images), (params0,), (direction,))
    feats = f0[None] + lams[:, None, None].astype(f0.dtype) * jd[None]
    logits = jax.vmap(head_logits, in_axes=(0, None))(feats, head)
    return jax.vmap(_correct, in_axes=(0, None, None))(logits, labels, mask)

  return count


def grid_accuracy(counter, params0, direction, lams, head,
                  batches: Iterable[Batch]) -> np.ndarray:
  """Accuracy (fraction in [0, 1]) for every ``λ``, over all ``batches``."""
  n = len(lams)
  # Pad λ to a power of two up to 8, then to a multiple of 8, so that grids of different
  # lengths share a few executables without evaluating many unused λ.
  size = 1 << (n - 1).bit_length() if n <= 8 else -(-n // 8) * 8
  padded = list(lams) + [0.0] * (size - n)
  lams = jnp.asarray(padded, jnp.float32)
  correct = np.zeros(lams.shape[0], np.int64)
  total = 0
  for images, labels, mask in batches:
    correct += np.asarray(counter(params0, direction, lams, head, images,
                                  labels, mask))
    total += int(jnp.sum(mask))  # works for global (multi-process) arrays too
  if total == 0:
    raise ValueError("no evaluation examples: the split is empty")
  return correct[:n] / total
