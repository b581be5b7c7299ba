"""The effective-noise experiment (SPEC §9, seed 003) on the offline suite.

Merging success is reported to be a non-monotonic function of the optimizer's
effective noise scale: a larger learning rate, stronger weight decay, a smaller
batch and data augmentation each raise it. This sweep changes one knob at a
time around the offline default and, for plain AdamW and SAFT-ASAM, fine-tunes
two tasks and measures

* ``merged_norm_acc`` — normalized test accuracy of their weight average
  (``θ0 + ½(τ_A + τ_B)``, the midpoint of the path between the two models),
  mean over the two tasks;
* ``barrier`` — the joint-task loss barrier (``L_A + L_B`` on validation data)
  on the straight line between the two fine-tuned models (``max`` over the line of the
  loss minus the chord; 0 when the path is convex);
* ``midpoint_excess`` — the same difference at the midpoint (negative: the merged
  model's joint loss is below the average of the endpoints'; the JTL-linearity gap).

Outputs: ``sweep.json``, ``sweep.md`` and ``sweep.png`` (one panel per knob).
"""
from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from saft_jax import analysis
from saft_jax.experiment import config as config_lib
from saft_jax.experiment import evaluate
from saft_jax.experiment.report import method_label
from saft_jax.experiment.runner import build_suite, finetune_all, task_accuracy

logger = logging.getLogger("saft_jax.experiment")

KNOBS = {
    "lr": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    "weight_decay": (0.0, 0.1, 0.3, 1.0, 3.0),
    "batch_size": (16, 32, 64, 128),
    "augment": (False, True),
}


def _with_knob(config, knob, value):
  if knob == "lr":
    return config_lib.replace(config, optim_lr=float(value))
  if knob == "weight_decay":
    return config_lib.replace(config, optim_weight_decay=float(value))
  if knob == "batch_size":
    return config_lib.replace(config, batch_size=int(value))
  if knob == "augment":
    return config_lib.replace(config, augment=bool(value))
  raise ValueError(f"unknown knob {knob!r}; known: {sorted(KNOBS)}")


def sweep_point(suite, config, out_dir, saft, tasks, counter):
  """Fine-tunes the two tasks under ``config``; returns the point's measurements."""
  tvs = finetune_all(suite, config, out_dir, "sgd", saft, config.seeds[0], None)
  test_acc = lambda direction, lam, t: float(
      task_accuracy(counter, suite, direction, [lam], t, "test", config.eval_batch_size)[0])
  ft = [test_acc(tv, 1.0, t) for t, tv in zip(tasks, tvs)]
  both = jax.tree.map(lambda a, b: a + b, *tvs)
  merged = [test_acc(both, 0.5, t) for t in tasks]
  feats = suite.features_fn()

  def loss_of(task):
    x, y = suite.tasks[task].splits["val"]
    head = suite.heads[task]
    return lambda p: optax.softmax_cross_entropy_with_integer_labels(
        evaluate.head_logits(feats(p, jnp.asarray(x)), head), jnp.asarray(y)).mean()

  ends = [jax.tree.map(lambda a, b: a + b, suite.params0, tv) for tv in tvs]
  barrier = analysis.loss_barrier([loss_of(t) for t in tasks], ends[0], ends[1], 11)
  mid = int(np.argmin(np.abs(np.asarray(barrier.alphas) - 0.5)))
  return dict(ft_acc=ft, merged_acc=merged,
              merged_norm_acc=float(np.mean(np.array(merged) / np.maximum(ft, 1e-12))),
              barrier=float(barrier.barrier), midpoint_excess=float(barrier.excess[mid]))


def noise_sweep(base_config, out_dir: str, *, tasks=("rot90", "flip"), safts=("none", "asam"),
                knobs=None) -> list[dict]:
  """Runs the sweep (one knob at a time around ``base_config``) and writes its reports."""
  if knobs is None:
    knobs = dict(KNOBS)
  elif not isinstance(knobs, dict):
    unknown = [k for k in knobs if k not in KNOBS]
    if unknown:
      raise ValueError(f"unknown knob(s) {unknown}; known: {sorted(KNOBS)}")
    knobs = {k: KNOBS[k] for k in knobs}
  if len(tasks) != 2:
    raise ValueError(f"the sweep merges exactly two tasks, got {tasks}")
  base_config = config_lib.replace(base_config, tasks=tuple(tasks), finetunes=("sgd",))
  suite = build_suite(base_config, out_dir)
  counter = evaluate.make_grid_counter(suite.features_fn())
  rows = []
  for knob, values in knobs.items():
    for value in values:
      config = _with_knob(base_config, knob, value)
      for saft in safts:
        point_dir = os.path.join(out_dir, "sweep", f"{knob}={value}")
        r = sweep_point(suite, config, point_dir, saft, list(tasks), counter)
        rows.append(dict(knob=knob, value=value, saft=saft, **r))
        logger.info("sweep %s=%s %s: merged norm acc %.4f, barrier %.4f, midpoint excess %.4f",
                    knob, value, saft, r["merged_norm_acc"], r["barrier"], r["midpoint_excess"])
  write_sweep(out_dir, rows, tasks)
  return rows


def write_sweep(out_dir, rows, tasks):
  """``sweep.json``, ``sweep.md`` and ``sweep.png``."""
  with open(os.path.join(out_dir, "sweep.json"), "w") as f:
    json.dump(rows, f, indent=1)
  md = [f"# Effective-noise sweep (offline suite, tasks {', '.join(tasks)})", "",
        "Merged = weight average of the two task models; barrier = joint-task loss barrier on "
        "the line between them.", ""]
  header = ["knob", "value"] + [f"{method_label('sgd', s)} {m}" for s in
                                sorted({r['saft'] for r in rows})
                                for m in ("norm acc", "barrier", "midpoint excess")]
  table = []
  for knob in dict.fromkeys(r["knob"] for r in rows):
    for value in dict.fromkeys(r["value"] for r in rows if r["knob"] == knob):
      cells = [knob, value]
      for s in sorted({r["saft"] for r in rows}):
        r = next(r for r in rows if (r["knob"], r["value"], r["saft"]) == (knob, value, s))
        cells += [r["merged_norm_acc"], r["barrier"], r["midpoint_excess"]]
      table.append(cells)
  md.append(analysis.markdown_table(header, table))
  with open(os.path.join(out_dir, "sweep.md"), "w") as f:
    f.write("\n".join(md) + "\n")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  knobs = list(dict.fromkeys(r["knob"] for r in rows))
  fig, axes = plt.subplots(1, len(knobs), figsize=(4.2 * len(knobs), 3.4), squeeze=False)
  for ax, knob in zip(axes[0], knobs):
    twin = ax.twinx()
    for s, color in zip(sorted({r["saft"] for r in rows}), ("tab:blue", "tab:red", "tab:green")):
      pts = [r for r in rows if r["knob"] == knob and r["saft"] == s]
      xs = [str(p["value"]) for p in pts]
      ax.plot(xs, [p["merged_norm_acc"] for p in pts], "o-", color=color,
              label=f"{method_label('sgd', s)} norm acc")
      twin.plot(xs, [p["midpoint_excess"] for p in pts], "s--", color=color, alpha=0.5,
                label=f"{method_label('sgd', s)} midpoint excess")
    ax.set_xlabel(knob)
    ax.set_ylabel("merged normalized accuracy")
    twin.set_ylabel("joint-loss midpoint excess (dashed)")
  axes[0][0].legend(fontsize=7, loc="lower left")
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "sweep.png"), dpi=110)
  plt.close(fig)
