"""`saft reproduce` with the data-driven merges (Fisher, RegMean, AdaMerging), tiny run."""
import json
import os

import jax
import numpy as np
import pytest

from saft_jax import merging
from saft_jax.experiment import analyze, config as config_lib, data_merges, runner

TASKS = ("digits", "rot90")


def _config(**kw):
  base = dict(suite="offline", tasks=TASKS, finetunes=("sgd",), safts=("none",),
              merges=config_lib.DATA_MERGES, steps=4, batch_size=32, eval_every=4,
              checkpoint_every=4, pretrain_steps=2, eval_batch_size=128, mesh_shape=1,
              stack_runs=0,
              optim=config_lib.OptimConfig(lr=1e-3, warmup_steps=2))
  base.update(kw)
  return config_lib.ReproduceConfig(**base)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("run"))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(data_merges, "ADAMERGING_STEPS", 3)
    runner.reproduce(_config(), out)
  return out


def test_records_of_data_merges(run_dir):
  records = json.load(open(os.path.join(run_dir, "results.json")))
  for merge in config_lib.DATA_MERGES:
    for finetune in ("sgd",):
      rs = [r for r in records if r["merge"] == merge and r["finetune"] == finetune]
      assert {(r["protocol"], r["task"]) for r in rs} == {
          (p, t) for p in ("single", "per_task", "fixed") for t in TASKS}
      # One fixed model: λ = 1 under every protocol, the same accuracy per task.
      assert all(r["lam"] == 1.0 for r in rs)
      for t in TASKS:
        assert len({r["abs_acc"] for r in rs if r["task"] == t}) == 1
      assert all(0.0 <= r["abs_acc"] <= 1.0 for r in rs)
  ada = next(r for r in records if r["merge"] == "adamerging")
  assert ada["hparams"]["granularity"] == "layer" and ada["hparams"]["steps"] == 3
  reg = next(r for r in records if r["merge"] == "regmean")
  assert reg["hparams"]["linear_layers"] == 25  # q, k, v, out, fc, proj per block + proj
  md = open(os.path.join(run_dir, "results.md")).read()
  assert "## Data-driven merges" in md
  assert "unlabeled test images" in md and "validation images" in md
  for name in ("Fisher merging", "RegMean", "AdaMerging (layer-wise)"):
    assert f"| {name} |" in md  # the tables' rows have display names


def test_every_merge_has_a_display_name():
  from saft_jax.experiment import report
  assert list(report.MERGE_NAMES) == list(config_lib.ALL_MERGES)


def test_regmean_records_match_a_recomputation(run_dir):
  """The sgd RegMean record equals the library merge on the validation images; and the
  linearized (FTTS) RegMean equals RegMean with every task's Grams taken at θ0."""
  records = json.load(open(os.path.join(run_dir, "results.json")))
  suite = runner.build_suite(_config(), run_dir)
  tvs = analyze.load_task_vectors(run_dir, "sgd", "none", 0, TASKS)
  apply = data_merges.suite_apply(suite, "plain")

  def grams_at(params_of_task):
    return [merging.gram_matrices(apply, params_of_task(i), suite.tasks[t].splits["val"][0],
                                  batch_size=256, model_args=(suite.heads[t],))
            for i, t in enumerate(TASKS)]
  models = [jax.tree.map(lambda a, b: a + b, suite.params0, tv) for tv in tvs]
  merged = merging.regmean(models, grams_at(lambda i: models[i]),
                           alpha=data_merges.REGMEAN_ALPHA)
  fn = jax.jit(suite.features_fn())
  for t in TASKS:
    x, y = suite.tasks[t].splits["test"]
    pred = np.argmax(np.asarray(runner.evaluate.head_logits(fn(merged, x), suite.heads[t])), -1)
    rec = next(r for r in records if r["merge"] == "regmean" and r["finetune"] == "sgd"
               and r["task"] == t and r["protocol"] == "fixed")
    assert rec["abs_acc"] == pytest.approx(float(np.mean(pred == y)), abs=1e-9)

  direction, hparams = data_merges.regmean_direction(suite, tvs, linear=True)
  want = merging.regmean(tvs, grams_at(lambda i: suite.params0),
                         alpha=data_merges.REGMEAN_ALPHA)
  assert hparams["linear_layers"] == 25
  for a, b in zip(jax.tree.leaves(direction), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=1e-6)


def test_data_merges_refuse_text_suites():
  class NoHeads:
    name = "text"
  with pytest.raises(ValueError, match="vision suite"):
    data_merges.check_suite(NoHeads(), ("regmean",))
  data_merges.check_suite(NoHeads(), ("ties",))
