"""``saft reproduce``: fine-tune every task with every method, merge, search, report.

One pipeline for every suite; what differs between the vision suites (``offline``,
``clip``: an image encoder with frozen heads) and the text suites (``text``, ``glue``:
a T5 whose outputs are label words, :mod:`saft_jax.experiment.text_suite`) is behind
:func:`build_suite`, :func:`make_counters`, :func:`make_accuracy` and the fine-tuning
of one run. Records of text suites also hold ``rank_acc``, ``exact_acc`` and
``label_words`` (see :mod:`saft_jax.experiment.text_eval`).

Run directory layout (read by ``saft analyze``)::

  OUT/suite.json, theta0.msgpack, heads.msgpack      # the suite's θ0 and frozen heads
  OUT/config.json                                    # the config of the run
  OUT/ft/<finetune>-<saft>/seed<k>/<task>/           # one fine-tuning run
      ckpt/ (orbax, resumable), metrics.jsonl, task_vector.msgpack, best.json
  OUT/results.json, meta.json, results.md            # the merge results

Finished fine-tunings are reused, an interrupted one resumes from its last checkpoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from saft_jax import data as data_lib
from saft_jax import merging
from saft_jax import train as train_lib
from saft_jax.experiment import config as config_lib
from saft_jax.experiment import data_merges, evaluate, report, search
from saft_jax.experiment import regime as regime_lib
from saft_jax.experiment.finetune import finetune_stacked, finetune_task
from saft_jax.experiment.store import load_tree, save_tree
from saft_jax.experiment.suites import build_offline_suite

logger = logging.getLogger("saft_jax.experiment")

TIES_KS = (0.1, 0.2, 0.3)


def build_suite(config, out_dir):
  """The suite of ``config`` (θ0 and whatever it caches live in ``out_dir``)."""
  if config.suite == "offline":
    return build_offline_suite(config, out_dir)
  if config.suite == "clip":
    from saft_jax.experiment.clip_suite import build_clip_suite
    return build_clip_suite(config, out_dir)
  if config.suite in config_lib.TEXT_SUITES:
    from saft_jax.experiment.text_suite import build_text_suite
    return build_text_suite(config, out_dir)
  raise ValueError(f"unknown suite {config.suite!r}; known: {', '.join(config_lib.SUITES)}")


def is_text_suite(suite) -> bool:
  """Whether ``suite`` is a text suite (a T5 generating label words)."""
  from saft_jax.experiment.text_suite import TextSuite
  return isinstance(suite, TextSuite)


def _extra_direction(merge: str, tvs: list, seed: int):
  """λ-independent directions of the data-free successors (defaults of their papers)."""
  if merge == "dare_ties":
    return merging.dare_ties_merged_vector(tvs, p=0.5, key=jax.random.key(seed), k=0.2)
  if merge == "breadcrumbs":
    masks = merging.breadcrumbs_masks(tvs)
    return merging.sum_task_vectors([jax.tree.map(lambda m, t: m.astype(t.dtype) * t, m, t)
                                     for m, t in zip(masks, tvs)])
  if merge == "magmax":
    return merging.magmax_merged_vector(tvs)
  if merge == "consensus":    # TALL-mask consensus on task arithmetic (reference use_ties=false)
    return merging.consensus_merged_vector(tvs)
  if merge == "consensus_ties":  # on TIES with the disjoint sum, as the reference builds it
    return merging.consensus_ties_merged_vector(tvs)
  if merge == "tsv_m":
    return merging.tsv_merged_vector(tvs)
  if merge == "iso_c":
    return merging.iso_c_merged_vector(tvs)
  raise ValueError(f"merge {merge!r} is not supported by the search")


def merge_candidates(merge: str, tvs: list, seed: int = 0) -> list[search.Candidate]:
  """λ-independent merge directions ``D`` (merged model ``θ0 + λ D``) and their λ grids."""
  lams = search.SINGLE_LAMBDAS
  if merge == "weight_average":
    # (1/T) Σ θ_t = θ0 + (1/T) Σ τ_t: no coefficient to search.
    return [search.Candidate({}, merging.sum_task_vectors(tvs), (1.0 / len(tvs),),
                             default=True)]
  if merge == "task_arithmetic":
    return [search.Candidate({}, merging.sum_task_vectors(tvs), lams, default=True)]
  if merge == "ties":
    return [search.Candidate({"k": k}, merging.ties_merged_vector(tvs, k=k), lams,
                             default=(k == 0.2)) for k in TIES_KS]
  return [search.Candidate({}, _extra_direction(merge, tvs, seed), lams, default=True)]


def task_accuracy(counter, suite, direction, lams, task: str, split: str, batch_size: int,
                  mesh=None):
  """Accuracy of ``θ0 + λ·direction`` on ``task``'s ``split`` for every ``λ`` in ``lams``.

  Heads are padded to the suite's largest class count (``suite.eval_heads``), so every
  task shares one compiled ``counter``."""
  batches = data_lib.eval_batches(suite.tasks[task], split, batch_size)
  if mesh is not None:
    batches = (train_lib.shard_batch(b, mesh) for b in batches)
  return evaluate.grid_accuracy(counter, suite.params0, direction, lams,
                                suite.eval_heads[task], batches)


def _run_dir(ft_root, finetune, saft, seed, task):
  return os.path.join(ft_root, f"{finetune}-{saft}", f"seed{seed}", task)


def _save_run(run_dir, tv, best, history=None, member=None):
  """Writes one finished run: its task vector, best.json and (stacked) metrics.jsonl.

  Only process 0 writes (every process holds the same ``tv`` and ``best``).
  """
  if not train_lib.is_primary():
    return
  os.makedirs(run_dir, exist_ok=True)
  if history is not None:
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
      for rec in history:
        f.write(json.dumps({k: v[member] if isinstance(v, list) else v
                            for k, v in rec.items()}) + "\n")
  save_tree(os.path.join(run_dir, "task_vector.msgpack"), tv)
  with open(os.path.join(run_dir, "best.json"), "w") as f:
    json.dump({k: float(v) for k, v in best.items()}, f)


def finetune_one(suite, config, run_dir, task, finetune, saft, seed, mesh=None):
  """One fine-tuning run in ``run_dir`` (resuming from its ``ckpt/``), saved as
  ``task_vector.msgpack`` and ``best.json``; returns ``(task_vector, best_val_metrics)``."""
  if is_text_suite(suite):
    from saft_jax.experiment.text_finetune import finetune_text_task
    tv, best = finetune_text_task(suite, task, finetune, saft, seed, config, run_dir, mesh=mesh)
  else:
    tv, best = finetune_task(suite, task, finetune, saft, seed, config, run_dir, mesh=mesh)
  _save_run(run_dir, tv, best)
  return tv, best


def finetune_all(suite, config, ft_root, finetune, saft, seeds, mesh) -> dict:
  """Task vectors ``{seed: [τ_t for t in suite.tasks]}`` of one method and setting.

  Finished runs (``ft_root/<finetune>-<saft>/seed<k>/<task>/task_vector.msgpack``) are
  reused; the missing ones are trained one at a time or stacked into one compiled
  program (``config.stack_runs``), resuming from their checkpoints. With several
  processes, process 0 decides which runs are missing and writes the results; the task
  vectors trained here are returned from memory, the reused ones read by every process.
  """
  seeds = [int(s) for s in seeds]
  runs = [(t, s) for s in seeds for t in suite.tasks]
  missing = [run for run, m in zip(runs, train_lib.primary_flags(
      [not os.path.exists(os.path.join(_run_dir(ft_root, finetune, saft, s, t),
                                       "task_vector.msgpack")) for t, s in runs])) if m]
  trained = {}
  text = is_text_suite(suite)  # text suites train one run at a time
  single = text or config.stack_runs == 1
  size = 1 if text else (len(missing) if config.stack_runs == 0 else config.stack_runs)
  for g in range(0, len(missing), max(size, 1)):
    group, t0 = missing[g:g + max(size, 1)], time.time()
    if len(group) == 1 and single:
      (t, s), = group
      logger.info("fine-tuning %s %s-%s seed %d (%d of %d missing runs)", t, finetune, saft, s,
                  g + 1, len(missing))
      tv, best = finetune_one(suite, config, _run_dir(ft_root, finetune, saft, s, t), t,
                              finetune, saft, s, mesh)
      results, history = [(tv, best)], None
    else:
      name = hashlib.sha1(json.dumps(group).encode()).hexdigest()[:10]
      group_dir = os.path.join(ft_root, f"{finetune}-{saft}", f"stacked-{name}")
      logger.info("fine-tuning %d runs of %s-%s in one program: %s", len(group), finetune,
                  saft, ", ".join(f"{t}/seed{s}" for t, s in group))
      results = finetune_stacked(suite, group, finetune, saft, config, group_dir, mesh=mesh)
      history = _read_jsonl(os.path.join(group_dir, "metrics.jsonl"))
      for m, ((t, s), (tv, best)) in enumerate(zip(group, results)):
        _save_run(_run_dir(ft_root, finetune, saft, s, t), tv, best, history, m)
      if jax.process_index() == 0:  # the members hold the results; drop the group state
        shutil.rmtree(os.path.join(group_dir, "ckpt"), ignore_errors=True)
    for (t, s), (tv, best) in zip(group, results):
      trained[(t, s)] = tv
      logger.info("fine-tuned %-8s %s-%s seed %d: val acc %.4f", t, finetune, saft, s,
                  best["accuracy"])
    logger.info("%d run(s) took %.1fs", len(group), time.time() - t0)
  return {s: [jax.tree.map(jnp.asarray, trained[(t, s)] if (t, s) in trained else load_tree(
      os.path.join(_run_dir(ft_root, finetune, saft, s, t), "task_vector.msgpack")))
              for t in suite.tasks] for s in seeds}


def _read_jsonl(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def merge_records(suite, config, tvs, accuracy, seed: int) -> list[dict]:
  """Every merge of ``config.merges`` searched under every protocol, for one seed's τs.

  When ``accuracy`` has a ``details(direction, lam, task, split)`` method (text suites:
  :class:`saft_jax.experiment.text_eval.TextAccuracy`), each record is extended with the
  test details of its merged model (e.g. ``rank_acc``, ``exact_acc``, ``label_words``).
  """
  tasks = list(suite.tasks)
  ft_val = np.array([accuracy(tv, [1.0], t, "val")[0] for tv, t in zip(tvs, tasks)])
  ft_test = np.array([accuracy(tv, [1.0], t, "test")[0] for tv, t in zip(tvs, tasks)])
  details = getattr(accuracy, "details", None)
  data_merges.check_suite(suite, config.merges)
  records = []
  for merge in config.merges:
    t0 = time.time()
    if merge in config_lib.DATA_MERGES:  # one fixed model from data (validation / test)
      candidates = data_merges.candidates(merge, suite, tvs, seed,
                                          getattr(accuracy, "linear_model", False))
    else:
      candidates = merge_candidates(merge, tvs, seed)
    for r in search.search(candidates, tasks, accuracy, ft_val, ft_test, config.protocols):
      record = dict(r, merge=merge, seed=seed)
      if details is not None:
        cand = next(c for c in candidates if c.hparams == r["hparams"])
        record.update(details(cand.direction, r["lam"], r["task"], "test"))
      records.append(record)
    if hasattr(accuracy, "forget"):  # its remembered results are keyed by the directions
      accuracy.forget()
    logger.info("searched %s: %d candidate(s) in %.1fs", merge, len(candidates),
                time.time() - t0)
  return records


def make_accuracy(suite, config, counter, mesh):
  """``accuracy(direction, lams, task, split)`` for :func:`saft_jax.experiment.search.search`."""
  if is_text_suite(suite):
    from saft_jax.experiment.text_eval import TextAccuracy
    return TextAccuracy(counter, config.eval_batch_size, config.text.score, mesh)

  def accuracy(direction, lams, task, split):
    return task_accuracy(counter, suite, direction, lams, task, split, config.eval_batch_size,
                         mesh)
  accuracy.linear_model = getattr(counter, "linear_model", False)  # read by data merges
  return accuracy


def make_counters(suite):
  """``{"plain": counter, "linear": counter}``: the evaluators of plain and linearized
  (FTTS) models that :func:`make_accuracy` takes."""
  if is_text_suite(suite):
    from saft_jax.experiment import text_eval
    return text_eval.make_counters(suite)
  # XLA:CPU runs a sequential map over λ faster than a vmapped chunk; accelerators prefer 8.
  chunk = None if jax.devices()[0].platform == "cpu" else 8
  linear = evaluate.make_linear_grid_counter(suite.features_fn())
  linear.linear_model = True  # the data-driven merges then merge the linearized model
  return {"plain": evaluate.make_grid_counter(suite.features_fn(), chunk=chunk),
          "linear": linear}


def fsdp_mesh_shape(config, device_count: int) -> tuple[int, int]:
  """The ``(data, model)`` mesh shape of ``config`` (``model_axis`` > 1) on
  ``device_count`` devices.

  Raises:
    ValueError: ``model_axis`` does not divide ``device_count``, or ``mesh_shape`` (the
      ``data`` axis) times ``model_axis`` is not ``device_count``.
  """
  model = config.model_axis
  if device_count % model:
    raise ValueError(f"model_axis={model} does not divide the {device_count} devices; use "
                     f"a divisor of {device_count} (1: parameters replicated)")
  data = device_count // model
  if config.mesh_shape is not None and config.mesh_shape != data:
    raise ValueError(f"mesh_shape={config.mesh_shape} (devices on the 'data' axis) times "
                     f"model_axis={model} is not the {device_count} devices; set "
                     f"mesh_shape=none (then the 'data' axis gets {data})")
  return data, model


def make_run_mesh(config):
  """Batches are sharded over all devices (all processes) on the mesh's ``data`` axis.
  ``mesh_shape`` None: all devices when there are several; 1: one device, no sharding.
  ``model_axis`` > 1: a ``("data", "model")`` mesh (see :func:`fsdp_mesh_shape`) whose
  ``model`` axis the parameters are sharded over (FSDP); batches are sharded on ``data``."""
  if config.model_axis > 1:
    return train_lib.make_mesh(fsdp_mesh_shape(config, jax.device_count()),
                               (train_lib.DATA_AXIS, train_lib.MODEL_AXIS))
  use_mesh = config.mesh_shape != 1 and (config.mesh_shape or jax.device_count() > 1)
  return train_lib.make_mesh((config.mesh_shape or -1,)) if use_mesh else None


def reproduce(config, out_dir: str) -> list[dict]:
  """Runs the whole grid of ``config`` and writes the results into ``out_dir``."""
  mesh = make_run_mesh(config)  # first: a bad mesh setting fails before anything is written
  os.makedirs(out_dir, exist_ok=True)
  if train_lib.is_primary():  # shared files of the run: written by process 0 only
    with open(os.path.join(out_dir, "config.json"), "w") as f:
      json.dump(dataclasses.asdict(config), f, indent=1, default=str)
  t_start = time.time()
  suite = build_suite(config, out_dir)
  counters = make_counters(suite)
  records, regime = [], {}
  for finetune in config.finetunes:
    counter = counters["linear" if finetune == "ftts" else "plain"]
    accuracy = make_accuracy(suite, config, counter, mesh)
    for saft in config.safts:
      tvs = finetune_all(suite, config, os.path.join(out_dir, "ft"), finetune, saft,
                         config.seeds, mesh)
      for seed in config.seeds:
        records += [dict(r, finetune=finetune, saft=saft)
                    for r in merge_records(suite, config, tvs[seed], accuracy, seed)]
        logger.info("merged %s-%s seed %d (%.0fs elapsed)", finetune, saft, seed,
                    time.time() - t_start)
      regime[f"{finetune}-{saft}"] = regime_lib.task_vector_quantities(
          suite.params0, [tv for s in config.seeds for tv in tvs[s]])
  meta = dict(suite=config.suite, tasks=list(suite.tasks), seeds=list(config.seeds),
              finetunes=list(config.finetunes), safts=list(config.safts),
              merges=list(config.merges), protocols=list(config.protocols),
              steps=config.steps, batch_size=config.batch_size,
              regime=dict(_config_quantities(suite, config),
                          theta0_test_acc=_theta0_accuracy(suite, config, counters, mesh),
                          task_vectors=regime),
              seconds=round(time.time() - t_start, 1), devices=str(jax.devices()))
  if is_text_suite(suite):
    meta.update(_text_meta(suite, config, counters, mesh))
  if train_lib.is_primary():
    report.write_results(out_dir, records, meta)
  data_merges.append_report(out_dir, config.merges)
  train_lib.barrier("saft-reproduce-results")  # the others may read the results next
  return records


def _config_quantities(suite, config) -> dict:
  if is_text_suite(suite):
    from saft_jax.experiment import text_suite
    return text_suite.config_quantities(suite, config)
  return regime_lib.config_quantities(suite.params0, config)


def _theta0_accuracy(suite, config, counters, mesh) -> dict:
  """Test accuracy of θ0 with each task's frozen head (the fine-tuning gain's baseline)."""
  accuracy = make_accuracy(suite, config, counters["plain"], mesh)
  zero = jax.tree.map(jnp.zeros_like, suite.params0)
  return {t: float(accuracy(zero, [0.0], t, "test")[0]) for t in suite.tasks}


def _text_meta(suite, config, counters, mesh) -> dict:
  """The score, the label-word candidates and θ0's test details of a text suite."""
  accuracy = make_accuracy(suite, config, counters["plain"], mesh)
  zero = jax.tree.map(jnp.zeros_like, suite.params0)
  return dict(score=config.text.score, label_word_candidates=list(suite.candidates),
              theta0_test={t: accuracy.details(zero, 0.0, t, "test") for t in suite.tasks})
