"""``saft merge``: merge checkpoints on disk with any method of :mod:`saft_jax.merging`.

The merge acts on the tensors the checkpoints store, under their own key names, and
writes the output in the same format (or another one with ``format``). Weight averaging,
task arithmetic and TIES on safetensors/orbax inputs stream leaf by leaf
(:func:`saft_jax.merging.stream_merge`: memory about one tensor per model); every other
case loads the checkpoints and merges in memory. A JSON summary (method, parameters,
inputs with their SHA-256, mode, seconds, peak memory) is written beside the output as
``<out>.merge.json``.

A merge config (``saft merge --config merge.yaml``), mergekit-like::

  method: ties              # or merge_method
  base: runs/theta0         # or base_model; optional for weight_average and slerp
  models:
    - model: runs/ft_mnist
      weight: 1.0           # optional (also as parameters: {weight: ...})
    - runs/ft_svhn          # a plain path
  parameters: {lam: 1.0, k: 0.2}
  out: runs/merged          # optional; --out wins
  format: hf                # optional: hf, open_clip, safetensors, orbax
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Dict, List, Optional

from saft_jax import merging
from saft_jax.workflow import checkpoints as ck
from saft_jax.workflow import merge_methods as mm
from saft_jax.workflow import progress as progress_lib

logger = logging.getLogger("saft_jax.workflow")

_CONFIG_KEYS = {"method": "method", "merge_method": "method", "base": "base",
                "base_model": "base", "models": "models", "parameters": "parameters",
                "out": "out", "output": "out", "format": "format", "act": "act"}


@dataclasses.dataclass
class MergeSpec:
  """What ``saft merge`` does.

  Attributes:
    method: a name out of :data:`saft_jax.workflow.merge_methods.METHODS`.
    models: the fine-tuned checkpoints.
    out: the output path.
    base: θ0 (optional for weight averaging and SLERP).
    parameters: method parameters as given (text or YAML values).
    weights: per-model weights (``None``: none).
    format: output format (``None``: the inputs' format).
    act: activation of a bare open_clip state dict (only to convert it to another format).
    overwrite: replace an existing output.
    streaming: ``None`` streams when possible; ``False`` forces the in-memory merge.
  """
  method: str
  models: List[str]
  out: str
  base: Optional[str] = None
  parameters: Dict[str, Any] = dataclasses.field(default_factory=dict)
  weights: Optional[List[float]] = None
  format: Optional[str] = None
  act: Optional[str] = None
  overwrite: bool = False
  streaming: Optional[bool] = None


def _model_entry(entry, i: int, path: str):
  """``(path, weight or None)`` of one ``models:`` item of a merge config."""
  if isinstance(entry, str):
    return entry, None
  if not isinstance(entry, dict) or "model" not in entry:
    raise ValueError(f"{path}: models[{i}] must be a path or a mapping with 'model', got "
                     f"{entry!r}")
  bad = sorted(set(entry) - {"model", "weight", "parameters"})
  if bad:
    raise ValueError(f"{path}: models[{i}]: unknown key {bad[0]!r}; valid keys: model, "
                     "weight, parameters")
  extra = entry.get("parameters") or {}
  if set(extra) - {"weight"}:
    raise ValueError(f"{path}: models[{i}].parameters: only 'weight' is a per-model "
                     f"parameter, got {sorted(extra)}")
  weight = entry.get("weight", extra.get("weight"))
  return str(entry["model"]), None if weight is None else float(weight)


def load_merge_config(path: str) -> Dict[str, Any]:
  """The fields of a :class:`MergeSpec` from a YAML merge config (see the module doc).

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a mapping, an unknown key, or a malformed ``models`` list.
  """
  import yaml  # PyYAML: a dependency of transformers, flax and orbax
  if not os.path.isfile(path):
    raise FileNotFoundError(f"merge config not found: {path!r}")
  with open(path) as f:
    raw = yaml.safe_load(f)
  if not isinstance(raw, dict):
    raise ValueError(f"{path}: a merge config is a mapping (method, base, models, ...)")
  bad = sorted(set(raw) - set(_CONFIG_KEYS))
  if bad:
    raise ValueError(f"{path}: unknown key {bad[0]!r}; valid keys: "
                     f"{', '.join(sorted(set(_CONFIG_KEYS)))}")
  fields = {_CONFIG_KEYS[k]: v for k, v in raw.items()}
  models = fields.get("models")
  if not isinstance(models, list) or not models:
    raise ValueError(f"{path}: 'models' must be a non-empty list")
  entries = [_model_entry(e, i, path) for i, e in enumerate(models)]
  fields["models"] = [p for p, _ in entries]
  weights = [w for _, w in entries]
  if any(w is not None for w in weights):
    fields["weights"] = [1.0 if w is None else w for w in weights]
  params = fields.get("parameters") or {}
  if not isinstance(params, dict):
    raise ValueError(f"{path}: 'parameters' must be a mapping")
  fields["parameters"] = params
  return fields


def build_spec(config_path: Optional[str] = None, parameters: Optional[Dict[str, Any]] = None,
               **options) -> MergeSpec:
  """A :class:`MergeSpec` from a merge config (optional) and command-line options.

  Options given (not ``None``) win over the config's fields; ``parameters`` are added to
  the config's ``parameters``.

  Raises:
    ValueError: ``method``, ``models`` or ``out`` given nowhere.
  """
  fields = load_merge_config(config_path) if config_path else {}
  fields.update({k: v for k, v in options.items() if v is not None})
  fields["parameters"] = dict(fields.get("parameters") or {}, **(parameters or {}))
  for name, flag in (("method", "--method"), ("models", "--models"), ("out", "--out")):
    if not fields.get(name):
      raise ValueError(f"{flag} is required (or {name}: in the merge config)")
  return MergeSpec(**fields)


def parse_parameter_options(tokens) -> Dict[str, str]:
  """``["--lam", "0.3", "--k=0.2", "--drop-top", "0.01"]`` -> ``{"lam": "0.3", "k": "0.2",
  "drop_top": "0.01"}`` (method parameters written as options).

  Raises:
    ValueError: a token that is not ``--name value`` / ``--name=value``.
  """
  out, tokens = {}, list(tokens)
  while tokens:
    tok = tokens.pop(0)
    if not tok.startswith("--") or len(tok) < 3:
      raise ValueError(f"unexpected argument {tok!r} (method parameters are --NAME VALUE)")
    name, sep, value = tok[2:].partition("=")
    if not sep:
      if not tokens:
        raise ValueError(f"{tok} needs a value")
      value = tokens.pop(0)
    out[name.replace("-", "_")] = value
  return out


def parse_weights(text: Optional[str]) -> Optional[List[float]]:
  """``"1,0.5,2"`` (``--weights``) -> ``[1.0, 0.5, 2.0]``; ``None`` stays ``None``."""
  if text is None:
    return None
  try:
    return [float(w) for w in text.split(",")]
  except ValueError:
    raise ValueError(f"--weights: expected numbers separated by commas, got {text!r}") from None


def parse_assignments(assignments) -> Dict[str, str]:
  """``["k=0.2", "trim=global"]`` (``--set``) -> ``{"k": "0.2", "trim": "global"}``."""
  out = {}
  for a in assignments or []:
    name, sep, value = a.partition("=")
    if not sep or not name.strip():
      raise ValueError(f"--set {a!r}: expected NAME=VALUE")
    out[name.strip()] = value
  return out


# ----------------------------------------------------------------------------- planning
@dataclasses.dataclass
class _Plan:
  method: mm.Method
  params: Dict[str, Any]
  base: Optional[ck.Checkpoint]
  models: List[ck.Checkpoint]
  out_format: str
  streaming: bool
  reason: str


def _check_inputs(spec: MergeSpec, method: mm.Method):
  """The detected checkpoints; errors for a wrong count, a missing base or mixed formats."""
  if not spec.models:
    raise ValueError("no models to merge (--models M1 M2 ...)")
  if method.num_models and len(spec.models) != method.num_models:
    raise ValueError(f"method {method.name} merges exactly {method.num_models} models, got "
                     f"{len(spec.models)}")
  if method.needs_base and not spec.base:
    raise ValueError(f"method {method.name} needs the pre-trained model: --base PATH")
  base = ck.detect_checkpoint(spec.base) if spec.base else None
  models = [ck.detect_checkpoint(p) for p in spec.models]
  ref = base or models[0]
  for m in models:
    if m.format != ref.format:
      raise ValueError(f"checkpoint {m.path!r} is in the {m.format} format, {ref.path!r} in "
                       f"{ref.format}: merge checkpoints of one format")
  return base, models


def _check_conversion(ref: ck.Checkpoint, out_format: str, act: Optional[str]) -> None:
  """Errors, before any work, for a conversion the inputs cannot support."""
  if out_format == ref.format:
    return
  if out_format in ck.CLIP_FORMATS and ref.format not in ck.CLIP_FORMATS:
    raise ValueError(f"--format {out_format}: {ref.path!r} is a {ref.format} checkpoint, which "
                     "records no CLIP config")
  if ref.format == "open_clip" and not ref.is_dir and act is None:
    raise ValueError(f"--format {out_format}: converting the bare open_clip state dict "
                     f"{ref.path!r} needs its activation: --act gelu or --act quick_gelu")


def _plan(spec: MergeSpec) -> _Plan:
  method = mm.get_method(spec.method)
  params = mm.resolve_parameters(spec.method, spec.parameters)
  base, models = _check_inputs(spec, method)
  params = mm.apply_weights(spec.method, params, spec.weights, len(models))
  ref = base or models[0]
  out_format = spec.format or ref.format
  if ref.format == ck.SHARDED and (out_format != ck.SHARDED or not method.streaming
                                   or spec.streaming is False):
    raise ValueError(f"{ref.path!r} is a sharded Hugging Face checkpoint: it is merged by "
                     "streaming only, into the same sharded layout (methods: "
                     f"{', '.join(m.name for m in mm.METHODS.values() if m.streaming)}; no "
                     "--format, no --no-stream)")
  if out_format not in ck.FORMATS + (ck.SHARDED,):
    raise ValueError(f"unknown output format {out_format!r}; known: {', '.join(ck.FORMATS)}")
  _check_conversion(ref, out_format, spec.act)
  reasons = []
  if not method.streaming:
    reasons.append(f"{method.name} is not streamed")
  if spec.streaming is False:
    reasons.append("streaming turned off")
  if out_format != ref.format:
    reasons.append(f"conversion {ref.format} -> {out_format}")
  not_st = [c.path for c in ([base] if base else []) + models if not c.streamable]
  if not_st:
    reasons.append(f"{not_st[0]!r} is not safetensors/orbax")
  if not not_st:  # metadata only: mismatches named before any tensor is read
    ck.check_same_layout(ck.read_layout(ref), [ck.read_layout(c) for c in models if c is not ref],
                         [c.path for c in models if c is not ref], ref.path)
  streaming = not reasons
  reason = ("leaf by leaf, memory about one tensor per model" if streaming
            else "in memory: " + "; ".join(reasons))
  return _Plan(method, params, base, models, out_format, streaming, reason)


def summary_path(out: str) -> str:
  """``<out without its file suffix>.merge.json``, beside the output."""
  out = out.rstrip("/\\")
  stem, ext = os.path.splitext(out)
  return (stem if ext in (".safetensors", ".pt", ".pth", ".bin") else out) + ".merge.json"


# ----------------------------------------------------------------------------- running
def _stream(plan: _Plan, out: str, weights) -> Dict[str, Any]:
  """The merge through :func:`saft_jax.merging.stream_merge` (safetensors/orbax tensors)."""
  ref = plan.base or plan.models[0]
  method, kwargs = plan.method.name, dict(plan.params)
  if method == "weight_average" and weights is not None:
    method, kwargs = "task_arithmetic", {"lam": [w / float(sum(weights)) for w in weights]}
  passes = 2 if method == "ties" else 1  # full reads of every input (an estimate for TIES)
  total = passes * sum(ck.size_bytes(c) for c in [ref] + plan.models)
  progress = progress_lib.ByteProgress(f"merge ({method}, streaming)", total)
  target = ck.weights_path(ref, out)
  if ref.is_dir and ref.format not in ("orbax", ck.SHARDED):  # sharded: stream_merge copies
    ck.copy_side_files(ref, out)
  with progress_lib.watch_reads(progress):
    stats = merging.stream_merge(ref.weights, [m.weights for m in plan.models], target,
                                 method, exclude=ck.buffer_filter(ref), **kwargs)
  return stats


def _in_memory(plan: _Plan, spec: MergeSpec) -> None:
  """Loads every checkpoint, merges with :func:`merge_methods.merge_trees`, writes."""
  ref = plan.base or plan.models[0]
  inputs = ([plan.base] if plan.base else []) + plan.models
  progress = progress_lib.ByteProgress("merge (reading checkpoints)",
                                       sum(ck.size_bytes(c) for c in inputs), every=0.0)
  trees, done = [], 0
  for c in inputs:
    trees.append(ck.read_tensors(c))
    done += ck.size_bytes(c)
    progress.update(done)
  layouts = [ck.layout_of(t) for t in trees]
  base_tree = trees[0] if plan.base else None
  models = trees[1:] if plan.base else trees
  ref_layout = layouts[0]
  ck.check_same_layout(ref_layout, layouts[1:], [c.path for c in inputs[1:]], ref.path)
  t0 = time.time()
  merged = mm.merge_trees(plan.method.name, base_tree, models, plan.params, spec.weights,
                          exclude=ck.buffer_filter(ref))
  logger.info("merged %d models with %s in %.1fs", len(models), plan.method.name,
              time.time() - t0)
  import jax
  import numpy as np
  merged = jax.tree.map(np.asarray, merged)
  if plan.out_format == ref.format:
    ck.write_tensors(merged, ref, spec.out)
    return
  if ref.format in ck.CLIP_FORMATS:
    cfg = ck.clip_config(ref, spec.act, tensors=trees[0])
    params = ck.to_clip_params(merged, ref, cfg)
    ck.write_params(params, spec.out, plan.out_format, cfg, template=ref)
  else:
    ck.write_params(merged if ref.format == "orbax" else ck.unflatten(merged), spec.out,
                    plan.out_format)


def run_merge(spec: MergeSpec) -> Dict[str, Any]:
  """Merges ``spec.models`` into ``spec.out`` and writes the JSON summary beside it.

  Returns:
    The summary (also written to :func:`summary_path`).

  Raises:
    FileExistsError: the output (or its summary) exists and ``overwrite`` is false.
    FileNotFoundError: an input does not exist.
    ValueError: an unknown method, parameter or format, or checkpoints that do not match
      (the message names the leaf).
  """
  t0 = time.time()
  plan = _plan(spec)
  summary_file = summary_path(spec.out)
  ck.output_exists(spec.out, spec.overwrite)
  ck.output_exists(summary_file, spec.overwrite)
  logger.info("merge %s of %d models: %s", plan.method.name, len(plan.models), plan.reason)
  stats = None
  try:
    if plan.streaming:
      stats = _stream(plan, spec.out, spec.weights)
    else:
      _in_memory(plan, spec)
  except BaseException:
    if os.path.exists(spec.out):  # a partial output of this run (none existed before)
      ck.output_exists(spec.out, overwrite=True)
    raise
  summary = {
      "method": plan.method.name, "parameters": _jsonable(plan.params),
      "weights": spec.weights,
      "base": _describe(plan.base), "models": [_describe(m) for m in plan.models],
      "output": {"path": spec.out, "format": plan.out_format},
      "mode": "streaming" if plan.streaming else "in-memory", "mode_reason": plan.reason,
      "seconds": round(time.time() - t0, 3),
      "peak_memory_mib": round(progress_lib.peak_memory_mib(), 1),
  }
  if stats:
    summary["stream_stats"] = {k: v for k, v in stats.items() if k != "seconds"}
  with open(summary_file, "w") as f:
    json.dump(summary, f, indent=1)
  logger.info("wrote %s (%s, %.1fs); summary %s", spec.out, summary["mode"],
              summary["seconds"], summary_file)
  return summary


def _describe(c: Optional[ck.Checkpoint]) -> Optional[Dict[str, str]]:
  if c is None:
    return None
  return {"path": c.path, "format": c.format, "sha256": ck.sha256(c)}


def _jsonable(params: Dict[str, Any]) -> Dict[str, Any]:
  return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
