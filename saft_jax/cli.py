"""The ``saft`` command: ``reproduce`` (the main job), ``sweep``, ``finetune``, ``merge``,
``eval``, ``analyze``, ``noise-sweep``."""
from __future__ import annotations

import argparse
import dataclasses
import json
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
    changes["merges"] = config_lib.ALL_MERGES
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


def _finetune(args) -> int:
  from saft_jax import train
  from saft_jax.workflow import finetune_cmd

  train.maybe_initialize_distributed()
  spec = finetune_cmd.build_spec(model=args.model, task=args.task, finetune=args.finetune,
                                 saft=args.saft, seed=args.seed, steps=args.steps,
                                 config_file=args.config, overrides=args.set or [],
                                 out=args.out, cache=args.cache, overwrite=args.overwrite)
  result = finetune_cmd.run_finetune(spec)
  print(json.dumps(result, indent=1))
  return 0


def _merge(args) -> int:
  from saft_jax.workflow import merge_cmd

  params = dict(merge_cmd.parse_assignments(args.set),
                **merge_cmd.parse_parameter_options(args.extra))
  weights = merge_cmd.parse_weights(args.weights)
  spec = merge_cmd.build_spec(args.config, params, method=args.method, base=args.base,
                              models=args.models, out=args.out, format=args.format,
                              weights=weights, act=args.act,
                              overwrite=args.overwrite or None,
                              streaming=False if args.no_stream else None)
  summary = merge_cmd.run_merge(spec)
  print(f"merged ({summary['mode']}, {summary['seconds']:.1f}s): {spec.out}")
  print(f"summary: {merge_cmd.summary_path(spec.out)}")
  return 0


def _eval(args) -> int:
  from saft_jax.workflow import eval_cmd

  spec = eval_cmd.build_spec(model=args.model, base=args.base, linearized=args.linearized,
                             tasks=args.tasks, out=args.out, config_file=args.config,
                             overrides=args.set or [], cache=args.cache,
                             overwrite=args.overwrite)
  result = eval_cmd.run_eval(spec)
  print(eval_cmd.markdown(result))
  print(f"results: {args.out}")
  return 0


_EXAMPLES = """commands, one example each:
  saft reproduce --set optim.asam_rho=0.05 --out runs/rho005
  saft sweep --set optim.asam_rho=0.01,0.02,0.05 --seeds 3 --out runs/rho_sweep
  saft finetune --task digits --saft asam --out runs/ft_digits
  saft merge --base B --models M1 M2 M3 --method task_arithmetic --lam 0.3 --out runs/merged
  saft eval --model runs/ft_digits/model.safetensors --tasks digits --out runs/eval.json
  saft analyze runs/offline
  saft noise-sweep --tasks rot90,flip --out runs/noise_sweep
"""


def _add_finetune(sub) -> None:
  from saft_jax.experiment.config import FINETUNES
  ft = sub.add_parser(
      "finetune", help="fine-tune one model on one task (SAFT or plain AdamW)",
      description="example: saft finetune --model checkpoints/ViT-B-32 --task eurosat "
      "--saft asam --out runs/ft_eurosat  (no --model: the offline suite's θ0, as reproduce "
      "builds it)")
  ft.add_argument("--model", help="a CLIP checkpoint (Hugging Face directory, open_clip "
                  "directory or state dict); omit it for the offline suite's tasks")
  ft.add_argument("--task", "--tasks", dest="task", required=True, help="the task to train on")
  ft.add_argument("--finetune", default="sgd", choices=FINETUNES,
                  help="sgd (all parameters), ftts (linearized), ftlo (attention only)")
  ft.add_argument("--saft", default="asam", help="none (plain AdamW), sam, asam or another "
                  "SAM-family transform (default: asam)")
  ft.add_argument("--seed", type=int, default=0, help="seed of the data order (default 0)")
  ft.add_argument("--steps", type=int, help="fine-tuning steps")
  ft.add_argument("--config", help="a Python config file defining get_config()")
  ft.add_argument("--set", action="append", metavar="KEY=VALUE",
                  help="override a config field (optim.lr=1e-5, batch_size=64, data_dir=..., "
                  "clip_act=gelu); repeatable")
  ft.add_argument("--out", required=True, help="output directory (a killed run resumes there)")
  ft.add_argument("--cache", help="offline suite: directory of θ0 and the heads (default: "
                  "--out; a reproduce run directory works)")
  ft.add_argument("--overwrite", action="store_true", help="replace another run in --out")
  ft.set_defaults(func=_finetune)


