"""``saft sweep``: the main job over a list of config settings × seeds, with fine-tunings reused.

Each *setting* is a dict of dotted config keys to values (``{"optim.asam_rho": 0.02}``),
applied to a base config with :func:`saft_jax.experiment.config.set_value`. For every
setting the rest of the main job runs unchanged (fine-tune, merge, search); nothing is
trained twice: a fine-tuning run is stored under the fingerprint of the config fields
that can change it (:func:`finetune_fingerprint`), so e.g. the plain-AdamW baseline is
trained once per seed and shared by every ASAM radius, and only settings that change
it (learning rate, batch size, ...) get their own.

Outputs (:mod:`saft_jax.experiment.sweep_report`): ``sweep.json`` (every results
record plus ``"setting"``; baseline records carry only the swept keys that change the
baseline), ``sweep_meta.json``, ``sweep.md`` (mean ± std over seeds, paired difference
to the baseline with a 95 % interval, the setting chosen on validation) and
``sweep.png``. Layout: ``CACHE/suite-<hash>/`` (θ0 and heads), ``CACHE/ft/<hash>/`` (the
fine-tunings of one fingerprint, as in ``saft reproduce``, with ``fingerprint.json``);
``CACHE`` is the output directory unless ``cache_dir`` / ``--cache`` names a shared one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from saft_jax import analysis
from saft_jax.experiment import config as config_lib
from saft_jax.experiment import evaluate, runner, sweep_report

logger = logging.getLogger("saft_jax.experiment")

# Config fields that never change a fine-tuning run (what is merged, reported, evaluated).
_NOT_TRAINING = ("tasks", "finetunes", "safts", "merges", "protocols", "seeds",
                 "eval_batch_size", "async_checkpoint", "mesh_shape", "model_axis",
                 "stack_runs")
# Sharpness fields of OptimConfig, and the settings that read them.
_SHARPNESS = {"sam_rho": ("sam",), "asam_rho": ("asam",), "asam_eta": ("asam",)}
_SUITE_FIELDS = ("suite", "tasks", "pretrain_steps", "clip_checkpoint", "tokenizer_dir",
                 "data_dir", "compute_dtype", "clip_act")
# Fields added after caches existed: left out of fingerprints while unset (None), so that
# runs cached before them keep their keys.
_OMIT_WHEN_UNSET = ("clip_act",)
# OptimConfig fields added after caches existed: left out while they hold these defaults.
_OPTIM_OMIT_WHEN_DEFAULT = {"schedule": "cosine"}


def _without_unset(fields: dict) -> dict:
  return {k: v for k, v in fields.items() if not (k in _OMIT_WHEN_UNSET and v is None)}


def _is_text(config) -> bool:
  return config.suite in config_lib.TEXT_SUITES


def _suite_fields(config) -> dict:
  """The config fields that define a suite (θ0, tasks); ``text`` only for text suites."""
  fields = _without_unset({k: getattr(config, k) for k in _SUITE_FIELDS})
  if _is_text(config):
    fields["text"] = dataclasses.asdict(config.text)
  return fields


def _digest(obj) -> str:
  return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def finetune_fingerprint(config, saft: str) -> dict:
  """The config fields that can change a fine-tuning run under sharpness setting ``saft``."""
  raw = _without_unset(dataclasses.asdict(config))
  for k in _NOT_TRAINING:
    raw.pop(k)
  if not _is_text(config):  # the text settings cannot change a vision run
    raw.pop("text")
  raw["optim"] = {k: v for k, v in raw["optim"].items()
                  if (k not in _SHARPNESS or saft in _SHARPNESS[k])
                  and not (k in _OPTIM_OMIT_WHEN_DEFAULT and v == _OPTIM_OMIT_WHEN_DEFAULT[k])}
  raw["saft"] = saft
  return raw


def grid_settings(axes: list[tuple[str, list]]) -> list[dict]:
  """The Cartesian product of ``[(key, values), ...]`` as setting dicts, in order."""
  keys = [k for k, _ in axes]
  if len(set(keys)) != len(keys):
    raise ValueError(f"a key is swept twice: {keys}")
  return [dict(zip(keys, vals)) for vals in itertools.product(*[v for _, v in axes])]


def _apply(config, setting: dict):
  for k, v in setting.items():
    config = config_lib.set_value(config, k, v)
  return config


def baseline_keys(base_config, settings: list[dict], keys: list[str]) -> list[str]:
  """The swept keys whose values change the plain-AdamW (``saft="none"``) runs."""
  out = []
  for k in keys:
    prints = {_digest(finetune_fingerprint(_apply(base_config, {k: s[k]}), "none"))
              for s in settings if k in s}
    prints.add(_digest(finetune_fingerprint(base_config, "none")))
    if len(prints) > 1:
      out.append(k)
  return out


def pair_barrier(suite, tvs, tasks) -> dict:
  """Joint-loss barrier and midpoint excess on the line between two task models.

  ``barrier``: ``max`` over 11 points of ``L_A + L_B`` (validation) minus the chord
  (0 when the path is convex); ``midpoint_excess``: the same difference at the midpoint
  (negative: the merged model's joint loss is below the endpoints' mean).
  """
  if len(tasks) != 2:
    raise ValueError(f"the barrier measure needs exactly two tasks, got {list(tasks)}")
  feats = suite.features_fn()

  def loss_of(task):
    x, y = suite.tasks[task].splits["val"]
    head = suite.heads[task]
    return lambda p: optax.softmax_cross_entropy_with_integer_labels(
        evaluate.head_logits(feats(p, jnp.asarray(x)), head), jnp.asarray(y)).mean()

  ends = [jax.tree.map(lambda a, b: a + b, suite.params0, tv) for tv in tvs]
  barrier = analysis.loss_barrier([loss_of(t) for t in tasks], ends[0], ends[1], 11)
  mid = int(np.argmin(np.abs(np.asarray(barrier.alphas) - 0.5)))
  return dict(barrier=float(barrier.barrier), midpoint_excess=float(barrier.excess[mid]))


def sweep(base_config, settings: list[dict], out_dir: str, *, measures=(),
          title: str | None = None, cache_dir: str | None = None) -> list[dict]:
  """Runs the main job for every setting (× ``base_config.seeds``) and writes the reports.

  Args:
    base_config: the config every setting starts from (its ``safts`` must include
      ``"none"``, the baseline every other setting is paired with).
    settings: setting dicts (dotted keys), in report order.
    out_dir: output directory; rerunning reuses every finished fine-tuning.
    measures: extra measurements: ``"barrier"`` adds ``barrier`` and ``midpoint_excess``
      (:func:`pair_barrier`) to the weight-averaging records (two-task sweeps).
    title: heading of ``sweep.md``.
    cache_dir: where θ0 / heads and the fine-tunings are stored (default ``out_dir``);
      sweeps sharing one ``cache_dir`` share every run they have in common.

  Returns:
    The sweep records (also in ``out_dir/sweep.json``).
  """
  if not settings:
    raise ValueError("a sweep needs at least one setting")
  if "none" not in base_config.safts:
    raise ValueError("the sweep pairs every setting with plain AdamW: safts must include "
                     f"'none', got {base_config.safts}")
  unknown = set(measures) - {"barrier"}
  if unknown:
    raise ValueError(f"unknown measure(s) {sorted(unknown)}; known: barrier")
  keys = list(dict.fromkeys(k for s in settings for k in s))
  configs = [_apply(base_config, s) for s in settings]  # validates every value up front
  base_keys = baseline_keys(base_config, settings, keys)
  os.makedirs(out_dir, exist_ok=True)
  cache_dir = cache_dir or out_dir
  t_start, done_runs = time.time(), set()
  suites, records = {}, []
  mesh = runner.make_run_mesh(base_config)
  for i, (setting, config) in enumerate(zip(settings, configs)):
    suite_key = _digest(_suite_fields(config))
    if suite_key not in suites:
      suite = runner.build_suite(config, os.path.join(cache_dir, f"suite-{suite_key}"))
      suites[suite_key] = (suite, runner.make_counters(suite))
    suite, counters = suites[suite_key]
    for finetune in config.finetunes:
      accuracy = runner.make_accuracy(suite, config, counters[
          "linear" if finetune == "ftts" else "plain"], mesh)
      for saft in config.safts:
        fingerprint = finetune_fingerprint(config, saft)
        run_key = (suite_key, finetune, _digest(fingerprint))
        if run_key in done_runs:
          continue  # e.g. the baseline, shared with an earlier setting
        ft_root = os.path.join(cache_dir, "ft", run_key[2])
        os.makedirs(ft_root, exist_ok=True)
        with open(os.path.join(ft_root, "fingerprint.json"), "w") as f:
          json.dump(fingerprint, f, indent=1, default=str)
        tvs = runner.finetune_all(suite, config, ft_root, finetune, saft, config.seeds, mesh)
        shown = sweep_report.restrict(setting, base_keys) if saft == "none" else dict(setting)
        for seed in config.seeds:
          extra = pair_barrier(suite, tvs[seed], list(suite.tasks)) if measures else {}
          for r in runner.merge_records(suite, config, tvs[seed], accuracy, seed):
            records.append(dict(r, finetune=finetune, saft=saft, setting=shown,
                                **(extra if r["merge"] == "weight_average" else {})))
        done_runs.add(run_key)
    elapsed = time.time() - t_start
    eta = elapsed / (i + 1) * (len(settings) - i - 1)
    logger.info("sweep setting %d/%d done (%s) | %.0fs elapsed | ETA %.0fs", i + 1,
                len(settings), sweep_report.setting_label(setting, keys), elapsed, eta)
  meta = dict(keys=keys, settings=settings, seeds=list(base_config.seeds),
              baseline_keys=base_keys, tasks=list(next(iter(suites.values()))[0].tasks),
              finetunes=list(base_config.finetunes), safts=list(base_config.safts),
              merges=list(base_config.merges), protocols=list(base_config.protocols),
              base_config=dataclasses.asdict(base_config), measures=list(measures),
              seconds=round(time.time() - t_start, 1),
              title=title or f"saft sweep over {', '.join(keys)}")
  sweep_report.write_sweep_report(out_dir, records, meta)
  return records
