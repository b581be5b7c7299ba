"""The effective-noise sweep (a preset of `saft sweep`) on a tiny configuration."""
import glob
import json
import os

import jax
import numpy as np
import optax
import pytest

from saft_jax.experiment import config as config_lib, evaluate, noise_sweep
from saft_jax.experiment.runner import build_suite
from saft_jax.experiment.store import load_tree


def _tvs(out, lr, saft, tasks):
  for fp_path in glob.glob(os.path.join(out, "ft", "*", "fingerprint.json")):
    fp = json.load(open(fp_path))
    if fp["saft"] == saft and fp["optim"]["lr"] == lr:
      root = os.path.dirname(fp_path)
      return [load_tree(os.path.join(root, f"sgd-{saft}", "seed0", t, "task_vector.msgpack"))
              for t in tasks]
  raise AssertionError(f"no fine-tuning stored for lr={lr}, saft={saft}")


def test_sweep_files_and_midpoint_accuracy(tmp_path):
  cfg = config_lib.ReproduceConfig(steps=6, batch_size=32, eval_every=3, checkpoint_every=3,
                                   pretrain_steps=10, eval_batch_size=512, mesh_shape=1,
                                   stack_runs=0, async_checkpoint=False,
                                   optim=config_lib.OptimConfig(lr=1e-3, warmup_steps=2))
  tasks = ("rot90", "flip")
  rows = noise_sweep.noise_sweep(cfg, str(tmp_path), knobs={"optim.lr": (1e-3, 1e-2)},
                                 safts=("none",))
  assert {r["setting"]["optim.lr"] for r in rows} == {1e-3, 1e-2}
  assert {r["merge"] for r in rows} == {"weight_average"}
  for f in ("sweep.json", "sweep.md", "sweep.png"):
    assert os.path.getsize(tmp_path / f) > 0
  assert json.load(open(tmp_path / "sweep.json")) == rows
  # Recompute the merged (midpoint) accuracy of the second point by hand.
  suite = build_suite(config_lib.replace(cfg, tasks=tasks), str(glob.glob(
      str(tmp_path / "suite-*"))[0]))
  tvs = _tvs(str(tmp_path), 1e-2, "none", tasks)
  mid = jax.tree.map(lambda p, a, b: p + 0.5 * (a + b), suite.params0, *tvs)
  fn = jax.jit(suite.features_fn())
  point = [r for r in rows if r["setting"]["optim.lr"] == 1e-2]
  for r in point:
    x, y = suite.tasks[r["task"]].splits["test"]
    pred = np.argmax(np.asarray(evaluate.head_logits(fn(mid, x), suite.heads[r["task"]])), -1)
    assert r["abs_acc"] == pytest.approx(float(np.mean(pred == y)), abs=1e-9)
  assert np.isfinite(point[0]["barrier"]) and point[0]["barrier"] >= 0.0
  ends = [jax.tree.map(lambda p, t: p + t, suite.params0, tv) for tv in tvs]

  def joint(params):
    total = 0.0
    for t in tasks:
      x, y = suite.tasks[t].splits["val"]
      logits = evaluate.head_logits(fn(params, x), suite.heads[t])
      total += float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())
    return total
  want = joint(mid) - 0.5 * (joint(ends[0]) + joint(ends[1]))
  assert point[0]["midpoint_excess"] == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_sweep_bad_input(tmp_path):
  cfg = config_lib.ReproduceConfig(steps=2)
  with pytest.raises(ValueError, match="unknown knob"):
    noise_sweep.noise_sweep(cfg, str(tmp_path), knobs=["momentum"])
  with pytest.raises(ValueError, match="exactly two tasks"):
    noise_sweep.noise_sweep(cfg, str(tmp_path), tasks=("rot90",))
  assert noise_sweep.noise_settings(["lr"]) == [{"optim.lr": v} for v in
                                                noise_sweep.KNOBS["optim.lr"]]
