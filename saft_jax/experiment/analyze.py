"""``saft analyze RUN_DIR``: the paper's measurements on a run of ``saft reproduce``.

For every fine-tuning method in the run (SGD / FTTS / FTLO), with its sharpness
settings side by side (e.g. SGD vs SAFT-ASAM) on one colour scale, it writes to
``RUN_DIR/analysis/``:

* ``xi_<method>.png`` — disentanglement error ξ(α1, α2) of the first two tasks
  (two-task, and all-task with every other task vector at ``λ_fixed``);
* ``joint_loss_<method>.png`` — joint-task loss over the same grid;
* ``ctl_<method>.png`` — per-layer cross-task linearity (not for FTTS: the
  linearized model is linear in θ, so its CTL distance is 0 by construction);
* ``barrier_<method>.png`` — loss from the task-arithmetic merge (λ = ``λ_fixed``)
  to each task model (the task's own loss);
* ``analysis.json`` (all numbers) and ``analysis.md`` (tables: Hessian top
  eigenvalue per task model, loss barriers, task-vector cosine / sign conflicts).

Data: the first ``num_examples`` validation examples of each task. FTTS models
are evaluated through their linearization (``f0 + Σ α_t J τ_t``).
"""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from saft_jax import analysis, merging, models
from saft_jax.experiment import config as config_lib
from saft_jax.experiment.evaluate import head_logits
from saft_jax.experiment.report import method_label
from saft_jax.experiment.store import load_tree

logger = logging.getLogger("saft_jax.experiment")


def _load_config(run_dir):
  path = os.path.join(run_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{run_dir} is not a run directory of `saft reproduce` "
                            f"(no config.json)")
  raw = json.load(open(path))
  raw["optim"] = config_lib.OptimConfig(**raw["optim"])
  if "text" in raw:
    raw["text"] = config_lib.TextConfig(**{k: tuple(v) if isinstance(v, list) else v
                                           for k, v in raw["text"].items()})
  for k, v in raw.items():
    if isinstance(v, list):
      raw[k] = tuple(v)
  return config_lib.ReproduceConfig(**raw)


def load_task_vectors(run_dir, finetune, saft, seed, tasks):
  """``[τ_t]`` of one (method, sharpness, seed); a clear error names a missing one."""
  tvs = []
  for t in tasks:
    path = os.path.join(run_dir, "ft", f"{finetune}-{saft}", f"seed{seed}", t,
                        "task_vector.msgpack")
    if not os.path.exists(path):
      raise FileNotFoundError(f"missing fine-tuned task vector for task {t!r} "
                              f"({finetune}-{saft}, seed {seed}): {path}; run `saft reproduce` "
                              "to completion first")
    tvs.append(jax.tree.map(jnp.asarray, load_tree(path)))
  return tvs


def _task_data(suite, task, n):
  images, labels = suite.tasks[task].splits["val"] if suite.tasks[task].splits else (None, None)
  if images is None:  # streamed task: take the first batch of the val split
    from saft_jax import data as data_lib
    images, labels, mask = next(iter(data_lib.eval_batches(suite.tasks[task], "val", n)))
    images, labels = images[mask], labels[mask]
  return jnp.asarray(images[:n]), jnp.asarray(labels[:n])


def _model_fns(suite, finetune, task, images, labels):
  """logits(params, x) and loss(params) of one task (linearized for FTTS)."""
  feats, head = suite.features_fn(), suite.heads[task]
  if finetune == "ftts":
    def logits(params, x):
      d = jax.tree.map(lambda p, p0: p - p0, params, suite.params0)
      f0, jd = jax.jvp(lambda p: feats(p, x), (suite.params0,), (d,))
      return head_logits(f0 + jd, head)
  else:
    def logits(params, x):
      return head_logits(feats(params, x), head)

  def loss(params):
    return optax.softmax_cross_entropy_with_integer_labels(logits(params, images), labels).mean()
  return logits, loss


