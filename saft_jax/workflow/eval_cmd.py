"""``saft eval``: test accuracy of one model on tasks, with the suite's frozen heads.

* Offline-suite tasks: the model is saft_jax params (``.safetensors`` or orbax, as
  ``saft finetune`` and ``saft merge`` write them); the heads are the suite's, fitted on
  its θ0 (read from ``cache``: by default the model's directory when it holds them).
* CLIP tasks: the model is a CLIP checkpoint (Hugging Face or open_clip); the heads are
  zero-shot heads from the text tower of ``base`` (else of the model).

The evaluation is :func:`saft_jax.experiment.runner.task_accuracy`, the one behind
``reproduce``'s tables: the plain model is evaluated as is; ``linearized`` evaluates
``f(x; θ0) + J f(x; θ0)·(θ − θ0)`` around ``base`` (models fine-tuned with ``ftts``).
Writes ``out`` (JSON) and the same table as markdown beside it (``.md``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp

from saft_jax.experiment import runner
from saft_jax.workflow import checkpoints as ck
from saft_jax.workflow.finetune_cmd import job_config, task_suite

logger = logging.getLogger("saft_jax.workflow")


@dataclasses.dataclass
class EvalSpec:
  """What ``saft eval`` does (see :func:`build_spec`)."""
  model: str
  tasks: List[str]
  out: str
  config: Any
  suite: str
  base: Optional[str] = None
  linearized: bool = False
  cache: Optional[str] = None
  overwrite: bool = False


def build_spec(*, model: str, tasks: str, out: str, base: Optional[str] = None,
               linearized: bool = False, config_file: Optional[str] = None, overrides=(),
               cache: Optional[str] = None, overwrite: bool = False) -> EvalSpec:
  """An :class:`EvalSpec` from the command's options.

  Raises:
    ValueError: no or unknown tasks, ``linearized`` without ``base``, a bad override.
  """
  names = [t.strip() for t in tasks.split(",") if t.strip()]
  if not names:
    raise ValueError("--tasks: give at least one task")
  if linearized and not base:
    raise ValueError("--linearized needs --base (θ0, the point the model is linearized at)")
  suite = task_suite(names)
  config = job_config(suite, config_file, overrides, suite=suite, tasks=tuple(names),
                      clip_checkpoint=(base or model) if suite == "clip" else None)
  return EvalSpec(model, names, out, config, suite, base, linearized, cache, overwrite)


def markdown_path(out: str) -> str:
  """``results.json`` -> ``results.md``."""
  stem, ext = os.path.splitext(out)
  return (stem if ext == ".json" else out) + ".md"


def _default_cache(spec: EvalSpec) -> str:
  """Where the offline suite's θ0 and heads are: for the base's, then the model's
  directory, the directory itself when it holds them, or the ``suite_cache`` recorded by
  ``saft finetune`` in its ``run.json``; else the directory of ``out`` (built there)."""
  for path in (spec.base, spec.model):
    if not path:
      continue
    d = os.path.dirname(os.path.abspath(path.rstrip("/")))
    if os.path.exists(os.path.join(d, "suite.json")):
      return d
    run = os.path.join(d, "run.json")
    if os.path.exists(run) and os.path.exists(
        os.path.join(json.load(open(run)).get("suite_cache", ""), "suite.json")):
      return json.load(open(run))["suite_cache"]
  out_dir = os.path.dirname(os.path.abspath(spec.out))
  logger.info("no offline suite next to the model: building θ0 and the heads in %s", out_dir)
  return out_dir


def _check_cache(cache: str, config) -> None:
  """Refuses an offline cache built with other settings (it would be silently rebuilt, and
  the heads would then not be those the model was fine-tuned with)."""
  path = os.path.join(cache, "suite.json")
  if not os.path.exists(path):
    return
  built = json.load(open(path)).get("pretrain_steps")
  if built != config.pretrain_steps:
    raise ValueError(f"the offline suite in {cache!r} was built with pretrain_steps={built}, "
                     f"this evaluation asks for {config.pretrain_steps}: pass --set "
                     f"pretrain_steps={built} (the fine-tuning's settings) or another --cache")


def _like(params, reference, name: str):
  """``params`` in ``reference``'s tree structure; errors name the first mismatched leaf."""
  ck.check_same_layout(ck.layout_of(reference), [ck.layout_of(params)], [name],
                       "the suite's θ0")
  flat = ck.flatten(params)
  paths = ck.layout_of(reference).paths
  treedef = jax.tree_util.tree_structure(reference)
  return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(flat[p]) for p in paths])


