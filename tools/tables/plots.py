"""Plots of a table's cells (matplotlib, Agg), saved as PNG and PDF next to the tables.

- ``bars`` (Fig. 1): per imbalance factor, one bar per method of the Average column; one panel per metric.
- ``sweep`` (Fig. 3, Tables 7 / 11): one panel per method entry of the spec (a sweep); x = the swept value,
  one line per metric with std error bars; a two-axis sweep (K x S) draws one line per value of the second
  axis for ``plot.grid_metric`` (default: the first metric; Fig. 3a: hm_mean, the average of HM-A and HM-M).
- ``head_tail`` (every B2N table): per method, base-test head and tail accuracy averaged over the datasets.
- ``expert_load``: per LAMP run with load diagnostics, a layer x statistic heatmap of its expert loads.
Figures have a fixed size (FIGSIZE at DPI) so their pixel size is known.
"""
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tools.tables.results import AVERAGE  # noqa: E402

DPI = 100
FIGSIZE = (10, 4)          # inches -> 1000 x 400 px PNG


def _save(fig, out_dir, stem):
    paths = []
    for ext in ("png", "pdf"):
        p = Path(out_dir) / f"{stem}.{ext}"
        fig.savefig(p, dpi=DPI)
        paths.append(p)
    plt.close(fig)
    return paths


def plot_bars(spec, cells, out_dir):
    group = AVERAGE if spec.average != "none" else spec.groups()[0][0]
    fig, axes = plt.subplots(1, len(spec.metrics), figsize=FIGSIZE, squeeze=False)
    width = 0.8 / max(1, len(spec.rows))
    for ax, metric in zip(axes[0], spec.metrics):
        for i, row in enumerate(spec.rows):
            xs = [j + (i - (len(spec.rows) - 1) / 2) * width for j in range(len(spec.settings))]
            ys = [cells[(s, row.label, group, metric)].mean for s in spec.settings]
            ax.bar(xs, [y if y is not None else 0 for y in ys], width, label=row.label,
                   color=plt.cm.tab20(i % 20))    # 11 rows in Figure 1: the default cycle has only 10 colours
        ax.set_xticks(range(len(spec.settings)))
        ax.set_xticklabels([f"imb {s}" if spec.regime == "lt_b2n" else str(s) for s in spec.settings])
        ax.set_ylabel(f"average {spec.metric_label(metric)}")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(spec.title or spec.name, fontsize=9)
    fig.tight_layout()
    return _save(fig, out_dir, spec.name)


def plot_sweep(spec, cells, out_dir):
    panels = []
    for row in spec.rows:
        if not panels or panels[-1][0] != row.method:
            panels.append((row.method, []))
        panels[-1][1].append(row)
    block, group = spec.settings[0], spec.groups()[0][0]
    fig, axes = plt.subplots(1, len(panels), figsize=FIGSIZE, squeeze=False)
    for ax, (name, rows) in zip(axes[0], panels):
        axes_names = [a for a, _ in rows[0].axes] or ["variant"]
        if len(axes_names) == 2:
            metric = spec.plot.get("grid_metric", spec.metrics[0])
            first = list(dict.fromkeys(dict(r.axes)[axes_names[0]] for r in rows))
            for second in dict.fromkeys(dict(r.axes)[axes_names[1]] for r in rows):
                sel = [r for r in rows if dict(r.axes)[axes_names[1]] == second]
                _line(ax, cells, block, group, metric, sel, first, f"{axes_names[1]}={second}")
            ax.set_xlabel(axes_names[0])
            ax.set_ylabel(spec.metric_label(metric))
        else:
            xs = [dict(r.axes).get(axes_names[0], r.label) for r in rows]
            for metric in spec.metrics:
                _line(ax, cells, block, group, metric, rows, xs, spec.metric_label(metric))
            ax.set_xlabel(axes_names[0])
        ax.set_title(name or spec.name, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out_dir, spec.name)


