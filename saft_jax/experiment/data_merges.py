"""Data-driven merges in the main job: Fisher merging, RegMean, AdaMerging.

Each produces one merged model per (fine-tuning method, sharpness setting, seed) from that
setting's task vectors, with the data its paper uses:

* ``fisher`` — each fine-tuned model's diagonal Fisher on its own task's **validation
  images** (the exact Fisher of the model's predictive distribution: the labels are not
  used), then :func:`saft_jax.merging.fisher_merge` (normalized, floor ``1e-6``).
* ``regmean`` — each fine-tuned model's layer-input Grams on its own task's **validation
  images**, then :func:`saft_jax.merging.regmean` (``α = 0.6``).
* ``adamerging`` — layer-wise coefficients learned on the **unlabeled test images** of
  all tasks (entropy minimization, Adam ``1e-3``, prior 0.3, clip to [0, 1], 500 steps
  of one 32-image batch per task), :func:`saft_jax.merging.adamerging`.

At most :data:`MAX_EXAMPLES` images per task are used (the first ones of the split; the
offline suite's splits are smaller). The models are the suite's encoder with each task's
frozen head; for FTTS the linearized encoder around θ0, as in its evaluation.

Coefficient search: a data-driven merge is one fixed model ``θ0 + D``, so it is one
candidate with the single coefficient ``λ = 1`` and appears under every protocol with the
same model (like weight averaging): ``single`` and ``per_task`` have nothing to choose and
``fixed`` uses ``λ = 1`` on ``D`` (its ``λ = 0.3`` is for task-vector sums). The records'
``hparams`` hold the method's settings.
"""
from __future__ import annotations

import functools
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from saft_jax import data as data_lib
from saft_jax import merging
from saft_jax.experiment import search
from saft_jax.experiment.evaluate import head_logits
from saft_jax.linearize import linearized_apply

logger = logging.getLogger("saft_jax.experiment")

MAX_EXAMPLES = 256          # per task and split (FusionBench: num_regmean_examples = 256)
BATCH_SIZE = 32
REGMEAN_ALPHA = merging._regmean.DEFAULT_ALPHA
ADAMERGING_STEPS = 500      # EnnengYang/AdaMerging
ADAMERGING_GRANULARITY = "layer"
ADAMERGING_MAX_EXAMPLES = 1024

DATA_USED = {
    "fisher": "validation images of each task (labels unused: the exact Fisher of each "
              "fine-tuned model's predictions)",
    "regmean": "validation images of each task (inputs of every linear layer of each "
               "fine-tuned model)",
    "adamerging": "unlabeled test images of every task (prediction entropy)",
}


def _inputs(task, split: str, limit: int) -> np.ndarray:
  """The first ``limit`` real (non-padding) images of ``task``'s ``split``."""
  out, n = [], 0
  for images, _, mask in data_lib.eval_batches(task, split, BATCH_SIZE):
    rows = np.asarray(images)[np.asarray(mask)]
    out.append(rows[:limit - n])
    n += len(out[-1])
    if n >= limit:
      break
  if not n:
    raise ValueError(f"task {task.name!r}: no {split} images for the data-driven merges")
  return np.concatenate(out)


@functools.lru_cache(maxsize=4)
def suite_apply(suite, kind: str):
  """One ``apply(params, images, head[, θ0]) -> logits`` per suite and kind, so the
  compiled Fisher / Gram / AdaMerging programs are shared by every task (heads and θ0 are
  arguments, not captured constants).

  ``kind``: ``"plain"`` (``apply(θ, x, head)``), ``"linear"`` (the linearized encoder
  around θ0 as a function of the full parameters: ``apply(θ, x, head, θ0)``, FTTS) or
  ``"tangent"`` (the same as a function of ``dθ = θ − θ0``: ``apply(dθ, x, head, θ0)``,
  whose linear layers meet their inputs at θ0; see :mod:`saft_jax.merging._regmean`).
  """
  features = suite.features_fn()
  if kind == "plain":
    return lambda p, x, head: head_logits(features(p, x), head)
  if kind == "linear":
    return lambda p, x, head, p0: head_logits(
        linearized_apply(features, p0, jax.tree.map(jnp.subtract, p, p0), x), head)
  if kind == "tangent":
    return lambda d, x, head, p0: head_logits(linearized_apply(features, p0, d, x), head)
  raise ValueError(f"unknown model kind {kind!r}")


def _model(suite, task: str, kind: str):
  args = (suite.heads[task],) if kind == "plain" else (suite.heads[task], suite.params0)
  return suite_apply(suite, kind), args


def _add(a, b):
  return jax.tree.map(lambda x, y: (x + y).astype(x.dtype), a, b)


def _sub(a, b):
  return jax.tree.map(lambda x, y: (x - y).astype(x.dtype), a, b)


def fisher_direction(suite, tvs, linear: bool):
  tasks = list(suite.tasks)
  models = [_add(suite.params0, tv) for tv in tvs]
  fishers = []
  for t, m in zip(tasks, models):
    apply, args = _model(suite, t, "linear" if linear else "plain")
    fishers.append(merging.fisher_diagonal(
        apply, m, _inputs(suite.tasks[t], "val", MAX_EXAMPLES), batch_size=BATCH_SIZE,
        model_args=args))
  return _sub(merging.fisher_merge(models, fishers), suite.params0), {
      "normalize": True, "floor": merging._fisher.FISHER_FLOOR}


