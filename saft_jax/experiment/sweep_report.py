"""Report of ``saft sweep``: SAFT vs plain AdamW over settings and seeds.

``saft sweep`` runs the main job for several *settings* (config overrides such
as ``{"optim.asam_rho": 0.02}``) and several seeds. Each record is a results
record of the main job (see :mod:`saft_jax.experiment.report`) with a
``"setting"`` dict of the swept keys. Baseline records (``saft == "none"``, plain
AdamW) carry only the part of the setting that can change the baseline
(``meta["baseline_keys"]``): ``{}`` when the baseline is shared by every setting.

The comparison unit is one seed: the mean over tasks of the normalized test
accuracy of the merged model. SAFT and the baseline are paired on the seed, and
the paired difference is summarized by its mean and a Student-t interval over
seeds. ``by validation`` picks, per seed, the setting with the highest mean
normalized *validation* accuracy; test numbers never enter the choice.

Outputs (``write_sweep_report``): ``sweep.json`` (the records), ``sweep_meta.json``,
``sweep.md`` and ``sweep.png``.
"""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict

import numpy as np

from saft_jax import analysis
from saft_jax.experiment.report import FINETUNE_NAMES, MERGE_NAMES, PROTOCOL_TEXT, method_label

BASELINE = "none"
BY_VALIDATION = "by validation"
_REQUIRED = ("abs_acc", "norm_acc")
_OPTIONAL = ("norm_val_acc", "barrier", "midpoint_excess")


# ---------------------------------------------------------------------------
# Statistics.


def paired_interval(diffs, confidence: float = 0.95) -> tuple[float, float, float]:
  """Mean of paired differences and its two-sided Student-t confidence interval.

  Args:
    diffs: 1-D sequence of paired differences (one per seed), finite.
    confidence: coverage of the interval, in (0, 1).

  Returns:
    ``(mean, lo, hi)`` with ``mean ± t_{(1+confidence)/2, n-1} · sd / sqrt(n)``
    (``sd`` with ``ddof=1``); ``(d, nan, nan)`` when there is one difference.

  Raises:
    ValueError: if ``diffs`` is empty, not 1-D or not finite, or ``confidence``
      is outside (0, 1).
  """
  from scipy import stats

  d = np.asarray(diffs, np.float64)
  if d.ndim != 1:
    raise ValueError(f"diffs must be 1-D, got shape {d.shape}")
  if d.size == 0:
    raise ValueError("diffs is empty")
  if not np.all(np.isfinite(d)):
    raise ValueError(f"diffs must be finite, got {d.tolist()}")
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  mean = float(d.mean())
  if d.size == 1:
    return mean, math.nan, math.nan
  half = float(stats.t.ppf(0.5 + confidence / 2, d.size - 1)) * float(d.std(ddof=1)) / math.sqrt(
      d.size)
  return mean, mean - half, mean + half


def _mean_std(values) -> tuple[float, float]:
  """Mean and sample std (``ddof=1``); nan std for one value, nan both for none."""
  v = np.asarray(list(values), np.float64)
  if v.size == 0:
    return math.nan, math.nan
  return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else math.nan)


# ---------------------------------------------------------------------------
# Settings.


def _hashable(v):
  if isinstance(v, dict):
    return tuple(sorted((str(k), _hashable(x)) for k, x in v.items()))
  if isinstance(v, (list, tuple)):
    return tuple(_hashable(x) for x in v)
  return v


def setting_key(setting: dict | None) -> tuple:
  """Hashable canonical form of a setting dict: sorted ``(key, value)`` pairs."""
  return _hashable(dict(setting or {}))


def setting_label(setting: dict | None, keys=()) -> str:
  """``"optim.asam_rho=0.02"``; keys in the order of ``keys``, others sorted after."""
  setting = dict(setting or {})
  order = [k for k in keys if k in setting] + sorted(k for k in setting if k not in keys)
  return ", ".join(f"{k}={setting[k]}" for k in order) or "(none)"


def restrict(setting: dict | None, keys) -> dict:
  """The part of ``setting`` whose keys are in ``keys`` (the baseline's setting)."""
  setting = dict(setting or {})
  return {k: setting[k] for k in keys if k in setting}


def _settings(records: list[dict], meta: dict) -> list[dict]:
  """SAFT settings: ``meta["settings"]`` order, then unlisted ones as first seen."""
  found = {setting_key(r.get("setting")): dict(r.get("setting") or {})
           for r in records if r["saft"] != BASELINE}
  out = {setting_key(s): dict(s) for s in meta.get("settings", [])}
  out.update({k: s for k, s in found.items() if k not in out})
  return list(out.values())