def _load_offline(spec: EvalSpec):
  """(suite, model params, base params or None) of offline-suite tasks."""
  cache = spec.cache or _default_cache(spec)
  _check_cache(cache, spec.config)
  model = ck.read_params(ck.detect_checkpoint(spec.model))
  base = ck.read_params(ck.detect_checkpoint(spec.base)) if spec.base else None
  suite = runner.build_suite(spec.config, cache)
  model = _like(model, suite.params0, spec.model)
  base = _like(base, suite.params0, spec.base) if base is not None else None
  return suite, model, base


def _load_clip(spec: EvalSpec):
  """(suite, model visual params, base visual params or None) of CLIP tasks."""
  from saft_jax import models
  for path in (spec.model, spec.base):
    if path and ck.detect_checkpoint(path).format not in ck.CLIP_FORMATS:
      raise ValueError(f"{path!r} is not a CLIP checkpoint (Hugging Face or open_clip), which "
                       "CLIP tasks need")
  act = spec.config.clip_act
  model = models.load_clip(spec.model, act=act).params["visual"]
  base = models.load_clip(spec.base, act=act).params["visual"] if spec.base else None
  cache = spec.cache or os.path.dirname(os.path.abspath(spec.out))
  suite = runner.build_suite(spec.config, cache)
  model = _like(model, suite.params0, spec.model)
  base = _like(base, suite.params0, spec.base) if base is not None else None
  return suite, model, base


def accuracies(suite, config, model, base=None, linearized: bool = False) -> Dict[str, float]:
  """Test accuracy per task of ``model`` (linearized around ``base`` if asked)."""
  counters = runner.make_counters(suite)
  mesh = runner.make_run_mesh(config)
  if linearized:
    point, counter = base, counters["linear"]
    direction = jax.tree.map(lambda m, b: m - b, model, base)
  else:
    point, counter = model, counters["plain"]
    direction = jax.tree.map(jnp.zeros_like, model)
  at = dataclasses.replace(suite, params0=point)
  return {t: float(runner.task_accuracy(counter, at, direction, [1.0], t, "test",
                                        config.eval_batch_size, mesh)[0])
          for t in suite.tasks}


def markdown(result: Dict[str, Any]) -> str:
  """The results as a markdown table (accuracy in %)."""
  acc = result["accuracy"]
  head = "| model | " + " | ".join(acc) + " | mean |"
  rule = "|---" * (len(acc) + 2) + "|"
  name = os.path.basename(result["model"].rstrip("/")) + (" (linearized)" if
                                                          result["linearized"] else "")
  row = (f"| {name} | " + " | ".join(f"{100 * a:.2f}" for a in acc.values())
         + f" | {100 * result['mean']:.2f} |")
  return "\n".join([f"#### saft eval — suite `{result['suite']}`, test split", "",
                    head, rule, row, ""])


def run_eval(spec: EvalSpec) -> Dict[str, Any]:
  """Evaluates, writes ``out`` and its markdown, and returns the results.

  Raises:
    FileExistsError: ``out`` exists and ``overwrite`` is false.
    FileNotFoundError: missing model or task data (the message says how to prepare it).
    ValueError: a model that does not fit the suite (the message names the leaf).
  """
  for path in (spec.out, markdown_path(spec.out)):
    if os.path.exists(path) and not spec.overwrite:
      raise FileExistsError(f"output {path!r} exists (choose another --out or pass "
                            "--overwrite)")
  load = _load_offline if spec.suite == "offline" else _load_clip
  suite, model, base = load(spec)
  acc = accuracies(suite, spec.config, model, base, spec.linearized)
  result = {"model": spec.model, "base": spec.base, "linearized": spec.linearized,
            "suite": spec.suite, "split": "test", "accuracy": acc,
            "mean": sum(acc.values()) / len(acc)}
  os.makedirs(os.path.dirname(os.path.abspath(spec.out)), exist_ok=True)
  with open(spec.out, "w") as f:
    json.dump(result, f, indent=1)
  with open(markdown_path(spec.out), "w") as f:
    f.write(markdown(result))
  return result
