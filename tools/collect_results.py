"""Aggregate ``results.json`` files into paper-layout tables: mean +- std over seeds, HM-A, HM-M.

Usage: ``python -m tools.collect_results OUTPUT_ROOT [--csv FILE] [--eval-key test]``

A run without the requested ``--eval-key`` but with ``test`` (a base run next to LAMP's new-class
``test_inductive``) is read from ``test``; the table's header says which runs those are.

Runs are grouped by (experiment, dataset, trainer, config). For each split (base / new / all) the
metrics are averaged over seeds first; HM-A = HM(mean base acc, mean new acc) and
HM-M = HM(mean base macro-F1, mean new macro-F1) are then taken of those means (docs/protocol.md, Scoring).
Std is the sample std (ddof=1), 0 for a single seed. The "Average" row of a method is the plain mean
of its per-dataset values (as in the LAMP paper).
"""
import argparse
import csv
import io
import json
import math
import os
import sys

from tabulate import tabulate

from engine.checkpoint import atomic_write_text
from engine.cli import run_cli
from engine.metrics import harmonic_mean

SPLITS = ("base", "new", "all")
# short name in row dicts -> key in results.json
METRICS = {"acc": "accuracy", "f1": "macro_f1", "mca": "mean_class_acc", "head_acc": "head_acc", "tail_acc": "tail_acc"}
REQUIRED = ("trainer", "dataset", "seed", "subsample_classes", "results")
FALLBACK_KEY = "test"  # read when a run lacks the requested --eval-key (runs with a single evaluation)
STD_NOTE = "mean ± std over seeds (sample std, ddof=1; 0 for a single seed)"


def _warn(msg):
    print(f"warning: {msg}", file=sys.stderr)


def mean_std(values):
    """(mean, sample std with ddof=1) of a list; std is 0 for one value; (None, None) when empty."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def find_results(root):
    """Paths of every ``results.json`` under ``root``, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if "results.json" in filenames:
            found.append(os.path.join(dirpath, "results.json"))
    return sorted(found)


def _load(path, eval_key, warn):
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        warn(f"skipping {path}: cannot read JSON ({err})")
        return None
    missing = [k for k in REQUIRED if k not in rec]
    if missing:
        warn(f"skipping {path}: missing field(s) {missing}")
        return None
    if rec["subsample_classes"] not in SPLITS:
        warn(f"skipping {path}: subsample_classes {rec['subsample_classes']!r} not in {list(SPLITS)}")
        return None
    rec["eval_key"] = eval_key
    if eval_key not in rec["results"]:
        if FALLBACK_KEY in rec["results"]:
            rec["eval_key"] = FALLBACK_KEY  # e.g. a base run of LAMP: only the new test has test_inductive
            return rec
        warn(f"skipping {path}: no results[{eval_key!r}] (has {sorted(rec['results'])})")
        return None
    return rec


