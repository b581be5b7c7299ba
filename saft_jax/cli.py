"""The ``saft`` command: ``saft reproduce`` (the main job) and ``saft analyze``."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys


def _setup_logging(verbose: bool) -> None:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                      stream=sys.stdout)
  for noisy in ("absl", "orbax", "jax._src", "etils", "tensorflow"):
    logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _reproduce(args) -> int:
  from saft_jax import train
  from saft_jax.experiment import config as config_lib
  from saft_jax.experiment import defaults, runner

  train.maybe_initialize_distributed()  # multi-host runs: before any JAX computation

  config = (config_lib.load_config_file(args.config) if args.config
            else defaults.default_config(args.suite))
  changes = {}
  if args.all_methods:
    changes["finetunes"] = config_lib.FINETUNES
  if args.finetunes:
    changes["finetunes"] = tuple(args.finetunes.split(","))
  if args.safts:
    changes["safts"] = tuple(args.safts.split(","))
  if args.merges == "all":
    changes["merges"] = config_lib.BASIC_MERGES + config_lib.EXTRA_MERGES
  elif args.merges:
    changes["merges"] = tuple(args.merges.split(","))
  if args.seeds:
    changes["seeds"] = tuple(range(args.seeds))
  if args.steps:
    changes["steps"] = args.steps
  if args.tasks:
    changes["tasks"] = tuple(args.tasks.split(","))
  config = config_lib.replace(config, **changes)
  runner.reproduce(config, args.out)
  print(open(os.path.join(args.out, "results.md")).read())
  print(f"results: {os.path.join(args.out, 'results.json')}")
  return 0


def _analyze(args) -> int:
  from saft_jax.experiment import analyze

  analyze.analyze_run(args.run_dir, out_dir=args.out, resolution=args.resolution,
                      hessian_iters=args.hessian_iters)
  return 0


def _noise_sweep(args) -> int:
  from saft_jax.experiment import defaults, noise_sweep

  config = defaults.default_config("offline")
  if args.steps:
    config = dataclasses.replace(config, steps=args.steps)
  knobs = args.knobs.split(",") if args.knobs else None
  noise_sweep.noise_sweep(config, args.out, tasks=tuple(args.tasks.split(",")), knobs=knobs)
  print(open(os.path.join(args.out, "sweep.md")).read())
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="saft", description=__doc__)
  parser.add_argument("-v", "--verbose", action="store_true", help="library log lines too")
  sub = parser.add_subparsers(dest="command", required=True)
  rep = sub.add_parser("reproduce", help="fine-tune × merge × search × report on a suite")
  rep.add_argument("--suite", default="offline", choices=("offline", "clip"),
                   help="built-in suite default (offline: no downloads)")
  rep.add_argument("--config", help="a Python config file defining get_config()")
  rep.add_argument("--out", default="runs/offline", help="run directory")
  rep.add_argument("--all-methods", action="store_true", help="add FTTS and FTLO to SGD")
  rep.add_argument("--finetunes", help="comma list out of sgd,ftts,ftlo")
  rep.add_argument("--safts", help="comma list out of none,sam,asam and the other SAM-family "
                   "transforms (gsam, looksam, ...)")
  rep.add_argument("--merges", help="'all' or a comma list of merge methods")
  rep.add_argument("--seeds", type=int, help="number of seeds (0..N-1); mean ± std reported")
  rep.add_argument("--steps", type=int, help="fine-tuning steps per task")
  rep.add_argument("--tasks", help="comma list of task names")
  rep.set_defaults(func=_reproduce)
  ana = sub.add_parser("analyze", help="disentanglement, CTL, joint loss, sharpness plots")
  ana.add_argument("run_dir", help="a run directory of `saft reproduce`")
  ana.add_argument("--out", help="output directory (default RUN_DIR/analysis)")
  ana.add_argument("--resolution", type=int, default=21, help="grid points per axis")
  ana.add_argument("--hessian-iters", type=int, default=20, help="Lanczos iterations")
  ana.set_defaults(func=_analyze)
  sw = sub.add_parser("noise-sweep", help="effective-noise sweep on the offline suite (SPEC §9)")
  sw.add_argument("--out", default="runs/noise_sweep", help="output directory")
  sw.add_argument("--tasks", default="rot90,flip", help="the two tasks to merge")
  sw.add_argument("--knobs", help="comma list out of lr,weight_decay,batch_size,augment")
  sw.add_argument("--steps", type=int, help="fine-tuning steps per task")
  sw.set_defaults(func=_noise_sweep)
  args = parser.parse_args(argv)
  _setup_logging(args.verbose)
  try:
    return args.func(args)
  except (ValueError, TypeError, FileNotFoundError) as e:
    print(f"saft {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
