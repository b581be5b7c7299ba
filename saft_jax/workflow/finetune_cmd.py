"""``saft finetune``: one model, one task, one fine-tuning method and sharpness setting.

The run is the one ``saft reproduce`` does for that task (:func:`runner.finetune_one`:
same suite, optimizer, schedule, data order and best-on-validation rule), trained on its
own (``reproduce`` with ``stack_runs=1``; its default stacked program gives the same
numbers up to float rounding). Output directory::

  OUT/run.json                     # the settings; a rerun with the same ones resumes
  OUT/ckpt/                        # the orbax run (resumable)
  OUT/metrics.jsonl, best.json     # training/validation metrics, best validation metrics
  OUT/task_vector.msgpack          # τ = θ_t − θ0 (saft_jax layout; also .safetensors)
  OUT/model...                     # the fine-tuned model θ0 + τ in the input's format
  OUT/LINEARIZED.md                # ftts only: how to evaluate it (linearized around θ0)

With a CLIP checkpoint (``--model``) the model is exported in its format (``model/`` for
directories, ``model.<suffix>`` for a state-dict file), the text tower unchanged. Without
one, the offline suite's θ0 is built (or read from ``cache``) as ``reproduce`` builds it,
and the model and θ0 are written as saft_jax params (``model.safetensors``,
``theta0.safetensors``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp

from saft_jax.experiment import config as config_lib
from saft_jax.experiment import defaults, runner
from saft_jax.experiment.store import load_tree
from saft_jax.workflow import checkpoints as ck

logger = logging.getLogger("saft_jax.workflow")

LINEARIZED_NOTE = """# A linearized (FTTS) model

`{model}` holds θ0 + τ, where τ (`task_vector.safetensors`) was trained in the tangent
space of θ0: the model is f(x; θ0) + J f(x; θ0) · τ, not f(x; θ0 + τ). Evaluate it
linearized around the same θ0:

    saft eval --model {model} --base {base} --linearized --tasks {task} --out eval.json

