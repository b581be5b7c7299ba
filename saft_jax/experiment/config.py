"""Configuration of the main job (configs as code, big_vision style).

A config is a plain frozen dataclass. ``experiments/configs/*.py`` files define
``get_config()`` returning one; ``saft reproduce --config FILE`` loads such a
file, ``--suite NAME`` takes a built-in default (:func:`default_config`).
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import typing
from typing import Any, Optional, Sequence

FINETUNES = ("sgd", "ftts", "ftlo")
# Sharpness settings of the main job: "none" (plain AdamW) or a saft_jax.optim transform
# whose returned params are the model (SWA / WA-SAM / MSAM need their own extraction).
SAFTS = ("none", "sam", "asam", "friendly_sam", "gsam", "sagm", "pgn", "ssam_f", "ssam_d",
         "rwp", "looksam", "sam_every_k")
BASIC_MERGES = ("weight_average", "task_arithmetic", "ties")
EXTRA_MERGES = ("dare_ties", "breadcrumbs", "magmax", "consensus", "consensus_ties", "tsv_m",
                "iso_c")
# Merges that use data (saft_jax.experiment.data_merges): one merged model, no λ search.
DATA_MERGES = ("fisher", "regmean", "adamerging")
ALL_MERGES = BASIC_MERGES + EXTRA_MERGES + DATA_MERGES


SCHEDULES = ("cosine", "linear")
TEXT_SUITES = ("text", "glue")
SUITES = ("offline", "clip") + TEXT_SUITES
TEXT_SCORES = ("rank", "exact")
TEXT_VOCABS = ("word", "byte")
TEXT_LEVELS = ("standard", "lexical")  # saft_jax.data.text_offline.LEVELS


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW + warm-up/decay + clip (SPEC §5), and the SAM family's settings.

  ``schedule`` is the learning-rate decay after the linear warm-up: ``"cosine"`` (the
  vision protocol) or ``"linear"`` (decay to 0 at the last step: the NLP protocol).
  """
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
  schedule: str = "cosine"

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """Settings of the text suites (``suite="text"`` or ``"glue"``).

  Attributes:
    d_model, num_layers, num_decoder_layers, num_heads, d_ff, feed_forward_proj,
    tie_word_embeddings: text suite: the T5's sizes (``d_kv = d_model // num_heads``).
    vocab: text suite: ``"word"`` (the grammar's closed word list,
      :class:`saft_jax.models.WordVocab` with span-corruption sentinels; one id per word,
      as T5's SentencePiece vocabulary gives common words) or ``"byte"``
      (:class:`saft_jax.models.ByteVocab`, ByT5's bytes, sentinels spelled out).
    max_input_len: input tokens (longer inputs are truncated, EOS kept).
    max_target_len: target tokens of training targets and label-word candidates.
    pretrain_steps, pretrain_batch_size, pretrain_lr: text suite: the pretext
      pre-training of θ0 (:func:`saft_jax.experiment.text_pretrain.pretrain_text_t5`).
    pretrain_task_share: text suite: share of each pre-training batch that is labelled
      examples of the four tasks drawn apart from their splits (Flan-style multi-task
      pre-training; 0: span corruption only).
    sizes: text suite: (train, val, test) examples per task.
    level: text suite: ``"standard"`` or ``"lexical"`` tasks
      (:func:`saft_jax.data.text_offline.offline_text_suite`).
    t5_checkpoint: glue suite: a Hugging Face T5 directory (e.g. Flan-T5-base).
    tokenizer_dir: glue suite: the tokenizer files (``None``: the checkpoint directory).
    data_dir: glue suite: tensorflow-datasets data directory holding ``glue/*``.
    score: the accuracy that drives the coefficient search, the best checkpoint and the
      tables: ``"exact"`` (the greedy generation is the true label word) or ``"rank"``
      (the true label word has the highest sequence log-probability among the task's
      label words). Both are recorded in ``results.json``.
    compute_dtype: "float32" or "bfloat16" activations of the T5 (params stay float32).
  """
  d_model: int = 64
  num_layers: int = 2
  num_decoder_layers: int = 1
  num_heads: int = 4
  d_ff: int = 256
  feed_forward_proj: str = "gated-gelu"
  tie_word_embeddings: bool = False
  vocab: str = "word"
  max_input_len: int = 32
  max_target_len: int = 8
  pretrain_steps: int = 1000
  pretrain_batch_size: int = 64
  pretrain_lr: float = 1e-3
  pretrain_task_share: float = 0.5
  sizes: tuple = (2000, 100, 200)
  level: str = "lexical"
  t5_checkpoint: Optional[str] = None
  tokenizer_dir: Optional[str] = None
  data_dir: Optional[str] = None
  score: str = "exact"
  compute_dtype: str = "float32"

  def __post_init__(self):
    if self.score not in TEXT_SCORES:
      raise ValueError(f"text.score must be one of {TEXT_SCORES}, got {self.score!r}")
    if self.level not in TEXT_LEVELS:
      raise ValueError(f"text.level must be one of {TEXT_LEVELS}, got {self.level!r}")
    if self.vocab not in TEXT_VOCABS:
      raise ValueError(f"text.vocab must be one of {TEXT_VOCABS}, got {self.vocab!r}")
    if self.compute_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"text.compute_dtype must be float32 or bfloat16, got "
                       f"{self.compute_dtype!r}")
    if (not isinstance(self.sizes, tuple) or len(self.sizes) != 3
        or not all(isinstance(n, int) and n > 0 for n in self.sizes)):
      raise ValueError(f"text.sizes must be three positive ints (train, val, test), got "
                       f"{self.sizes!r}")
    if not 0.0 <= self.pretrain_task_share <= 1.0:
      raise ValueError(f"text.pretrain_task_share must be in [0, 1], got "
                       f"{self.pretrain_task_share!r}")
    if self.max_input_len < 2 or self.max_target_len < 2:
      raise ValueError("text.max_input_len and text.max_target_len must be >= 2")