def _baseline_settings(records: list[dict], meta: dict) -> list[dict]:
  """Distinct baseline settings, in the order of the SAFT settings they belong to."""
  bkeys = meta.get("baseline_keys", [])
  out = {setting_key(restrict(s, bkeys)): restrict(s, bkeys) for s in _settings(records, meta)}
  for r in records:
    if r["saft"] == BASELINE:
      out.setdefault(setting_key(r.get("setting")), dict(r.get("setting") or {}))
  return list(out.values())


# ---------------------------------------------------------------------------
# Grouping.


def _ordered(values, names) -> list:
  names = list(names)
  return sorted(set(values), key=lambda v: (names.index(v) if v in names else len(names), str(v)))


def _protocols(records):
  return _ordered((r["protocol"] for r in records), PROTOCOL_TEXT)


def _merges(records):
  return _ordered((r["merge"] for r in records), MERGE_NAMES)


def _methods(records) -> list[tuple[str, str]]:
  """Non-baseline ``(finetune, saft)`` pairs, in fine-tuning-method order."""
  ft = list(FINETUNE_NAMES)
  return sorted({(r["finetune"], r["saft"]) for r in records if r["saft"] != BASELINE},
                key=lambda m: (ft.index(m[0]) if m[0] in ft else len(ft), m[0], m[1]))


def _task_mean(group: list[dict]) -> dict:
  """Means over the tasks of one (setting, method, merge, protocol, seed) group."""
  tasks = [r["task"] for r in group]
  if len(set(tasks)) != len(tasks):
    raise ValueError(f"duplicate task records in one group: {sorted(tasks)}")
  out = {"tasks": tuple(sorted(tasks))}
  for f in _REQUIRED:
    out[f] = float(np.mean([r[f] for r in group]))
  for f in _OPTIONAL:
    vals = [r.get(f) for r in group]
    if all(v is not None for v in vals):
      out[f] = float(np.mean(vals))
  return out


def seed_means(records: list[dict]) -> dict:
  """Means over tasks per seed.

  Args:
    records: results records with a ``"setting"`` dict (missing means ``{}``).

  Returns:
    ``{(setting_key, finetune, saft, merge, protocol, seed): stats}`` where
    ``stats`` has ``norm_acc`` and ``abs_acc`` (means over tasks), ``tasks``, and
    ``norm_val_acc`` / ``barrier`` / ``midpoint_excess`` when every task record
    of the group has them.

  Raises:
    ValueError: if a group holds two records of the same task.
  """
  groups = defaultdict(list)
  for r in records:
    groups[(setting_key(r.get("setting")), r["finetune"], r["saft"], r["merge"], r["protocol"],
            r["seed"])].append(r)
  return {k: _task_mean(v) for k, v in groups.items()}


def _by_seed(means: dict) -> dict:
  """``{(setting_key, finetune, saft, merge, protocol): {seed: stats}}``."""
  out = defaultdict(dict)
  for k, v in means.items():
    out[k[:-1]][k[-1]] = v
  return out


def _field_mean(by_seed: dict, field: str):
  vals = [s[field] for s in by_seed.values() if field in s]
  return float(np.mean(vals)) if vals else None


def _compare(saft: dict, base: dict) -> dict:
  """Aggregates over seeds of SAFT and baseline per-seed stats, and their paired difference.

  Args:
    saft: ``{seed: stats}`` of the SAFT method.
    base: ``{seed: stats}`` of the baseline.

  Returns:
    A dict of mean/std over seeds (``norm_*``, ``abs_*``, ``base_*``), the paired
    seeds, per-seed differences ``diffs`` of normalized accuracy and
    ``diff_mean``/``diff_lo``/``diff_hi`` (nan without pairs), and the means over
    seeds of ``barrier``/``midpoint_excess`` (None when absent).

  Raises:
    ValueError: if a paired seed's SAFT and baseline cover different tasks.
  """
  paired = sorted(set(saft) & set(base))
  for s in paired:
    if saft[s]["tasks"] != base[s]["tasks"]:
      raise ValueError(f"seed {s}: SAFT tasks {saft[s]['tasks']} != baseline tasks "
                       f"{base[s]['tasks']}")
  diffs = [saft[s]["norm_acc"] - base[s]["norm_acc"] for s in paired]
  diff = paired_interval(diffs) if diffs else (math.nan, math.nan, math.nan)
  out = {"seeds": sorted(saft), "base_seeds": sorted(base), "paired_seeds": paired,
         "diffs": diffs, "diff_mean": diff[0], "diff_lo": diff[1], "diff_hi": diff[2]}
  for prefix, stats in (("", saft), ("base_", base)):
    for f in ("norm", "abs"):
      m, s = _mean_std(v[f"{f}_acc"] for v in stats.values())
      out[f"{prefix}{f}_mean"], out[f"{prefix}{f}_std"] = m, s
    for f in ("barrier", "midpoint_excess"):
      out[f"{prefix}{f}"] = _field_mean(stats, f)
  return out


