"""The effective-noise sweep on a tiny configuration."""
import json
import os

import jax
import numpy as np
import pytest

from saft_jax.experiment import config as config_lib, evaluate, noise_sweep
from saft_jax.experiment.analyze import load_task_vectors
from saft_jax.experiment.runner import build_suite


def test_sweep_files_and_midpoint_accuracy(tmp_path):
  cfg = config_lib.ReproduceConfig(steps=6, batch_size=32, eval_every=3, checkpoint_every=3,
                                   pretrain_steps=10, eval_batch_size=512,
                                   optim=config_lib.OptimConfig(lr=1e-3, warmup_steps=2))
  rows = noise_sweep.noise_sweep(cfg, str(tmp_path), knobs={"lr": (1e-3, 1e-2)},
                                 safts=("none",))
  assert [(r["knob"], r["value"]) for r in rows] == [("lr", 1e-3), ("lr", 1e-2)]
  for f in ("sweep.json", "sweep.md", "sweep.png"):
    assert os.path.getsize(tmp_path / f) > 0
  assert json.load(open(tmp_path / "sweep.json")) == rows
  # Recompute the merged (midpoint) accuracy of the second point by hand.
  suite = build_suite(config_lib.replace(cfg, tasks=("rot90", "flip")), str(tmp_path))
  tvs = load_task_vectors(str(tmp_path / "sweep" / "lr=0.01"), "sgd", "none", 0, ("rot90", "flip"))
  mid = jax.tree.map(lambda p, a, b: p + 0.5 * (a + b), suite.params0, *tvs)
  fn = jax.jit(suite.features_fn())
  for t, got in zip(("rot90", "flip"), rows[1]["merged_acc"]):
    x, y = suite.tasks[t].splits["test"]
    pred = np.argmax(np.asarray(evaluate.head_logits(fn(mid, x), suite.heads[t])), -1)
    assert got == pytest.approx(float(np.mean(pred == y)), abs=1e-9)
  assert np.isfinite(rows[1]["barrier"]) and rows[1]["barrier"] >= 0.0
  # midpoint excess: joint loss at the midpoint minus the mean of the endpoints' joint losses
  import optax
  ends = [jax.tree.map(lambda p, t: p + t, suite.params0, tv) for tv in tvs]

  def joint(params):
    total = 0.0
    for t in ("rot90", "flip"):
      x, y = suite.tasks[t].splits["val"]
      logits = evaluate.head_logits(fn(params, x), suite.heads[t])
      total += float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())
    return total
  want = joint(mid) - 0.5 * (joint(ends[0]) + joint(ends[1]))
  assert rows[1]["midpoint_excess"] == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_sweep_bad_input(tmp_path):
  cfg = config_lib.ReproduceConfig(steps=2)
  with pytest.raises(ValueError, match="unknown knob"):
    noise_sweep.noise_sweep(cfg, str(tmp_path), knobs=["momentum"])
  with pytest.raises(ValueError, match="exactly two tasks"):
    noise_sweep.noise_sweep(cfg, str(tmp_path), tasks=("rot90",))