@dataclasses.dataclass(frozen=True)
class ReproduceConfig:
  """Everything ``saft reproduce`` needs.

  Attributes:
    suite: "offline" (digits tasks, tiny ViT; no downloads), "clip", "text" (four
      grammar text tasks, small byte-level T5; no downloads) or "glue" (a T5 checkpoint on
      GLUE cola/mrpc/rte/sst2); the last two read their settings from ``text``.
    tasks: task names of the suite (``None``: all of them).
    finetunes: fine-tuning methods out of :data:`FINETUNES`.
    safts: sharpness settings out of :data:`SAFTS` ("none" is plain AdamW).
    merges: merge methods (:data:`BASIC_MERGES`, optionally :data:`EXTRA_MERGES` and the
      data-driven :data:`DATA_MERGES`, vision suites only).
    protocols: coefficient-search protocols (see :mod:`saft_jax.experiment.search`).
    seeds: one full grid per seed; reports give mean ± std.
    steps: optimizer steps per fine-tuning run.
    batch_size: global batch size.
    accum_steps: gradient accumulation micro-batches per step.
    eval_every: validation (and best-checkpoint) period in steps.
    checkpoint_every: periodic checkpoint period in steps.
    compute_dtype: "float32" or "bfloat16" (params stay float32); vision suites (the text
      suites use ``text.compute_dtype``).
    mesh_shape: devices along the ``data`` axis (``None``: all devices if there are
      several, divided by ``model_axis``; ``1``: a single device without sharding
      annotations).
    model_axis: devices along a ``model`` mesh axis that the large parameters and their
      optimizer state are split over (FSDP, :mod:`saft_jax.train.fsdp`); the ``data``
      axis gets the remaining devices. ``1``: a data-only mesh, parameters replicated.
      Must divide the device count. Vision and text suites; same numbers up to float
      rounding.
    optim: optimizer settings.
    augment: data augmentation during fine-tuning (offline suite: 1-pixel shifts).
    clip_checkpoint: CLIP suite: path of the open_clip / Hugging Face checkpoint.
    clip_act: CLIP suite: the checkpoint's activation, "gelu" (open_clip-trained weights
      such as laion2b) or "quick_gelu" (OpenAI weights); ``None`` reads it from the
      checkpoint, which a bare open_clip state dict cannot tell (then it is required).
      Overrides what the checkpoint records.
    tokenizer_dir: CLIP suite: the tokenizer source: a directory with Hugging Face CLIP
      tokenizer files (vocab.json + merges.txt), or open_clip's BPE vocabulary
      ``bpe_simple_vocab_16e6.txt.gz`` (the file, or a directory holding it); ``None``: the
      checkpoint directory.
    data_dir: CLIP suite: tensorflow-datasets data directory.
    pretrain_steps: offline suite: steps of the θ0 pretext pre-training.
    eval_batch_size: batch size of evaluation passes.
    async_checkpoint: write orbax checkpoints in a background thread (single-process runs;
      multi-process runs always save synchronously).
    stack_runs: fine-tuning runs (task × seed) of one method and sharpness setting trained
      together in one compiled program (``jax.vmap``): 1 = one at a time, 0 = all of them,
      N = groups of N. Same numbers either way, up to float rounding. Vision suites only
      (the text suites train one run at a time).
    text: settings of the text suites (:class:`TextConfig`).
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
  model_axis: int = 1
  optim: OptimConfig = OptimConfig()
  augment: bool = False
  clip_checkpoint: Optional[str] = None
  clip_act: Optional[str] = None
  tokenizer_dir: Optional[str] = None
  data_dir: Optional[str] = None
  pretrain_steps: int = 0
  eval_batch_size: int = 256
  async_checkpoint: bool = True
  stack_runs: int = 1
  text: TextConfig = TextConfig()

  def __post_init__(self):
    if self.suite not in SUITES:
      raise ValueError(f"unknown suite {self.suite!r}; known: {', '.join(SUITES)}")
    for name, values, known in (("finetunes", self.finetunes, FINETUNES),
                                ("safts", self.safts, SAFTS),
                                ("merges", self.merges, ALL_MERGES)):
      bad = [v for v in values if v not in known]
      if bad or not values:
        raise ValueError(f"{name}: unknown or empty {bad or values}; known: {known}")
    if self.stack_runs < 0:
      raise ValueError(f"stack_runs must be >= 0 (0: all runs together), got {self.stack_runs}")
    if (isinstance(self.model_axis, bool) or not isinstance(self.model_axis, int)
        or self.model_axis < 1):
      raise ValueError(f"model_axis must be a positive int (devices along the mesh's 'model' "
                       f"axis; 1: parameters replicated), got {self.model_axis!r}")
    if self.model_axis > 1 and self.mesh_shape == 1:
      raise ValueError(f"model_axis={self.model_axis} needs a device mesh, but mesh_shape=1 "
                       "runs on a single device without sharding; set mesh_shape=none")
    if self.steps <= 0 or self.batch_size <= 0 or self.accum_steps <= 0:
      raise ValueError("steps, batch_size and accum_steps must be positive")
    if self.batch_size % self.accum_steps:
      raise ValueError(f"batch_size {self.batch_size} is not divisible by "
                       f"accum_steps {self.accum_steps}")
    if self.clip_act not in (None, "gelu", "quick_gelu"):
      raise ValueError(f"clip_act must be none, gelu (open_clip-trained weights such as laion2b) "
                       f"or quick_gelu (OpenAI weights), got {self.clip_act!r}")
    if self.compute_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"compute_dtype must be float32 or bfloat16, got {self.compute_dtype!r}")
    if (not isinstance(self.seeds, tuple) or not self.seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds)):
      raise ValueError(f"seeds must be a non-empty tuple of ints, got {self.seeds!r}")


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


# ----------------------------------------------------------------------------------------
# Overrides: ``key=value`` assignments with dotted keys ("steps", "optim.asam_rho").
# ----------------------------------------------------------------------------------------

_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
_NONES = ("none", "null")


def _is_group(hint) -> bool:
  """Whether a field's type is a nested config dataclass (a group, not a value)."""
  return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def _field_hints(obj) -> dict:
  """Resolved type hints of the fields of a dataclass instance, in field order."""
  hints = typing.get_type_hints(type(obj))
  return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def config_keys(config: ReproduceConfig | OptimConfig | TextConfig) -> list[str]:
  """All settable dotted keys of a config, e.g. ``"steps"``, ``"optim.asam_rho"``,
  ``"text.pretrain_steps"``.

  Args:
    config: a :class:`ReproduceConfig` (or a nested config such as :class:`OptimConfig`).

  Returns:
    The keys in field order; nested dataclass fields are expanded with dots and the
    nested dataclass itself (``"optim"``) is not a key.
  """
  keys = []
  for name, hint in _field_hints(config).items():
    if _is_group(hint):
      keys += [f"{name}.{k}" for k in config_keys(getattr(config, name))]
    else:
      keys.append(name)
  return keys


