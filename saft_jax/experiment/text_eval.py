"""Accuracy of (merged) T5 models on text tasks over a grid of merge coefficients.

The model is ``θ0 + λ D`` for a direction ``D`` (a task vector or a merge direction),
or for FTTS the linearized model ``f(θ0) + λ J f(θ0)·D`` (one ``jax.jvp`` through the
whole encoder–decoder per batch gives every ``λ``). For each input, every candidate
(the label words of ALL tasks of the suite, :class:`~saft_jax.experiment.text_suite.
TextSuite`) is teacher-forced once, which gives at each of its positions the
log-probability of its token and whether that token is the arg-max:

* **rank** classification: the predicted class is the label word of *this* task with the
  highest sequence log-probability;
* **exact** match: greedy decoding outputs candidate ``c`` (through its EOS) iff, with
  ``c`` teacher-forced, the arg-max at every position is ``c``'s token (greedy decoding
  feeds back its own arg-max, so the two runs see the same prefixes). So one pass tells
  whether the greedy output is the true label word, and which candidate, if any, it is;
* **label words** of the greedy outputs: the share that is a label word of this task
  (``this_task``), of another task of the suite (``other_task``) or neither
  (``neither``); the three sum to 1.

Exact match compares token sequences: a generation that spells a label word with
other tokens than its tokenization counts as ``neither``.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from saft_jax.experiment.text_suite import TextSuite, shard
from saft_jax.models import t5 as t5_lib

STATS = ("rank", "exact", "this_task", "other_task", "neither")


def teacher_forced_logits(cfg: t5_lib.T5Config, params, input_ids, attention_mask,
                          candidate_ids, compute_dtype=jnp.float32) -> jax.Array:
  """``[B, C, T, V]`` logits of every candidate teacher-forced on every input.

  Args:
    cfg: the T5 config.
    params: T5 parameters.
    input_ids, attention_mask: ``[B, L]`` inputs.
    candidate_ids: ``[C, T]`` candidate token ids with -100 padding.
    compute_dtype: activation dtype.
  """
  b, (c, t) = input_ids.shape[0], candidate_ids.shape
  hidden = t5_lib.encode(cfg, params, input_ids, attention_mask, compute_dtype=compute_dtype)
  dec_in = t5_lib.shift_right(candidate_ids, cfg.decoder_start_token_id, cfg.pad_token_id)
  logits = t5_lib.decode(cfg, params, jnp.repeat(hidden, c, axis=0),
                         jnp.repeat(attention_mask, c, axis=0), jnp.tile(dec_in, (b, 1)),
                         compute_dtype=compute_dtype)
  return logits.reshape(b, c, t, -1)


def candidate_scores(logits, candidate_ids) -> tuple[jax.Array, jax.Array]:
  """``(logprob [B, C], greedy [B, C])`` from teacher-forced ``logits [B, C, T, V]``.

  ``logprob`` is each candidate's sequence log-probability; ``greedy`` is True where the
  arg-max at every position of the candidate (EOS included) is its token, i.e. where
  greedy decoding outputs exactly that candidate.
  """
  valid = candidate_ids >= 0
  tokens = jnp.where(valid, candidate_ids, 0)[None, :, :, None]
  logits = logits.astype(jnp.float32)
  token_lp = (jnp.take_along_axis(logits, jnp.broadcast_to(tokens, logits.shape[:3] + (1,)),
                                  axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1))
  logprob = jnp.sum(jnp.where(valid[None], token_lp, 0.0), axis=-1)
  hit = (jnp.argmax(logits, axis=-1) == tokens[..., 0]) | ~valid[None]
  return logprob, jnp.all(hit, axis=-1)


def batch_counts(logprob, greedy, label_candidate, task_mask, row_mask) -> jax.Array:
  """``[5]`` sums over the real rows of one batch, in the order of :data:`STATS`.

  Args:
    logprob, greedy: ``[B, C]`` from :func:`candidate_scores`.
    label_candidate: ``[B]`` candidate index of each example's true label word.
    task_mask: ``[C]`` True on the label words of the evaluated task.
    row_mask: ``[B]`` True on real (non-padding) rows.
  """
  rank_pred = jnp.argmax(jnp.where(task_mask[None], logprob, -jnp.inf), axis=-1)
  rank = rank_pred == label_candidate
  exact = jnp.take_along_axis(greedy, label_candidate[:, None], axis=-1)[:, 0]
  this = jnp.any(greedy & task_mask[None], axis=-1)
  other = jnp.any(greedy & ~task_mask[None], axis=-1) & ~this
  neither = ~(this | other)
  flags = jnp.stack([rank, exact, this, other, neither]) & row_mask[None]
  return jnp.sum(flags.astype(jnp.int32), axis=-1)


def _scaled(params0, direction, lam):
  return jax.tree.map(lambda p, d: (p + lam.astype(p.dtype) * d.astype(p.dtype)).astype(p.dtype),
                      params0, direction)


@functools.lru_cache(maxsize=8)
def make_counters_fns(cfg: t5_lib.T5Config, dtype_name: str):
  """The jitted batch functions of :class:`TextEvaluator` for one T5 config.

  Returns ``(plain, linear_outputs, linear_count)``:

  * ``plain(params0, direction, lam, ids, mask, cands, label_cand, task_mask, row_mask)``
    -> ``[5]`` counts (:data:`STATS`) of ``θ0 + λ D``;
  * ``linear_outputs(params0, direction, ids, mask, cands) -> (f0, JD)``: the logits at
    θ0 and their derivative along ``D`` (one ``jax.jvp``);
  * ``linear_count(f0, jd, lam, cands, label_cand, task_mask, row_mask)`` -> ``[5]``
    counts of the linearized model ``f0 + λ JD``.

  ``λ`` is a scalar argument and θ0, ``D`` are arguments, so every λ grid, task,
  direction and run of a suite reuses one executable per batch shape.
  """
  dtype = jnp.dtype(dtype_name)

  def logits_fn(params, ids, mask, cands):
    return teacher_forced_logits(cfg, params, ids, mask, cands, dtype)

  def counts(logits, cands, label_cand, task_mask, row_mask):
    return batch_counts(*candidate_scores(logits, cands), label_cand, task_mask, row_mask)

  @jax.jit
  def plain(params0, direction, lam, ids, mask, cands, label_cand, task_mask, row_mask):
    logits = logits_fn(_scaled(params0, direction, lam), ids, mask, cands)
    return counts(logits, cands, label_cand, task_mask, row_mask)

  @jax.jit
  def linear_outputs(params0, direction, ids, mask, cands):
    return jax.jvp(lambda p: logits_fn(p, ids, mask, cands), (params0,), (direction,))

  @jax.jit
  def linear_count(f0, jd, lam, cands, label_cand, task_mask, row_mask):
    return counts(f0 + lam.astype(f0.dtype) * jd, cands, label_cand, task_mask, row_mask)

  return plain, linear_outputs, linear_count


class TextEvaluator:
  """Grid evaluation of one text suite, for plain (``linear=False``) models ``θ0 + λ D``
  or linearized (``linear=True``, FTTS) models ``f(θ0) + λ J f(θ0)·D``."""

  def __init__(self, suite: TextSuite, linear: bool):
    self.suite, self.linear = suite, linear
    self.fns = make_counters_fns(suite.t5, jnp.dtype(suite.compute_dtype).name)

  def stats(self, direction, lams: Sequence[float], task: str, split: str, batch_size: int,
            mesh=None) -> dict:
    """``{stat: [len(lams)] fractions}`` (:data:`STATS`) of ``task``'s ``split``."""
    suite = self.suite
    plain, linear_outputs, linear_count = self.fns
    lam_arr = [jnp.float32(lam) for lam in lams]
    cands = jnp.asarray(suite.candidate_ids)
    task_mask = jnp.asarray(suite.candidate_mask(task))
    sums, count = [], 0
    for ids, mask, label_cand, row_mask in shard(suite.eval_batches(task, split, batch_size),
                                                 mesh):
      if self.linear:
        f0, jd = linear_outputs(suite.params0, direction, ids, mask, cands)
        sums.append([linear_count(f0, jd, lam, cands, label_cand, task_mask, row_mask)
                     for lam in lam_arr])
      else:
        sums.append([plain(suite.params0, direction, lam, ids, mask, cands, label_cand,
                           task_mask, row_mask) for lam in lam_arr])
      count += int(jnp.sum(row_mask))  # works for global (multi-process) arrays too
    if count == 0:
      raise ValueError(f"no evaluation examples: {task}/{split} is empty")
    totals = np.sum(np.asarray(jax.device_get(sums), np.int64), axis=0)  # [L, 5]
    return {k: totals[:, i] / count for i, k in enumerate(STATS)}


