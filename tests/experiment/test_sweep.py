"""`saft sweep`: settings × seeds, fine-tunings reused, records and reports; `--set` on the CLI."""
import dataclasses
import json
import os

import numpy as np
import pytest

from saft_jax import cli
from saft_jax.experiment import config as config_lib, runner, sweep

TASKS = ("digits", "rot90")


def _config(**kw):
  base = dict(suite="offline", tasks=TASKS, finetunes=("sgd",), safts=("none", "asam"),
              merges=("weight_average", "task_arithmetic"), protocols=("single", "fixed"),
              seeds=(0, 1), steps=4, batch_size=32, eval_every=2, checkpoint_every=2,
              pretrain_steps=10, eval_batch_size=128, mesh_shape=1, stack_runs=0,
              async_checkpoint=False, optim=config_lib.OptimConfig(lr=1e-3, warmup_steps=1))
  base.update(kw)
  return config_lib.ReproduceConfig(**base)


@pytest.fixture(scope="module")
def rho_sweep(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("rho"))
  trained = []
  real = runner.finetune_stacked

  def counting(suite, members, *a, **kw):
    trained.extend(members)
    return real(suite, members, *a, **kw)

  runner.finetune_stacked = counting
  try:
    settings = sweep.grid_settings([("optim.asam_rho", [0.02, 0.5])])
    records = sweep.sweep(_config(), settings, out)
    first = list(trained)
    again = sweep.sweep(_config(), settings, out)  # a rerun trains nothing
  finally:
    runner.finetune_stacked = real
  return out, records, first, trained[len(first):], again


def test_rho_sweep_records_and_reuse(rho_sweep):
  out, records, first, second, again = rho_sweep
  # baseline once per seed (shared by both ρ), ASAM once per ρ and seed: 2 + 4 runs of 2 tasks
  assert len(first) == (2 + 4) * len(TASKS) and len(set(first)) == 2 * len(TASKS)
  assert second == []
  keys = {(json.dumps(r["setting"], sort_keys=True), r["saft"], r["seed"]) for r in records}
  want = {('{"optim.asam_rho": 0.02}', "asam", s) for s in (0, 1)}
  want |= {('{"optim.asam_rho": 0.5}', "asam", s) for s in (0, 1)}
  want |= {("{}", "none", s) for s in (0, 1)}
  assert keys == want
  assert json.load(open(os.path.join(out, "sweep.json"))) == records
  assert [r["abs_acc"] for r in again] == [r["abs_acc"] for r in records]
  meta = json.load(open(os.path.join(out, "sweep_meta.json")))
  assert meta["baseline_keys"] == [] and meta["keys"] == ["optim.asam_rho"]
  for f in ("sweep.md", "sweep.png"):
    assert os.path.getsize(os.path.join(out, f)) > 0
  assert "by validation" in open(os.path.join(out, "sweep.md")).read()


def test_rho_sweep_equals_reproduce(rho_sweep, tmp_path):
  """A sweep setting gives the records `saft reproduce` gives for the same config."""
  out, records, *_ = rho_sweep
  cfg = config_lib.set_value(_config(seeds=(1,), safts=("asam",)), "optim.asam_rho", 0.02)
  ref = runner.reproduce(cfg, str(tmp_path))
  got = [r for r in records if r["saft"] == "asam" and r["seed"] == 1
         and r["setting"] == {"optim.asam_rho": 0.02}]
  key = lambda r: (r["merge"], r["protocol"], r["task"])
  assert sorted(map(key, got)) == sorted(map(key, ref))
  ref_by = {key(r): r for r in ref}
  for r in got:
    assert r["abs_acc"] == pytest.approx(ref_by[key(r)]["abs_acc"], abs=0.02)
    assert r["ft_acc"] == pytest.approx(ref_by[key(r)]["ft_acc"], abs=0.02)


