"""The sweep report on synthetic records: statistics, pairing, selection, files."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from saft_jax.experiment import sweep_report as sr

T_975_2 = 4.302652729911275   # Student t, 0.975 quantile, 2 degrees of freedom
T_975_1 = 12.706204736174698  # 1 degree of freedom


def rec(seed, norm, *, saft="asam", setting=None, task="a", merge="weight_average",
        protocol="single", finetune="sgd", val=None, **extra):
  """One results record; abs_acc = norm / 2 so the two are told apart."""
  return dict(task=task, finetune=finetune, saft=saft, merge=merge, protocol=protocol, seed=seed,
              abs_acc=norm / 2, norm_acc=norm, ft_acc=0.9, val_acc=0.5,
              norm_val_acc=norm if val is None else val, lam=0.3, hparams={},
              setting=dict(setting or {}), **extra)


def rho_meta(rhos, seeds=(0, 1), tasks=("a",)):
  return dict(keys=["optim.asam_rho"], settings=[{"optim.asam_rho": r} for r in rhos],
              seeds=list(seeds), baseline_keys=[], tasks=list(tasks))


def find(rows, **kw):
  out = [r for r in rows if all(r[k] == v for k, v in kw.items())]
  assert len(out) == 1, out
  return out[0]


# --- paired_interval -------------------------------------------------------------------------


def test_paired_interval_hand_example():
  mean, lo, hi = sr.paired_interval([1.0, 2.0, 3.0])
  half = T_975_2 * 1.0 / math.sqrt(3)
  assert mean == pytest.approx(2.0, abs=1e-12)
  assert lo == pytest.approx(2.0 - half, abs=1e-9)
  assert hi == pytest.approx(2.0 + half, abs=1e-9)


def test_paired_interval_confidence_level():
  _, lo, hi = sr.paired_interval([1.0, 2.0, 3.0], confidence=0.9)
  half = 2.919985580355516 / math.sqrt(3)  # t_{0.95, 2}
  assert (lo, hi) == pytest.approx((2.0 - half, 2.0 + half), abs=1e-9)


def test_paired_interval_single_and_invalid():
  mean, lo, hi = sr.paired_interval([0.25])
  assert mean == 0.25 and math.isnan(lo) and math.isnan(hi)
  for bad in ([], [[1.0, 2.0]], [1.0, float("nan")]):
    with pytest.raises(ValueError):
      sr.paired_interval(bad)
  with pytest.raises(ValueError):
    sr.paired_interval([1.0, 2.0], confidence=1.0)


# --- seed_means ------------------------------------------------------------------------------


def test_seed_means_task_average_and_optional_fields():
  records = [rec(0, 0.8, task="a", setting={"x": 1}, barrier=0.3, midpoint_excess=-0.1),
             rec(0, 0.6, task="b", setting={"x": 1}, barrier=0.3, midpoint_excess=-0.1),
             rec(0, 0.5, task="a", merge="ties", setting={"x": 1})]
  means = sr.seed_means(records)
  wa = means[(sr.setting_key({"x": 1}), "sgd", "asam", "weight_average", "single", 0)]
  assert wa["norm_acc"] == pytest.approx(0.7)
  assert wa["abs_acc"] == pytest.approx(0.35)
  assert wa["norm_val_acc"] == pytest.approx(0.7)
  assert wa["barrier"] == pytest.approx(0.3) and wa["midpoint_excess"] == pytest.approx(-0.1)
  ties = means[(sr.setting_key({"x": 1}), "sgd", "asam", "ties", "single", 0)]
  assert "barrier" not in ties and ties["norm_acc"] == pytest.approx(0.5)


def test_seed_means_rejects_duplicate_task():
  with pytest.raises(ValueError, match="duplicate"):
    sr.seed_means([rec(0, 0.8), rec(0, 0.7)])


def test_setting_key_is_canonical():
  assert sr.setting_key({"b": 1, "a": 2}) == sr.setting_key({"a": 2, "b": 1})
  assert sr.setting_label({"b": 1, "a": 0.02}, keys=["b", "a"]) == "b=1, a=0.02"


# --- paired_rows -----------------------------------------------------------------------------


def test_pairing_uses_the_matching_seed():
  s = {"optim.asam_rho": 0.02}
  # Baseline records out of seed order, plus a baseline seed SAFT lacks.
  records = [rec(1, 0.95, saft="none"), rec(2, 0.10, saft="none"), rec(0, 0.70, saft="none"),
             rec(0, 0.80, setting=s), rec(1, 0.90, setting=s)]
  (row,) = sr.paired_rows(records, rho_meta([0.02]))
  assert row["paired_seeds"] == [0, 1] and row["base_seeds"] == [0, 1, 2]
  assert row["diffs"] == pytest.approx([0.10, -0.05])
  mean, lo, hi = sr.paired_interval([0.10, -0.05])
  assert (row["diff_mean"], row["diff_lo"], row["diff_hi"]) == pytest.approx((mean, lo, hi))
  assert row["diff_mean"] == pytest.approx(0.025)  # mismatched pairs would not give this
  assert row["norm_mean"] == pytest.approx(0.85)
  assert row["norm_std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
  assert row["abs_mean"] == pytest.approx(0.425)
  assert row["base_norm_mean"] == pytest.approx(np.mean([0.95, 0.10, 0.70]))
  assert row["base_norm_std"] == pytest.approx(np.std([0.95, 0.10, 0.70], ddof=1))


def test_shared_baseline_pairs_every_setting():
  records = [rec(0, 0.70, saft="none"), rec(1, 0.72, saft="none")]
  for rho, bump in ((0.01, 0.01), (0.05, 0.05)):
    records += [rec(0, 0.70 + bump, setting={"optim.asam_rho": rho}),
                rec(1, 0.72 + 2 * bump, setting={"optim.asam_rho": rho})]
  rows = sr.paired_rows(records, rho_meta([0.01, 0.05]))
  assert [r["setting"] for r in rows] == [{"optim.asam_rho": 0.01}, {"optim.asam_rho": 0.05}]
  assert all(r["base_setting"] == {} for r in rows)
  assert rows[0]["diffs"] == pytest.approx([0.01, 0.02])
  assert rows[1]["diffs"] == pytest.approx([0.05, 0.10])


def test_per_setting_baseline_pairs_the_same_value():
  meta = dict(keys=["optim.lr"], settings=[{"optim.lr": 1e-4}, {"optim.lr": 1e-3}],
              seeds=[0, 1], baseline_keys=["optim.lr"], tasks=["a"])
  records = []
  for lr, base in ((1e-4, 0.50), (1e-3, 0.80)):
    for seed in (0, 1):
      records += [rec(seed, base + 0.01 * seed, saft="none", setting={"optim.lr": lr}),
                  rec(seed, base + 0.03 + 0.02 * seed, setting={"optim.lr": lr})]
  rows = sr.paired_rows(records, meta)
  assert [r["base_setting"] for r in rows] == [{"optim.lr": 1e-4}, {"optim.lr": 1e-3}]
  for r in rows:
    assert r["diffs"] == pytest.approx([0.03, 0.04])
  assert rows[1]["base_norm_mean"] == pytest.approx(0.805)


def test_pairing_rejects_different_task_sets():
  records = [rec(0, 0.7, saft="none", task="a"), rec(0, 0.7, saft="none", task="b"),
             rec(0, 0.8, task="a", setting={"optim.asam_rho": 0.02})]
  with pytest.raises(ValueError, match="tasks"):
    sr.paired_rows(records, rho_meta([0.02]))


def test_missing_baseline_gives_nan_difference():
  (row,) = sr.paired_rows([rec(0, 0.8, setting={"optim.asam_rho": 0.02})], rho_meta([0.02]))
  assert row["paired_seeds"] == [] and math.isnan(row["diff_mean"])


# --- select_by_validation --------------------------------------------------------------------


def test_selection_uses_validation_not_test():
  lo, hi = {"optim.asam_rho": 0.01}, {"optim.asam_rho": 0.1}
  records = [rec(0, 0.70, saft="none"), rec(1, 0.70, saft="none"),
             # rho 0.01: best test accuracy, worse validation, on both seeds.
             rec(0, 0.95, setting=lo, val=0.60), rec(1, 0.96, setting=lo, val=0.61),
             rec(0, 0.75, setting=hi, val=0.90), rec(1, 0.77, setting=hi, val=0.91)]
  (row,) = sr.select_by_validation(records, rho_meta([0.01, 0.1]))
  assert row["setting"] == sr.BY_VALIDATION
  assert row["choices"] == [(0, hi), (1, hi)]
  assert row["norm_mean"] == pytest.approx(0.76)
  assert row["diffs"] == pytest.approx([0.05, 0.07])
  assert row["base_choices"] == [(0, {}), (1, {})]


def test_selection_per_seed_and_ties_take_first_setting():
  a, b = {"optim.asam_rho": 0.01}, {"optim.asam_rho": 0.1}
  records = [rec(0, 0.70, saft="none"), rec(1, 0.70, saft="none"),
             rec(0, 0.80, setting=a, val=0.5), rec(0, 0.90, setting=b, val=0.5),  # tie
             rec(1, 0.80, setting=a, val=0.4), rec(1, 0.90, setting=b, val=0.6)]
  (row,) = sr.select_by_validation(records, rho_meta([0.01, 0.1]))
  assert row["choices"] == [(0, a), (1, b)]
  assert row["diffs"] == pytest.approx([0.10, 0.20])
  # Reversing the sweep order flips the tie.
  (row,) = sr.select_by_validation(records, rho_meta([0.1, 0.01]))
  assert row["choices"] == [(0, b), (1, b)]


def test_selection_of_a_varying_baseline_is_by_validation_too():
  meta = dict(keys=["optim.lr"], settings=[{"optim.lr": 1e-4}, {"optim.lr": 1e-3}],
              seeds=[0], baseline_keys=["optim.lr"], tasks=["a"])
  records = [rec(0, 0.90, saft="none", setting={"optim.lr": 1e-4}, val=0.2),
             rec(0, 0.60, saft="none", setting={"optim.lr": 1e-3}, val=0.8),
             rec(0, 0.70, setting={"optim.lr": 1e-4}, val=0.9),
             rec(0, 0.99, setting={"optim.lr": 1e-3}, val=0.1)]
  (row,) = sr.select_by_validation(records, meta)
  assert row["choices"] == [(0, {"optim.lr": 1e-4})]
  assert row["base_choices"] == [(0, {"optim.lr": 1e-3})]
  assert row["diffs"] == pytest.approx([0.10])


# --- markdown, plot, files -------------------------------------------------------------------


def tiny_case():
  s = {"optim.asam_rho": 0.02}
  records = [rec(0, 0.70, saft="none", barrier=0.5, midpoint_excess=-0.25),
             rec(1, 0.71, saft="none", barrier=0.7, midpoint_excess=-0.35),
             rec(0, 0.80, setting=s, barrier=0.1, midpoint_excess=-0.5),
             rec(1, 0.82, setting=s, barrier=0.3, midpoint_excess=-0.7),
             rec(0, 0.60, saft="none", merge="ties"), rec(1, 0.60, saft="none", merge="ties"),
             rec(0, 0.61, setting=s, merge="ties")]
  return records, dict(rho_meta([0.02]), title="Tiny ρ sweep")


def test_markdown_tiny_hand_case():
  records, meta = tiny_case()
  md = sr.sweep_markdown(records, meta)
  assert md.startswith("# Tiny ρ sweep\n")
  assert "Seeds: [0, 1]. Tasks: a." in md
  assert "paired difference (SAFT − plain AdamW)" in md and "t-distribution" in md
  assert "## Protocol `single`: " + sr.PROTOCOL_TEXT["single"] in md
  assert "### SAFT-ASAM vs SGD" in md
  # Diffs 10 and 11 points: mean 10.5, sd 1/sqrt(2), se 0.5, half-width 0.5 t_{0.975, 1}.
  half = 0.5 * T_975_1
  delta = f"+10.50 [{10.5 - half:+.2f}, {10.5 + half:+.2f}]"
  assert delta == "+10.50 [+4.15, +16.85]"
  lines = md.splitlines()
  header = next(line for line in lines if line.startswith("| setting"))
  assert header == ("| setting | weight averaging: norm acc (mean ± std) | weight averaging: Δ vs "
                    "baseline [95 % CI] | weight averaging: barrier | weight averaging: midpoint "
                    "excess | TIES: norm acc (mean ± std) | TIES: Δ vs baseline [95 % CI] |")
  assert (f"| optim.asam_rho=0.02 | 81.00 ± 1.41 | {delta} | 0.2000 | -0.6000 | 61.00 | "
          "+1.00 (1 seed) |") in lines
  assert ("| SGD (baseline, plain AdamW) | 70.50 ± 0.71 | – | 0.6000 | -0.3000 | 60.00 ± 0.00 "
          "| – |") in lines
  assert f"| by validation | 81.00 ± 1.41 | {delta} | – | – | 61.00 | +1.00 (1 seed) |" in lines
  assert ("- weight averaging: seed 0: optim.asam_rho=0.02; seed 1: optim.asam_rho=0.02"
          in lines)


def test_markdown_varying_baseline_has_baseline_column():
  meta = dict(keys=["optim.lr"], settings=[{"optim.lr": 1e-4}, {"optim.lr": 1e-3}],
              seeds=[0], baseline_keys=["optim.lr"], tasks=["a"])
  records = [rec(0, 0.50, saft="none", setting={"optim.lr": 1e-4}),
             rec(0, 0.60, saft="none", setting={"optim.lr": 1e-3}),
             rec(0, 0.55, setting={"optim.lr": 1e-4}), rec(0, 0.70, setting={"optim.lr": 1e-3})]
  md = sr.sweep_markdown(records, meta).splitlines()
  assert "| optim.lr=0.0001 | 55.00 | +5.00 (1 seed) | 50.00 |" in md
  assert "| optim.lr=0.001 | 70.00 | +10.00 (1 seed) | 60.00 |" in md
  assert "| by validation | 70.00 | +10.00 (1 seed) | 60.00 |" in md
  assert not any("(baseline, plain AdamW)" in line for line in md)


def test_write_sweep_report_files_and_round_trip(tmp_path):
  records, meta = tiny_case()
  paths = sr.write_sweep_report(str(tmp_path / "out"), records, meta)
  assert sorted(paths) == ["markdown", "meta", "plot", "records"]
  for name, f in (("records", "sweep.json"), ("meta", "sweep_meta.json"),
                  ("markdown", "sweep.md"), ("plot", "sweep.png")):
    assert paths[name] == str(tmp_path / "out" / f)
    assert (tmp_path / "out" / f).stat().st_size > 0
  assert json.loads((tmp_path / "out" / "sweep.json").read_text()) == records
  assert json.loads((tmp_path / "out" / "sweep_meta.json").read_text()) == meta
  assert (tmp_path / "out" / "sweep.md").read_text() == sr.sweep_markdown(records, meta)
  assert (tmp_path / "out" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_categorical_settings_and_varying_baseline(tmp_path):
  settings = [{"optim.lr": 1e-4, "optim.asam_rho": 0.02},
              {"optim.lr": 1e-3, "optim.asam_rho": 0.05}]
  meta = dict(keys=["optim.lr", "optim.asam_rho"], settings=settings, seeds=[0, 1],
              baseline_keys=["optim.lr"], tasks=["a"])
  records = []
  for s in settings:
    for seed in (0, 1):
      for protocol in ("single", "fixed"):
        records += [rec(seed, 0.6 + 0.01 * seed, saft="none", setting={"optim.lr": s["optim.lr"]},
                        protocol=protocol),
                    rec(seed, 0.7 + 0.01 * seed, setting=s, protocol=protocol)]
  path = sr.sweep_plot(records, meta, str(tmp_path / "p.png"))
  assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
  assert path == str(tmp_path / "p.png")
  assert "optim.lr=0.0001, optim.asam_rho=0.02" in sr.sweep_markdown(records, meta)