def collect(root, eval_key="test", warn=_warn):
    """One row dict per (experiment, dataset, trainer, config); see the module docstring.

    Row keys: experiment, dataset, trainer, config; for each split S in base/new/all and metric M in
    acc/f1/mca/head_acc/tail_acc: ``S_M_mean``, ``S_M_std``; ``S_seeds`` (sorted list) and ``n_S``;
    ``hm_acc``, ``hm_f1``; ``warnings`` (list of str).
    """
    groups = {}
    for path in find_results(root):
        rec = _load(path, eval_key, warn)
        if rec is None:
            continue
        key = (str(rec.get("experiment", "")), rec["dataset"], rec["trainer"], str(rec.get("config", "")))
        group = groups.setdefault(key, {"runs": {s: {} for s in SPLITS}, "settings": set()})
        runs = group["runs"][rec["subsample_classes"]]
        if rec["seed"] in runs:
            kept_path, kept = runs[rec["seed"]]
            new = rec["results"][rec["eval_key"]]
            differ = [m for m in METRICS.values() if kept.get(m) != new.get(m)]
            detail = (f"; THEIR RESULTS DIFFER ({', '.join(f'{m} {kept.get(m)} vs {new.get(m)}' for m in differ)})"
                      if differ else " (same results)")
            warn(f"duplicate seed {rec['seed']} for {key} split {rec['subsample_classes']}: "
                 f"keeping {kept_path}, ignoring {path}{detail}")
            continue
        runs[rec["seed"]] = (path, rec["results"][rec["eval_key"]])
        if rec["eval_key"] != eval_key:
            group.setdefault("fallback", []).append(f"{rec['subsample_classes']} seed {rec['seed']}")
        group["settings"].add((rec.get("imb_factor"), rec.get("num_shots")))

    rows = []
    for key in sorted(groups):
        experiment, dataset, trainer, config = key
        group = groups[key]
        row = {"experiment": experiment, "dataset": dataset, "trainer": trainer, "config": config, "warnings": [],
               "eval_fallback": sorted(group.get("fallback", []))}
        for split in SPLITS:
            runs = group["runs"][split]
            row[f"{split}_seeds"] = sorted(runs)
            row[f"n_{split}"] = len(runs)
            for short, long in METRICS.items():
                values = [res.get(long) for _, res in runs.values()]
                row[f"{split}_{short}_mean"], row[f"{split}_{short}_std"] = mean_std(values)
        row["hm_acc"] = harmonic_mean(row["base_acc_mean"], row["new_acc_mean"])
        row["hm_f1"] = harmonic_mean(row["base_f1_mean"], row["new_f1_mean"])
        if row["n_base"] and row["n_new"] and row["base_seeds"] != row["new_seeds"]:
            row["warnings"].append(f"base seeds {row['base_seeds']} != new seeds {row['new_seeds']}")
        if len(group["settings"]) > 1:
            row["warnings"].append(f"runs differ in (imb_factor, num_shots): {sorted(group['settings'], key=str)}")
        for msg in row["warnings"]:
            warn(f"{experiment}/{dataset}/{trainer}/{config}: {msg}")
        rows.append(row)
    return rows


def average_rows(rows):
    """Per (experiment, trainer, config) with more than one dataset: mean over datasets of each value.

    Each value is averaged over the datasets that have it; ``n_datasets`` / ``of_datasets`` say how
    many of the experiment's datasets the method covers (a warning is added when not all).
    """
    by_method = {}
    for row in rows:
        by_method.setdefault((row["experiment"], row["trainer"], row["config"]), []).append(row)
    n_datasets = {}
    for row in rows:
        n_datasets.setdefault(row["experiment"], set()).add(row["dataset"])

    averages = []
    for (experiment, trainer, config), group in sorted(by_method.items()):
        if len(group) < 2:
            continue
        avg = {"experiment": experiment, "dataset": "Average", "trainer": trainer, "config": config,
               "n_datasets": len(group), "of_datasets": len(n_datasets[experiment]), "warnings": []}
        value_keys = [f"{s}_{m}_mean" for s in SPLITS for m in METRICS] + ["hm_acc", "hm_f1"]
        for k in value_keys:
            avg[k] = mean_std([r[k] for r in group])[0]
        if len(group) < len(n_datasets[experiment]):
            avg["warnings"].append(
                f"average over {len(group)} of {len(n_datasets[experiment])} datasets of {experiment}"
            )
        averages.append(avg)
    return averages


def _fmt(mean, std=None):
    if mean is None:
        return "-"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _cells(row, split, metric):
    return _fmt(row.get(f"{split}_{metric}_mean"), row.get(f"{split}_{metric}_std"))