def test_baseline_keys_follow_what_changes_plain_adamw():
  base = _config()
  settings = sweep.grid_settings([("optim.lr", [1e-4, 1e-3]), ("optim.asam_rho", [0.1, 0.5])])
  assert len(settings) == 4
  assert sweep.baseline_keys(base, settings, ["optim.lr", "optim.asam_rho"]) == ["optim.lr"]
  fp = sweep.finetune_fingerprint(base, "none")
  assert "asam_rho" not in fp["optim"] and "lr" in fp["optim"]
  assert "asam_rho" in sweep.finetune_fingerprint(base, "asam")["optim"]
  with pytest.raises(ValueError, match="swept twice"):
    sweep.grid_settings([("steps", [1]), ("steps", [2])])


def test_unset_late_fields_keep_old_fingerprints():
  base = _config()
  assert "clip_act" not in sweep.finetune_fingerprint(base, "none")
  assert "clip_act" not in sweep._suite_fields(base)
  gelu = dataclasses.replace(base, clip_act="gelu")
  assert sweep.finetune_fingerprint(gelu, "none")["clip_act"] == "gelu"
  assert sweep._digest(sweep._suite_fields(gelu)) != sweep._digest(sweep._suite_fields(base))


def test_sweep_bad_input(tmp_path):
  with pytest.raises(ValueError, match="safts must include 'none'"):
    sweep.sweep(_config(safts=("asam",)), [{"steps": 2}], str(tmp_path))
  with pytest.raises(ValueError, match="at least one setting"):
    sweep.sweep(_config(), [], str(tmp_path))
  with pytest.raises(ValueError, match="unknown measure"):
    sweep.sweep(_config(), [{"steps": 2}], str(tmp_path), measures=("sharpness",))
  with pytest.raises(ValueError, match="steps"):  # a bad value fails before any training
    sweep.sweep(_config(), [{"steps": 2}, {"steps": -1}], str(tmp_path))


def test_cli_set_and_errors(tmp_path, capsys):
  cfg_file = tmp_path / "cfg.py"
  cfg_file.write_text(
      "from saft_jax.experiment import config as c\n"
      "def get_config():\n"
      "  return c.ReproduceConfig(tasks=('digits', 'parity'), finetunes=('sgd',), "
      "safts=('asam',), merges=('task_arithmetic',), protocols=('fixed',), steps=2, "
      "batch_size=32, eval_every=2, checkpoint_every=2, pretrain_steps=4, mesh_shape=1, "
      "stack_runs=0, async_checkpoint=False)\n")
  out = tmp_path / "run"
  assert cli.main(["reproduce", "--config", str(cfg_file), "--set", "optim.asam_rho=0.02",
                   "--set", "optim.lr=3e-4", "--out", str(out)]) == 0
  saved = json.load(open(out / "config.json"))
  assert saved["optim"]["asam_rho"] == 0.02 and saved["optim"]["lr"] == 3e-4
  meta = json.load(open(out / "meta.json"))
  assert meta["regime"]["asam_rho_per_coordinate"] == pytest.approx(
      0.02 / np.sqrt(meta["regime"]["num_params"]))
  capsys.readouterr()
  assert cli.main(["reproduce", "--set", "optim.rhoo=1", "--out", str(out)]) == 2
  assert "optim.rhoo" in capsys.readouterr().err
  assert cli.main(["reproduce", "--set", "steps=ten", "--out", str(out)]) == 2
  assert "expected an int" in capsys.readouterr().err
  assert cli.main(["reproduce", "--seeds", "0", "--out", str(out)]) == 2
  assert "--seeds must be at least 1" in capsys.readouterr().err
  assert cli.main(["sweep", "--out", str(out)]) == 2
  assert "nothing to sweep" in capsys.readouterr().err
  assert cli.main(["sweep", "--set", "optim.asam_rho=0.1,0.1", "--out", str(out)]) == 2
  assert "optim.asam_rho" in capsys.readouterr().err
