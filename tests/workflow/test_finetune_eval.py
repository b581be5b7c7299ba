"""`saft finetune` then `saft eval` on the offline suite reproduce `saft reproduce`'s
accuracy for the same task, seed and settings; merge of two fine-tuned offline models;
errors."""
import json
import os
import shutil

import numpy as np
import pytest

from saft_jax import cli
from saft_jax.models import convert_common as cc

# Tiny settings of tests/experiment/test_reproduce.py, one run at a time on one device.
SETTINGS = ["pretrain_steps=20", "steps=8", "batch_size=32", "eval_every=4",
            "checkpoint_every=4", "eval_batch_size=128", "mesh_shape=1", "optim.lr=1e-3",
            "optim.warmup_steps=2", "stack_runs=1", "async_checkpoint=false"]


def _sets(extra=()):
  return [a for s in list(SETTINGS) + list(extra) for a in ("--set", s)]


def _run(*argv):
  return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A cache of the offline suite (θ0 and the heads of digits and parity) shared by the
  runs, as a `saft reproduce` run directory would hold it."""
  from saft_jax.experiment import config as config_lib, defaults, runner
  root = tmp_path_factory.mktemp("wf")
  config = config_lib.apply_overrides(defaults.default_config("offline"),
                                      SETTINGS + ["tasks=digits,parity"])
  runner.build_suite(config, str(root / "cache"))
  return root


def test_offline_cache_is_shared_across_task_sets(runs):
  """θ0 is keyed by its own settings; heads of new tasks are added to the cache."""
  from saft_jax.experiment import config as config_lib, defaults, runner
  from saft_jax.experiment.store import load_tree
  key = json.load(open(runs / "cache" / "suite.json"))
  assert key["tasks"] == ["digits", "parity"] and key["pretrain_steps"] == 20
  theta0 = os.path.getmtime(runs / "cache" / "theta0.msgpack")
  config = config_lib.apply_overrides(defaults.default_config("offline"),
                                      SETTINGS + ["tasks=parity"])
  suite = runner.build_suite(config, str(runs / "cache"))
  assert list(suite.heads) == ["parity"]
  assert os.path.getmtime(runs / "cache" / "theta0.msgpack") == theta0
  np.testing.assert_array_equal(np.asarray(suite.heads["parity"]),
                                load_tree(str(runs / "cache" / "heads.msgpack"))["parity"])


@pytest.fixture(scope="module")
def ft_digits(runs):
  assert _run("finetune", "--task", "digits", "--saft", "none", *_sets(), "--cache",
              runs / "cache", "--out", runs / "ft_digits") == 0
  return runs / "ft_digits"


def test_finetune_output_directory(ft_digits):
  d = ft_digits
  for name in ("run.json", "metrics.jsonl", "best.json", "task_vector.msgpack",
               "task_vector.safetensors", "model.safetensors", "theta0.safetensors"):
    assert os.path.getsize(d / name) > 0, name
  assert os.listdir(d / "ckpt" / "state") and os.listdir(d / "ckpt" / "best")
  assert not os.path.exists(d / "LINEARIZED.md")
  theta0, model, tv = (cc.read_safetensors(str(d / n)) for n in
                       ("theta0.safetensors", "model.safetensors", "task_vector.safetensors"))
  for k in theta0:
    np.testing.assert_array_equal(model[k], theta0[k] + tv[k])
  assert json.load(open(d / "run.json"))["config"]["steps"] == 8
  assert len(open(d / "metrics.jsonl").read().splitlines()) >= 2


def test_finetune_then_eval_reproduces_reproduce(runs, ft_digits):
  """`saft reproduce` on the same task, seed and settings (θ0 from the same cache)."""
  rep = runs / "rep"
  shutil.copytree(runs / "cache", rep)
  assert _run("reproduce", "--tasks", "digits", "--safts", "none", "--merges",
              "task_arithmetic", *_sets(["protocols=fixed"]), "--out", rep) == 0
  record = next(r for r in json.load(open(rep / "results.json")) if r["task"] == "digits")
  out = runs / "eval.json"
  assert _run("eval", "--model", ft_digits / "model.safetensors", "--tasks", "digits",
              "--cache", runs / "cache", *_sets(), "--out", out) == 0
  assert json.load(open(out))["accuracy"]["digits"] == record["ft_acc"]
  assert "| model.safetensors |" in open(runs / "eval.md").read()
  assert (json.load(open(ft_digits / "best.json"))
          == json.load(open(rep / "ft" / "sgd-none" / "seed0" / "digits" / "best.json")))


def test_rerun_resumes_and_other_settings_are_refused(runs, ft_digits, capsys):
  d = ft_digits
  mtime = os.path.getmtime(d / "task_vector.msgpack")
  assert _run("finetune", "--task", "digits", "--saft", "none", *_sets(), "--cache",
              runs / "cache", "--out", d) == 0
  assert os.path.getmtime(d / "task_vector.msgpack") == mtime
  assert _run("finetune", "--task", "digits", "--saft", "asam", *_sets(), "--cache",
              runs / "cache", "--out", d) == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("saft finetune: error: ") and "holds another run" in err


def test_run_from_before_a_new_config_field_resumes(runs, ft_digits, capsys):
  """A run.json without a newer field (here ``model_axis``) resumes when the field is at
  its default, and is refused when the rerun sets it otherwise."""
  d = runs / "ft_digits_old"
  shutil.copytree(ft_digits, d)
  settings = json.load(open(d / "run.json"))
  del settings["config"]["model_axis"]
  json.dump(settings, open(d / "run.json", "w"))
  mtime = os.path.getmtime(d / "task_vector.msgpack")
  assert _run("finetune", "--task", "digits", "--saft", "none", *_sets(), "--cache",
              runs / "cache", "--out", d) == 0
  assert os.path.getmtime(d / "task_vector.msgpack") == mtime
  json.dump(settings, open(d / "run.json", "w"))
  assert _run("finetune", "--task", "digits", "--saft", "none",
              *_sets(["mesh_shape=none", "model_axis=2"]), "--cache", runs / "cache",
              "--out", d) == 2
  assert "holds another run" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ft_parity(runs):
  """FTTS on a second task."""
  ft = runs / "ft_parity"
  assert _run("finetune", "--task", "parity", "--finetune", "ftts", "--saft", "none",
              *_sets(["steps=4"]), "--cache", runs / "cache", "--out", ft) == 0
  return ft


def test_ftts_export_and_note(ft_parity):
  note = open(ft_parity / "LINEARIZED.md").read()
  assert "--linearized" in note and "theta0.safetensors" in note
  theta0, model, tv = (cc.read_safetensors(str(ft_parity / n)) for n in
                       ("theta0.safetensors", "model.safetensors", "task_vector.safetensors"))
  for k in theta0:
    np.testing.assert_array_equal(model[k], theta0[k] + tv[k])


def test_linearized_eval(runs, ft_parity):
  """--linearized evaluates f(x; θ0) + J·(θ − θ0): the accuracy reproduce reports for the
  linearized model, up to the rounding of θ0 + τ − θ0."""
  assert _run("eval", "--model", ft_parity / "model.safetensors", "--base",
              ft_parity / "theta0.safetensors", "--linearized", "--tasks", "parity", *_sets(),
              "--out", runs / "lin.json") == 0
  lin = json.load(open(runs / "lin.json"))
  assert lin["linearized"] and 0 <= lin["accuracy"]["parity"] <= 1
  from saft_jax.experiment import config as config_lib, defaults, runner
  from saft_jax.experiment.store import load_tree
  import jax.numpy as jnp
  import jax
  config = config_lib.apply_overrides(defaults.default_config("offline"),
                                      SETTINGS + ["tasks=parity"])
  suite = runner.build_suite(config, str(runs / "cache"))
  tv = jax.tree.map(jnp.asarray, load_tree(str(ft_parity / "task_vector.msgpack")))
  counter = runner.make_counters(suite)["linear"]
  want = runner.task_accuracy(counter, suite, tv, [1.0], "parity", "test", 128)[0]
  assert lin["accuracy"]["parity"] == pytest.approx(float(want), abs=1 / 359 + 1e-9)


def test_merge_and_eval_sgd_and_ftts_models(runs, ft_digits, ft_parity):
  out = runs / "merged.safetensors"
  assert _run("merge", "--base", ft_digits / "theta0.safetensors", "--models",
              ft_digits / "model.safetensors", ft_parity / "model.safetensors",
              "--method", "ties", "--lam", "0.5", "--out", out) == 0
  assert _run("eval", "--model", out, "--tasks", "digits,parity", *_sets(),
              "--out", runs / "merged.json") == 0  # the cache found through the base
  acc = json.load(open(runs / "merged.json"))["accuracy"]
  assert set(acc) == {"digits", "parity"} and all(0 <= a <= 1 for a in acc.values())


def _error(capsys, command, *argv):
  assert _run(command, *argv) == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith(f"saft {command}: error: "), err
  return err


def test_eval_errors(runs, ft_digits, tmp_path, capsys):
  model = ft_digits / "model.safetensors"
  (tmp_path / "taken.json").write_text("{}")
  msg = _error(capsys, "eval", "--model", model, "--tasks", "digits", "--out",
               tmp_path / "taken.json")
  assert "taken.json" in msg and "exists" in msg
  # the suite cache recorded by finetune, built with other settings than the defaults
  msg = _error(capsys, "eval", "--model", model, "--tasks", "digits", "--out", tmp_path / "r.json")
  assert "pretrain_steps=20" in msg and "cache" in msg
  msg = _error(capsys, "eval", "--model", model, "--tasks", "imagenet", "--out", tmp_path / "r")
  assert "unknown task 'imagenet'" in msg
  msg = _error(capsys, "eval", "--model", model, "--linearized", "--tasks", "digits",
               "--out", tmp_path / "r")
  assert "--linearized needs --base" in msg
  from safetensors.numpy import save_file
  bad = cc.read_safetensors(str(model))
  bad.pop("ln_post/scale")
  save_file(bad, str(tmp_path / "bad.safetensors"))
  msg = _error(capsys, "eval", "--model", tmp_path / "bad.safetensors", "--tasks", "digits",
               "--cache", runs / "cache", *_sets(), "--out", tmp_path / "r.json")
  assert "ln_post/scale" in msg


def test_finetune_errors(tmp_path, capsys):
  msg = _error(capsys, "finetune", "--task", "digits,rot90", "--out", tmp_path / "x")
  assert "one task" in msg
  msg = _error(capsys, "finetune", "--task", "eurosat", "--out", tmp_path / "x")
  assert "--model" in msg
  msg = _error(capsys, "finetune", "--task", "digits", "--set", "optim.lrr=1", "--out",
               tmp_path / "x")
  assert "optim.lr" in msg
  msg = _error(capsys, "finetune", "--task", "digits", "--saft", "adam", "--out", tmp_path / "x")
  assert "safts" in msg and "asam" in msg