def _plus(params0, tv, scale=1.0):
  return jax.tree.map(lambda p, t: p + scale * t, params0, tv)


def _features_fn(suite):
  def features(params, x):
    emb, blocks = models.encode_image(suite.vision, params, x, return_blocks=True,
                                      compute_dtype=suite.compute_dtype)
    feats = {f"block_{i}": b[:, 0] for i, b in enumerate(blocks)}  # class-token stream
    feats["embedding"] = emb
    return feats
  return features


def analyze_method(suite, finetune, saft, tvs, tasks, data, fns, features, *, alphas,
                   lam_fixed, hessian_iters, key):
  """All numbers for one (method, sharpness) pair.

  ``fns[t] = (logits(params, x), loss(params))`` and ``features`` are built once per
  fine-tuning method and shared by its sharpness settings, so their compiled kernels
  are reused.
  """
  t1, t2 = tasks[0], tasks[1]
  xs = (data[t1][0], data[t2][0])
  others = tvs[2:]
  out = {}
  t0 = time.time()
  for name, fixed in (("two_task", ()), ("all_task", others)):
    xi = analysis.disentanglement_error([fns[t1][0], fns[t2][0]], suite.params0,
                                        (tvs[0], tvs[1]), xs, alphas,
                                        fixed_task_vectors=fixed,
                                        fixed_coefs=lam_fixed if fixed else None)
    jl = analysis.joint_loss_grid([fns[t1][1], fns[t2][1]], suite.params0, (tvs[0], tvs[1]),
                                  alphas, fixed_task_vectors=fixed,
                                  fixed_coefs=lam_fixed if fixed else None)
    out[f"xi_{name}"] = xi.error
    out[f"joint_loss_{name}"] = jl.joint
  out["alphas"] = np.asarray(alphas)
  if finetune != "ftts":
    ctl = analysis.cross_task_linearity(features, _plus(suite.params0, tvs[0]),
                                        _plus(suite.params0, tvs[1]), list(xs))
    out["ctl"] = ctl.as_dict() if hasattr(ctl, "as_dict") else dict(zip(ctl.names, ctl.dis_cos[0]))
  merged = _plus(suite.params0, merging.sum_task_vectors(tvs), lam_fixed)
  barriers = {}
  for t, tv in zip(tasks, tvs):
    b = analysis.loss_barrier(fns[t][1], merged, _plus(suite.params0, tv), 11)
    barriers[t] = b
  out["barriers"] = barriers
  out["hessian_top"] = {
      t: float(np.asarray(analysis.top_hessian_eigenvalue(
          fns[t][1], _plus(suite.params0, tv), method="lanczos", num_iters=hessian_iters,
          key=key)).reshape(-1)[0])
      for t, tv in zip(tasks, tvs)}
  out["cosine"] = np.asarray(merging.cosine_similarity_matrix(tvs))
  out["sign_conflict"] = float(merging.sign_conflict_rate(tvs))
  logger.info("analyzed %s (%.1fs)", method_label(finetune, saft), time.time() - t0)
  return out