# ---------------------------------------------------------------------------
# Rows.


def paired_rows(records: list[dict], meta: dict) -> list[dict]:
  """SAFT vs baseline for every non-baseline (setting, finetune, saft, merge, protocol).

  The baseline of a SAFT group has the same finetune, merge and protocol, and the
  setting restricted to ``meta["baseline_keys"]``; pairs are formed on seeds
  present in both.

  Args:
    records: sweep records (see module docstring).
    meta: sweep meta with ``settings`` and ``baseline_keys``.

  Returns:
    One dict per group (protocol, method, setting, merge order) with keys
    ``protocol``, ``finetune``, ``saft``, ``merge``, ``setting``, ``base_setting``
    and those of ``_compare`` (accuracies as fractions).
  """
  index = _by_seed(seed_means(records))
  bkeys = meta.get("baseline_keys", [])
  rows = []
  for protocol in _protocols(records):
    for finetune, saft in _methods(records):
      for setting in _settings(records, meta):
        base_setting = restrict(setting, bkeys)
        for merge in _merges(records):
          tail = (finetune, saft, merge, protocol)
          saft_seeds = index.get((setting_key(setting), *tail), {})
          if not saft_seeds:
            continue
          base_seeds = index.get((setting_key(base_setting), finetune, BASELINE, merge,
                                  protocol), {})
          rows.append({"protocol": protocol, "finetune": finetune, "saft": saft, "merge": merge,
                       "setting": dict(setting), "base_setting": base_setting,
                       **_compare(saft_seeds, base_seeds)})
  return rows


def _choose(candidates: list[tuple[dict, dict]]):
  """The candidate ``(setting, stats)`` with the highest ``norm_val_acc``; first on ties.

  A lone candidate is taken as is; otherwise candidates without a finite
  ``norm_val_acc`` are skipped, and None is returned when none is left.
  """
  if len(candidates) == 1:
    return candidates[0]
  best = None
  for setting, stats in candidates:
    v = stats.get("norm_val_acc")
    if v is None or not math.isfinite(v):
      continue
    if best is None or v > best[1]["norm_val_acc"]:
      best = (setting, stats)
  return best


def _select(index: dict, settings: list[dict], tail: tuple) -> dict:
  """Per seed, the setting chosen by validation: ``{seed: (setting, stats)}``."""
  per = [(s, index.get((setting_key(s), *tail), {})) for s in settings]
  seeds = sorted({seed for _, by in per for seed in by})
  out = {}
  for seed in seeds:
    choice = _choose([(s, by[seed]) for s, by in per if seed in by])
    if choice is not None:
      out[seed] = choice
  return out


def select_by_validation(records: list[dict], meta: dict) -> list[dict]:
  """SAFT with the setting chosen per seed by mean normalized validation accuracy.

  Per (finetune, saft, merge, protocol, seed) the setting with the highest mean
  over tasks of ``norm_val_acc`` is chosen (ties: first in ``meta["settings"]``);
  its test accuracy is reported. When the baseline changes with the setting it
  is chosen the same way among its own settings; a shared baseline is used as is.

  Args:
    records: sweep records (see module docstring).
    meta: sweep meta with ``settings`` and ``baseline_keys``.

  Returns:
    One dict per (protocol, finetune, saft, merge) with ``setting`` =
    ``"by validation"``, ``choices`` / ``base_choices`` (``[(seed, setting)]``)
    and the keys of ``_compare``.
  """
  index = _by_seed(seed_means(records))
  settings, base_settings = _settings(records, meta), _baseline_settings(records, meta)
  rows = []
  for protocol in _protocols(records):
    for finetune, saft in _methods(records):
      for merge in _merges(records):
        chosen = _select(index, settings, (finetune, saft, merge, protocol))
        if not chosen:
          continue
        base = _select(index, base_settings, (finetune, BASELINE, merge, protocol))
        rows.append({
            "protocol": protocol, "finetune": finetune, "saft": saft, "merge": merge,
            "setting": BY_VALIDATION,
            "choices": [(seed, s) for seed, (s, _) in chosen.items()],
            "base_choices": [(seed, s) for seed, (s, _) in base.items()],
            **_compare({k: v for k, (_, v) in chosen.items()},
                       {k: v for k, (_, v) in base.items()})})
  return rows