def _level_names(obj, prefix: str) -> list[str]:
  """The keys of one nesting level as shown in errors (groups as ``"optim.*"``)."""
  return [f"{prefix}{n}.*" if _is_group(h) else f"{prefix}{n}"
          for n, h in _field_hints(obj).items()]


def _unknown_key(config, key: str, obj, prefix: str, part: str) -> ValueError:
  """The error for an unknown ``part`` of ``key`` at the level ``obj`` / ``prefix``."""
  candidates = {n: prefix + n for n in _field_hints(obj)}
  if not prefix:  # top level: a bare nested name ("asam_rho") suggests "optim.asam_rho"
    for full in config_keys(config):
      candidates.setdefault(full.rsplit(".", 1)[-1], full)
  close = difflib.get_close_matches(part, list(candidates), n=1)
  hint = f" did you mean {candidates[close[0]]!r}?" if close else ""
  where = f" in {prefix[:-1]}" if prefix else ""
  return ValueError(f"--set {key}: unknown key {part!r}{where};{hint} valid keys: "
                    f"{', '.join(_level_names(obj, prefix))}")


def _resolve(config, key: str) -> tuple[Any, str, Any]:
  """``(owner, field name, type hint)`` of a dotted key; a clear error otherwise."""
  obj, prefix, parts = config, "", key.split(".")
  for i, part in enumerate(parts):
    hints = _field_hints(obj)
    if part not in hints:
      raise _unknown_key(config, key, obj, prefix, part)
    hint = hints[part]
    last = i == len(parts) - 1
    if _is_group(hint) and last:
      sub = getattr(obj, part)
      raise ValueError(f"--set {key}: {key!r} is a group of settings, not a value; "
                       f"set one of {', '.join(_level_names(sub, prefix + part + '.'))}")
    if not last:
      if not _is_group(hint):
        raise ValueError(f"--set {key}: {prefix + part!r} is a value, not a group of "
                         "settings")
      obj, prefix = getattr(obj, part), prefix + part + "."
  return obj, parts[-1], hint


