"""A seconds-scale variant of the offline suite for smoke tests (big_vision's `runlocal`).

  saft reproduce --config experiments/configs/offline_runlocal.py --out /tmp/runlocal

Three tasks, 20 steps: checks the whole pipeline end to end, numbers mean nothing.
"""
from saft_jax.experiment.config import replace
from saft_jax.experiment.defaults import offline_config


def get_config():
  return replace(offline_config(), tasks=("digits", "rot90", "parity"), steps=20,
                 eval_every=10, checkpoint_every=10, pretrain_steps=100)
