"""The effective-noise experiment (SPEC §9, seed 003): a preset of :mod:`saft_jax.experiment.sweep`.

Merging success is reported to be a non-monotonic function of the optimizer's
effective noise scale: a larger learning rate, stronger weight decay, a smaller
batch and data augmentation each raise it. This preset changes one knob at a time
around the base config and, for plain AdamW and SAFT-ASAM, fine-tunes two tasks
and measures their weight average's normalized test accuracy, the joint-task loss
``barrier`` on the line between the two task models and the ``midpoint_excess``
(see :func:`saft_jax.experiment.sweep.pair_barrier`). Outputs are the sweep's:
``sweep.json``, ``sweep.md``, ``sweep.png``.
"""
from __future__ import annotations

from saft_jax.experiment import config as config_lib
from saft_jax.experiment import sweep as sweep_lib

KNOBS = {
    "optim.lr": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    "optim.weight_decay": (0.0, 0.1, 0.3, 1.0, 3.0),
    "batch_size": (16, 32, 64, 128),
    "augment": (False, True),
}
ALIASES = {"lr": "optim.lr", "weight_decay": "optim.weight_decay"}


def noise_settings(knobs=None) -> list[dict]:
  """One setting per (knob, value): one knob changed at a time."""
  if knobs is None:
    knobs = dict(KNOBS)
  elif not isinstance(knobs, dict):
    names = [ALIASES.get(k, k) for k in knobs]
    unknown = [k for k, n in zip(knobs, names) if n not in KNOBS]
    if unknown:
      raise ValueError(f"unknown knob(s) {unknown}; known: {sorted(KNOBS)} "
                       f"(aliases {sorted(ALIASES)})")
    knobs = {n: KNOBS[n] for n in names}
  return [{ALIASES.get(k, k): v} for k, values in knobs.items() for v in values]


def noise_sweep(base_config, out_dir: str, *, tasks=("rot90", "flip"), safts=("none", "asam"),
                knobs=None) -> list[dict]:
  """Runs the preset (weight averaging of two tasks, SGD) and writes its reports."""
  if len(tasks) != 2:
    raise ValueError(f"the noise sweep merges exactly two tasks, got {tasks}")
  config = config_lib.replace(base_config, tasks=tuple(tasks), finetunes=("sgd",),
                              safts=tuple(safts), merges=("weight_average",),
                              protocols=("fixed",))
  return sweep_lib.sweep(config, noise_settings(knobs), out_dir, measures=("barrier",),
                         title=f"Effective-noise sweep (tasks {', '.join(tasks)})")
