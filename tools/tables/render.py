"""Render: a spec's cells in the paper's layout as markdown, CSV and LaTeX, with the paper's numbers beside ours.

Rounding: every number is printed with two decimals (``f"{x:.2f}"``, round-half-even on the binary value, as
Python formats floats), like the paper; differences are ours minus the paper's, computed from the unrounded
mean. Best per column (highest mean within a block) is bold, as in the paper.

Paper-number files (``configs/tables/<table>_paper.csv``): columns ``block,row,group,metric,value,line`` --
block = the setting (imbalance factor / shots) of the spec, row = the row label, group = dataset name or
``__average__``, value as printed in the paper, line = its line in ``lamp_paper.txt`` (or in the spec's
``paper_source``). Rows or cells the paper does not report are shown as "–" (e.g. methods added after the paper).
"""
import csv
import io
from pathlib import Path


PAPER_FIELDS = ["block", "row", "group", "metric", "value", "line"]
NOTE = ("Cells: mean ± sample std (ddof=1) over seeds, two decimals. HM-A / HM-M: harmonic mean of the "
        "seed-averaged base and new accuracy / macro-F1 (± over per-seed HMs). Average columns: plain mean of "
        "the per-dataset means (no ±). (k/n): only k of the n seeds are finished. Bold: best in its column.")


def fmt(x):
    return "–" if x is None else f"{x:.2f}"


def read_paper(path):
    """{(block, row, group, metric): (value as float, value text, line)} of a paper-number CSV."""
    out = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != PAPER_FIELDS:
            raise ValueError(f"{path}: columns must be {PAPER_FIELDS}, got {reader.fieldnames}")
        for i, rec in enumerate(reader, start=2):
            key = (int(rec["block"]), rec["row"], rec["group"], rec["metric"])
            if key in out:
                raise ValueError(f"{path}:{i}: duplicate cell {key}")
            out[key] = (float(rec["value"]), rec["value"], int(rec["line"]))
    return out


def layout_keys(spec):
    """Every (block, row, group, metric) of the layout, in reading order."""
    return [(b, r.label, g, m) for b in spec.block_keys() for r in spec.rows for g, _ in spec.groups() for m in spec.metrics]


def _columns(spec):
    return [(g, glabel, m) for g, glabel in spec.groups() for m in spec.metrics]


def _header(spec, glabel, m):
    single = len(spec.groups()) == 1
    return spec.metric_label(m) if single else f"{glabel} {spec.metric_label(m)}"


def _best(spec, cells, block):
    best = {}
    for g, _, m in _columns(spec):
        vals = [cells[(block, r.label, g, m)].mean for r in spec.rows]
        vals = [v for v in vals if v is not None]
        if len(vals) > 1:
            best[(g, m)] = max(vals)
    return best


def _cell_text(cell, bold=False):
    if cell.mean is None:
        return "–" if not cell.n else f"– ({cell.n}/{cell.of})"
    text = fmt(cell.mean) if cell.std is None else f"{fmt(cell.mean)} ± {fmt(cell.std)}"
    if bold:
        text = f"**{text}**"
    if cell.n < cell.of:
        text += f" ({cell.n}/{cell.of})"
    return text


def _block_title(spec, block):
    if spec.regime == "lt_b2n":
        return f"imb = {block}"
    if spec.regime == "fewshot":
        return f"{block}-shot"
    return f"source imb = {block}"


