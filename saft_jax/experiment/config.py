"""Configuration of the main job (configs as code, big_vision style).

A config is a plain frozen dataclass. ``experiments/configs/*.py`` files define
``get_config()`` returning one; ``saft reproduce --config FILE`` loads such a
file, ``--suite NAME`` takes a built-in default (:func:`default_config`).
"""
from __future__ import annotations

import dataclasses
import importlib.util
from typing import Optional

FINETUNES = ("sgd", "ftts", "ftlo")
# Sharpness settings of the main job: "none" (plain AdamW) or a saft_jax.optim transform
# whose returned params are the model (SWA / WA-SAM / MSAM need their own extraction).
SAFTS = ("none", "sam", "asam", "friendly_sam", "gsam", "sagm", "pgn", "ssam_f", "ssam_d",
         "rwp", "looksam", "sam_every_k")
BASIC_MERGES = ("weight_average", "task_arithmetic", "ties")
EXTRA_MERGES = ("dare_ties", "breadcrumbs", "magmax", "consensus", "tsv_m", "iso_c")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW + warm-up/cosine + clip (SPEC §5), and the SAM family's settings."""
  lr: float = 1e-5
  weight_decay: float = 0.1
  warmup_steps: int = 500
  clip_norm: float = 1.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  sam_rho: float = 0.05
  asam_rho: float = 0.5
  asam_eta: float = 0.01


@dataclasses.dataclass(frozen=True)
class ReproduceConfig:
  """Everything ``saft reproduce`` needs.

  Attributes:
    suite: "offline" (digits tasks, tiny ViT; no downloads) or "clip".
    tasks: task names of the suite (``None``: all of them).
    finetunes: fine-tuning methods out of :data:`FINETUNES`.
    safts: sharpness settings out of :data:`SAFTS` ("none" is plain AdamW).
    merges: merge methods (:data:`BASIC_MERGES`, optionally :data:`EXTRA_MERGES`).
    protocols: coefficient-search protocols (see :mod:`saft_jax.experiment.search`).
    seeds: one full grid per seed; reports give mean ± std.
    steps: optimizer steps per fine-tuning run.
    batch_size: global batch size.
    accum_steps: gradient accumulation micro-batches per step.
    eval_every: validation (and best-checkpoint) period in steps.
    checkpoint_every: periodic checkpoint period in steps.
    compute_dtype: "float32" or "bfloat16" (params stay float32).
    mesh_shape: devices along the ``data`` axis (``None``: all devices if there are
      several; ``1``: a single device without sharding annotations).
    optim: optimizer settings.
    augment: data augmentation during fine-tuning (offline suite: 1-pixel shifts).
    clip_checkpoint: CLIP suite: path of the open_clip / Hugging Face checkpoint.
    tokenizer_dir: CLIP suite: local directory with the CLIP tokenizer files.
    data_dir: CLIP suite: tensorflow-datasets data directory.
    pretrain_steps: offline suite: steps of the θ0 pretext pre-training.
    eval_batch_size: batch size of evaluation passes.
    async_checkpoint: write orbax checkpoints in a background thread.
  """
  suite: str = "offline"
  tasks: Optional[tuple] = None
  finetunes: tuple = ("sgd",)
  safts: tuple = ("none", "asam")
  merges: tuple = BASIC_MERGES
  protocols: tuple = ("single", "per_task", "fixed")
  seeds: tuple = (0,)
  steps: int = 8000
  batch_size: int = 128
  accum_steps: int = 1
  eval_every: int = 500
  checkpoint_every: int = 500
  compute_dtype: str = "float32"
  mesh_shape: Optional[int] = None
  optim: OptimConfig = OptimConfig()
  augment: bool = False
  clip_checkpoint: Optional[str] = None
  tokenizer_dir: Optional[str] = None
  data_dir: Optional[str] = None
  pretrain_steps: int = 0
  eval_batch_size: int = 256
  async_checkpoint: bool = True

  def __post_init__(self):
    for name, values, known in (("finetunes", self.finetunes, FINETUNES),
                                ("safts", self.safts, SAFTS),
                                ("merges", self.merges, BASIC_MERGES + EXTRA_MERGES)):
      bad = [v for v in values if v not in known]
      if bad or not values:
        raise ValueError(f"{name}: unknown or empty {bad or values}; known: {known}")
    if self.steps <= 0 or self.batch_size <= 0 or self.accum_steps <= 0:
      raise ValueError("steps, batch_size and accum_steps must be positive")
    if self.batch_size % self.accum_steps:
      raise ValueError(f"batch_size {self.batch_size} is not divisible by "
                       f"accum_steps {self.accum_steps}")
    if self.compute_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"compute_dtype must be float32 or bfloat16, got {self.compute_dtype!r}")


def replace(config: ReproduceConfig, **changes) -> ReproduceConfig:
  """``dataclasses.replace`` that also accepts ``optim_<field>`` keys."""
  optim = {k[len("optim_"):]: v for k, v in changes.items() if k.startswith("optim_")}
  rest = {k: v for k, v in changes.items() if not k.startswith("optim_")}
  if optim:
    rest["optim"] = dataclasses.replace(config.optim, **optim)
  return dataclasses.replace(config, **rest)


def load_config_file(path: str) -> ReproduceConfig:
  """Imports a Python config file and calls its ``get_config()``."""
  spec = importlib.util.spec_from_file_location("saft_config", path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"config file not found: {path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path} defines no get_config()")
  config = module.get_config()
  if not isinstance(config, ReproduceConfig):
    raise TypeError(f"{path}: get_config() returned {type(config).__name__}, "
                    "expected saft_jax.experiment.config.ReproduceConfig")
  return config