# ---------------------------------------------------------------------------
# Markdown.


def _pct(mean: float, std: float) -> str:
  if mean is None or math.isnan(mean):
    return "–"
  return f"{100 * mean:.2f}" if math.isnan(std) else f"{100 * mean:.2f} ± {100 * std:.2f}"


def _delta(row: dict) -> str:
  if not row["paired_seeds"]:
    return "–"
  m, lo, hi = (100 * row[k] for k in ("diff_mean", "diff_lo", "diff_hi"))
  return f"{m:+.2f} (1 seed)" if math.isnan(lo) else f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def _num(v) -> str:
  return "–" if v is None else f"{v:.4f}"


def _is_shared(rows: list[dict]) -> bool:
  return len({setting_key(r["base_setting"]) for r in rows}) <= 1


def _merge_cells(row: dict | None, shared: bool, loss_cols: bool) -> list[str]:
  """Cells of one merge in a setting (or by-validation) row; "–" when missing."""
  if row is None:
    return ["–"] * (2 + (not shared) + 2 * loss_cols)
  cells = [_pct(row["norm_mean"], row["norm_std"]), _delta(row)]
  if not shared:
    cells.append(_pct(row["base_norm_mean"], row["base_norm_std"]))
  if loss_cols:
    for f in ("barrier", "midpoint_excess"):
      cells.append(_num(row[f]) if shared or row[f"base_{f}"] is None
                   else f"{_num(row[f])} (base {_num(row[f'base_{f}'])})")
  return cells


def _baseline_cells(row: dict | None, loss_cols: bool) -> list[str]:
  """Cells of the shared-baseline row for one merge."""
  if row is None:
    return ["–"] * (2 + 2 * loss_cols)
  cells = [_pct(row["base_norm_mean"], row["base_norm_std"]), "–"]
  if loss_cols:
    cells += [_num(row["base_barrier"]), _num(row["base_midpoint_excess"])]
  return cells


def _choices_line(row: dict, keys, field: str = "choices", suffix: str = "") -> str:
  picks = "; ".join(f"seed {seed}: {setting_label(s, keys)}" for seed, s in row[field])
  return f"- {MERGE_NAMES.get(row['merge'], row['merge'])}{suffix}: {picks or '–'}"


def _method_table(rows, sel, merges, finetune, saft, keys) -> list[str]:
  """Table lines (plus chosen settings) for one (protocol, finetune, saft)."""
  shared = _is_shared(rows)
  loss = {m: any(r["merge"] == m and (r["barrier"] is not None or r["base_barrier"] is not None)
                 for r in rows) for m in merges}
  header = ["setting"]
  for m in merges:
    name = MERGE_NAMES.get(m, m)
    header += [f"{name}: norm acc (mean ± std)", f"{name}: Δ vs baseline [95 % CI]"]
    header += [] if shared else [f"{name}: baseline norm acc"]
    header += [f"{name}: barrier", f"{name}: midpoint excess"] if loss[m] else []
  lookup = {(setting_key(r["setting"]), r["merge"]): r for r in rows}
  table = []
  for skey in dict.fromkeys(setting_key(r["setting"]) for r in rows):
    setting = next(r["setting"] for r in rows if setting_key(r["setting"]) == skey)
    cells = [setting_label(setting, keys)]
    for m in merges:
      cells += _merge_cells(lookup.get((skey, m)), shared, loss[m])
    table.append(cells)
  if shared:
    cells = [f"{method_label(finetune, BASELINE)} (baseline, plain AdamW)"]
    for m in merges:
      cells += _baseline_cells(next((r for r in rows if r["merge"] == m), None), loss[m])
    table.append(cells)
  sel_by_merge = {r["merge"]: r for r in sel}
  cells = [BY_VALIDATION]
  for m in merges:
    r = sel_by_merge.get(m)
    cells += _merge_cells(r and {**r, "barrier": None, "base_barrier": None,
                                 "midpoint_excess": None, "base_midpoint_excess": None},
                          shared, loss[m])
  table.append(cells)
  lines = [analysis.markdown_table(header, table)]
  if sel:
    lines += ["Settings chosen by validation:", ""]
    for r in sel:
      lines.append(_choices_line(r, keys))
      if not shared:
        lines.append(_choices_line(r, keys, "base_choices", " (baseline)"))
    lines.append("")
  return lines