def _unwrap_optional(hint) -> tuple[Any, bool]:
  """``(X, True)`` for ``Optional[X]``, ``(hint, False)`` otherwise."""
  if typing.get_origin(hint) is typing.Union:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and len(typing.get_args(hint)) == 2:
      return args[0], True
  return hint, False


def _is_tuple(hint) -> bool:
  return hint is tuple or typing.get_origin(hint) is tuple


def _tuple_element_type(owner, name: str, hint) -> type:
  """Element type of a tuple field (bool, int, float, else str).

  ``tuple[T, ...]`` gives ``T``; a bare ``tuple`` follows the first element of the
  field's current value, or of its declared default when that is ``None`` or empty.
  """
  args = [a for a in typing.get_args(hint) if a is not Ellipsis]
  if len(args) == 1 and args[0] in (bool, int, float, str):
    return args[0]
  field = next(f for f in dataclasses.fields(owner) if f.name == name)
  for sample in (getattr(owner, name), field.default):
    if isinstance(sample, tuple) and sample:
      return next((t for t in (bool, int, float) if isinstance(sample[0], t)), str)
  return str


_NAMES = {bool: "a bool (true/false/1/0/yes/no)", int: "an int", float: "a float",
          str: "a str"}


def _parse_scalar(kind: type, text: str):
  """``text`` as ``kind`` (bool, int, float or str); ``ValueError`` otherwise."""
  if kind is bool:
    if text.strip().lower() not in _BOOLS:
      raise ValueError(text)
    return _BOOLS[text.strip().lower()]
  return kind(text)


