"""One fine-tuning run of the grid: (task, method, sharpness setting, seed) -> task vector.

* ``sgd``  — every encoder parameter is trained (the paper's name for AdamW).
* ``ftlo`` — only the attention q/k/v/out kernels (:func:`saft_jax.models.ftlo_mask`);
  the rest is frozen (never perturbed, never decayed, no gradient computed).
* ``ftts`` — the linearized encoder ``f(x;θ0) + J f(x;θ0)·dθ``; the trainable
  parameter is the offset ``dθ`` (the task vector); θ0 is an argument of the step.

The sharpness setting wraps the protocol's AdamW chain: ``none``, ``sam`` or
``asam`` (SPEC §3 defaults). The task vector is taken from the checkpoint with
the best validation accuracy. Runs resume from their orbax checkpoints.

:func:`finetune_stacked` trains several (task, seed) runs of one method and setting
as ONE compiled program (``jax.vmap`` over a member axis; heads padded to the largest
class count, padded classes masked out), with the same numbers as :func:`finetune_task`
run one at a time, up to float rounding.
"""
from __future__ import annotations

import functools
import inspect
import os

import numpy as np

import jax
import jax.numpy as jnp
import optax

from saft_jax import data as data_lib
from saft_jax import models, optim
from saft_jax import train as train_lib
from saft_jax.experiment import config as config_lib
from saft_jax.experiment.evaluate import head_logits, pad_head


