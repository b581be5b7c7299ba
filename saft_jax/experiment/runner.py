"""``saft reproduce``: fine-tune every task with every method, merge, search, report.

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
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from saft_jax import data as data_lib
from saft_jax import merging
from saft_jax import train as train_lib
from saft_jax.experiment import evaluate, report, search
from saft_jax.experiment.finetune import finetune_task
from saft_jax.experiment.store import load_tree, save_tree
from saft_jax.experiment.suites import build_offline_suite

logger = logging.getLogger("saft_jax.experiment")

TIES_KS = (0.1, 0.2, 0.3)


def build_suite(config, out_dir):
  if config.suite == "offline":
    return build_offline_suite(config, out_dir)
  if config.suite == "clip":
    from saft_jax.experiment.clip_suite import build_clip_suite
    return build_clip_suite(config, out_dir)
  raise ValueError(f"unknown suite {config.suite!r}; known: offline, clip")


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
  if merge == "consensus":
    return merging.consensus_merged_vector(tvs)
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
  """Accuracy of ``θ0 + λ·direction`` on ``task``'s ``split`` for every ``λ`` in ``lams``."""
  batches = data_lib.eval_batches(suite.tasks[task], split, batch_size)
  if mesh is not None:
    batches = (train_lib.shard_batch(b, mesh) for b in batches)
  return evaluate.grid_accuracy(counter, suite.params0, direction, lams, suite.heads[task],
                                batches)


def finetune_all(suite, config, out_dir, finetune, saft, seed, mesh):
  """Task vectors of every task of ``suite`` (reused from ``out_dir`` when finished)."""
  tvs = []
  for t in suite.tasks:
    run_dir = os.path.join(out_dir, "ft", f"{finetune}-{saft}", f"seed{seed}", t)
    tv_path = os.path.join(run_dir, "task_vector.msgpack")
    if os.path.exists(tv_path):
      tvs.append(jax.tree.map(jnp.asarray, load_tree(tv_path)))
      continue
    t0 = time.time()
    tv, best = finetune_task(suite, t, finetune, saft, seed, config, run_dir, mesh=mesh)
    save_tree(tv_path, tv)
    with open(os.path.join(run_dir, "best.json"), "w") as f:
      json.dump({k: float(v) for k, v in best.items()}, f)
    logger.info("fine-tuned %-8s %s-%s seed %d: val acc %.4f (%.1fs)", t, finetune, saft, seed,
                best["accuracy"], time.time() - t0)
    tvs.append(tv)
  return tvs


def reproduce(config, out_dir: str) -> list[dict]:
  """Runs the whole grid of ``config`` and writes the results into ``out_dir``."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(dataclasses.asdict(config), f, indent=1, default=str)
  t_start = time.time()
  suite = build_suite(config, out_dir)
  tasks = list(suite.tasks)
  # Batches are sharded over all devices (all processes) on the mesh's `data` axis.
  # mesh_shape None: all devices when there are several; 1: one device, no sharding.
  use_mesh = config.mesh_shape != 1 and (config.mesh_shape or jax.device_count() > 1)
  mesh = train_lib.make_mesh((config.mesh_shape or -1,)) if use_mesh else None
  # XLA:CPU runs a sequential map over λ faster than a vmapped chunk; accelerators prefer 8.
  chunk = None if jax.devices()[0].platform == "cpu" else 8
  counters = {"plain": evaluate.make_grid_counter(suite.features_fn(), chunk=chunk),
              "linear": evaluate.make_linear_grid_counter(suite.features_fn())}
  records = []
  for seed in config.seeds:
    for finetune in config.finetunes:
      counter = counters["linear" if finetune == "ftts" else "plain"]

      def accuracy(direction, lams, task, split):
        return task_accuracy(counter, suite, direction, lams, task, split,
                             config.eval_batch_size, mesh)

      for saft in config.safts:
        tvs = finetune_all(suite, config, out_dir, finetune, saft, seed, mesh)
        ft_val = np.array([accuracy(tv, [1.0], t, "val")[0] for tv, t in zip(tvs, tasks)])
        ft_test = np.array([accuracy(tv, [1.0], t, "test")[0] for tv, t in zip(tvs, tasks)])
        for merge in config.merges:
          cands = merge_candidates(merge, tvs, seed)
          for r in search.search(cands, tasks, accuracy, ft_val, ft_test, config.protocols):
            records.append(dict(r, finetune=finetune, saft=saft, merge=merge, seed=seed))
        logger.info("merged %s-%s seed %d (%.0fs elapsed)", finetune, saft, seed,
                    time.time() - t_start)
  meta = dict(suite=config.suite, tasks=tasks, seeds=list(config.seeds),
              finetunes=list(config.finetunes), safts=list(config.safts),
              merges=list(config.merges), protocols=list(config.protocols),
              steps=config.steps, batch_size=config.batch_size,
              seconds=round(time.time() - t_start, 1), devices=str(jax.devices()))
  report.write_results(out_dir, records, meta)
  return records
