"""One fine-tuning run of a text suite: (task, method, sharpness setting, seed) -> task vector.

The loss is the token cross-entropy of the class's label word (teacher-forced, padding
ignored; the formula of :func:`saft_jax.experiment.text_pretrain.token_cross_entropy`,
split into :func:`label_logits` and :func:`logits_cross_entropy` so that FTTS applies
the same loss to the linearized logits).

* ``sgd``  — every T5 parameter is trained (the paper's name for AdamW).
* ``ftlo`` — only the attention q/k/v/o kernels of every block, self- and
  cross-attention (:func:`saft_jax.models.ftlo_mask`); the rest is frozen (never
  perturbed, never decayed, no gradient computed).
* ``ftts`` — the linearized model ``f(θ0) + J f(θ0)·dθ`` (one ``jax.jvp`` through the
  whole encoder–decoder; :func:`saft_jax.train.linearized_loss`); the trainable
  parameter is ``dθ``, the task vector.

The optimizer is :func:`saft_jax.experiment.finetune.make_optimizer` (AdamW with the
configured schedule, wrapped by the sharpness setting). Runs use
:func:`saft_jax.train.fit`: orbax checkpoints (resumable), ``metrics.jsonl``, progress
log lines and the best checkpoint by validation accuracy in the suite's score. The
compiled steps are built once per (method, sharpness setting) and shared by every task
(θ0 and the frozen leaves are arguments of the step).
"""
from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import optax

from saft_jax import models
from saft_jax import train as train_lib
from saft_jax.experiment import text_eval
from saft_jax.experiment.finetune import _fit_options, make_optimizer
from saft_jax.experiment.text_suite import TextSuite, shard
from saft_jax.models import t5 as t5_lib


def label_logits(cfg: t5_lib.T5Config, params, input_ids, attention_mask, labels,
                 compute_dtype=jnp.float32) -> jax.Array:
  """``[B, T, V]`` logits of the targets ``labels`` (-100 padding) teacher-forced."""
  dec_in = t5_lib.shift_right(labels, cfg.decoder_start_token_id, cfg.pad_token_id)
  return t5_lib.t5_logits(cfg, params, input_ids, attention_mask, dec_in,
                          compute_dtype=compute_dtype)


def logits_cross_entropy(logits, labels) -> jax.Array:
  """Mean cross-entropy of ``logits [B, T, V]`` at the label tokens (-100 ignored)."""
  valid = labels >= 0
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                       jnp.where(valid, labels, 0))
  weights = valid.astype(jnp.float32)
  return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_text_loss(cfg: t5_lib.T5Config, compute_dtype, finetune: str):
  """``loss_fn(trainable, frozen, batch) -> (loss, {})`` of a fine-tuning method.

  ``batch = (input_ids, attention_mask, labels)``. The loss reads θ0 (FTTS) or the
  frozen leaves (FTLO) from ``frozen`` (:func:`initial_state`), so the compiled step
  captures no parameters.
  """
  if finetune == "ftts":
    return train_lib.linearized_loss(
        lambda params, consts, batch: label_logits(cfg, params, *batch, compute_dtype),
        lambda logits, consts, batch: (logits_cross_entropy(logits, batch[2]), {}))
  if finetune not in ("sgd", "ftlo"):
    raise ValueError(f"unknown fine-tuning method {finetune!r}; known: sgd, ftts, ftlo")

  def loss(trainable, frozen, batch):
    params = train_lib.combine(trainable, frozen["rest"])
    return logits_cross_entropy(label_logits(cfg, params, *batch, compute_dtype), batch[2]), {}

  return loss


def initial_state(suite: TextSuite, finetune: str) -> tuple:
  """``(trainable, frozen)`` at the start of a run: θ0 (SGD), the attention kernels of θ0
  and the other leaves (FTLO), or ``dθ = 0`` and θ0 (FTTS)."""
  if finetune == "ftts":
    return (jax.tree.map(jnp.zeros_like, suite.params0),
            train_lib.linearized_consts(suite.params0))
  if finetune == "sgd":
    return suite.params0, {"rest": None}
  if finetune == "ftlo":
    trainable, rest = train_lib.partition(suite.params0, models.ftlo_mask(suite.params0))
    return trainable, {"rest": rest}
  raise ValueError(f"unknown fine-tuning method {finetune!r}; known: sgd, ftts, ftlo")


def to_task_vector(suite: TextSuite, finetune: str, trainable, frozen):
  """The task vector τ = θ_t − θ0 (full structure; zeros on frozen FTLO leaves)."""
  if finetune == "ftts":
    return trainable
  params = train_lib.combine(trainable, frozen["rest"])
  return jax.tree.map(lambda t, p0: t - p0, params, suite.params0)


@functools.lru_cache(maxsize=16)
def _program(cfg: t5_lib.T5Config, dtype_name: str, finetune: str, saft: str, optim,
             steps: int, accum_steps: int, mesh):
  """``(tx, step)``: the compiled train step of one (method, sharpness) pair, shared by
  every task and every suite with the same model config (θ0 is an argument)."""
  loss = make_text_loss(cfg, jnp.dtype(dtype_name), finetune)
  tx = make_optimizer(types.SimpleNamespace(optim=optim), saft, steps)
  return tx, train_lib.make_train_step(loss, tx, mesh=mesh, accum_steps=accum_steps)


def finetune_text_task(suite: TextSuite, task: str, finetune: str, saft: str, seed: int,
                       config, run_dir: str, *, mesh=None):
  """Fine-tunes θ0 on one text task; returns ``(task_vector, best_val_metrics)``.

  ``best_val_metrics["accuracy"]`` is the validation accuracy in the suite's score;
  ``rank_acc`` and ``exact_acc`` are both reported.
  """
  tx, step = _program(suite.t5, jnp.dtype(suite.compute_dtype).name, finetune, saft,
                      config.optim, config.steps, config.accum_steps, mesh)
  trainable, frozen = initial_state(suite, finetune)
  state = train_lib.init_train_state(trainable, tx, mesh=mesh)
  if mesh is not None:
    frozen = train_lib.replicate(frozen, mesh)
  counter = text_eval.evaluator(suite, finetune == "ftts")

  def eval_fn(trainable, frozen):
    stats = counter.stats(to_task_vector(suite, finetune, trainable, frozen), [1.0], task,
                          "val", config.eval_batch_size, mesh)
    return {"accuracy": float(stats[suite.score][0]), "rank_acc": float(stats["rank"][0]),
            "exact_acc": float(stats["exact"][0])}

  def batches_fn(start):
    return shard(suite.train_batches(task, config.batch_size, seed, start), mesh)

  result = train_lib.fit(step, state, frozen, batches_fn, eval_fn=eval_fn,
                         **_fit_options(config, run_dir))
  return to_task_vector(suite, finetune, result.best_params, frozen), result.best_metrics
