"""Every merge of :mod:`saft_jax.merging` by name, with its own validated parameters.

A :class:`Method` names the library function that does the merge and the parameters it
exposes; each parameter's default is read from that function's signature (one source of
truth), and a parameter without a default there is required. ``seed`` stands for the
PRNG ``key`` of the random merges (DARE).

Per-model weights (``weight`` in a merge config, ``--weights``) scale the per-task
coefficient of the methods that have one (``lam`` of task arithmetic, DARE and
Breadcrumbs: ``λ_t = λ · w_t``) and make weight averaging a weighted average
``Σ_t (w_t / Σ w) θ_t``; the other methods refuse them.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Dict, Optional, Sequence

import jax

from saft_jax import merging

_REQUIRED = inspect.Parameter.empty


@dataclasses.dataclass(frozen=True)
class Method:
  """One merge method.

  Attributes:
    name: the name on the command line.
    fn: the :mod:`saft_jax.merging` function.
    params: exposed parameter names (``seed`` -> the function's ``key``).
    summary: one line for ``saft merge --help``.
    needs_base: whether θ0 is needed.
    per_task: the parameter that takes one value per model (scaled by the weights).
    streaming: whether :func:`saft_jax.merging.stream_merge` implements it.
    num_models: the exact number of models, if the method fixes it.
  """
  name: str
  fn: Callable
  params: tuple
  summary: str
  needs_base: bool = True
  per_task: Optional[str] = None
  streaming: bool = False
  num_models: Optional[int] = None

  def defaults(self) -> Dict[str, Any]:
    """``{parameter: default}`` from the function's signature (``_REQUIRED`` if none)."""
    sig = inspect.signature(self.fn).parameters
    out = {}
    for p in self.params:
      out[p] = 0 if p == "seed" else sig[p].default
    return out


def _consensus_ties(pretrained, tvs, lam=1.0, k: int = 2, tall_lambda=0.4, ties_k: float = 0.2,
                    *, keep: str = "exact", trim: str = "global", strict: bool = False,
                    exclude=None):
  """``θ0 + λ · consensus_ties_merged_vector(...)`` (the library builds the direction)."""
  return merging.apply_task_vector(pretrained, merging.consensus_ties_merged_vector(
      tvs, k=k, tall_lambda=tall_lambda, ties_k=ties_k, keep=keep, trim=trim, strict=strict,
      exclude=exclude), lam, exclude=exclude)


_TIES = ("k", "trim", "keep", "disjoint")
METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("weight_average", merging.weight_average, (), "(1/T) Σ θ_t (weights: Σ w_t θ_t / Σ w)",
           needs_base=False, streaming=True),
    Method("task_arithmetic", merging.task_arithmetic, ("lam",), "θ0 + Σ λ_t (θ_t − θ0)",
           per_task="lam", streaming=True),
    Method("ties", merging.ties, ("lam",) + _TIES, "TIES: trim to the top-k fraction, elect "
           "signs, disjoint mean", streaming=True),
    Method("dare", merging.dare_merge, ("lam", "p", "seed"), "DARE drop-and-rescale (rate p) "
           "+ task arithmetic", per_task="lam"),
    Method("dare_ties", merging.dare_ties, ("lam", "p", "seed") + _TIES, "DARE then TIES"),
    Method("breadcrumbs", merging.breadcrumbs_merge,
           ("lam", "drop_top", "drop_bottom", "keep_fraction", "granularity"),
           "Model Breadcrumbs: drop the largest and smallest entries", per_task="lam"),
    Method("consensus", merging.consensus_merge, ("lam", "k", "tall_lambda", "strict"),
           "Consensus (TALL masks) on task arithmetic"),
    Method("consensus_ties", _consensus_ties,
           ("lam", "k", "tall_lambda", "ties_k", "keep", "trim", "strict"),
           "Consensus (TALL masks) on TIES"),
    Method("magmax", merging.magmax, ("lam", "tie"), "MagMax: largest-magnitude entry"),
    Method("model_stock", merging.model_stock, (), "Model Stock: per-layer interpolation "
           "ratio from the angle between task vectors"),
    Method("slerp", merging.slerp, ("t", "dot_threshold"), "spherical interpolation of two "
           "models (no base)", needs_base=False, num_models=2),
    Method("tsv_m", merging.tsv_merge, ("alpha",), "Task Singular Vectors merge"),
    Method("iso_c", merging.iso_c, ("alpha",), "Iso-C: isotropic spectrum of Σ τ_t"),
    Method("iso_cts", merging.iso_cts, ("alpha", "common_space_fraction"),
           "Iso-CTS: common and task-specific subspaces"),
)}


def get_method(name: str) -> Method:
  """The :class:`Method` called ``name``; the error lists the known ones."""
  if name not in METHODS:
    raise ValueError(f"unknown merge method {name!r}; known: {', '.join(METHODS)}")
  return METHODS[name]


