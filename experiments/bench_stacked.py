"""Fine-tuning every task one run at a time vs stacked into one compiled program.

    python3 experiments/bench_stacked.py                      # SGD and SAFT-ASAM, 8 tasks
    python3 experiments/bench_stacked.py --steps 200 --seeds 3

Both paths are the main job's (`finetune_task` and `finetune_stacked` of
saft_jax.experiment.finetune) on the offline suite's default config, with evaluation and
orbax checkpoints as in `saft reproduce`; wall time includes compilation. Prints seconds
per path, the speed-up, and the largest task-vector difference between the two.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp

from saft_jax.experiment import config as config_lib
from saft_jax.experiment import defaults, runner
from saft_jax.experiment.finetune import finetune_stacked, finetune_task


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--seeds", type=int, default=1)
  p.add_argument("--safts", default="none,asam")
  args = p.parse_args()
  config = config_lib.replace(defaults.offline_config(), steps=args.steps, mesh_shape=1)
  with tempfile.TemporaryDirectory() as d:
    suite = runner.build_suite(config, d)
    members = [(t, s) for s in range(args.seeds) for t in suite.tasks]
    print(f"{len(members)} runs × {args.steps} steps, batch {config.batch_size}, "
          f"devices {jax.devices()}")
    for saft in args.safts.split(","):
      t0 = time.perf_counter()
      one = [finetune_task(suite, t, "sgd", saft, s, config, f"{d}/one-{saft}-{t}-{s}")[0]
             for t, s in members]
      t_one = time.perf_counter() - t0
      t0 = time.perf_counter()
      stacked = [tv for tv, _ in finetune_stacked(suite, members, "sgd", saft, config,
                                                  f"{d}/stacked-{saft}")]
      t_stacked = time.perf_counter() - t0
      diff = max(float(jnp.max(jnp.abs(a - b))) for x, y in zip(one, stacked)
                 for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
      print(f"sgd-{saft}: one at a time {t_one:.1f} s | stacked {t_stacked:.1f} s | "
            f"speed-up {t_one / t_stacked:.2f}× | max |Δτ| {diff:.2e}")


if __name__ == "__main__":
  main()