def _md_table(headers, lines):
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def markdown(spec, cells, paper=None, plots=()):
    cols = _columns(spec)
    headers = ["Method"] + [_header(spec, gl, m) for _, gl, m in cols]
    out = [f"# {spec.title or spec.name}", "", NOTE, ""]
    for block in spec.block_keys():
        if spec.blocks:
            out += [f"## {_block_title(spec, block)}", ""]
        best = _best(spec, cells, block)
        lines = []
        for r in spec.rows:
            line = [r.label]
            for g, _, m in cols:
                c = cells[(block, r.label, g, m)]
                line.append(_cell_text(c, bold=c.mean is not None and best.get((g, m)) == c.mean))
            lines.append(line)
        out += [_md_table(headers, lines), ""]
        if paper:
            p_lines, d_lines = [], []
            for r in spec.rows:
                pl, dl = [r.label], [r.label]
                for g, _, m in cols:
                    p = paper.get((block, r.label, g, m))
                    ours = cells[(block, r.label, g, m)].mean
                    pl.append("–" if p is None else p[1])
                    dl.append("–" if p is None or ours is None else f"{ours - p[0]:+.2f}")
                p_lines.append(pl)
                d_lines.append(dl)
            lines_used = sorted({paper[k][2] for k in paper if k[0] == block})
            src = f"lines {lines_used[0]}–{lines_used[-1]}" if lines_used else "no lines"
            out += [f"Paper ({src} of {spec.paper_source}):", "", _md_table(headers, p_lines), "",
                    "Ours − paper:", "", _md_table(headers, d_lines), ""]
    if spec.b2n:
        out += ["## Head / tail accuracy on the base test (extra view; not in the paper)", "",
                "Head: the top 20% of base classes by training images after down-sampling; tail: the rest.", ""]
        ht_headers = ["Setting", "Method"] + [f"{gl} {x}" for g, gl in spec.groups() for x in ("Head", "Tail")]
        lines = []
        for block in spec.block_keys():
            for r in spec.rows:
                line = [str(block), r.label]
                for g, _ in spec.groups():
                    line += [_cell_text(cells[(block, r.label, g, "base_head_acc")]),
                             _cell_text(cells[(block, r.label, g, "base_tail_acc")])]
                lines.append(line)
        out += [_md_table(ht_headers, lines), ""]
    if plots:
        out += ["Plots: " + ", ".join(str(p) for p in plots), ""]
    return "\n".join(out)


def to_csv(spec, cells, paper=None):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["block", "row", "group", "metric", "mean", "std", "n_seeds", "of_seeds", "paper", "paper_line", "diff"])
    metrics = list(spec.metrics)
    if spec.b2n:
        metrics += [m for m in ("base_head_acc", "base_tail_acc") if m not in metrics]
    for block in spec.block_keys():
        for r in spec.rows:
            for g, _ in spec.groups():
                for m in metrics:
                    c = cells[(block, r.label, g, m)]
                    p = (paper or {}).get((block, r.label, g, m))
                    w.writerow([block, r.label, g, m, "" if c.mean is None else f"{c.mean:.4f}",
                                "" if c.std is None else f"{c.std:.4f}", c.n, c.of,
                                "" if p is None else p[1], "" if p is None else p[2],
                                "" if p is None or c.mean is None else f"{c.mean - p[0]:.4f}"])
    return buf.getvalue()


def _tex_escape(text):
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
        text = text.replace(a, b)
    return text


def latex(spec, cells):
    """booktabs tables (one per block), best per column in bold, std in small type."""
    groups = spec.groups()
    nm = len(spec.metrics)
    out = [f"% {spec.title or spec.name} -- generated by tools/tables; requires \\usepackage{{booktabs}}"]
    for block in spec.block_keys():
        best = _best(spec, cells, block)
        out += ["\\begin{tabular}{l" + "c" * (len(groups) * nm) + "}", "\\toprule"]
        title = _tex_escape(_block_title(spec, block) if spec.blocks else "Method")
        if len(groups) > 1:
            out.append(title + " & " + " & ".join(f"\\multicolumn{{{nm}}}{{c}}{{{_tex_escape(gl)}}}" for _, gl in groups) + " \\\\")
            out.append("".join(f"\\cmidrule(lr){{{2 + i * nm}-{1 + (i + 1) * nm}}}" for i in range(len(groups))))
            out.append(" & " + " & ".join(_tex_escape(spec.metric_label(m)) for _ in groups for m in spec.metrics) + " \\\\")
        else:
            out.append(title + " & " + " & ".join(_tex_escape(spec.metric_label(m)) for m in spec.metrics) + " \\\\")
        out.append("\\midrule")
        for r in spec.rows:
            parts = [_tex_escape(r.label)]
            for g, _ in groups:
                for m in spec.metrics:
                    c = cells[(block, r.label, g, m)]
                    if c.mean is None:
                        parts.append("--")
                        continue
                    v = fmt(c.mean)
                    if best.get((g, m)) == c.mean:
                        v = f"\\textbf{{{v}}}"
                    if c.std is not None:
                        v += f"{{\\scriptsize$\\pm${fmt(c.std)}}}"
                    parts.append(v)
            out.append(" & ".join(parts) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}", ""]
    return "\n".join(out)


def write_all(spec, cells, out_dir, paper=None, plots=()):
    """Write <name>.md / .csv / .tex into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext, text in (("md", markdown(spec, cells, paper, plots)), ("csv", to_csv(spec, cells, paper)),
                      ("tex", latex(spec, cells))):
        p = out_dir / f"{spec.name}.{ext}"
        p.write_text(text)
        paths.append(p)
    return paths
