"""Render: a spec's cells in the paper's layout as markdown, CSV and LaTeX, with the paper's numbers beside ours.

Rounding: every number is printed with two decimals (``f"{x:.2f}"``, round-half-even on the binary value, as
Python formats floats), like the paper; differences are ours minus the paper's, computed from the unrounded
mean. Best per column (highest mean within a block) among the paper's methods is bold, as in the paper; rows
the paper does not have are marked with a dagger. A spec's notes print under the markdown table and in the
LaTeX caption; the LaTeX is a complete ``table`` environment (booktabs + graphicx), label ``tab:<name>``.

Paper-number files (``configs/tables/<table>_paper.csv``): columns ``block,row,group,metric,value,line`` --
block = the setting (imbalance factor / shots) of the spec, row = the row label, group = dataset name or
``__average__``, value as printed in the paper, line = its line in ``lamp_paper.txt`` (or in the spec's
``paper_source``). Rows or cells the paper does not report are shown as "–" (e.g. methods added after the paper).
"""
import csv
import io
from pathlib import Path


PAPER_FIELDS = ["block", "row", "group", "metric", "value", "line"]


def note(spec):
    """The conventions line printed with every table (the Average column's HM convention is the spec's)."""
    avg = ("plain mean of the per-dataset means (no ±)" if spec.average_hm == "per_dataset" else
           "plain mean of the per-dataset means (no ±); its HM cells are the HM of the average base and new")
    return ("Cells: mean ± sample std (ddof=1) over seeds, two decimals. HM-A / HM-M: harmonic mean of the "
            "seed-averaged base and new accuracy / macro-F1 (± over per-seed HMs). Average columns: " + avg +
            ". (k/n): only k of the n seeds are finished. Bold: best in its column among the paper's methods.")


def shown_paper(spec, paper):
    """The paper numbers to show: none for the rows the spec marks as not comparable (paper_omit_rows)."""
    if not paper:
        return paper
    omit = set(spec.paper_omit_rows)
    return {k: v for k, v in paper.items() if k[1] not in omit}


def added_rows(spec, paper):
    """Rows that are not the paper's methods (no paper number at all): marked, and not bolded against it."""
    if not paper:
        return set()
    in_paper = {k[1] for k in paper} | set(spec.paper_omit_rows)
    return {r.label for r in spec.rows if r.label not in in_paper}


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


def _best(spec, cells, block, added=frozenset()):
    """The best mean per column among the paper's methods (every row when there is no paper)."""
    best = {}
    for g, _, m in _columns(spec):
        vals = [cells[(block, r.label, g, m)].mean for r in spec.rows if r.label not in added]
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
    paper = shown_paper(spec, paper)
    added = added_rows(spec, paper)
    cols = _columns(spec)
    headers = [spec.first_column_label()] + [_header(spec, gl, m) for _, gl, m in cols]
    out = [f"# {spec.title or spec.name}", "", note(spec), ""]

    def label(r):
        return f"{r.label} †" if r.label in added else r.label

    for block in spec.block_keys():
        if spec.blocks:
            out += [f"## {_block_title(spec, block)}", ""]
        best = _best(spec, cells, block, added)
        lines = []
        for r in spec.rows:
            line = [label(r)]
            for g, _, m in cols:
                c = cells[(block, r.label, g, m)]
                line.append(_cell_text(c, bold=c.mean is not None and r.label not in added and best.get((g, m)) == c.mean))
            lines.append(line)
        out += [_md_table(headers, lines), ""]
        if paper:
            p_lines, d_lines = [], []
            for r in spec.rows:
                pl, dl = [label(r)], [label(r)]
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
    notes = table_notes(spec, added)
    if notes:
        out += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
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


def table_notes(spec, added=()):
    """The spec's notes, plus the mark of the rows that are not in the paper."""
    notes = list(spec.notes)
    if added:
        notes.append("† Not in the paper (no paper numbers); bold is the best of the paper's methods only.")
    return notes


def to_csv(spec, cells, paper=None):
    paper = shown_paper(spec, paper)
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


