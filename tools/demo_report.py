"""The demo's report: summary, one plot and ``REPORT.md`` from the demo table's runs.

    python -m tools.demo_report output/demo --data output/demo/data [--backbone tiny-world] --opts KEY VALUE ...

The runs are those of the table spec ``configs/tables/demo.yaml`` (launched by ``python -m tools.tables demo``
with the same ``--output``, ``--data`` and ``--opts``); their cells come from the table library
(``tools.tables.collect``), the same numbers as ``<root>/tables/demo/demo.md``. Also reads
``<root>/timings.tsv`` (written by scripts/demo.sh) and the pretraining record next to the `tiny-world`
checkpoint, and writes ``<root>/demo_plot.png`` and ``<root>/REPORT.md``.
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.checkpoint import atomic_write_text  # noqa: E402
from engine.cli import UserError, run_cli  # noqa: E402

SPEC = "demo"
EXPERIMENT = "base2new_imb10"
SUMMARY_METRICS = {"base": "base_acc", "new": "new_acc", "hm_a": "hm_acc", "hm_m": "hm_f1",
                   "head": "base_head_acc", "tail": "base_tail_acc"}


def demo_plan(root, data, opts):
    from tools.tables import build_plan, load_spec
    return build_plan(load_spec(SPEC), root, data, opts)


def summarise(plan, cells):
    """Per row of the spec: the mean over the datasets of base / new / HM / head / tail (finished runs only)."""
    from tools.tables.results import AVERAGE
    setting = plan.spec.settings[0]
    out = []
    for row in plan.spec.rows:
        entry = {"method": row.label}
        for short, metric in SUMMARY_METRICS.items():
            entry[short] = cells[(setting, row.label, AVERAGE, metric)].mean
        if entry["base"] is not None:
            out.append(entry)
    if not out:
        raise UserError(f"no finished demo runs under {plan.output}; run bash scripts/demo.sh first")
    return out


def zero_shot_new(plan, cells):
    """[(dataset, new-class accuracy of zero-shot CLIP)] for the datasets where it finished (zero-shot CLIP: the
    row of a method that does not train, by its registry entry)."""
    from engine.registry import TRAINER_REGISTRY
    setting = plan.spec.settings[0]
    rows = [r for r in plan.spec.rows if not TRAINER_REGISTRY.info(r.trainer).trains]
    if not rows:
        return []
    return [(d.name, cells[(setting, rows[0].label, d.name, "new_acc")].mean) for d in plan.spec.datasets
            if cells[(setting, rows[0].label, d.name, "new_acc")].mean is not None]


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


def launch_text(root):
    """How the last launch ran the demo's runs (the table launcher's tables/demo/launch_report.json), or None."""
    path = Path(root) / "tables" / "demo" / "launch_report.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    jobs, done = report.get("jobs") or [], report.get("skipped_done", 0)
    if report.get("launcher") == "slurm":
        arrays = sorted({j.split("_")[0] for j in jobs})
        how = (f"through SLURM: {len(jobs)} task(s) of job array {', '.join(arrays)}" if jobs else
               "through SLURM (nothing left to submit)")
    else:
        how = (f"through submitit's local executor: {len(jobs)} job(s)" if jobs else
               "locally (nothing left to submit)")
    return (f"Runs launched {how}; {report.get('pending', 0)} unit(s) submitted (a training run with its "
            f"evaluations each), {done} finished before.")


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


def report_text(root, backbone, plan, summary, zero_shot, timings, ckpt, record):
    datasets = [d.name for d in plan.spec.datasets]
    lines = [f"# Demo: long-tailed base-to-new prompt learning on `{backbone}`", ""]
    lines += ["Long-tailed base-to-new protocol (docs/protocol.md): train on the base half of the classes, "
              "capped at 100 images per class and down-sampled to imbalance factor 10 (exponential profile), "
              f"seed 1; test on the base classes and on the unseen new classes. Datasets: {', '.join(datasets)} "
              "(generated world, datasets/world.py). Runs, rows and shortened schedules: the table spec "
              "configs/tables/demo.yaml (launched by `python -m tools.tables demo`).", ""]
    lines += ["## Summary (mean over the datasets)", "",
              "| Method | Base | New | HM-A | HM-M | Base head | Base tail |", "|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['method']} | {_f(s['base'])} | {_f(s['new'])} | {_f(s['hm_a'])} | {_f(s['hm_m'])} "
                     f"| {_f(s['head'])} | {_f(s['tail'])} |")
    from datasets.world import DEMO_DATASETS

    classes_by_config = {cfg_name: len(classes) for cfg_name, _, classes, *_ in DEMO_DATASETS.values()}
    chance = []
    for dataset, acc in zero_shot:
        text = f"{dataset} {_f(acc)}%"
        if dataset in classes_by_config:
            n_new = classes_by_config[dataset] - (classes_by_config[dataset] + 1) // 2  # new = second half
            text += f" (chance {100 / n_new:.1f}%)"
        chance.append(text)
    lines += ["", "Accuracies in %. HM-A / HM-M: harmonic mean of base and new accuracy / macro-F1. Head / tail: "
              "base test accuracy on the classes with the most / fewest training images.", ""]
    if chance:
        lines += ["Zero-shot new-class accuracy per dataset: " + "; ".join(chance) + ".", ""]
    lines += ["![head, tail and new accuracy per method](demo_plot.png)", ""]
    launch = launch_text(root)
    if launch:
        lines += ["## Launch", "", launch, ""]
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
              f"- `{root}/tables/demo/demo.md` (also `.csv`, `.tex`, plots): the table per dataset, from the table "
              "library",
              f"- `{root}/demo_plot.png`: the plot above",
              f"- `{root}/{EXPERIMENT}/train_base|test_new/<dataset>/<trainer>/<config>/seed1/`: each run "
              "(config, log.txt, results.json, manifest.json, checkpoints)",
              f"- `{root}/logs/`: the pretraining and table-launch logs; each run's own `log.txt` is in its folder",
              f"- `{root}/data/`: the generated datasets", ""]
    lines += ["What this shows and does not: the world is generated (coloured shapes and textures at 32 px), "
              "so the numbers say that each method runs the protocol end to end and how it moves base, new, "
              "head and tail accuracy on a small pretrained CLIP — not how it does on ImageNet-scale data.", ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="demo output folder (DEMO_OUTPUT; the --output of python -m tools.tables demo)")
    p.add_argument("--data", default=None, help="datasets root (default: ROOT/data)")
    p.add_argument("--backbone", default="tiny-world")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="the --opts given to python -m tools.tables demo")
    a = p.parse_args(argv)
    root = a.root
    if not os.path.isdir(root):
        raise UserError(f"{root} is not a folder; run bash scripts/demo.sh first")
    from tools.tables import collect
    plan = demo_plan(root, a.data or os.path.join(root, "data"), a.opts)
    cells = collect(plan, warn=lambda msg: print(f"warning: {msg}", file=sys.stderr))
    summary = summarise(plan, cells)
    plot(summary, os.path.join(root, "demo_plot.png"),
         f"LT base-to-new (imbalance 10) on {a.backbone}: mean over {len(plan.spec.datasets)} datasets")
    ckpt, record = pretrain_record(a.backbone)
    text = report_text(root, a.backbone, plan, summary, zero_shot_new(plan, cells), read_timings(root), ckpt, record)
    atomic_write_text(text, os.path.join(root, "REPORT.md"))
    lines = text.split("\n")
    first = lines.index("## Summary (mean over the datasets)")
    print("\n".join(lines[first: first + 4 + len(summary)]))  # heading, blank, header, rule, one row per method
    print(f"\n[demo] wrote {root}/REPORT.md, {root}/demo_plot.png; the full table: {root}/tables/demo/demo.md")
    return 0


if __name__ == "__main__":
    run_cli(main)
