"""Issue 17, §2 and §4: caveats reach the reader (notes, paper cells that are not comparable, the Average HM
convention) and LaTeX a researcher can paste (complete table environment, split wide blocks, the paper's
value as an option, bold among the paper's methods, the swept key as first column label, and every .tex
compiles with pdflatex)."""
import os
import random
import re
import shutil
import subprocess

import pytest

from engine.metrics import harmonic_mean
from tools.tables import build_plan, collect, load_spec
from tools.tables.render import latex, markdown, read_paper, to_csv
from tools.tables.results import AVERAGE, Cell
from tools.tables.spec import SPEC_DIR, SpecError

SPECS = sorted(p.stem for p in SPEC_DIR.glob("*.yaml") if p.stem not in ("datasets", "table5"))


def _cells(spec, seed=0, missing=()):
    """Every cell of ``spec`` with a random value (rows in ``missing`` empty)."""
    rng = random.Random(seed)
    groups = [g for g, _ in spec.groups()]
    metrics = list(spec.metrics) + (["base_head_acc", "base_tail_acc"] if spec.b2n else [])
    return {(b, r.label, g, m): (Cell(None, None, 0, len(spec.seeds)) if r.label in missing else
                                 Cell(rng.uniform(20, 90), None if g == AVERAGE else rng.uniform(0, 2),
                                      len(spec.seeds), len(spec.seeds)))
            for b in spec.settings for r in spec.rows for g in groups for m in metrics}


def _paper(spec):
    return read_paper(spec.paper) if spec.paper else None


# ---- §2 caveats

def test_notes_print_under_the_markdown_table_and_in_the_latex_caption():
    spec = load_spec("table3")
    assert any("w/o Source" in n and "includes" not in n and "source included" in n for n in spec.notes)
    cells = _cells(spec)
    md = markdown(spec, cells, _paper(spec))
    notes_at = md.index("Notes:")
    assert md.index("| CoOp+LA |") < notes_at and md.index("Ours − paper:") < notes_at
    for n in spec.notes:
        assert f"- {n}" in md[notes_at:]
    caption = re.search(r"\\caption\{(.*)\}\n", latex(spec, cells, _paper(spec))).group(1)
    assert caption.startswith("Table 3: long-tailed cross-dataset transfer") and "w/o Source" in caption
    assert "batch 4" in caption


def test_table6_clip_paper_cells_render_as_absent():
    """The paper's CLIP row repeats CoOp+LA's Table 1 numbers: no paper value, no difference for it."""
    spec = load_spec("table6")
    assert spec.paper_omit_rows == ["CLIP"] and any("CoOp+LA" in n and "CLIP" in n for n in spec.notes)
    paper = _paper(spec)
    assert (10, "CLIP", "imagenet", "hm_acc") in paper            # the CSV keeps the printed value ...
    cells = _cells(spec)
    md = markdown(spec, cells, paper)
    paper_md, diff_md = md.split("Paper (lines")[1].split("Ours − paper:")
    for part in (paper_md, diff_md):
        clip = next(l for l in part.splitlines() if l.startswith("| CLIP |"))
        assert set(clip.strip("| ").split(" | ")[1:]) == {"–"}      # ... but it is not shown
        full = next(l for l in part.splitlines() if l.startswith("| MPP+MSP+LBO |"))
        assert "–" not in full
    rows = [r.split(",") for r in to_csv(spec, cells, paper).splitlines()[1:]]
    assert all(r[8] == "" and r[10] == "" for r in rows if r[1] == "CLIP")
    assert all(r[8] != "" for r in rows if r[1] == "MPP" and r[3] in ("hm_acc", "hm_f1"))
    with pytest.raises(SpecError, match="paper_omit_rows names"):
        load_spec({"name": "x", "regime": "lt_b2n", "settings": [10], "seeds": [1], "datasets": ["dtd"],
                   "methods": [{"trainer": "CoOp", "config": "vit_b16_ep50"}], "paper_omit_rows": ["Nope"]})


def _b2n_spec(average_hm):
    return load_spec({"name": "avg", "regime": "fewshot", "settings": [16], "seeds": [1],
                      "datasets": ["dtd", "eurosat"], "methods": [{"trainer": "CoOp", "config": "vit_b16_ep50"}],
                      "layout": {"metrics": ["base_acc", "new_acc", "hm_acc", "hm_f1", "hm_mean"],
                                 "average_hm": average_hm}})


