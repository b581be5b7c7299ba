"""The ``saft`` command: ``reproduce`` (the main job), ``sweep``, ``analyze``, ``noise-sweep``."""
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


def _base_config(args):
  """The config of ``reproduce`` / ``sweep``: suite default or file, then the options."""
  from saft_jax.experiment import config as config_lib
  from saft_jax.experiment import defaults

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
  if args.seeds is not None:
    if args.seeds < 1:
      raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    changes["seeds"] = tuple(range(args.seeds))
  if args.steps is not None:
    changes["steps"] = args.steps
  if args.tasks:
    changes["tasks"] = tuple(args.tasks.split(","))
  return config_lib.replace(config, **changes)


def _reproduce(args) -> int:
  from saft_jax import train
  from saft_jax.experiment import config as config_lib
  from saft_jax.experiment import runner

  train.maybe_initialize_distributed()  # multi-host runs: before any JAX computation
  config = config_lib.apply_overrides(_base_config(args), args.set or [])
  runner.reproduce(config, args.out)
  print(open(os.path.join(args.out, "results.md")).read())
  print(f"results: {os.path.join(args.out, 'results.json')}")
  return 0


def _sweep(args) -> int:
  from saft_jax import train
  from saft_jax.experiment import config as config_lib
  from saft_jax.experiment import sweep

  train.maybe_initialize_distributed()
  base = _base_config(args)
  if not args.set:
    raise ValueError("nothing to sweep: give at least one --set KEY=V1,V2,...")
  axes = [config_lib.parse_sweep_values(base, a) for a in args.set]
  if args.fixed:
    base = config_lib.apply_overrides(base, args.fixed)
  sweep.sweep(base, sweep.grid_settings(axes), args.out, cache_dir=args.cache)
  print(open(os.path.join(args.out, "sweep.md")).read())
  print(f"results: {os.path.join(args.out, 'sweep.json')}")
  return 0


def _add_job_options(p, default_out: str) -> None:
  """The options ``reproduce`` and ``sweep`` share."""
  p.add_argument("--suite", default="offline", choices=("offline", "clip", "text", "glue"),
                 help="built-in suite default (offline, text: no downloads; clip: a CLIP "
                 "checkpoint on 8 image tasks; glue: a T5 checkpoint on GLUE)")
  p.add_argument("--config", help="a Python config file defining get_config()")
  p.add_argument("--out", default=default_out, help="output directory")
  p.add_argument("--all-methods", action="store_true", help="add FTTS and FTLO to SGD")
  p.add_argument("--finetunes", help="comma list out of sgd,ftts,ftlo")
  p.add_argument("--safts", help="comma list out of none,sam,asam and the other SAM-family "
                 "transforms (gsam, looksam, ...)")
  p.add_argument("--merges", help="'all' or a comma list of merge methods")
  p.add_argument("--seeds", type=int, help="number of seeds (0..N-1); mean ± std reported")
  p.add_argument("--steps", type=int, help="fine-tuning steps per task")
  p.add_argument("--tasks", help="comma list of task names")


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
  rep = sub.add_parser("reproduce", help="fine-tune × merge × search × report on a suite",
                       description="example: saft reproduce --set optim.asam_rho=0.05 "
                       "--out runs/rho005")
  _add_job_options(rep, "runs/offline")
  rep.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, dotted for nested ones (optim.asam_rho=0.02, "
                   "steps=100, tasks=digits,rot90, text.pretrain_steps=200); repeatable")
  rep.set_defaults(func=_reproduce)
  swp = sub.add_parser("sweep", help="the main job over config values × seeds, paired with "
                       "plain AdamW", description="example: saft sweep --set "
                       "optim.asam_rho=0.01,0.02,0.05 --seeds 3 --out runs/rho_sweep")
  _add_job_options(swp, "runs/sweep")
  swp.add_argument("--set", action="append", metavar="KEY=V1,V2,...",
                   help="a swept config field and its values (tuple fields: values separated "
                   "by ';'); several --set make a grid")
  swp.add_argument("--fixed", action="append", metavar="KEY=VALUE",
                   help="a config override applied to every setting (not swept); repeatable")
  swp.add_argument("--cache", help="directory of θ0 and fine-tunings shared between sweeps "
                   "(default: --out)")
  swp.set_defaults(func=_sweep)
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