def sweep_markdown(records: list[dict], meta: dict) -> str:
  """The sweep report: one table per protocol and method, one row per setting.

  Args:
    records: sweep records (see module docstring).
    meta: sweep meta (``keys``, ``settings``, ``seeds``, ``baseline_keys``,
      ``tasks``, optional ``title``).

  Returns:
    Markdown text.
  """
  keys = list(meta.get("keys", []))
  title = meta.get("title") or f"saft sweep over {', '.join(keys) or 'settings'}"
  seeds = list(meta.get("seeds") or sorted({r["seed"] for r in records}))
  tasks = list(meta.get("tasks") or sorted({r["task"] for r in records}))
  bkeys = list(meta.get("baseline_keys", []))
  lines = [f"# {title}", "",
           f"Seeds: {seeds}. Tasks: {', '.join(map(str, tasks))}. Settings: "
           + "; ".join(f"`{setting_label(s, keys)}`" for s in _settings(records, meta)) + ".", "",
           "Cells: normalized merged test accuracy (%), mean over tasks, then mean ± std over "
           "seeds. Δ vs baseline: paired difference (SAFT − plain AdamW) of the mean normalized "
           "test accuracy over tasks, per seed (pairs on seeds present in both), in percentage "
           "points; mean over seeds with a 95 % confidence interval from a Student "
           "t-distribution over seeds (n − 1 degrees of freedom).",
           "",
           "Baseline (plain AdamW): "
           + ("shared by all settings." if not bkeys else
              f"run at each value of {', '.join(bkeys)}; paired with the SAFT run of the same "
              "value.")
           + f" `{BY_VALIDATION}`: per seed, the setting with the highest mean normalized "
             "validation accuracy (ties: first setting); its test accuracy is reported"
           + (", and the baseline's setting is chosen the same way." if bkeys else ".")
           + " Barrier / midpoint excess (when present): joint-task loss barrier on the line "
             "between the task models and its value at the midpoint, mean over seeds.", ""]
  if not records:
    return "\n".join(lines + ["No records.", ""])
  paired, selected = paired_rows(records, meta), select_by_validation(records, meta)
  merges = _merges(records)
  for protocol in _protocols(records):
    lines += [f"## Protocol `{protocol}`: {PROTOCOL_TEXT.get(protocol, protocol)}", ""]
    for finetune, saft in _methods(records):
      rows = [r for r in paired if (r["protocol"], r["finetune"], r["saft"]) ==
              (protocol, finetune, saft)]
      if not rows:
        continue
      sel = [r for r in selected if (r["protocol"], r["finetune"], r["saft"]) ==
             (protocol, finetune, saft)]
      lines += [f"### {method_label(finetune, saft)} vs {method_label(finetune, BASELINE)}", ""]
      lines += _method_table(rows, sel, [m for m in merges if any(r["merge"] == m for r in rows)],
                             finetune, saft, keys)
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# Plot.


def _is_number(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) \
      and math.isfinite(float(v))


def _x_axis(settings: list[dict], keys: list) -> tuple[list[float], list[str] | None, bool, str]:
  """x positions, categorical tick labels (None when numeric), log scale, x label."""
  if len(keys) == 1 and settings and all(_is_number(s.get(keys[0])) for s in settings):
    xs = [float(s[keys[0]]) for s in settings]
    log = min(xs) > 0 and max(xs) / min(xs) >= 10
    return xs, None, log, keys[0]
  return (list(map(float, range(len(settings)))), [setting_label(s, keys) for s in settings],
          False, "setting")


def _zero_nan(values) -> list[float]:
  return [0.0 if v is None or math.isnan(v) else 100 * v for v in values]


