"""The offline digits suite (the default of `saft reproduce`), as a config file.

  saft reproduce --config experiments/configs/offline.py --out runs/offline

Produces runs/offline/results.{json,md} and meta.json: SGD and SAFT-ASAM on the 8 digits
tasks, merged by weight averaging, task arithmetic and TIES under the three search
protocols. Add `--all-methods` for FTTS and FTLO, `--seeds 3` for mean ± std.

The faithful regime, decided before looking at merged accuracy (README, "The offline
suite"); meta.json["regime"] records the measured quantities:
- ASAM radius per coordinate ρ/√d equal to CLIP ViT-B/32's at the paper's ρ = 0.5:
  ρ = 0.5·√(205,696 / 87,849,216) = 0.0242 → 0.024 (`regime.dimension_matched_rho`);
- learning rate: the smallest of {1e-4, 3e-4, 1e-3, 3e-3} whose fine-tuned models come
  within one point of the best rate's mean validation accuracy (measured: 0.881, 0.932,
  0.964, 0.971 → 1e-3), the analogue of the paper's conservative 1e-5;
- batch 32 (a smaller fraction of each task's training set, closer to the paper's) and
  200 steps; the task × seed runs of one setting are trained as one program.
"""
from saft_jax.experiment.defaults import offline_config


def get_config():
  return offline_config()
