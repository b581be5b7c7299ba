"""Coefficient search for merges on validation data, under the paper's protocols.

A merge *candidate* is a λ-independent direction ``D`` (e.g. TIES at one ``k``);
the merged model is ``θ0 + λ D``. Validation accuracy is computed for every
candidate, every ``λ`` of the grid and every task in one array
``val[c, l, t]``; the protocols then only pick indices:

* ``single`` — one ``(candidate, λ)`` for all tasks, the one with the highest
  mean *normalized* validation accuracy (tangent-space protocol; ``λ`` from 21
  points in [0, 1]).
* ``per_task`` — for each target task its own ``(candidate, λ)`` with
  ``λ ∈ {0.1, 0.3, 0.5, 0.7, 0.9, 1.0}`` maximizing that task's validation
  accuracy (the SAFT reference code's protocol).
* ``fixed`` — no search: ``λ = 0.3`` and the method's default hyper-parameters
  (where SPEC §8 says SAFT's gain is largest).

Ties in the argmax go to the first candidate / smallest ``λ``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

SINGLE_LAMBDAS = tuple(float(x) for x in np.round(np.linspace(0.0, 1.0, 21), 4))
PER_TASK_LAMBDAS = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
FIXED_LAMBDA = 0.3
PROTOCOLS = ("single", "per_task", "fixed")


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One λ-independent merge direction and the λ values it may use."""
  hparams: dict           # e.g. {"k": 0.2}; {} for task arithmetic
  direction: Any          # pytree D
  lams: tuple             # λ grid for this candidate
  default: bool = False   # used by the ``fixed`` protocol


@dataclasses.dataclass(frozen=True)
class Choice:
  protocol: str
  task: str
  candidate: int
  lam: float


def _lam_index(lams: Sequence[float], lam: float) -> int:
  for i, x in enumerate(lams):
    if abs(x - lam) < 1e-6:
      return i
  raise ValueError(f"λ={lam} is not in the candidate's grid {tuple(lams)}")


def choose(val: list[np.ndarray], candidates: Sequence[Candidate],
           ft_val: np.ndarray, tasks: Sequence[str],
           protocols: Sequence[str] = PROTOCOLS) -> list[Choice]:
  """Picks coefficients from validation accuracies.

  Args:
    val: per candidate, an array ``[len(candidate.lams), T]`` of accuracies.
    candidates: the candidates, in the same order.
    ft_val: ``[T]`` validation accuracy of each task's own fine-tuned model
      (the denominator of normalized accuracy).
    tasks: task names, in the column order of ``val``.
    protocols: which of :data:`PROTOCOLS` to run.
  """
  unknown = set(protocols) - set(PROTOCOLS)
  if unknown:
    raise ValueError(f"unknown protocol(s) {sorted(unknown)}; known: {PROTOCOLS}")
  if len(val) != len(candidates) or not candidates:
    raise ValueError("need one validation array per candidate, and at least one")
  ft_val = np.maximum(np.asarray(ft_val, np.float64), 1e-12)
  out = []
  if "single" in protocols:
    best = None
    for c, (v, cand) in enumerate(zip(val, candidates)):
      score = np.mean(v / ft_val[None, :], axis=1)
      l = int(np.argmax(score))
      if best is None or score[l] > best[0] + 1e-12:
        best = (score[l], c, cand.lams[l])
    out += [Choice("single", t, best[1], best[2]) for t in tasks]
  if "per_task" in protocols:
    for ti, t in enumerate(tasks):
      best = None
      for c, (v, cand) in enumerate(zip(val, candidates)):
        allowed = [l for l in PER_TASK_LAMBDAS if any(abs(l - x) < 1e-6 for x in cand.lams)]
        if not allowed:   # e.g. weight averaging: its single fixed λ
          allowed = list(cand.lams)
        for lam in allowed:
          a = v[_lam_index(cand.lams, lam), ti]
          if best is None or a > best[0] + 1e-12:
            best = (a, c, lam)
      out.append(Choice("per_task", t, best[1], best[2]))
  if "fixed" in protocols:
    c = next((i for i, cand in enumerate(candidates) if cand.default), 0)
    lams = candidates[c].lams
    lam = FIXED_LAMBDA if any(abs(FIXED_LAMBDA - x) < 1e-6 for x in lams) else lams[0]
    out += [Choice("fixed", t, c, lam) for t in tasks]
  return out


def search(candidates: Sequence[Candidate], tasks: Sequence[str],
           accuracy: Callable[[Any, Sequence[float], str, str], np.ndarray],
           ft_val: np.ndarray, ft_test: np.ndarray,
           protocols: Sequence[str] = PROTOCOLS) -> list[dict]:
  """Runs the search and evaluates the chosen merges on the test split.

  Args:
    candidates: merge directions to search over.
    tasks: task names.
    accuracy: ``accuracy(direction, lams, task, split) -> [len(lams)]`` accuracy
      of ``θ0 + λ·direction`` on ``task``'s ``split`` ("val" or "test").
    ft_val, ft_test: ``[T]`` accuracies of the task's own fine-tuned model.

  Returns:
    One record per (protocol, task) with ``abs_acc``, ``norm_acc``, ``ft_acc``,
    ``lam``, the candidate's hyper-parameters, the validation accuracy ``val_acc`` and
    ``norm_val_acc`` (divided by the task model's validation accuracy).
  """
  val = [np.stack([accuracy(c.direction, c.lams, t, "val") for t in tasks], axis=1)
         for c in candidates]
  choices = choose(val, candidates, ft_val, tasks, protocols)
  # Evaluate on test only the (candidate, λ) pairs some protocol chose.
  wanted: dict[tuple[int, str], set] = {}
  for ch in choices:
    wanted.setdefault((ch.candidate, ch.task), set()).add(ch.lam)
  test = {}
  for (c, t), lams in wanted.items():
    lams = sorted(lams)
    accs = accuracy(candidates[c].direction, lams, t, "test")
    test.update({(c, t, l): float(a) for l, a in zip(lams, accs)})
  records = []
  for ch in choices:
    ti = list(tasks).index(ch.task)
    abs_acc = test[(ch.candidate, ch.task, ch.lam)]
    cand = candidates[ch.candidate]
    val_acc = float(val[ch.candidate][_lam_index(cand.lams, ch.lam), ti])
    records.append(dict(
        task=ch.task, protocol=ch.protocol, lam=ch.lam, hparams=dict(cand.hparams),
        abs_acc=abs_acc, norm_acc=abs_acc / max(float(ft_test[ti]), 1e-12),
        ft_acc=float(ft_test[ti]), val_acc=val_acc,
        norm_val_acc=val_acc / max(float(ft_val[ti]), 1e-12)))
  return records