Merges of such models (task arithmetic, TIES, ...) are linearized models too: evaluate
them the same way.
"""


@dataclasses.dataclass
class FinetuneSpec:
  """What ``saft finetune`` does (see :func:`build_spec`)."""
  task: str
  out: str
  config: Any
  model: Optional[str] = None
  finetune: str = "sgd"
  saft: str = "asam"
  seed: int = 0
  cache: Optional[str] = None
  overwrite: bool = False


def task_suite(tasks: List[str]) -> str:
  """``"offline"`` or ``"clip"``: the suite whose tasks these are.

  Raises:
    ValueError: an unknown task, or tasks of two suites.
  """
  from saft_jax.data import offline
  from saft_jax.experiment.clip_suite import TEMPLATE_SETS
  kinds = set()
  for t in tasks:
    if t in offline.TASKS:
      kinds.add("offline")
    elif t in TEMPLATE_SETS:
      kinds.add("clip")
    else:
      raise ValueError(f"unknown task {t!r}; offline suite: {', '.join(offline.TASKS)}; CLIP: "
                       f"{', '.join(TEMPLATE_SETS)}")
  if len(kinds) > 1:
    raise ValueError(f"tasks {', '.join(tasks)} mix the offline suite and CLIP tasks")
  return kinds.pop()


def job_config(suite_name: str, config_file: Optional[str], overrides, **changes):
  """The config of a workflow command: ``config_file`` or the suite's default, then
  ``changes`` (dataclass fields), then the ``--set`` overrides."""
  config = (config_lib.load_config_file(config_file) if config_file
            else defaults.default_config(suite_name))
  config = config_lib.replace(config, **{k: v for k, v in changes.items() if v is not None})
  return config_lib.apply_overrides(config, overrides)


def build_spec(*, task: str, out: str, model: Optional[str] = None, finetune: str = "sgd",
               saft: str = "asam", seed: int = 0, steps: Optional[int] = None,
               config_file: Optional[str] = None, overrides=(), cache: Optional[str] = None,
               overwrite: bool = False) -> FinetuneSpec:
  """A :class:`FinetuneSpec` from the command's options.

  Raises:
    ValueError: several tasks, an unknown task, method or setting, or a bad override.
  """
  tasks = [t for t in task.split(",") if t]
  if len(tasks) != 1:
    raise ValueError(f"--task: saft finetune trains one task, got {task!r} (one run per task)")
  suite = task_suite(tasks)
  if suite == "clip" and model is None:
    raise ValueError(f"task {tasks[0]!r} is a CLIP task: give the CLIP checkpoint with --model")
  if suite == "offline" and model is not None:
    raise ValueError(f"task {tasks[0]!r} is an offline-suite task, fine-tuned from the suite's "
                     "own θ0: leave out --model")
  config = job_config(suite, config_file, overrides, suite=suite, tasks=(tasks[0],),
                      finetunes=(finetune,), safts=(saft,), seeds=(int(seed),), steps=steps,
                      clip_checkpoint=model)
  return FinetuneSpec(tasks[0], out, config, model, finetune, saft, int(seed), cache, overwrite)


def _settings(spec: FinetuneSpec) -> Dict[str, Any]:
  return {"task": spec.task, "model": spec.model, "finetune": spec.finetune,
          "saft": spec.saft, "seed": spec.seed,
          "config": json.loads(json.dumps(dataclasses.asdict(spec.config), default=str))}


def _fill_new_fields(previous: Dict[str, Any], settings: Dict[str, Any]) -> None:
  """A run.json written before a config field existed: that field had its default, so a
  rerun that leaves it at the default resumes (fills ``previous`` in place)."""
  config = previous.get("config")
  if not isinstance(config, dict):
    return
  for field in dataclasses.fields(config_lib.ReproduceConfig):
    if (field.name not in config and field.default is not dataclasses.MISSING
        and settings["config"].get(field.name) == field.default):
      config[field.name] = field.default


def _prepare_out(spec: FinetuneSpec) -> None:
  """Creates OUT with run.json; resumes a run with the same settings; refuses another."""
  path = os.path.join(spec.out, "run.json")
  settings = _settings(spec)
  if os.path.exists(spec.out) and os.listdir(spec.out) and not spec.overwrite:
    previous = json.load(open(path)) if os.path.exists(path) else None
    if previous is not None:
      previous.pop("suite_cache", None)
      _fill_new_fields(previous, settings)
    if previous != settings:
      what = ("another run" if previous else "other files")
      raise FileExistsError(f"output {spec.out!r} holds {what}: choose another --out or pass "
                            "--overwrite (a run with the same settings resumes)")
    logger.info("resuming the run in %s", spec.out)
  elif os.path.exists(spec.out) and spec.overwrite:
    ck.output_exists(spec.out, True)
  os.makedirs(spec.out, exist_ok=True)
  with open(path, "w") as f:  # suite_cache: where saft eval finds θ0 and the heads
    json.dump(dict(settings, suite_cache=os.path.abspath(spec.cache or spec.out)), f, indent=1)


def _train(spec: FinetuneSpec, suite):
  """τ and the best validation metrics (the finished run's, when there is one)."""
  tv_path = os.path.join(spec.out, "task_vector.msgpack")
  if os.path.exists(tv_path) and os.path.exists(os.path.join(spec.out, "best.json")):
    logger.info("reusing the finished run in %s", spec.out)
    return (jax.tree.map(jnp.asarray, load_tree(tv_path)),
            json.load(open(os.path.join(spec.out, "best.json"))))
  mesh = runner.make_run_mesh(spec.config)
  return runner.finetune_one(suite, spec.config, spec.out, spec.task, spec.finetune, spec.saft,
                             spec.seed, mesh)


def _model_path(out: str, source: Optional[ck.Checkpoint]) -> str:
  """``OUT/model`` for directory formats, ``OUT/model<suffix>`` for files."""
  if source is None:
    return os.path.join(out, "model.safetensors")
  if source.is_dir:
    return os.path.join(out, "model")
  return os.path.join(out, "model" + os.path.splitext(source.path)[1])


def _export(spec: FinetuneSpec, suite, tv) -> Dict[str, str]:
  """Writes the fine-tuned model (θ0 + τ) in the input's format; returns the paths."""
  theta = jax.tree.map(lambda p0, t: p0 + t, suite.params0, tv)
  source = ck.detect_checkpoint(spec.model) if spec.model else None
  model_path = _model_path(spec.out, source)
  ck.output_exists(model_path, True)
  paths = {"model": model_path}
  if source is None:
    ck.write_params(theta, model_path, "safetensors")
    paths["theta0"] = os.path.join(spec.out, "theta0.safetensors")
    ck.write_params(suite.params0, paths["theta0"], "safetensors")
  else:
    from saft_jax import models
    clip = models.load_clip(spec.model, act=spec.config.clip_act)
    ck.write_params(dict(clip.params, visual=theta), model_path, source.format, clip.config,
                    template=source)
    paths["theta0"] = spec.model
  paths["task_vector"] = os.path.join(spec.out, "task_vector.safetensors")
  ck.write_params(tv, paths["task_vector"], "safetensors")
  if spec.finetune == "ftts":
    paths["note"] = os.path.join(spec.out, "LINEARIZED.md")
    with open(paths["note"], "w") as f:
      f.write(LINEARIZED_NOTE.format(model=model_path, base=paths["theta0"], task=spec.task))
  return paths


def run_finetune(spec: FinetuneSpec) -> Dict[str, Any]:
  """Fine-tunes, exports and returns ``{"task", "best", "paths", ...}``.

  Raises:
    FileExistsError: ``out`` holds another run and ``overwrite`` is false.
    FileNotFoundError: missing task data (the message says how to prepare it) or model.
  """
  if spec.model is not None:
    ck.detect_checkpoint(spec.model)  # a clear error before anything is written
  _prepare_out(spec)
  suite = runner.build_suite(spec.config, spec.cache or spec.out)
  tv, best = _train(spec, suite)
  paths = _export(spec, suite, tv)
  logger.info("fine-tuned %s (%s-%s, seed %d): best val accuracy %.4f; model %s", spec.task,
              spec.finetune, spec.saft, spec.seed, best["accuracy"], paths["model"])
  return {"task": spec.task, "finetune": spec.finetune, "saft": spec.saft, "seed": spec.seed,
          "best": {k: float(v) for k, v in best.items()}, "paths": paths}