def _line(ax, cells, block, group, metric, rows, xs, label):
    ys = [cells[(block, r.label, group, metric)].mean for r in rows]
    es = [cells[(block, r.label, group, metric)].std or 0.0 for r in rows]
    pts = [(i, y, e) for i, (y, e) in enumerate(zip(ys, es)) if y is not None]
    if pts:
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=label)
    ax.set_xticks(range(len(xs)))
    ax.set_xticklabels([str(x) for x in xs], fontsize=7)


def plot_head_tail(spec, cells, out_dir):
    groups = [g for g, _ in spec.groups() if g != AVERAGE]
    fig, axes = plt.subplots(1, len(spec.settings), figsize=FIGSIZE, squeeze=False)
    for ax, block in zip(axes[0], spec.settings):
        for k, (metric, name) in enumerate((("base_head_acc", "head"), ("base_tail_acc", "tail"))):
            ys = []
            for r in spec.rows:
                vals = [cells[(block, r.label, g, metric)].mean for g in groups]
                vals = [v for v in vals if v is not None]
                ys.append(sum(vals) / len(vals) if vals else 0.0)
            ax.bar([i + (k - 0.5) * 0.4 for i in range(len(spec.rows))], ys, 0.4, label=name)
        ax.set_xticks(range(len(spec.rows)))
        ax.set_xticklabels([r.label for r in spec.rows], rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("base-test accuracy (mean over datasets)")
        ax.set_title(f"{spec.name}: {block}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out_dir, f"{spec.name}_head_tail")


STATS = ("min", "max", "entropy")


def plot_expert_load(plan, out_dir):
    """One heatmap per run folder with ``load_diagnostics`` in its results.json (LAMP's; first seed of each
    row / dataset / setting): rows = LAMP layers, columns = the pool entries, colour = selection frequency
    x M (1 = its fair share) in the last training epoch. Older results without per-entry frequencies give
    min / max frequency x M and entropy / log M instead. Runs without selections (no pool) get none."""
    paths = []
    seen = set()
    for u in plan.members or plan.units:
        if (u.setting, u.row.label) in seen:
            continue
        path = os.path.join(u.steps[0].folder, "results.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            diag = json.load(f).get("load_diagnostics")
        layers = sorted(diag or {}, key=int)
        per_entry = all("freq" in diag[l] for l in layers)
        if not layers or (per_entry and not any(sum(diag[l]["freq"]) for l in layers)):
            continue      # no diagnostics, or nothing selected (a run without the pool, USE_POOL False)
        seen.add((u.setting, u.row.label))
        data = []
        for l in layers:
            d = diag[l]
            m = max(1.0, round(2.718281828 ** d["max_entropy"]))
            if per_entry:
                data.append([f * m for f in d["freq"]])
            else:
                data.append([d["min"] * m, d["max"] * m, d["entropy"] / d["max_entropy"] if d["max_entropy"] else 0.0])
        fig, ax = plt.subplots(figsize=(6 if per_entry else 4, 4))
        im = ax.imshow(data, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels([f"L{l}" for l in layers])
        if per_entry:
            ax.set_xlabel("pool entry (colour: selection frequency x M)")
        else:
            ax.set_xticks(range(3))
            ax.set_xticklabels(["min x M", "max x M", "H / log M"])
        ax.set_title(f"{u.row.label} {u.steps[0].dataset} seed{u.seed}", fontsize=8)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        stem = f"{plan.spec.name}_load_{u.setting}_{''.join(c if c.isalnum() else '_' for c in u.row.label)}"
        paths += _save(fig, out_dir, stem)
    return paths


def plot_all(plan, cells, out_dir):
    spec = plan.spec
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    kind = spec.plot.get("kind", "none")
    paths = []
    if kind == "bars":
        paths += plot_bars(spec, cells, out_dir)
    elif kind == "sweep":
        paths += plot_sweep(spec, cells, out_dir)
    elif kind != "none":
        raise ValueError(f"{spec.name}: unknown plot kind {kind!r} (bars, sweep, none)")
    if spec.b2n:
        paths += plot_head_tail(spec, cells, out_dir)
    paths += plot_expert_load(plan, out_dir)
    return paths