@functools.lru_cache(maxsize=16)
def evaluator(suite: TextSuite, linear: bool) -> TextEvaluator:
  """The (shared) :class:`TextEvaluator` of ``suite``."""
  return TextEvaluator(suite, linear)


def make_counters(suite: TextSuite) -> dict:
  """``{"plain": evaluator, "linear": evaluator}`` as ``runner.make_counters`` returns."""
  return {"plain": evaluator(suite, False), "linear": evaluator(suite, True)}


def record_details(stats: dict) -> dict:
  """Record fields of one model's stats: ``rank_acc``, ``exact_acc`` and ``label_words``."""
  return dict(rank_acc=float(stats["rank"]), exact_acc=float(stats["exact"]),
              label_words={k: float(stats[k]) for k in ("this_task", "other_task", "neither")})


class TextAccuracy:
  """``accuracy(direction, lams, task, split) -> [len(lams)]`` for
  :func:`saft_jax.experiment.search.search`, in the suite's score, remembering the
  other statistics of every model it evaluated (:meth:`details`).

  Args:
    counter: a :class:`TextEvaluator`.
    batch_size: evaluation batch size.
    score: "exact" or "rank".
    mesh: optional device mesh (batches sharded on its data axis).
  """

  def __init__(self, counter: TextEvaluator, batch_size: int, score: str, mesh=None):
    if score not in ("exact", "rank"):
      raise ValueError(f"score must be exact or rank, got {score!r}")
    self.counter, self.batch_size, self.score, self.mesh = counter, batch_size, score, mesh
    self._seen: dict = {}

  def _key(self, direction, lam, task, split):
    return id(direction), task, split, round(float(lam), 6)

  def __call__(self, direction, lams, task: str, split: str) -> np.ndarray:
    stats = self.counter.stats(direction, lams, task, split, self.batch_size, self.mesh)
    for i, lam in enumerate(lams):
      self._seen[self._key(direction, lam, task, split)] = {k: v[i] for k, v in stats.items()}
    return stats[self.score]

  def details(self, direction, lam: float, task: str, split: str) -> dict:
    """:func:`record_details` of ``θ0 + lam·direction`` (evaluated if not seen yet).

    Results are remembered by the identity of ``direction``: call :meth:`forget` before
    the directions evaluated so far may be freed.
    """
    key = self._key(direction, lam, task, split)
    if key not in self._seen:
      self(direction, [lam], task, split)
    return record_details(self._seen[key])

  def forget(self) -> None:
    """Drops the remembered statistics."""
    self._seen.clear()