@pytest.mark.parametrize("average_hm", ["per_dataset", "of_averages"])
def test_average_hm_convention(tmp_path, average_hm):
    from tests.test_tables import _write_result
    spec = _b2n_spec(average_hm)
    plan = build_plan(spec, tmp_path)
    values = {"dtd": (90.0, 30.0), "eurosat": (60.0, 60.0)}      # per-dataset HMs 45 and 60
    for u in plan.units:
        base, new = values[u.steps[0].dataset]
        _write_result(u.steps[0], "base", base, base - 10, 1)
        _write_result(u.steps[1], "new", new, new - 10, 1)
    cells = collect(plan)
    avg = {m: cells[(16, "CoOp", AVERAGE, m)].mean for m in ("base_acc", "new_acc", "hm_acc", "hm_f1", "hm_mean")}
    assert (avg["base_acc"], avg["new_acc"]) == (75.0, 45.0)
    if average_hm == "per_dataset":
        assert avg["hm_acc"] == pytest.approx((45.0 + 60.0) / 2)
    else:
        assert avg["hm_acc"] == pytest.approx(harmonic_mean(75.0, 45.0)) and avg["hm_acc"] != pytest.approx(52.5)
        assert avg["hm_f1"] == pytest.approx(harmonic_mean(65.0, 35.0))
    assert avg["hm_mean"] == pytest.approx((avg["hm_acc"] + avg["hm_f1"]) / 2)
    assert ("HM of the average base and new" in markdown(spec, cells)) == (average_hm == "of_averages")
    with pytest.raises(SpecError, match="average_hm"):
        _b2n_spec("median")


@pytest.mark.parametrize("name", SPECS)
def test_each_spec_uses_its_papers_average_hm_convention(name):
    """A paper whose Average HM is the HM of its average Base / New (and not the mean of per-dataset HMs)
    is rendered with average_hm: of_averages, so that ours and theirs are computed the same way."""
    spec = load_spec(name)
    paper = _paper(spec)
    rows = {k[1] for k in paper or {} if k[2] == AVERAGE and k[3] == "hm_acc"}
    verdicts = set()
    for r in rows:
        b, n, h = (paper.get((spec.settings[0], r, AVERAGE, m)) for m in ("base_acc", "new_acc", "hm_acc"))
        if b is None or n is None:
            continue
        per = [paper.get((spec.settings[0], r, d.name, "hm_acc")) for d in spec.datasets]
        if all(per) and abs(sum(p[0] for p in per) / len(per) - h[0]) <= 0.015:
            verdicts.add("per_dataset")
        elif abs(harmonic_mean(b[0], n[0]) - h[0]) <= 0.015:
            verdicts.add("of_averages")
    if verdicts:
        assert verdicts == {spec.average_hm}, (name, verdicts)
    if name in ("vamp_b2n", "vamp_ablation"):
        assert verdicts == {"of_averages"}


def test_rows_not_in_the_lamp_paper_are_noted():
    for name in ("table1", "table2", "table9", "table10", "table12_15", "table15"):
        spec = load_spec(name)
        added = [r.label for r in spec.rows if r.trainer in ("MMRL", "VaMP", "MMLoP")]
        assert added and any("not in the LAMP paper" in n and all(a in n for a in added) for n in spec.notes), name


# ---- §4 LaTeX

def test_latex_is_a_complete_table_environment_with_split_blocks():
    spec = load_spec("table2")
    tex = latex(spec, _cells(spec), _paper(spec))
    body = [l for l in tex.splitlines() if not l.startswith("%")]
    assert body[0] == "\\begin{table}[t]" and body[-1] == "\\end{table}"
    assert "\\label{tab:table2}" in tex and tex.count("\\caption{") == 1
    assert tex.count("\\toprule") == tex.count("\\bottomrule") == tex.count("\\begin{tabular}") >= 3
    for fmt in re.findall(r"\\begin\{tabular\}\{l(c*)\}", tex):
        assert len(fmt) <= 12                         # Table 2: 36 value columns in 3 tabulars of 12
    t1 = load_spec("table1")
    tex1 = latex(t1, _cells(t1), _paper(t1))
    assert tex1.count("\\begin{tabular}") == 3 * 2    # one per imbalance factor, each in two halves
    assert [l.split(" & ")[0] for l in tex1.splitlines() if l.startswith("imb = ")][:2] == ["imb = 10", "imb = 10"]