def make_optimizer(config, saft: str, total_steps: int):
  """The protocol's AdamW chain (``config.optim.schedule``: cosine or linear decay after
  the warm-up), wrapped by SAM/ASAM when ``saft`` asks for it."""
  o = config.optim
  # Short smoke runs keep at least half of their steps after the warm-up.
  base = train_lib.make_base_optimizer(o.lr, total_steps, min(o.warmup_steps, total_steps // 2),
                                       o.weight_decay, o.clip_norm, b1=o.b1, b2=o.b2, eps=o.eps,
                                       schedule=o.schedule)
  if saft == "none":
    return base
  if saft == "sam":
    return optim.sam(base, rho=o.sam_rho)
  if saft == "asam":
    return optim.asam(base, rho=o.asam_rho, eta=o.asam_eta)
  if saft in config_lib.SAFTS:  # the other SAM-family transforms, with their defaults
    factory = optim.TRANSFORMS[saft]
    params = inspect.signature(factory).parameters
    kwargs = {}
    if "key" in params:
      kwargs["key"] = jax.random.key(0)
    if "total_steps" in params:  # e.g. SSAM-D's cosine-decayed drop rate, as its reference
      kwargs["total_steps"] = total_steps
    return factory(base, **kwargs)
  raise ValueError(f"unknown sharpness setting {saft!r}; known: {config_lib.SAFTS}")


def _train_objective(features, head, batch):
  """Mean cross-entropy of the frozen head; aux: the batch accuracy."""
  images, labels = batch
  del images
  logits = head_logits(features, head)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  return loss, {"accuracy": acc}


def _eval_objective(features, head, batch):
  """Sums of correct predictions and real examples of a padded eval batch."""
  _, labels, mask = batch
  hits = (jnp.argmax(head_logits(features, head), -1) == labels) & mask
  return jnp.zeros((), jnp.float32), {"correct": jnp.sum(hits.astype(jnp.float32)),
                                      "count": jnp.sum(mask.astype(jnp.float32))}


def make_loss(suite, finetune: str, objective=_train_objective):
  """``loss_fn(trainable, frozen, batch)``, the initial trainable tree and ``make_frozen(head)``.

  ``objective(features, head, batch) -> (loss, aux)`` acts on the encoder's
  features (the linearized features for FTTS).
  """
  feats = suite.features_fn()
  if finetune == "ftts":
    loss = train_lib.linearized_loss(
        lambda p, consts, batch: feats(p, batch[0]),
        lambda out, consts, batch: objective(out, consts["head"], batch))
    dtheta = jax.tree.map(jnp.zeros_like, suite.params0)
    return loss, dtheta, lambda head: train_lib.linearized_consts(suite.params0, {"head": head})
  if finetune == "sgd":
    trainable, rest = suite.params0, jax.tree.map(lambda _: None, suite.params0)
  elif finetune == "ftlo":
    trainable, rest = train_lib.partition(suite.params0, models.ftlo_mask(suite.params0))
  else:
    raise ValueError(f"unknown fine-tuning method {finetune!r}; known: sgd, ftts, ftlo")

  def loss(trainable, frozen, batch):
    params = train_lib.combine(trainable, frozen["rest"])
    return objective(feats(params, batch[0]), frozen["head"], batch)

  return loss, trainable, lambda head: {"rest": rest, "head": head}


def to_task_vector(suite, finetune: str, trainable, frozen):
  """The task vector τ = θ_t − θ0 (full structure; zeros on frozen FTLO leaves)."""
  if finetune == "ftts":
    return trainable
  params = train_lib.combine(trainable, frozen["rest"])
  return jax.tree.map(lambda t, p0: t - p0, params, suite.params0)


@functools.lru_cache(maxsize=16)
def _program(suite, finetune: str, saft: str, config, mesh):
  """Compiled train/eval steps of one (method, sharpness) pair, shared by all tasks.

  The head and θ0 are arguments of the steps, so every task reuses the same
  executables (one compilation per method instead of one per task).
  """
  loss, trainable, make_frozen = make_loss(suite, finetune)
  tx = make_optimizer(config, saft, config.steps)
  step = train_lib.make_train_step(loss, tx, mesh=mesh, accum_steps=config.accum_steps)
  eval_loss = make_loss(suite, finetune, _eval_objective)[0]
  eval_step = train_lib.make_eval_step(lambda tr, fr, b: eval_loss(tr, fr, b)[1], mesh=mesh)
  return tx, step, eval_step, trainable, make_frozen


def _fit_options(config, run_dir: str) -> dict:
  """The loop options shared by one run and a stacked group (steps, eval, checkpoints)."""
  os.makedirs(run_dir, exist_ok=True)
  return dict(total_steps=config.steps, eval_every=config.eval_every,
              checkpoint_dir=os.path.join(run_dir, "ckpt"), save_every=config.checkpoint_every,
              log_every=max(1, config.steps // 4),
              metrics_path=os.path.join(run_dir, "metrics.jsonl"),
              # Multi-process runs save synchronously: a restarted 2-process run with
              # orbax's background saves was seen to hang in the save's finalize thread.
              ckpt_async=config.async_checkpoint and jax.process_count() == 1)


def place_on_mesh(tree, mesh, *, leading_axes: int = 0):
  """``tree`` on ``mesh``: split over its ``model`` axis by the FSDP rule when it has one
  (:func:`saft_jax.train.shard_params`), else replicated; unchanged without a mesh."""
  if mesh is None:
    return tree
  if train_lib.has_model_axis(mesh):
    return train_lib.shard_params(tree, mesh, leading_axes=leading_axes)
  return train_lib.replicate(tree, mesh)


def finetune_task(suite, task_name: str, finetune: str, saft: str, seed: int, config,
                  run_dir: str, *, mesh=None):
  """Fine-tunes θ0 on one task; returns ``(task_vector, best_val_metrics)``.

  On a mesh with a ``model`` axis the trainable params, their optimizer state and the
  frozen tree (θ0 for FTTS, the frozen leaves for FTLO) are split over it (FSDP).
  """
  task, head = suite.tasks[task_name], suite.heads[task_name]
  tx, step, eval_step, trainable, make_frozen = _program(suite, finetune, saft, config, mesh)
  state = train_lib.init_train_state(trainable, tx, mesh=mesh)
  frozen = place_on_mesh(make_frozen(head), mesh)
  shard = (lambda it: (train_lib.shard_batch(b, mesh) for b in it)) if mesh is not None else (
      lambda it: it)

  def eval_fn(trainable, frozen):
    batches = data_lib.eval_batches(task, "val", config.eval_batch_size)
    return train_lib.evaluate(eval_step, trainable, frozen, shard(batches))

  def batches_fn(start):
    return shard(data_lib.train_batches(task, config.batch_size, seed=seed, start_step=start,
                                        augment=config.augment or None))

  result = train_lib.fit(step, state, frozen, batches_fn, eval_fn=eval_fn,
                         **_fit_options(config, run_dir))
  # Host copies: the arrays of a multi-process mesh span the processes.
  best_params, frozen = train_lib.to_host(result.best_params), train_lib.to_host(frozen)
  return to_task_vector(suite, finetune, best_params, frozen), result.best_metrics


_HEAD = object()  # marks the per-member head inside the frozen tree (vmap in_axes 0)


@functools.lru_cache(maxsize=16)
def _stacked_program(suite, finetune: str, saft: str, config, mesh):
  """Compiled stacked train/eval steps of one (method, sharpness) pair."""
  loss, trainable, make_frozen = make_loss(suite, finetune)
  tx = make_optimizer(config, saft, config.steps)
  frozen_axes = jax.tree.map(lambda x: 0 if x is _HEAD else None, make_frozen(_HEAD),
                             is_leaf=lambda x: x is _HEAD)
  step = train_lib.make_stacked_train_step(loss, tx, frozen_axes=frozen_axes, mesh=mesh,
                                           accum_steps=config.accum_steps)
  eval_loss = make_loss(suite, finetune, _eval_objective)[0]
  eval_step = train_lib.make_stacked_eval_step(lambda tr, fr, b: eval_loss(tr, fr, b)[1],
                                               frozen_axes=frozen_axes, mesh=mesh)
  return tx, step, eval_step, trainable, make_frozen


def _stack(trees):
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def _stacked_eval_batches(tasks, batch_size: int):
  """Lock-step val batches of every member; a member that ran out gets a masked batch."""
  iters = [iter(data_lib.eval_batches(t, "val", batch_size)) for t in tasks]
  last = [None] * len(tasks)
  while True:
    batches = [next(it, None) for it in iters]
    if all(b is None for b in batches):
      return
    for i, b in enumerate(batches):
      if b is not None:
        last[i] = b
    batches = [b if b is not None else (last[i][0], last[i][1], np.zeros_like(last[i][2]))
               for i, b in enumerate(batches)]
    if any(b is None for b in batches):  # a member with an empty split from the start
      raise ValueError("a task of the stacked group has no validation examples")
    yield _stack(batches)


def finetune_stacked(suite, members, finetune: str, saft: str, config, group_dir: str, *,
                     mesh=None):
  """Fine-tunes θ0 on every ``(task, seed)`` of ``members`` in one compiled program.

  Returns ``[(task_vector, best_val_metrics)]`` in the order of ``members``; each run
  equals :func:`finetune_task` on its own (same batches, schedule and best-checkpoint
  rule) up to float rounding. The group resumes from ``group_dir/ckpt``. On a mesh with
  a ``model`` axis the stacked state is split over it as in :func:`finetune_task`.
  """
  members = [(t, int(s)) for t, s in members]
  if not members:
    raise ValueError("finetune_stacked needs at least one (task, seed) member")
  tasks = [suite.tasks[t] for t, _ in members]
  width = max(np.shape(suite.heads[t])[-1] for t, _ in members)
  heads = _stack([pad_head(suite.heads[t], width) for t, _ in members])
  tx, step, eval_step, trainable, make_frozen = _stacked_program(suite, finetune, saft,
                                                                 config, mesh)
  frozen = make_frozen(jax.tree.map(jnp.asarray, heads))
  state = train_lib.init_train_state(trainable, tx)
  state = jax.tree.map(lambda x: jnp.broadcast_to(x, (len(members),) + x.shape), state)
  put = (lambda b: b) if mesh is None else (
      lambda b: jax.tree.map(lambda x: jax.make_array_from_process_local_data(
          train_lib.stacked_batch_sharding(mesh), np.asarray(x)), b))
  # A model axis splits each member's large leaves (never the member axis) and θ0.
  state, frozen = place_on_mesh(state, mesh, leading_axes=1), place_on_mesh(frozen, mesh)

  def eval_fn(params, frozen):
    return train_lib.evaluate(eval_step, params, frozen,
                              (put(b) for b in _stacked_eval_batches(tasks, config.eval_batch_size)))

  def batches_fn(start):
    its = [data_lib.train_batches(task, config.batch_size, seed=seed, start_step=start,
                                  augment=config.augment or None)
           for task, (_, seed) in zip(tasks, members)]
    return (put(_stack(bs)) for bs in zip(*its))

  result = train_lib.fit_stacked(step, state, frozen, batches_fn, eval_fn=eval_fn,
                                 **_fit_options(config, group_dir))
  best = eval_fn(result.best_params, frozen)
  # Host copies: the arrays of a multi-process mesh span the processes.
  best_params, frozen = train_lib.to_host(result.best_params), train_lib.to_host(frozen)
  out = []
  for m in range(len(members)):
    params_m = jax.tree.map(lambda x: x[m], best_params)
    # θ0 / frozen leaves are shared by the members; only the head is stacked.
    out.append((to_task_vector(suite, finetune, params_m, frozen),
                {k: float(np.asarray(v)[m]) for k, v in best.items()}))
  return out