def _plot_panel(ax, rows: list[dict], settings: list[dict], keys: list) -> None:
  """One (protocol, finetune) panel: SAFT lines with error bars, baseline bands."""
  import matplotlib.ticker

  xs, ticks, log, xlabel = _x_axis(settings, keys)
  xpos = {setting_key(s): x for s, x in zip(settings, xs)}
  markers = ("o", "s", "^", "D", "v")
  safts = list(dict.fromkeys(r["saft"] for r in rows))
  for i, merge in enumerate(_ordered({r["merge"] for r in rows}, MERGE_NAMES)):
    color = f"C{i}"
    name = MERGE_NAMES.get(merge, merge)
    mrows = [r for r in rows if r["merge"] == merge]
    for j, saft in enumerate(safts):
      pts = sorted((r for r in mrows if r["saft"] == saft),
                   key=lambda r: xpos[setting_key(r["setting"])])
      if pts:
        ax.errorbar([xpos[setting_key(r["setting"])] for r in pts],
                    [100 * r["norm_mean"] for r in pts], yerr=_zero_nan(r["norm_std"] for r in pts),
                    color=color, marker=markers[j % len(markers)], capsize=3,
                    label=f"{method_label(pts[0]['finetune'], saft)}, {name}")
    base = [r for r in mrows if not math.isnan(r["base_norm_mean"])]
    if not base:
      continue
    label = f"{method_label(base[0]['finetune'], BASELINE)} (plain AdamW), {name}"
    if _is_shared(mrows):
      m, s = 100 * base[0]["base_norm_mean"], base[0]["base_norm_std"]
      ax.axhline(m, color=color, ls=":", lw=1.2, label=label)
      if not math.isnan(s):
        ax.axhspan(m - 100 * s, m + 100 * s, color=color, alpha=0.12, lw=0)
    else:
      bpts = sorted({setting_key(r["setting"]): r for r in base if r["saft"] == safts[0]}.values(),
                    key=lambda r: xpos[setting_key(r["setting"])])
      bx = [xpos[setting_key(r["setting"])] for r in bpts]
      bm = np.array([100 * r["base_norm_mean"] for r in bpts])
      bs = np.array(_zero_nan(r["base_norm_std"] for r in bpts))
      ax.plot(bx, bm, ls="--", color=color, label=label)
      ax.fill_between(bx, bm - bs, bm + bs, color=color, alpha=0.12, lw=0)
  if log:
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.set_xticks(xs)
  if ticks is not None:
    ax.set_xticklabels(ticks, rotation=30, ha="right", fontsize=7)
  else:
    ax.set_xticklabels([f"{x:g}" for x in xs], fontsize=8)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("normalized merged test accuracy (%)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6)


def sweep_plot(records: list[dict], meta: dict, path: str) -> str:
  """Writes ``path`` (PNG): one panel per (protocol, finetune), accuracy vs setting.

  Args:
    records: sweep records (see module docstring).
    meta: sweep meta.
    path: output PNG path.

  Returns:
    ``path``.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  keys = list(meta.get("keys", []))
  rows = paired_rows(records, meta) if records else []
  panels = list(dict.fromkeys((r["protocol"], r["finetune"]) for r in rows)) or [None]
  fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
  for ax, panel in zip(axes[0], panels):
    if panel is None:
      ax.text(0.5, 0.5, "no SAFT records", ha="center", va="center", transform=ax.transAxes)
      continue
    prow = [r for r in rows if (r["protocol"], r["finetune"]) == panel]
    present = {setting_key(r["setting"]) for r in prow}
    settings = [s for s in _settings(records, meta) if setting_key(s) in present]
    _plot_panel(ax, prow, settings, keys)
    ax.set_title(f"protocol {panel[0]} · {FINETUNE_NAMES.get(panel[1], panel[1])}", fontsize=9)
  fig.suptitle(meta.get("title") or f"saft sweep over {', '.join(keys) or 'settings'}",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# ---------------------------------------------------------------------------
# Files.


def write_sweep_report(out_dir: str, records: list[dict], meta: dict) -> dict[str, str]:
  """Writes ``sweep.json``, ``sweep_meta.json``, ``sweep.md`` and ``sweep.png``.

  Args:
    out_dir: output directory (created if missing).
    records: sweep records.
    meta: sweep meta.

  Returns:
    ``{"records", "meta", "markdown", "plot"}`` → file paths.
  """
  os.makedirs(out_dir, exist_ok=True)
  paths = {name: os.path.join(out_dir, f) for name, f in
           (("records", "sweep.json"), ("meta", "sweep_meta.json"), ("markdown", "sweep.md"),
            ("plot", "sweep.png"))}
  for name, obj in (("records", records), ("meta", meta)):
    with open(paths[name], "w") as f:
      json.dump(obj, f, indent=1, default=analysis.to_jsonable)
  with open(paths["markdown"], "w") as f:
    f.write(sweep_markdown(records, meta))
  sweep_plot(records, meta, paths["plot"])
  return paths