def format_table(rows):
    """Markdown tables (one per experiment) with an Average row per method over datasets."""
    if not rows:
        return "no results"
    out = []
    for experiment in sorted({r["experiment"] for r in rows}):
        ex_rows = [r for r in rows if r["experiment"] == experiment]
        ex_rows = ex_rows + average_rows(ex_rows)
        has_b2n = any(r.get("n_base") or r.get("n_new") for r in ex_rows)
        has_ht = any(r.get("base_head_acc_mean") is not None for r in ex_rows)
        has_all = any(r.get("n_all") for r in ex_rows)
        headers = ["Dataset", "Method", "Config"]
        if has_b2n:
            headers += ["Base acc", "New acc", "HM-A", "Base F1", "New F1", "HM-M"]
        if has_ht:
            headers += ["Base head acc", "Base tail acc"]
        if has_all:
            headers += ["All acc", "All F1"]
        headers.append("Seeds")
        table = []
        for r in ex_rows:
            line = [r["dataset"], r["trainer"], r["config"]]
            if has_b2n:
                line += [_cells(r, "base", "acc"), _cells(r, "new", "acc"), _fmt(r["hm_acc"]),
                         _cells(r, "base", "f1"), _cells(r, "new", "f1"), _fmt(r["hm_f1"])]
            if has_ht:
                line += [_cells(r, "base", "head_acc"), _cells(r, "base", "tail_acc")]
            if has_all:
                line += [_cells(r, "all", "acc"), _cells(r, "all", "f1")]
            line.append(_seeds_cell(r, has_b2n, has_all))
            table.append(line)
        out.append(f"## {experiment or '(no experiment name)'}\n")
        out.append(tabulate(table, headers=headers, tablefmt="github", disable_numparse=True))
        out.append("")
    out.append(
        f"Cells: {STD_NOTE}. HM-A / HM-M: harmonic mean of the seed-averaged base and new accuracy / "
        "macro-F1. Average: mean over datasets of the per-dataset values. Seeds: base/new (and all); "
        "'!' marks different base and new seed sets."
    )
    return "\n".join(out)


def _seeds_cell(row, has_b2n, has_all):
    if row["dataset"] == "Average":
        if row["n_datasets"] < row["of_datasets"]:
            return f"{row['n_datasets']} of {row['of_datasets']} datasets"
        return f"{row['n_datasets']} datasets"
    parts = []
    if has_b2n:
        mark = " !" if row["n_base"] and row["n_new"] and row["base_seeds"] != row["new_seeds"] else ""
        parts.append(f"{row['n_base']}/{row['n_new']}{mark}")
    if has_all:
        parts.append(str(row["n_all"]))
    return ", ".join(parts)


def to_csv(rows):
    """CSV text of ``rows`` plus their Average rows (lists joined by spaces, None as empty)."""
    all_rows = rows + average_rows(rows)
    fields = ["experiment", "dataset", "trainer", "config", "hm_acc", "hm_f1"]
    for r in all_rows:
        fields += [k for k in r if k not in fields and k != "warnings"]
    fields.append("warnings")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in all_rows:
        writer.writerow({k: _csv_value(r.get(k)) for k in fields})
    return buf.getvalue()


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, list):
        return " ".join(str(x) for x in v) if not all(isinstance(x, str) for x in v) else "; ".join(v)
    if isinstance(v, float):
        return f"{v:.4f}"
    return v


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="output root to search for results.json files")
    parser.add_argument("--csv", default=None, help="also write the rows (and Average rows) to this CSV file")
    parser.add_argument("--eval-key", default="test", help="which entry of results.json's 'results' to read")
    args = parser.parse_args(argv)

    if not os.path.isdir(args.root):
        print(f"error: {args.root} is not a directory", file=sys.stderr)
        return 2
    if not find_results(args.root):
        print(f"error: no results.json found under {args.root}", file=sys.stderr)
        return 1
    rows = collect(args.root, eval_key=args.eval_key)
    if not rows:
        print(f"error: no usable results.json under {args.root} (see warnings above)", file=sys.stderr)
        return 1
    fallback = sum(len(r["eval_fallback"]) for r in rows)
    if fallback:
        print(f"Eval key {args.eval_key!r}; {fallback} run(s) without it (e.g. base runs, which have a single "
              f"evaluation) are read from {FALLBACK_KEY!r}: "
              + "; ".join(f"{r['dataset']}/{r['trainer']}/{r['config']}: {', '.join(r['eval_fallback'])}"
                          for r in rows if r["eval_fallback"]) + "\n")
    print(format_table(rows))
    if args.csv:
        atomic_write_text(to_csv(rows), args.csv)
        print(f"wrote {args.csv}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main)
