"""End-to-end: `saft reproduce` and `saft analyze` on a tiny offline run."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saft_jax import cli
from saft_jax.experiment import analyze, config as config_lib, evaluate, runner

TASKS = ("digits", "rot90", "parity")


def _config(**kw):
  base = dict(suite="offline", tasks=TASKS, finetunes=("sgd",), safts=("none", "asam"),
              steps=8, batch_size=32, eval_every=4, checkpoint_every=4, pretrain_steps=20,
              eval_batch_size=128, mesh_shape=1,
              optim=config_lib.OptimConfig(lr=1e-3, warmup_steps=2))
  base.update(kw)
  return config_lib.ReproduceConfig(**base)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("run"))
  runner.reproduce(_config(), out)
  return out


def test_results_files_and_keys(run_dir):
  records = json.load(open(os.path.join(run_dir, "results.json")))
  assert isinstance(records, list)
  combos = {(r["finetune"], r["saft"], r["merge"], r["protocol"]) for r in records}
  assert len(combos) == 1 * 2 * 3 * 3
  for r in records:
    for k in ("task", "finetune", "saft", "merge", "abs_acc", "norm_acc", "ft_acc"):
      assert k in r
    assert 0.0 <= r["abs_acc"] <= 1.0 and 0.0 <= r["ft_acc"] <= 1.0
    assert r["norm_acc"] == pytest.approx(r["abs_acc"] / r["ft_acc"])
  md = open(os.path.join(run_dir, "results.md")).read()
  assert "| TIES |" in md and "SAFT-ASAM" in md


def test_accuracies_match_a_recomputation(run_dir):
  """ft_acc and a task-arithmetic abs_acc recomputed by a plain forward pass."""
  records = json.load(open(os.path.join(run_dir, "results.json")))
  suite = runner.build_suite(_config(), run_dir)
  tvs = analyze.load_task_vectors(run_dir, "sgd", "asam", 0, TASKS)
  fn = jax.jit(suite.features_fn())

  def acc(params, task):
    x, y = suite.tasks[task].splits["test"]
    pred = np.argmax(np.asarray(evaluate.head_logits(fn(params, x), suite.heads[task])), -1)
    return float(np.mean(pred == y))

  for t, tv in zip(TASKS, tvs):
    p = jax.tree.map(lambda a, b: a + b, suite.params0, tv)
    rec = next(r for r in records if r["task"] == t and r["saft"] == "asam")
    assert rec["ft_acc"] == pytest.approx(acc(p, t), abs=1e-9)
  rec = next(r for r in records if r["task"] == "rot90" and r["saft"] == "asam"
             and r["merge"] == "task_arithmetic" and r["protocol"] == "fixed")
  assert rec["lam"] == pytest.approx(0.3)
  merged = jax.tree.map(lambda a, *b: a + 0.3 * sum(b), suite.params0, *tvs)
  assert rec["abs_acc"] == pytest.approx(acc(merged, "rot90"), abs=1e-9)


def test_rerun_reuses_finetuned_models(run_dir):
  before = json.load(open(os.path.join(run_dir, "results.json")))
  tv_path = os.path.join(run_dir, "ft", "sgd-none", "seed0", "digits", "task_vector.msgpack")
  mtime = os.path.getmtime(tv_path)
  runner.reproduce(_config(merges=("task_arithmetic",)), run_dir)
  assert os.path.getmtime(tv_path) == mtime
  after = json.load(open(os.path.join(run_dir, "results.json")))
  same = [r for r in before if r["merge"] == "task_arithmetic"]
  assert [r["abs_acc"] for r in after] == [r["abs_acc"] for r in same]


def test_analyze_command(run_dir):
  out = os.path.join(run_dir, "an")
  rc = cli.main(["analyze", run_dir, "--out", out, "--resolution", "3", "--hessian-iters", "3"])
  assert rc == 0
  for f in ("analysis.json", "analysis.md", "xi_sgd.png", "joint_loss_sgd.png", "ctl_sgd.png",
            "barrier_sgd.png"):
    assert os.path.getsize(os.path.join(out, f)) > 0
  numbers = json.load(open(os.path.join(out, "analysis.json")))["sgd"]["SGD"]
  # Recompute ξ at (α1, α2) = (1, 1) (grid [-2, 0, 2] has no 1; use (0, 0) -> exactly 0
  # and (2, 2) by hand on the validation data).
  xi = np.asarray(numbers["xi_two_task"])
  assert xi[1, 1] == 0.0
  suite = runner.build_suite(_config(), run_dir)
  tvs = analyze.load_task_vectors(run_dir, "sgd", "none", 0, TASKS)
  fn = jax.jit(suite.features_fn())
  total = 0.0
  for t, tv in zip(TASKS[:2], tvs[:2]):
    x, _ = suite.tasks[t].splits["val"]
    x = x[:128]
    single = jax.tree.map(lambda a, b: a + 2.0 * b, suite.params0, tv)
    both = jax.tree.map(lambda a, b, c: a + 2.0 * b + 2.0 * c, suite.params0, tvs[0], tvs[1])
    p1 = np.argmax(np.asarray(evaluate.head_logits(fn(single, x), suite.heads[t])), -1)
    p2 = np.argmax(np.asarray(evaluate.head_logits(fn(both, x), suite.heads[t])), -1)
    total += float(np.mean(p1 != p2))
  assert xi[2, 2] == pytest.approx(total, abs=1e-6)


def test_analyze_errors(tmp_path, run_dir):
  with pytest.raises(FileNotFoundError, match="not a run directory"):
    analyze.analyze_run(str(tmp_path))
  with pytest.raises(ValueError, match="needs >= 2 tasks"):
    analyze.analyze_run(run_dir, tasks=["digits", "nope"], out_dir=str(tmp_path / "x"))
  with pytest.raises(FileNotFoundError, match="missing fine-tuned task vector"):
    analyze.load_task_vectors(run_dir, "ftts", "none", 0, TASKS)


def test_linearized_and_attention_only_methods(tmp_path):
  # mesh_shape=None: batches sharded over the 8 fake devices (the data-parallel path).
  cfg = _config(tasks=("digits", "parity"), finetunes=("ftts", "ftlo"), safts=("asam",),
                merges=("task_arithmetic",), protocols=("fixed",), mesh_shape=None)
  records = runner.reproduce(cfg, str(tmp_path))
  assert {r["finetune"] for r in records} == {"ftts", "ftlo"}
  suite = runner.build_suite(cfg, str(tmp_path))
  tv = analyze.load_task_vectors(str(tmp_path), "ftlo", "asam", 0, ("digits",))[0]
  from saft_jax import models
  mask = models.ftlo_mask(suite.params0)
  changed = jax.tree.map(lambda t, m: bool(jnp.any(t != 0)) == m, tv, mask)
  assert all(jax.tree.leaves(changed))  # exactly the attention kernels moved


def test_bad_config():
  with pytest.raises(ValueError, match="finetunes"):
    _config(finetunes=("lora",))
  with pytest.raises(ValueError, match="unknown suite"):
    runner.build_suite(_config(suite="imagenet"), "/tmp")
