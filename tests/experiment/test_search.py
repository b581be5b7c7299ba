"""Coefficient-search protocols against brute-force selections."""
import json

import numpy as np
import pytest

from saft_jax.experiment import report, search


def _setup(seed=0, T=3):
  rng = np.random.default_rng(seed)
  tasks = [f"t{i}" for i in range(T)]
  cands = [search.Candidate({"k": k}, direction=k, lams=search.SINGLE_LAMBDAS,
                            default=(k == 0.2)) for k in (0.1, 0.2, 0.3)]
  tables = {(c.direction, split): rng.uniform(0.2, 0.9, (len(c.lams), T))
            for c in cands for split in ("val", "test")}

  def accuracy(direction, lams, task, split):
    table = tables[(direction, split)]
    rows = [search._lam_index(search.SINGLE_LAMBDAS, l) for l in lams]
    return table[rows, tasks.index(task)]

  ft_val, ft_test = rng.uniform(0.8, 1.0, T), rng.uniform(0.8, 1.0, T)
  return tasks, cands, tables, accuracy, ft_val, ft_test


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_protocols_match_brute_force(seed):
  tasks, cands, tables, accuracy, ft_val, ft_test = _setup(seed)
  recs = search.search(cands, tasks, accuracy, ft_val, ft_test)
  lams = np.array(search.SINGLE_LAMBDAS)
  # single: brute force over every (candidate, λ) of the mean normalized val accuracy.
  best = max(((np.mean(tables[(c.direction, "val")][l] / ft_val), ci, lams[l])
              for ci, c in enumerate(cands) for l in range(len(lams))),
             key=lambda x: x[0])
  for r in [r for r in recs if r["protocol"] == "single"]:
    assert r["lam"] == pytest.approx(best[2])
    assert r["hparams"] == cands[best[1]].hparams
    ti = tasks.index(r["task"])
    l = search._lam_index(search.SINGLE_LAMBDAS, r["lam"])
    assert r["abs_acc"] == pytest.approx(tables[(cands[best[1]].direction, "test")][l, ti])
    assert r["norm_acc"] == pytest.approx(r["abs_acc"] / ft_test[ti])
  # per task: brute force over the 6 allowed λ values and all candidates.
  for r in [r for r in recs if r["protocol"] == "per_task"]:
    ti = tasks.index(r["task"])
    opts = [(tables[(c.direction, "val")][search._lam_index(search.SINGLE_LAMBDAS, l), ti], l, c.hparams["k"])
            for c in cands for l in search.PER_TASK_LAMBDAS]
    _, lam, k = max(opts, key=lambda x: x[0])
    assert (r["lam"], r["hparams"]["k"]) == (pytest.approx(lam), k)
  # fixed: λ = 0.3 and the default candidate, no search.
  for r in [r for r in recs if r["protocol"] == "fixed"]:
    assert r["lam"] == pytest.approx(0.3) and r["hparams"] == {"k": 0.2}


def test_unknown_protocol_is_an_error():
  tasks, cands, _, accuracy, ft_val, ft_test = _setup()
  with pytest.raises(ValueError, match="unknown protocol"):
    search.search(cands, tasks, accuracy, ft_val, ft_test, protocols=("best",))


def test_report_files(tmp_path):
  recs = []
  for seed in (0, 1):
    for ft, saft in (("sgd", "none"), ("sgd", "asam")):
      for t, a in (("a", 0.5 + 0.1 * seed), ("b", 0.7)):
        recs.append(dict(task=t, finetune=ft, saft=saft, merge="ties", protocol="single",
                         seed=seed, abs_acc=a, norm_acc=a / 0.9, ft_acc=0.9, lam=0.3,
                         hparams={"k": 0.2}))
  jpath, mpath = report.write_results(str(tmp_path), recs, {"suite": "x", "tasks": ["a", "b"]})
  assert json.load(open(jpath)) == recs
  md = open(mpath).read()
  # mean over tasks per seed: seed0 60.0, seed1 65.0 -> 62.50 ± 3.54
  assert "| TIES | 62.50 ± 3.54 / 69.44 ± 3.93 |" in md
  assert "SAFT-ASAM" in md and "Protocol `single`" in md