def analyze_run(run_dir: str, *, out_dir: str | None = None, resolution: int = 21,
                hessian_iters: int = 20, num_examples: int = 128, lam_fixed: float = 0.3,
                seed: int = 0, tasks=None) -> dict:
  """Runs the analysis of a run directory; returns the numbers written to JSON."""
  from saft_jax.experiment.runner import build_suite
  config = _load_config(run_dir)
  if config.suite in config_lib.TEXT_SUITES:
    raise ValueError(f"saft analyze supports the vision suites only; {run_dir} is a run of "
                     f"the {config.suite} suite")
  out_dir = out_dir or os.path.join(run_dir, "analysis")
  os.makedirs(out_dir, exist_ok=True)
  suite = build_suite(config, run_dir)
  tasks = list(tasks or suite.tasks)
  unknown = [t for t in tasks if t not in suite.tasks]
  if unknown or len(tasks) < 2:
    raise ValueError(f"analysis needs >= 2 tasks of the run {list(suite.tasks)}; got {tasks}")
  data = {t: _task_data(suite, t, num_examples) for t in tasks}
  alphas = analysis.default_alphas(-2.0, 2.0, resolution)
  key = jax.random.key(seed)
  results, md = {}, [f"# saft analyze — {run_dir}", "",
                     f"Tasks: {', '.join(tasks)}; ξ and joint loss over tasks "
                     f"{tasks[0]!r} × {tasks[1]!r}, α ∈ [−2, 2] ({resolution} points); all-task "
                     f"variant and merges use λ = {lam_fixed}; {num_examples} validation "
                     "examples per task.", ""]
  features = _features_fn(suite)
  for finetune in config.finetunes:
    per = {}
    fns = {t: _model_fns(suite, finetune, t, *data[t]) for t in tasks}
    for saft in config.safts:
      tvs = load_task_vectors(run_dir, finetune, saft, seed, tasks)
      per[method_label(finetune, saft)] = analyze_method(
          suite, finetune, saft, tvs, tasks, data, fns, features, alphas=alphas,
          lam_fixed=lam_fixed, hessian_iters=hessian_iters, key=key)
    results[finetune] = per
    md += _plots_and_tables(finetune, per, tasks, alphas, out_dir)
  with open(os.path.join(out_dir, "analysis.json"), "w") as f:
    json.dump(analysis.to_jsonable(results), f, indent=1)
  with open(os.path.join(out_dir, "analysis.md"), "w") as f:
    f.write("\n".join(md))
  logger.info("analysis written to %s", out_dir)
  return results


def _plots_and_tables(finetune, per, tasks, alphas, out_dir):
  name = finetune
  md = [f"## {name.upper()}", ""]
  for kind, label in (("xi", "ξ(α1, α2)"), ("joint_loss", "joint-task loss")):
    grids = {f"{m} ({v})": r[f"{kind}_{v}"] for m, r in per.items()
             for v in ("two_task", "all_task")}
    analysis.plot_grid_pair(grids, alphas, alphas, os.path.join(out_dir, f"{kind}_{name}.png"),
                            title=f"{name.upper()}: {label}", label=label)
    md.append(f"![{kind}]({kind}_{name}.png)")
  ctl = {m: r["ctl"] for m, r in per.items() if "ctl" in r}
  if ctl:
    analysis.plot_ctl_bars(ctl, os.path.join(out_dir, f"ctl_{name}.png"),
                           title=f"{name.upper()}: cross-task linearity")
    md.append(f"![ctl](ctl_{name}.png)")
  curves = {f"{m}: {t}": r["barriers"][t] for m, r in per.items() for t in tasks}
  analysis.plot_loss_curves(curves, os.path.join(out_dir, f"barrier_{name}.png"),
                            title=f"{name.upper()}: merged (α=0) → task model (α=1)")
  md += [f"![barrier](barrier_{name}.png)", ""]
  rows = []
  for m, r in per.items():
    rows.append([m, float(np.mean(r["xi_two_task"])), float(np.mean(r["xi_all_task"])),
                 float(np.mean([r["hessian_top"][t] for t in tasks])),
                 float(np.mean([r["barriers"][t].barrier for t in tasks])),
                 r["sign_conflict"],
                 float(np.mean(r["cosine"][~np.eye(len(tasks), dtype=bool)]))])
  md.append(analysis.markdown_table(
      ["method", "mean ξ two-task", "mean ξ all-task", "mean top Hessian eig.",
       "mean loss barrier", "sign-conflict rate", "mean task-vector cosine"], rows))
  md += ["", "Top Hessian eigenvalue per task model:", ""]
  md.append(analysis.markdown_table(["method"] + tasks,
                                    [[m] + [r["hessian_top"][t] for t in tasks]
                                     for m, r in per.items()]))
  md.append("")
  return md