def _add_merge(sub) -> None:
  from saft_jax.workflow import checkpoints, merge_methods
  mer = sub.add_parser(
      "merge", help="merge checkpoints on disk with any merge method", allow_abbrev=False,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      description="example: saft merge --base B --models M1 M2 M3 --method ties --k 0.2 "
      "--out merged  (or: saft merge --config merge.yaml)",
      epilog="methods [parameters, defaults; give them as --NAME VALUE or --set NAME=VALUE]:\n"
      + merge_methods.describe())
  mer.add_argument("--config", help="a YAML merge config (method, base, models with optional "
                   "weight, parameters, out, format)")
  mer.add_argument("--base", help="the pre-trained model θ0")
  mer.add_argument("--models", nargs="+", help="the fine-tuned models")
  mer.add_argument("--method", help="a merge method (see below)")
  mer.add_argument("--weights", help="comma list, one weight per model")
  mer.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="a method parameter; repeatable")
  mer.add_argument("--out", help="output path")
  mer.add_argument("--format", choices=checkpoints.FORMATS,
                   help="output format (default: the inputs')")
  mer.add_argument("--act", choices=("gelu", "quick_gelu"),
                   help="activation of a bare open_clip state dict (to convert it)")
  mer.add_argument("--no-stream", action="store_true", help="merge in memory")
  mer.add_argument("--overwrite", action="store_true", help="replace an existing output")
  mer.set_defaults(func=_merge, takes_extra=True)


def _add_eval(sub) -> None:
  ev = sub.add_parser(
      "eval", help="test accuracy of a model on tasks (JSON + markdown)",
      description="example: saft eval --model runs/merged --tasks eurosat,svhn --out "
      "runs/merged.json")
  ev.add_argument("--model", required=True, help="the model to evaluate")
  ev.add_argument("--base", help="θ0: the linearization point with --linearized; for CLIP, "
                  "the zero-shot heads come from its text tower")
  ev.add_argument("--linearized", action="store_true",
                  help="evaluate f(x; θ0) + J·(θ − θ0) (models fine-tuned with ftts)")
  ev.add_argument("--tasks", required=True, help="comma list of task names")
  ev.add_argument("--out", required=True, help="results JSON (the markdown goes beside it)")
  ev.add_argument("--config", help="a Python config file defining get_config()")
  ev.add_argument("--set", action="append", metavar="KEY=VALUE",
                  help="override a config field (eval_batch_size=64, data_dir=...); repeatable")
  ev.add_argument("--cache", help="offline suite: directory of θ0 and the heads (default: the "
                  "model's directory when it holds them)")
  ev.add_argument("--overwrite", action="store_true", help="replace existing results")
  ev.set_defaults(func=_eval)


def main(argv=None) -> int:
  # Logging first: building the merge options imports JAX, whose import installs a root
  # log handler that would make logging.basicConfig a no-op.
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("-v", "--verbose", action="store_true")
  _setup_logging(pre.parse_known_args(argv)[0].verbose)
  parser = argparse.ArgumentParser(prog="saft", description=__doc__, epilog=_EXAMPLES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
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
  _add_finetune(sub)
  _add_merge(sub)
  _add_eval(sub)
  args, extra = parser.parse_known_args(argv)
  if extra and not getattr(args, "takes_extra", False):
    print(f"saft {args.command}: error: unrecognized arguments: {' '.join(extra)}",
          file=sys.stderr)
    return 2
  args.extra = extra
  try:
    return args.func(args)
  except (ValueError, TypeError, FileNotFoundError, FileExistsError) as e:
    print(f"saft {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
