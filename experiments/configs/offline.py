"""The offline digits suite (the default of `saft reproduce`), as a config file.

  saft reproduce --config experiments/configs/offline.py --out runs/offline

Produces runs/offline/results.{json,md}: SGD and SAFT-ASAM on the 8 digits tasks,
merged by weight averaging, task arithmetic and TIES under the three search
protocols. Add `--all-methods` for FTTS and FTLO, `--seeds 3` for mean ± std.
"""
from saft_jax.experiment.defaults import offline_config


def get_config():
  return offline_config()