def regmean_direction(suite, tvs, linear: bool):
  """RegMean on the task vectors (the merge commutes with adding θ0)."""
  tasks = list(suite.tasks)
  grams, axes = [], None
  for t, tv in zip(tasks, tvs):
    x = _inputs(suite.tasks[t], "val", MAX_EXAMPLES)
    apply, args = _model(suite, t, "tangent" if linear else "plain")
    params = tv if linear else _add(suite.params0, tv)
    grams.append(merging.gram_matrices(apply, params, x, batch_size=MAX_EXAMPLES,
                                       model_args=args))
    if axes is None:
      axes = merging.gram_axes(apply, params, x, model_args=args)
  return merging.regmean(list(tvs), grams, alpha=REGMEAN_ALPHA, axes=axes), {
      "alpha": REGMEAN_ALPHA, "linear_layers": len(axes)}


def adamerging_direction(suite, tvs, linear: bool, seed: int):
  tasks = list(suite.tasks)
  inputs = [_inputs(suite.tasks[t], "test", ADAMERGING_MAX_EXAMPLES) for t in tasks]
  kind = "tangent" if linear else "plain"  # linear: learn dθ = Σ λ τ directly
  models = [_model(suite, t, kind) for t in tasks]
  base = jax.tree.map(jnp.zeros_like, suite.params0) if linear else suite.params0
  merged, lams, losses = merging.adamerging(
      [a for a, _ in models], base, list(tvs), inputs, granularity=ADAMERGING_GRANULARITY,
      steps=ADAMERGING_STEPS, batch_size=BATCH_SIZE, seed=seed,
      model_args=[args for _, args in models])
  direction = merged if linear else _sub(merged, suite.params0)
  lams = np.asarray(lams)
  return direction, {"granularity": ADAMERGING_GRANULARITY, "steps": ADAMERGING_STEPS,
                     "mean_lambda": round(float(lams.mean()), 4),
                     "entropy_first": round(losses[0], 4) if losses else None,
                     "entropy_last": round(losses[-1], 4) if losses else None}


def candidates(merge: str, suite, tvs: list, seed: int, linear: bool) -> list:
  """The data-driven merge ``merge`` as one search candidate ``θ0 + 1 · D``."""
  t0 = time.time()
  if merge == "fisher":
    direction, hparams = fisher_direction(suite, tvs, linear)
  elif merge == "regmean":
    direction, hparams = regmean_direction(suite, tvs, linear)
  elif merge == "adamerging":
    direction, hparams = adamerging_direction(suite, tvs, linear, seed)
  else:
    raise ValueError(f"{merge!r} is not a data-driven merge; known: {tuple(DATA_USED)}")
  logger.info("%s merge (%s model, data: %s) in %.1fs", merge,
              "linearized" if linear else "plain", DATA_USED[merge], time.time() - t0)
  return [search.Candidate(hparams, direction, (1.0,), default=True)]


def check_suite(suite, merges) -> None:
  """Data-driven merges need a vision suite (an encoder with per-task heads)."""
  wanted = [m for m in merges if m in DATA_USED]
  if wanted and not (hasattr(suite, "features_fn") and hasattr(suite, "heads")):
    raise ValueError(f"merges {wanted} need the per-task classifiers of a vision suite "
                     f"(offline, clip); suite {getattr(suite, 'name', suite)!r} has none")


def report_lines(merges) -> list[str]:
  """The results.md section stating the data each data-driven merge used."""
  used = [m for m in merges if m in DATA_USED]
  if not used:
    return []
  lines = ["## Data-driven merges", "",
           "One merged model per method and seed, the same under every protocol (λ = 1 on "
           f"the merged direction; no coefficient search). At most {MAX_EXAMPLES} images "
           f"per task for Fisher / RegMean, {ADAMERGING_MAX_EXAMPLES} for AdaMerging.", "",
           "| merge | data | settings |", "|---|---|---|"]
  settings = {"fisher": "exact diagonal Fisher, L2-normalized per model, floor 1e-6",
              "regmean": f"α = {REGMEAN_ALPHA} (off-diagonal scaling); other leaves averaged",
              "adamerging": f"{ADAMERGING_GRANULARITY}-wise λ, prior 0.3, clip [0, 1], Adam "
                            f"1e-3, {ADAMERGING_STEPS} steps × {BATCH_SIZE} images per task"}
  lines += [f"| {m} | {DATA_USED[m]} | {settings[m]} |" for m in used]
  return lines + [""]


def append_report(out_dir: str, merges) -> None:
  """Appends :func:`report_lines` to ``out_dir/results.md`` (if any merge is data-driven)."""
  lines = report_lines(merges)
  if lines and jax.process_index() == 0:
    with open(os.path.join(out_dir, "results.md"), "a") as f:
      f.write("\n" + "\n".join(lines))
