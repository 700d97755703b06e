"""The demo's report: the LT-B2N table, one plot and ``REPORT.md`` from the runs under a demo output folder.

    python -m tools.demo_report output/demo [--backbone tiny-world]

Reads ``<root>/base2new_imb10/**/results.json`` (as ``tools.collect_results`` does), ``<root>/timings.tsv``
(written by scripts/demo.sh) and the pretraining record next to the `tiny-world` checkpoint, and writes
``<root>/table.md``, ``<root>/results.csv``, ``<root>/demo_plot.png`` and ``<root>/REPORT.md``.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.checkpoint import atomic_write_text  # noqa: E402
from engine.cli import UserError, run_cli  # noqa: E402

EXPERIMENT = "base2new_imb10"
LA_SUFFIX = "_la"
# Row order of the summary (methods not listed follow in alphabetical order).
ORDER = ("ZeroshotCLIP", "CoOp", "CoOp+LA", "CoCoOp", "CoCoOp+LA", "MaPLe", "MaPLe+LA", "MMA", "MMA+LA", "TCP",
         "TCP+LA", "Candle", "LFA", "LAMP", "LAMP+LA")


def method_label(row):
    return row["trainer"] + ("+LA" if row["config"].endswith(LA_SUFFIX) else "")


# ---- rendering of the LT-B2N table ----------------------------------------------------------------------
# The one place that turns results.json files into rows and the markdown table; switch it to the table
# library (tables specs) when that lands.

def render_table(root):
    """(rows, markdown, csv text) of the runs under ``root``."""
    from tools.collect_results import collect, format_table, to_csv

    rows = [r for r in collect(root, warn=lambda msg: print(f"warning: {msg}", file=sys.stderr))
            if r["experiment"] == EXPERIMENT]
    if not rows:
        raise UserError(f"no finished {EXPERIMENT} runs under {root}; run bash scripts/demo.sh first")
    return rows, format_table(rows), to_csv(rows)


# ---- summary, plot, report ----------------------------------------------------------------------------

def summarise(rows):
    """Per method (in ``ORDER``): the mean over datasets of base / new / HM / head / tail."""
    keys = {"base": "base_acc_mean", "new": "new_acc_mean", "hm_a": "hm_acc", "hm_m": "hm_f1",
            "head": "base_head_acc_mean", "tail": "base_tail_acc_mean"}
    order, groups = [], {}
    for row in rows:
        label = method_label(row)
        if label not in groups:
            order.append(label)
        groups.setdefault(label, []).append(row)
    order.sort(key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))
    out = []
    for label in order:
        entry = {"method": label, "datasets": len(groups[label])}
        for short, key in keys.items():
            values = [r[key] for r in groups[label] if r.get(key) is not None]
            entry[short] = sum(values) / len(values) if values else None
        out.append(entry)
    return out


def plot(summary, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [s["method"] for s in summary]
    x = np.arange(len(labels))
    series = [("base head", "head", "#4c72b0"), ("base tail", "tail", "#dd8452"), ("new", "new", "#55a868")]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) + 2), 3.6))
    for i, (name, key, colour) in enumerate(series):
        values = [s[key] if s[key] is not None else 0.0 for s in summary]
        ax.bar(x + (i - 1) * 0.27, values, 0.27, label=name, color=colour)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.legend(ncol=3, fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_timings(root):
    timings = {}
    path = Path(root) / "timings.tsv"
    if path.is_file():
        for line in path.read_text().splitlines():
            if "\t" in line:
                name, seconds = line.rsplit("\t", 1)
                timings[name] = int(seconds)
    return timings


def pretrain_record(backbone):
    if backbone != "tiny-world":
        return None, None
    import json
    from engine.clip_loader import resolve_weights_path
    try:
        path = resolve_weights_path(backbone)
    except FileNotFoundError:
        return None, None
    meta = Path(str(path) + ".json")
    return path, (json.loads(meta.read_text()) if meta.is_file() else None)


def _f(v):
    return "-" if v is None else f"{v:.1f}"


def report_text(root, backbone, rows, summary, timings, ckpt, record):
    datasets = sorted({r["dataset"] for r in rows})
    lines = [f"# Demo: long-tailed base-to-new prompt learning on `{backbone}`", ""]
    lines += ["Long-tailed base-to-new protocol (methods.md 1.1): train on the base half of the classes, "
              "capped at 100 images per class and down-sampled to imbalance factor 10 (exponential profile), "
              f"seed 1; test on the base classes and on the unseen new classes. Datasets: {', '.join(datasets)} "
              "(generated world, datasets/world.py). Schedules are shortened (scripts/demo.sh, `demo_schedule`); "
              "epochs per run are in each results.json.", ""]
    lines += ["## Summary (mean over the datasets)", "",
              "| Method | Base | New | HM-A | HM-M | Base head | Base tail |", "|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['method']} | {_f(s['base'])} | {_f(s['new'])} | {_f(s['hm_a'])} | {_f(s['hm_m'])} "
                     f"| {_f(s['head'])} | {_f(s['tail'])} |")
    from datasets.world import DEMO_DATASETS

    chance = []
    for r in rows:
        if r["trainer"] == "ZeroshotCLIP":
            text = f"{r['dataset']} {_f(r['new_acc_mean'])}%"
            if r["dataset"] in DEMO_DATASETS:
                n_new = len(DEMO_DATASETS[r["dataset"]][2]) // 2
                text += f" (chance {100 / n_new:.1f}%)"
            chance.append(text)
    lines += ["", "Accuracies in %. HM-A / HM-M: harmonic mean of base and new accuracy / macro-F1. Head / tail: "
              "base test accuracy on the classes with the most / fewest training images.", ""]
    if chance:
        lines += ["Zero-shot new-class accuracy per dataset: " + "; ".join(chance) + ".", ""]
    lines += ["![head, tail and new accuracy per method](demo_plot.png)", ""]
    lines += ["## Time", ""]
    names = {"data": "generate the demo datasets", "pretrain": "pretrain (or reuse) tiny-world",
             "runs": "all training and evaluation runs", "total": "whole demo"}
    for key, text in names.items():
        if key in timings:
            lines.append(f"- {text}: {timings[key]} s")
    try:
        load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
        lines.append(f"- machine: {os.cpu_count()} CPU cores, load average at report time {load}")
    except OSError:
        pass
    runs = sorted((k[4:], v) for k, v in timings.items() if k.startswith("run "))
    if runs:
        lines += ["", "<details><summary>seconds per run (method, dataset)</summary>", ""]
        lines += [f"- {name}: {sec} s" for name, sec in runs]
        lines += ["", "</details>"]
    if record:
        zs = ", ".join(f"{k} {v:.1f}% (chance {record['chance'][k]:.1f}%)" for k, v in record["zero_shot"].items())
        lines += ["", "## The pretrained model", "",
                  f"`{ckpt}` (sha256 `{record['sha256'][:16]}…`), pretrained in {record['seconds']} s "
                  f"({record['params']['steps']} steps of {record['params']['batch_size']} image-caption pairs, "
                  f"{record['threads']} thread(s)); held-out zero-shot accuracy: {zs}. Parameters and the "
                  f"training log: `{ckpt}.json`."]
    lines += ["", "## Files", "",
              f"- `{root}/table.md`: the full table (per dataset, with macro-F1)",
              f"- `{root}/results.csv`: the same rows as CSV",
              f"- `{root}/demo_plot.png`: the plot above",
              f"- `{root}/{EXPERIMENT}/train_base|test_new/<dataset>/<trainer>/<config>/seed1/`: each run "
              "(config, log.txt, results.json, manifest.json, checkpoints)",
              f"- `{root}/logs/`: one log per (dataset, method) and the pretraining log",
              f"- `{root}/data/`: the generated datasets", ""]
    lines += ["What this shows and does not: the world is generated (coloured shapes and textures at 32 px), "
              "so the numbers say that each method runs the protocol end to end and how it moves base, new, "
              "head and tail accuracy on a small pretrained CLIP — not how it does on ImageNet-scale data.", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="demo output folder (DEMO_OUTPUT)")
    p.add_argument("--backbone", default="tiny-world")
    a = p.parse_args(argv)
    root = a.root
    if not os.path.isdir(root):
        raise UserError(f"{root} is not a folder; run bash scripts/demo.sh first")
    rows, table, csv_text = render_table(root)
    summary = summarise(rows)
    atomic_write_text(table + "\n", os.path.join(root, "table.md"))
    atomic_write_text(csv_text, os.path.join(root, "results.csv"))
    plot(summary, os.path.join(root, "demo_plot.png"),
         f"LT base-to-new (imbalance 10) on {a.backbone}: mean over {len({r['dataset'] for r in rows})} datasets")
    ckpt, record = pretrain_record(a.backbone)
    text = report_text(root, a.backbone, rows, summary, read_timings(root), ckpt, record)
    atomic_write_text(text, os.path.join(root, "REPORT.md"))
    print(table)
    print()
    print("\n".join(text.split("\n")[4:6 + len(summary) + 1]))
    print(f"\n[demo] wrote {root}/REPORT.md, {root}/table.md, {root}/results.csv, {root}/demo_plot.png")
    return 0


if __name__ == "__main__":
    run_cli(main)