_TEX_CHARS = [("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
              ("$", r"\$"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\textasciicircum{}")]
_TEX_UNICODE = {"α": r"$\alpha$", "β": r"$\beta$", "γ": r"$\gamma$", "λ": r"$\lambda$", "μ": r"$\mu$",
                "±": r"$\pm$", "×": r"$\times$", "≥": r"$\geq$", "≤": r"$\leq$", "→": r"$\rightarrow$",
                "−": "-", "–": "--", "—": "---", "’": "'", "‘": "`", "“": "``", "”": "''", "†": r"$^\dagger$",
                "…": r"\dots{}"}


def _tex_escape(text):
    text = str(text)
    out = []
    for ch in text:
        for a, b in _TEX_CHARS:
            if ch == a:
                ch = b
                break
        else:
            ch = _TEX_UNICODE.get(ch, ch)
        out.append(ch)
    return "".join(out)


def _chunks(spec):
    """Column groups split so that no tabular has more than ``spec.tex_max_columns`` value columns (the
    paper splits its wide tables the same way: Table 2 in two halves)."""
    groups = spec.groups()
    per = max(1, spec.tex_max_columns // max(1, len(spec.metrics)))
    n = -(-len(groups) // per)
    size = -(-len(groups) // n)
    return [groups[i:i + size] for i in range(0, len(groups), size)]


def latex(spec, cells, paper=None, paper_values=False):
    """A complete ``table`` environment (booktabs, graphicx): caption = title + notes, label ``tab:<name>``;
    one tabular per block and column chunk; best per column among the paper's methods in bold, added rows
    marked with a dagger; with ``paper_values`` each cell also shows the paper's value in parentheses."""
    paper = shown_paper(spec, paper)
    added = added_rows(spec, paper)
    nm = len(spec.metrics)
    caption = _tex_escape(spec.title or spec.name)
    notes = table_notes(spec, added)
    if paper_values and paper:
        notes.append("In parentheses: the paper's value.")
    if notes:
        caption += ". " + " ".join(_tex_escape(n) for n in notes)
    out = [f"% {spec.title or spec.name} -- generated by tools/tables; needs \\usepackage{{booktabs}} and "
           f"\\usepackage{{graphicx}}",
           "\\begin{table}[t]", "\\centering", f"\\caption{{{caption}}}", f"\\label{{tab:{spec.name}}}",
           "\\small", "\\setlength{\\tabcolsep}{4pt}"]
    first = True
    for block in spec.block_keys():
        best = _best(spec, cells, block, added)
        for groups in _chunks(spec):
            if not first:
                out.append("\\par\\medskip")
            first = False
            out += ["\\resizebox{\\ifdim\\width>\\linewidth\\linewidth\\else\\width\\fi}{!}{%",
                    "\\begin{tabular}{l" + "c" * (len(groups) * nm) + "}", "\\toprule"]
            title = _tex_escape(_block_title(spec, block) if spec.blocks else spec.first_column_label())
            if len(spec.groups()) > 1:
                out.append(title + " & " + " & ".join(f"\\multicolumn{{{nm}}}{{c}}{{{_tex_escape(gl)}}}" for _, gl in groups) + " \\\\")
                out.append("".join(f"\\cmidrule(lr){{{2 + i * nm}-{1 + (i + 1) * nm}}}" for i in range(len(groups))))
                out.append((_tex_escape(spec.first_column_label()) if spec.blocks else "") + " & "
                           + " & ".join(_tex_escape(spec.metric_label(m)) for _ in groups for m in spec.metrics) + " \\\\")
            else:
                out.append(title + " & " + " & ".join(_tex_escape(spec.metric_label(m)) for m in spec.metrics) + " \\\\")
            out.append("\\midrule")
            rows = [r for r in spec.rows if r.label not in added] + [r for r in spec.rows if r.label in added]
            for i, r in enumerate(rows):
                if i and r.label in added and rows[i - 1].label not in added:
                    out.append("\\midrule")
                parts = [_tex_escape(r.label) + ("$^\\dagger$" if r.label in added else "")]
                for g, _ in groups:
                    for m in spec.metrics:
                        parts.append(_tex_cell(cells[(block, r.label, g, m)], r.label not in added and
                                               best.get((g, m)) == cells[(block, r.label, g, m)].mean,
                                               (paper or {}).get((block, r.label, g, m)) if paper_values else None))
                out.append(" & ".join(parts) + " \\\\")
            out += ["\\bottomrule", "\\end{tabular}}"]
    out += ["\\end{table}", ""]
    return "\n".join(out)


def _tex_cell(c, bold, paper_value):
    if c.mean is None:
        v = "--"
    else:
        v = fmt(c.mean)
        if bold:
            v = f"\\textbf{{{v}}}"
        if c.std is not None:
            v += f"{{\\scriptsize$\\pm${fmt(c.std)}}}"
        if c.n < c.of:
            v += f"\\textsuperscript{{({c.n}/{c.of})}}"
    if paper_value is not None:
        v += f" {{\\scriptsize({_tex_escape(paper_value[1])})}}"
    return v


def write_all(spec, cells, out_dir, paper=None, plots=(), tex_paper=False):
    """Write <name>.md / .csv / .tex into ``out_dir``; returns their paths. ``tex_paper``: the paper's value
    next to ours in the LaTeX table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext, text in (("md", markdown(spec, cells, paper, plots)), ("csv", to_csv(spec, cells, paper)),
                      ("tex", latex(spec, cells, paper, tex_paper))):
        p = out_dir / f"{spec.name}.{ext}"
        p.write_text(text)
        paths.append(p)
    return paths