def parse_value(config: ReproduceConfig, key: str, text: str) -> Any:
  """Converts ``text`` to the declared type of the field ``key`` of ``config``.

  Args:
    config: the config to read field types (and tuple element types) from.
    key: a dotted key out of :func:`config_keys`.
    text: the value as written on a command line. Tuples are comma-separated (their
      elements follow the type of the field's current or default elements: int, float,
      else str); ``Optional`` fields take ``none`` / ``null``; bools take
      true/false/1/0/yes/no (case-insensitive).

  Returns:
    The parsed value.

  Raises:
    ValueError: an unknown key, or text that is not of the field's type; the message
      names the key, the expected type and the text.
  """
  owner, name, hint = _resolve(config, key)
  kind, optional = _unwrap_optional(hint)
  if optional and text.strip().lower() in _NONES:
    return None
  if _is_tuple(kind):
    element = _tuple_element_type(owner, name, kind)
    expected = f"a comma-separated tuple of {element.__name__}s"
  elif kind in _NAMES:
    element, expected = kind, _NAMES[kind]
  else:
    raise ValueError(f"--set {key}: fields of type {hint} cannot be set from text")
  if optional:
    expected += " or none"
  try:
    if not _is_tuple(kind):
      return _parse_scalar(kind, text if kind is str else text.strip())
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or not all(items):
      raise ValueError(text)
    return tuple(_parse_scalar(element, t) for t in items)
  except ValueError:
    raise ValueError(f"--set {key}: expected {expected}, got {text!r}") from None


def set_value(config: ReproduceConfig, key: str, value: Any) -> ReproduceConfig:
  """A copy of ``config`` with the field ``key`` (dotted) set to ``value``.

  The dataclasses' own ``__post_init__`` validation runs on the new config.

  Args:
    config: the config to change (it is not modified).
    key: a dotted key out of :func:`config_keys`.
    value: the new (already parsed) value.

  Returns:
    The new config; ``config`` itself is unchanged.
  """
  _resolve(config, key)
  *groups, name = key.split(".")
  owners = [config]
  for group in groups:
    owners.append(getattr(owners[-1], group))
  new = dataclasses.replace(owners.pop(), **{name: value})
  for group in reversed(groups):
    new = dataclasses.replace(owners.pop(), **{group: new})
  return new


def _split_assignment(assignment: str) -> tuple[str, str]:
  """``"key=value"`` → ``(key, value)``, split at the first ``=``."""
  key, sep, text = assignment.partition("=")
  if not sep or not key.strip():
    raise ValueError(f"--set {assignment!r}: expected key=value")
  return key.strip(), text


def apply_overrides(config: ReproduceConfig, assignments: Sequence[str]) -> ReproduceConfig:
  """Applies ``"key=value"`` assignments in order (see :func:`parse_value`).

  Args:
    config: the config to change (it is not modified).
    assignments: e.g. ``["steps=100", "optim.asam_rho=0.02", "tasks=digits,rot90"]``.

  Returns:
    The new config.
  """
  for assignment in assignments:
    key, text = _split_assignment(assignment)
    config = set_value(config, key, parse_value(config, key, text))
  return config


def parse_sweep_values(config: ReproduceConfig, assignment: str) -> tuple[str, list]:
  """``"key=v1,v2,v3"`` → ``(key, [v1, v2, v3])``, each parsed by :func:`parse_value`.

  Tuple-typed fields separate their values with ``;`` (each value a comma list):
  ``"tasks=digits,rot90;flip,invert"`` → ``("tasks", [("digits", "rot90"),
  ("flip", "invert")])``.

  Raises:
    ValueError: an unknown key, a value that does not parse, an empty value or the same
      value twice.
  """
  key, text = _split_assignment(assignment)
  _, _, hint = _resolve(config, key)
  separator = ";" if _is_tuple(_unwrap_optional(hint)[0]) else ","
  pieces = text.split(separator)
  if not all(p.strip() for p in pieces):
    raise ValueError(f"--set {key}: empty value in sweep {text!r} "
                     f"(values are separated by {separator!r})")
  values = [parse_value(config, key, p) for p in pieces]
  duplicates = [p for i, (p, v) in enumerate(zip(pieces, values)) if v in values[:i]]
  if duplicates:
    raise ValueError(f"--set {key}: duplicate sweep value(s) {duplicates} in {text!r}")
  return key, values