def test_bold_among_the_paper_methods_and_added_rows_marked():
    spec = load_spec("table9")
    cells = _cells(spec)
    for k in list(cells):
        if k[1] == "MMRL+LA":
            cells[k] = Cell(99.5, 0.1, 5, 5)             # an added row beats every paper method everywhere
    tex = latex(spec, cells, _paper(spec))
    mmrl = next(l for l in tex.splitlines() if l.startswith("MMRL+LA$^\\dagger$ & "))
    assert "\\textbf" not in mmrl
    best = {}
    paper_rows = [r.label for r in spec.rows if r.trainer not in ("MMRL", "VaMP", "MMLoP")]
    for g, _ in spec.groups():
        best[g] = max(paper_rows, key=lambda r: cells[(100, r, g, "hm_acc")].mean)
    lamp_line = next(l for l in tex.splitlines() if l.startswith(best["dtd"] + " & "))
    assert f"\\textbf{{{cells[(100, best['dtd'], 'dtd', 'hm_acc')].mean:.2f}}}" in lamp_line
    assert "$^\\dagger$ Not in the paper" in tex
    md = markdown(spec, cells, _paper(spec))
    assert "| MMRL+LA † |" in md and "**99.50" not in md


def test_paper_value_next_to_ours_is_an_option():
    spec = load_spec("table2")
    cells = _cells(spec)
    paper = _paper(spec)
    plain, with_paper = latex(spec, cells, paper), latex(spec, cells, paper, paper_values=True)
    mma = next(l for l in with_paper.splitlines() if l.startswith("MMA & "))
    assert "{\\scriptsize(77.31)}" in mma and "(77.31)" not in plain
    assert "In parentheses: the paper's value." in with_paper


@pytest.mark.parametrize("name,label,tex_label", [("table7", "β", "$\\beta$"), ("table11", "M", "M"),
                                                  ("table6", "Method", "Method")])
def test_sweep_tables_label_the_first_column_with_the_swept_key(name, label, tex_label):
    spec = load_spec(name)
    cells = _cells(spec)
    assert markdown(spec, cells).split("\n")[4].startswith(f"| {label} |")
    assert any(l.startswith(tex_label + " & ") for l in latex(spec, cells).splitlines())


def pdflatex_or_skip():
    exe = shutil.which("pdflatex")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("pdflatex is missing: .ci/run installs texlive-latex-recommended")
        pytest.skip("pdflatex not installed (apt-get install texlive-latex-recommended; CI installs it)")
    return exe


def compile_tex(tex_path, workdir):
    """Wrap one generated .tex in a minimal document and compile it; the log on any LaTeX error."""
    exe = pdflatex_or_skip()
    doc = workdir / (tex_path.stem + "_doc.tex")
    doc.write_text("\\documentclass{article}\n\\usepackage{booktabs}\n"
                   "\\usepackage{graphicx}\n\\begin{document}\n\\input{" + str(tex_path) + "}\n\\end{document}\n")
    proc = subprocess.run([exe, "-interaction=nonstopmode", "-halt-on-error", "-no-shell-escape", doc.name],
                          cwd=workdir, capture_output=True, text=True, timeout=120)
    log = (workdir / (doc.stem + ".log")).read_text(errors="replace") if (workdir / (doc.stem + ".log")).exists() else ""
    assert proc.returncode == 0 and (workdir / (doc.stem + ".pdf")).is_file(), (tex_path, proc.stdout[-3000:])
    assert not re.search(r"^! ", log, re.M), log[-3000:]
    return log


@pytest.mark.parametrize("name", ["table1", "table2", "table3", "table6", "table7", "vamp_b2n"])
def test_shipped_specs_latex_compiles(tmp_path, name):
    spec = load_spec(name)
    tex = tmp_path / f"{name}.tex"
    tex.write_text(latex(spec, _cells(spec, missing={spec.rows[-1].label}), _paper(spec), paper_values=True))
    compile_tex(tex, tmp_path)
