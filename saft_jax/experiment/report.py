"""Results files of the main job: ``results.json`` and ``results.md``.

``results.json`` is a JSON list of records (run settings go to ``meta.json``);
each record holds at
least ``task``, ``finetune`` (sgd/ftts/ftlo), ``saft`` (none/asam/...), ``merge``,
``protocol``, ``seed``, ``abs_acc``, ``norm_acc``, ``ft_acc`` (fractions in
[0, 1]), ``lam`` and ``hparams``. ``results.md`` lays the task means out like the
paper's tables (SPEC §8): one row per merge, one column per fine-tuning method,
cells ``Abs / Norm`` in percent, ``mean ± std`` over seeds when there are several.

Text suites (``meta["score"]`` set) add to each record ``rank_acc``, ``exact_acc`` and
``label_words`` = ``{"this_task", "other_task", "neither"}``: the shares of the merged
model's greedy outputs on the test split that are a label word of the record's task, of
another task of the suite, or neither (they sum to 1). ``results.md`` then gets a table
of these shares per protocol, merge and method.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict

import numpy as np

PROTOCOL_TEXT = {
    "single": "one λ for all tasks, chosen from 21 points in [0, 1] by mean normalized "
              "validation accuracy (tangent-space protocol)",
    "per_task": "one λ per target task from {0.1, 0.3, 0.5, 0.7, 0.9, 1.0}, chosen by "
                "that task's validation accuracy (SAFT reference code's protocol)",
    "fixed": "no search: λ = 0.3 and default hyper-parameters (TIES k = 0.2)",
}
SCORE_TEXT = {
    "exact": "exact match of the generated (greedy) text with the true label word",
    "rank": "rank classification (the true label word has the highest sequence "
            "log-probability among the task's label words)",
}
FINETUNE_NAMES = {"sgd": "SGD", "ftts": "FTTS", "ftlo": "FTLO"}
# Display names, in the order of the tables (config.ALL_MERGES).
MERGE_NAMES = {"weight_average": "weight averaging", "task_arithmetic": "task arithmetic",
               "ties": "TIES", "dare_ties": "DARE-TIES", "breadcrumbs": "Breadcrumbs",
               "magmax": "MagMax", "consensus": "TA-Consensus",
               "consensus_ties": "TIES-Consensus", "tsv_m": "TSV-M", "iso_c": "Iso-C",
               "fisher": "Fisher merging", "regmean": "RegMean",
               "adamerging": "AdaMerging (layer-wise)"}


def method_label(finetune: str, saft: str) -> str:
  base = FINETUNE_NAMES.get(finetune, finetune)
  if saft == "none":
    return base
  return f"SAFT-{saft.upper()}" if finetune == "sgd" else f"{base}+SAFT-{saft.upper()}"


def _fmt(values) -> str:
  v = 100 * np.asarray(values, np.float64)
  return f"{v.mean():.2f}" if v.size == 1 else f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"


def summarize(records: list[dict]) -> dict:
  """Task means per (protocol, merge, finetune, saft, seed) -> (abs, norm)."""
  groups = defaultdict(list)
  for r in records:
    groups[(r["protocol"], r["merge"], r["finetune"], r["saft"], r["seed"])].append(r)
  return {k: (float(np.mean([r["abs_acc"] for r in v])),
              float(np.mean([r["norm_acc"] for r in v]))) for k, v in groups.items()}


def markdown(records: list[dict], meta: dict) -> str:
  summary = summarize(records)
  methods = sorted({(r["finetune"], r["saft"]) for r in records},
                   key=lambda m: (list(FINETUNE_NAMES).index(m[0])
                                  if m[0] in FINETUNE_NAMES else 9, m[1] != "none", m[1]))
  merges = sorted({r["merge"] for r in records},
                  key=lambda m: list(MERGE_NAMES).index(m) if m in MERGE_NAMES else 9)
  seeds = sorted({r["seed"] for r in records})
  lines = [f"# saft reproduce — suite `{meta.get('suite', '?')}`", "",
           f"Seeds: {seeds}. Tasks: {', '.join(meta.get('tasks', []))}. "
           "Cells: mean over tasks of absolute / normalized test accuracy (%)"
           + (", mean ± std over seeds." if len(seeds) > 1 else "."), ""]
  if meta.get("score"):
    lines += [f"Accuracy: {SCORE_TEXT.get(meta['score'], meta['score'])}.", ""]
  for protocol in [p for p in PROTOCOL_TEXT if any(r["protocol"] == p for r in records)]:
    lines += [f"## Protocol `{protocol}`: {PROTOCOL_TEXT[protocol]}", "",
              "| merge | " + " | ".join(method_label(*m) for m in methods) + " |",
              "|---" * (len(methods) + 1) + "|"]
    for merge in merges:
      cells = []
      for m in methods:
        vals = [summary[k] for k in [(protocol, merge, *m, s) for s in seeds] if k in summary]
        cells.append("–" if not vals else
                     f"{_fmt([a for a, _ in vals])} / {_fmt([n for _, n in vals])}")
      lines.append(f"| {MERGE_NAMES.get(merge, merge)} | " + " | ".join(cells) + " |")
    lines.append("")
  tasks = meta.get("tasks") or sorted({r["task"] for r in records})
  lines += ["## Fine-tuned (individual) test accuracy per task (%)", "",
            "| method | " + " | ".join(tasks) + " | mean |", "|---" * (len(tasks) + 2) + "|"]
  for m in methods:
    per = []
    for t in tasks:
      per.append([r["ft_acc"] for r in records if (r["finetune"], r["saft"]) == m
                  and r["task"] == t and r["protocol"] == records[0]["protocol"]
                  and r["merge"] == records[0]["merge"]])
    means = [np.mean(p) if p else np.nan for p in per]
    lines.append(f"| {method_label(*m)} | " + " | ".join(f"{100 * x:.2f}" for x in means)
                 + f" | {100 * np.nanmean(means):.2f} |")
  lines.append("")
  if any("label_words" in r for r in records):
    lines += label_word_table(records, tasks, methods, merges)
  return "\n".join(lines)


def label_word_table(records: list[dict], tasks: list, methods: list, merges: list) -> list:
  """Markdown lines: per protocol, merge and method, the shares (%) of each task's test
  outputs that are a label word of that task / of another task / neither (seed means)."""
  lines = ["## Label words of the merged models' outputs (%)", "",
           "Per task: greedy outputs that are a label word of this task / of another task "
           "of the suite / neither (test split, mean over seeds).", ""]
  for protocol in [p for p in PROTOCOL_TEXT if any(r["protocol"] == p for r in records)]:
    lines += [f"### Protocol `{protocol}`", "",
              "| merge | method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 2) + "|"]
    for merge in merges:
      for m in methods:
        cells = []
        for t in tasks:
          shares = [r["label_words"] for r in records if "label_words" in r
                    and (r["protocol"], r["merge"], r["finetune"], r["saft"], r["task"])
                    == (protocol, merge, *m, t)]
          cells.append("–" if not shares else " / ".join(
              f"{100 * np.mean([s[k] for s in shares]):.1f}"
              for k in ("this_task", "other_task", "neither")))
        lines.append(f"| {MERGE_NAMES.get(merge, merge)} | {method_label(*m)} | "
                     + " | ".join(cells) + " |")
    lines.append("")
  return lines


def write_results(out_dir: str, records: list[dict], meta: dict) -> tuple[str, str]:
  """Writes ``results.json``, ``meta.json`` and ``results.md``; returns two paths."""
  os.makedirs(out_dir, exist_ok=True)
  jpath, mpath = os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")
  with open(jpath, "w") as f:
    json.dump(records, f, indent=1)
  with open(os.path.join(out_dir, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1)
  with open(mpath, "w") as f:
    f.write(markdown(records, meta))
  return jpath, mpath