def _parse(name: str, default, value, method: str):
  """``value`` (text from the command line, or a YAML scalar/list) in ``default``'s type."""
  kind = type(default) if default not in (_REQUIRED, None) else float
  if name == "seed":
    kind = int
  if isinstance(value, str) and "," in value:
    value = value.split(",")
  if isinstance(value, (list, tuple)):  # one value per model (checked by the caller)
    return tuple(_parse(name, default, v, method) for v in value)
  try:
    if kind is bool:
      text = str(value).strip().lower()
      if text not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(value)
      return text in ("true", "1", "yes")
    if kind is int and isinstance(value, float) and not value.is_integer():
      raise ValueError(value)
    if kind is float and default is None and str(value).strip().lower() in ("none", "null"):
      return None
    return kind(value) if kind is not int else int(float(value))
  except (TypeError, ValueError):
    raise ValueError(f"method {method}: parameter {name!r} expects "
                     f"{'a ' + kind.__name__}, got {value!r}") from None


def resolve_parameters(method: str, given: Dict[str, Any]) -> Dict[str, Any]:
  """Every parameter of ``method``: the given ones parsed, the rest at their defaults.

  Raises:
    ValueError: an unknown method or parameter (the message lists the valid ones), a
      value of the wrong type, or a missing required parameter.
  """
  m = get_method(method)
  defaults = m.defaults()
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    valid = ", ".join(defaults) or "none"
    raise ValueError(f"unknown parameter {unknown[0]!r} for method {method}; valid "
                     f"parameters: {valid}")
  out = {}
  for name, default in defaults.items():
    if name in given:
      out[name] = _parse(name, default, given[name], method)
      if isinstance(out[name], tuple) and name != m.per_task:
        raise ValueError(f"method {method}: parameter {name!r} takes one value (one per model: "
                         f"{', '.join(n for n, x in METHODS.items() if x.per_task)}), got "
                         f"{given[name]!r}")
    elif default is _REQUIRED:
      raise ValueError(f"method {method} needs the parameter {name!r} (e.g. --{name} 0.3)")
    else:
      out[name] = default
  return out


def describe() -> str:
  """One line per method with its parameters and defaults (for ``saft merge --help``)."""
  lines = []
  for m in METHODS.values():
    ps = ", ".join(f"{k}" if v is _REQUIRED else f"{k}={v}" for k, v in m.defaults().items())
    lines.append(f"  {m.name:<16} {m.summary}" + (f" [{ps}]" if ps else ""))
  return "\n".join(lines)


def apply_weights(method: str, params: Dict[str, Any], weights: Optional[Sequence[float]],
                  num_models: int) -> Dict[str, Any]:
  """``params`` with the per-model ``weights`` folded into the per-task coefficient.

  Raises:
    ValueError: weights for a method without a per-task coefficient, or a count that is
      not the number of models.
  """
  m = get_method(method)
  lam = params.get(m.per_task) if m.per_task else None
  if isinstance(lam, tuple) and len(lam) != num_models:
    raise ValueError(f"{m.per_task} has {len(lam)} values for {num_models} models")
  if weights is None:
    return params
  if len(weights) != num_models:
    raise ValueError(f"{len(weights)} weights for {num_models} models")
  if method == "weight_average":
    return params
  if m.per_task is None:
    raise ValueError(f"method {method} does not take per-model weights (those that do: "
                     f"{', '.join(n for n, x in METHODS.items() if x.per_task)}, "
                     "weight_average)")
  lams = lam if isinstance(lam, tuple) else (lam,) * num_models
  return dict(params, **{m.per_task: tuple(float(a) * float(w) for a, w in zip(lams, weights))})


def merge_trees(method: str, base, models: Sequence, params: Dict[str, Any],
                weights: Optional[Sequence[float]] = None, exclude=None):
  """The merged pytree (in memory) of ``models`` around ``base`` (θ0).

  Args:
    method: a name out of :data:`METHODS`.
    base: θ0 (``None`` for the methods that need none).
    models: the fine-tuned pytrees, same structure as ``base``.
    params: resolved parameters (:func:`resolve_parameters`, :func:`apply_weights`).
    weights: per-model weights (only weight averaging reads them here).
    exclude: predicate on leaf paths never merged (they keep θ0's value).
  """
  m = get_method(method)
  if method == "weight_average":
    if weights is None:
      return merging.weight_average(list(models), exclude=exclude)
    # Σ_t (w_t/Σw) θ_t = θ_ref + Σ_t (w_t/Σw)(θ_t − θ_ref), around any reference θ_ref.
    total = float(sum(weights))
    if total == 0:
      raise ValueError("the weights sum to 0")
    ref = base if base is not None else models[0]
    tvs = [merging.task_vector(ref, x, exclude=exclude) for x in models]
    return merging.task_arithmetic(ref, tvs, [w / total for w in weights], exclude=exclude)
  if method == "slerp":
    return m.fn(models[0], models[1], exclude=exclude, **params)
  kwargs = dict(params, exclude=exclude)
  if "seed" in kwargs:
    kwargs["key"] = jax.random.key(kwargs.pop("seed"))
  tvs = [merging.task_vector(base, x, exclude=exclude) for x in models]
  return m.fn(base, tvs, **kwargs)
