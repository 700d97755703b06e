"""Table specs, planner, paper numbers, renderer and launcher pieces (no training; see test_tables_e2e.py)."""
import csv
import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from tests.helpers_data import require_shared
from tools.tables import build_plan, collect, load_spec
from tools.tables.plan import folder_tag, load_step_times, lock_held
from tools.tables.render import latex, layout_keys, markdown, read_paper, to_csv
from tools.tables.spec import SPEC_DIR, SpecError

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO.parent / "shared" / "papers" / "lamp_paper.txt"
METHODS_MD = REPO.parent / "shared" / "specs" / "methods.md"


def _b2n(rows, settings, datasets, seeds):
    """(training runs, all runs) of a B2N spec: one base training + one new-class evaluation per run."""
    n = rows * settings * datasets * seeds
    return n, 2 * n


def _xd(rows, settings, targets, seeds):
    """(training runs, all runs) of an XD / DG spec: one source training + one evaluation per target."""
    n = rows * settings * seeds
    return n, n * (1 + targets)


# (training runs, all runs) of every table / figure: LAMP paper (issue 10) with the MMRL / VaMP / MMLoP rows of
# issue 11 (3 more rows in Tables 1, 2, 9, 10, 12-15), and the VaMP / MMLoP papers' own tables (3 seeds)
COUNTS = {"table1": _b2n(8 + 3, 3, 11, 5), "figure1": _b2n(8 + 3, 3, 11, 5), "table2": _b2n(7 + 3, 1, 11, 5),
          "table3": (35, 385), "table4": (35, 175), "table6": (60, 120), "table7": (35, 70),
          "table9": _b2n(5 + 3, 1, 10, 5), "table10": _b2n(5 + 3, 1, 10, 5), "table11": (30, 60),
          "table12_15": _b2n(5 + 3, 4, 11, 5), "table12": _b2n(5 + 3, 1, 11, 5), "table13": _b2n(5 + 3, 1, 11, 5),
          "table14": _b2n(5 + 3, 1, 11, 5), "table15": _b2n(5 + 3, 1, 11, 5), "figure3": (190, 380),
          "vamp_b2n": _b2n(4, 1, 11, 3), "vamp_xd": _xd(2, 1, 10, 3), "vamp_dg": _xd(2, 1, 4, 3),
          "vamp_ablation": _b2n(4, 1, 11, 3), "mmlop_ablation": _b2n(5, 1, 11, 3), "mmlop_rank": _b2n(3, 1, 11, 3),
          "mmlop_dg": _xd(1, 1, 4, 3),
          "demo": _b2n(13, 1, 3, 1),
          # issue 16 (tests/test_world_benchmark.py): Table 1's 11 rows + zero-shot; Table 6's ablation, 5 rows
          "world_benchmark": _b2n(11 + 1, 2, 3, 3), "world_ablation": _b2n(5, 1, 3, 3),
          # issue 16 section 5: CoOp+LA, LAMP and 8 one-change LAMP variants, LAMP+LA; WorldShapes only
          "world_diagnosis": _b2n(11, 1, 1, 3)}
COMMANDS_ELSEWHERE = {"demo": "scripts/demo.sh"}  # specs whose one command is not scripts/tables/<name>.sh
NEW_SPECS = ["vamp_b2n", "vamp_xd", "vamp_dg", "vamp_ablation", "mmlop_ablation", "mmlop_rank", "mmlop_dg"]


def test_every_spec_is_listed():
    names = {p.stem for p in SPEC_DIR.glob("*.yaml")} - {"datasets", "table5"}
    assert names == set(COUNTS)
    for name in list(COUNTS) + ["table5"]:
        script = COMMANDS_ELSEWHERE.get(name, f"scripts/tables/{name}.sh")
        assert (REPO / script).is_file(), name


@pytest.mark.parametrize("name", ["table1", "table3", "table4", "table12_15", "figure3"] + NEW_SPECS)
def test_dry_run_counts_without_touching_the_disk(name, tmp_path, capsys, monkeypatch):
    from tools.tables.__main__ import main
    out = tmp_path / "never"
    real_open = os.open

    def no_create(path, flags, *a, **kw):
        assert not flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR), f"dry-run opened {path} for writing"
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", no_create)
    monkeypatch.setattr(os, "makedirs", lambda *a, **k: pytest.fail("dry-run made a folder"))
    assert main([name, "--dry-run", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    train, runs = COUNTS[name]
    assert f"{name}: {train:,} training runs + {runs - train:,} evaluation runs = {runs:,} runs" in text
    assert f"runs done 0, running 0, partial 0, missing {runs}" in text
    assert sum(1 for l in text.splitlines() if l.startswith("missing ")) == runs    # one line per run
    assert not out.exists()


@pytest.mark.parametrize("name", sorted(set(COUNTS) - {"table1", "table3", "table4", "table12_15", "figure3"} - set(NEW_SPECS)))
def test_dry_run_counts_other_specs(name):
    plan = build_plan(load_spec(name), "/nonexistent/output")
    t = plan.totals()
    assert (t["training_runs"], t["runs"]) == COUNTS[name]
    assert t["training_steps"] > 0


def test_xd_and_dg_share_their_source_runs():
    xd, dg = build_plan(load_spec("table3"), "out"), build_plan(load_spec("table4"), "out")
    assert {u.key for u in xd.units} == {u.key for u in dg.units}
    u = xd.units[0]
    assert "/xd_imb100/train_all/imagenet/CoOp/vit_b16_ep50_ctxv1_la/seed1" in u.key
    assert [Path(s.folder).parts[-4] for s in u.steps[1:]] == [d.name for d in load_spec("table3").datasets]
    assert "/dg_imb100/test_all/imagenet_a/" in build_plan(load_spec("table4"), "out").units[0].steps[1].folder


def test_plan_arguments_follow_lib_sh(tmp_path):
    plan = build_plan(load_spec("table1"), tmp_path / "o", tmp_path / "d")
    u = next(u for u in plan.units if u.row.label == "MaPLe+LA" and u.setting == 20 and u.seed == 3
             and u.steps[0].dataset == "dtd")
    train, new = u.steps
    assert train.folder.endswith("base2new_imb20/train_base/dtd/MaPLe/vit_b16_c2_ep5_batch4_2ctx_la/seed3")
    assert new.folder.endswith("base2new_imb20/test_new/dtd/MaPLe/vit_b16_c2_ep5_batch4_2ctx_la/seed3")
    a = train.argv
    assert a[a.index("--seed") + 1] == "3" and a[a.index("--trainer") + 1] == "MaPLe"
    assert a[a.index("--root") + 1] == str(tmp_path / "d")
    opts = a[a.index("DATASET.CACHE_DIR"):]
    assert opts[:10] == ["DATASET.CACHE_DIR", str(tmp_path / "o" / "cache"), "DATASET.NUM_SHOTS", "100",
                         "DATASET.IMB_FACTOR", "20", "DATASET.SUBSAMPLE_CLASSES", "base", "TRAINER.LOSS", "la"]
    b = new.argv
    assert b[b.index("--model-dir") + 1] == train.folder and "--eval-only" in b
    assert b[b.index("DATASET.SUBSAMPLE_CLASSES") + 1] == "new"


def _tiny_spec(**kw):
    raw = {"name": "t", "regime": "lt_b2n", "settings": [10], "seeds": [1, 2], "datasets": ["caltech101", "dtd"],
           "methods": [{"label": "CoOp", "trainer": "CoOp", "config": "vit_b16_ep50_ctxv1"},
                       {"label": "LAMP", "trainer": "LAMP", "config": "vit_b16_lt_b2n"}],
           "layout": {"metrics": ["hm_acc", "hm_f1"]}}
    raw.update(kw)
    return load_spec(raw)


def test_spec_knobs_change_the_plan():
    base = build_plan(_tiny_spec(), "o")
    assert len(base.units) == 2 * 2 * 2
    assert len(build_plan(_tiny_spec(seeds=[1, 2, 3]), "o").units) == 12
    assert len(build_plan(_tiny_spec(settings=[10, 50]), "o").units) == 16
    la = _tiny_spec(methods=[{"label": "CoOp+LA", "trainer": "CoOp", "config": "vit_b16_ep50_ctxv1", "loss": "la"}])
    assert "/CoOp/vit_b16_ep50_ctxv1_la/seed1" in build_plan(la, "o").units[0].key
    opts = build_plan(_tiny_spec(opts=["OPTIM.MAX_EPOCH", "3"]), "o")
    assert "/vit_b16_ep50_ctxv1_max_epoch3/seed1" in opts.units[0].key
    assert opts.units[0].steps[0].argv[-2:] == ["OPTIM.MAX_EPOCH", "3"]
    assert opts.units[0].train_steps * 50 == base.units[0].train_steps * 3  # epochs drive the step count
    fs = build_plan(_tiny_spec(regime="fewshot", settings=[4]), "o").units[0]
    assert "/fewshot_4shots/train_base/" in fs.key
    assert fs.steps[0].argv[fs.steps[0].argv.index("DATASET.NUM_SHOTS") + 1] == "4"
    assert fs.train_steps == 50 * (50 * 4 // 32)            # 50 base classes x 4 shots, batch 32, 50 epochs
    ds = build_plan(_tiny_spec(datasets=[{"name": "cal_b", "config": "caltech101", "opts": ["DATASET.IMB_PROFILE", "step"]}]), "o")
    assert "/train_base/cal_b/" in ds.units[0].key and ds.units[0].steps[0].argv[-4:-2] == ["DATASET.IMB_PROFILE", "step"]


def test_spec_errors_are_one_line_user_errors():
    with pytest.raises(SpecError, match="unknown key"):
        _tiny_spec(colour="red")
    with pytest.raises(SpecError, match="not available for regime"):
        _tiny_spec(layout={"metrics": ["acc"]})
    with pytest.raises(SpecError, match="blocks none needs exactly one setting"):
        _tiny_spec(settings=[10, 20], layout={"blocks": "none"})
    with pytest.raises(SpecError, match="duplicate row label"):
        _tiny_spec(methods=[{"label": "A", "trainer": "CoOp", "config": "vit_b16_ep50_ctxv1"}] * 2)
    with pytest.raises(SpecError, match="no table spec"):
        load_spec("table99")


def test_layout_knobs():
    assert [g for g, _ in _tiny_spec().groups()] == ["caltech101", "dtd", "__average__"]
    assert [g for g, _ in _tiny_spec(layout={"average": "first"}).groups()] == ["__average__", "caltech101", "dtd"]
    assert [g for g, _ in _tiny_spec(layout={"average": "none"}).groups()] == ["caltech101", "dtd"]
    xd = load_spec("table3")
    assert xd.groups()[0] == ("imagenet", "ImageNet (Source)") and xd.groups()[-1][0] == "__average__"
    assert not _tiny_spec().blocks and _tiny_spec(settings=[10, 20]).blocks
    assert _tiny_spec(layout={"metric_labels": {"hm_acc": "HM"}}).metric_label("hm_acc") == "HM"


def _write_result(step, split, acc, f1, seed, head=None, tail=None, key="test", **fields):
    """A results.json as train.py writes it for the planned run ``step`` (a Step; or a bare folder: a record
    with no run fields); ``fields`` override recorded fields (a run that is not the planned one)."""
    folder = getattr(step, "folder", step)
    os.makedirs(folder, exist_ok=True)
    rec = dict(step.expected()) if hasattr(step, "expected") else {}
    assert rec.get("seed", seed) == seed and rec.get("subsample_classes", split) == split
    rec.update({"seed": seed, "subsample_classes": split, "experiment": "x", **fields,
                "results": {key: {"accuracy": acc, "macro_f1": f1, "head_acc": head, "tail_acc": tail}}})
    Path(folder, "results.json").write_text(json.dumps(rec))


def test_variant_sweep_one_folder_per_value_and_one_row_each(tmp_path):
    spec = load_spec({"name": "beta", "regime": "lt_b2n", "settings": [10], "seeds": [1], "datasets": ["imagenet"],
                      "methods": [{"label": "", "trainer": "LAMP", "config": "vit_b16_lt_b2n",
                                   "sweep": [{"name": "beta", "key": "TRAINER.LAMP.BETA", "default": "2.0",
                                              "values": ["0.5", "1.0", "2.0"]}]}],
                      "layout": {"metrics": ["hm_acc"], "average": "none"}})
    plan = build_plan(spec, tmp_path)
    folders = [u.key for u in plan.units]
    assert [Path(f).parts[-2] for f in folders] == ["vit_b16_lt_b2n_beta0.5", "vit_b16_lt_b2n_beta1.0", "vit_b16_lt_b2n"]
    assert plan.units[0].steps[0].argv[-2:] == ["TRAINER.LAMP.BETA", "0.5"]
    assert plan.units[2].steps[0].argv[-2:] == ["TRAINER.LOSS", "ce"]      # default value: the plain config run
    for i, u in enumerate(plan.units):
        _write_result(u.steps[0], "base", 60.0 + i, 50.0, 1)
        _write_result(u.steps[1], "new", 70.0 + i, 55.0, 1)
    md = markdown(spec, collect(plan))
    rows = [l for l in md.splitlines() if re.match(r"\| (0.5|1.0|2.0) \|", l)]
    assert len(rows) == 3
    for i, line in enumerate(rows):
        hm = 2 * (60 + i) * (70 + i) / (130 + 2 * i)
        assert f"{hm:.2f}" in line


def test_same_run_in_two_rows_is_one_unit_read_by_both(tmp_path):
    spec = _tiny_spec(methods=[{"label": "A", "trainer": "CoOp", "config": "vit_b16_ep50_ctxv1"},
                               {"label": "B", "trainer": "CoOp", "config": "vit_b16_ep50_ctxv1"}])
    plan = build_plan(spec, tmp_path)
    assert len(plan.units) == 4 and len(plan.members) == 8
    for u in plan.units:
        _write_result(u.steps[0], "base", 60, 50, u.seed)
        _write_result(u.steps[1], "new", 40, 30, u.seed)
    cells = collect(plan)
    assert cells[(10, "A", "dtd", "hm_acc")].mean == cells[(10, "B", "dtd", "hm_acc")].mean == pytest.approx(48.0)
    fig3 = build_plan(load_spec("figure3"), tmp_path)
    default = [u for u in fig3.members if Path(u.key).parts[-2] == "vit_b16_lt_b2n" and u.seed == 1]
    assert sorted(u.row.label for u in default) == ["(a) K=6, S=2", "(b) 32", "(c) 3-12", "(d) 5e-4"]


def test_collect_render_eval_key_best_and_paper(tmp_path):
    spec = _tiny_spec(eval_key="test_inductive", seeds=[1, 2])
    plan = build_plan(spec, tmp_path)
    accs = {}
    for u in plan.units:
        base = 50 + 10 * (u.row.label == "LAMP") + u.seed + (u.steps[0].dataset == "dtd")
        accs[(u.row.label, u.steps[0].dataset, u.seed)] = base
        _write_result(u.steps[0], "base", base, base - 5, u.seed, head=base + 3, tail=base - 3, key="test_inductive")
        _write_result(dataclasses.replace(u.steps[0], folder=u.steps[0].folder.replace("train_base", "ignored")), "base", 0, 0, u.seed)
        _write_result(u.steps[1], "new", base - 10, base - 12, u.seed, key="test_inductive")
    cells = collect(plan)
    c = cells[(10, "LAMP", "dtd", "hm_acc")]
    b, n = [61 + 1, 62 + 1], [51 + 1, 52 + 1]
    exp = 2 * (sum(b) / 2) * (sum(n) / 2) / (sum(b) / 2 + sum(n) / 2)
    assert c.mean == pytest.approx(exp) and c.n == 2
    per_seed = [2 * x * y / (x + y) for x, y in zip(b, n)]
    assert c.std == pytest.approx(abs(per_seed[0] - per_seed[1]) / 2 ** 0.5)
    avg = cells[(10, "LAMP", "__average__", "hm_acc")].mean
    assert avg == pytest.approx((cells[(10, "LAMP", "dtd", "hm_acc")].mean + cells[(10, "LAMP", "caltech101", "hm_acc")].mean) / 2)
    assert cells[(10, "LAMP", "dtd", "base_head_acc")].mean == pytest.approx(sum(b) / 2 + 3)
    # eval_key is honoured: with "test" nothing is found
    assert collect(build_plan(_tiny_spec(), tmp_path))[(10, "LAMP", "dtd", "hm_acc")].mean is None
    paper = {(10, "LAMP", "dtd", "hm_acc"): (50.0, "50.00", 7), (10, "CoOp", "dtd", "hm_acc"): (40.0, "40.00", 6)}
    md = markdown(spec, cells, paper)
    lamp_line = next(l for l in md.splitlines() if l.startswith("| LAMP |"))
    assert f"**{c.mean:.2f} ± {c.std:.2f}**" in lamp_line       # best in its column is bold
    assert f"{c.mean - 50:+.2f}" in md and "lines 6–7" in md
    rows = list(csv.DictReader(to_csv(spec, cells, paper).splitlines()))
    r = next(r for r in rows if (r["row"], r["group"], r["metric"]) == ("LAMP", "dtd", "hm_acc"))
    assert float(r["paper"]) == 50.0 and float(r["diff"]) == pytest.approx(c.mean - 50, abs=1e-4)
    tex = latex(spec, cells)
    assert "\\begin{tabular}{lcccccc}" in tex and f"\\textbf{{{c.mean:.2f}}}" in tex and "\\cmidrule" in tex


def test_partial_seeds_are_marked(tmp_path):
    spec = _tiny_spec()
    plan = build_plan(spec, tmp_path)
    u = plan.units[0]
    _write_result(u.steps[0], "base", 60, 50, u.seed)
    _write_result(u.steps[1], "new", 40, 30, u.seed)
    md = markdown(spec, collect(plan))
    assert "(1/2)" in md
    assert plan.states()[u.key] == "done" and plan.totals()["by_state"]["done"] == 1
    assert plan.totals()["runs_by_state"]["done"] == 2
    os.makedirs(plan.units[1].steps[0].folder)
    assert plan.units[1].state() == "partial" and plan.units[1].steps[1].state() == "missing"


# ---- the paper's numbers

# (table, line): (label printed, row it belongs to). Table 2's first half prints TCP and MMA swapped; see
# PAPER_NUMBERS.md and test_table2_tcp_mma_rows_carry_each_papers_published_numbers.
_RELABELLED = {("table2", 224): ("TCP", "MMA"), ("table2", 225): ("MMA", "TCP")}
# rows added after the LAMP paper (issue 11): no paper numbers; every other row has all its cells
NOT_IN_LAMP_PAPER = {"MMRL+LA", "VaMP+LA", "MMLoP+LA", "MMRL", "VaMP", "MMLoP"}


@pytest.mark.parametrize("name", ["table1", "table2", "table3", "table4", "table6", "table7", "table9",
                                  "table10", "table11", "table12_15", "table12", "table15"])
def test_paper_numbers_match_layout_and_paper_text(name):
    spec = load_spec(name)
    paper = read_paper(spec.paper)
    rows = [r for r in spec.rows if r.label not in NOT_IN_LAMP_PAPER]
    keys = {k for k in layout_keys(spec) if k[1] not in NOT_IN_LAMP_PAPER}
    in_spec = {k: v for k, v in paper.items() if k[0] in spec.settings}
    assert set(in_spec) == keys                      # one number per cell of the paper's rows, no more, no less
    assert len(in_spec) == len(spec.block_keys()) * len(rows) * len(spec.groups()) * len(spec.metrics)
    require_shared(PAPER)
    text = PAPER.read_text().split("\n")
    by_line = {}
    with open(spec.paper) as f:
        for rec in csv.DictReader(f):
            by_line.setdefault(int(rec["line"]), []).append(rec)
    for line, recs in by_line.items():
        tokens = [t.strip() for t in re.sub(r"</?u>", "", text[line - 1]).split("\t") if t.strip()]
        label = recs[0]["row"]
        printed, ours = _RELABELLED.get((spec.paper.stem.replace("_paper", ""), line), (label, label))
        assert tokens[0] == printed and label == ours, (line, tokens[0], label)
        assert tokens[1:] == [r["value"] for r in recs], line   # every value, in the printed column order


# Published numbers of the two methods (their own papers, 16-shot B2N ViT-B/16): which printed line is whose.
_PUBLISHED = {"MMA": {("imagenet", "base_acc"): "77.31", ("imagenet", "new_acc"): "71.00",
                      ("imagenet", "hm_acc"): "74.02", ("__average__", "base_acc"): "83.20",
                      ("eurosat", "base_acc"): "85.46", ("eurosat", "new_acc"): "82.34", ("eurosat", "hm_acc"): "83.87"},
              "TCP": {("imagenet", "base_acc"): "77.27", ("imagenet", "new_acc"): "69.87", ("imagenet", "hm_acc"): "73.38",
                      ("__average__", "base_acc"): "84.13", ("__average__", "new_acc"): "75.36"}}


def test_table2_tcp_mma_rows_carry_each_papers_published_numbers():
    """Lines 224 / 234 are MMA, 225 / 235 TCP (the paper swaps the labels of 224 / 225), and each row's
    printed average Base / New is the mean of that row's 11 datasets."""
    paper = read_paper(load_spec("table2").paper)
    lines = {}
    for (_, row, group, metric), (value, text, line) in paper.items():
        lines.setdefault(row, set()).add(line)
        if (group, metric) in _PUBLISHED.get(row, {}):
            assert text == _PUBLISHED[row][(group, metric)], (row, group, metric, text)
    assert lines["MMA"] == {224, 234} and lines["TCP"] == {225, 235}
    spec = load_spec("table2")
    for row in ("MMA", "TCP"):
        for metric in ("base_acc", "new_acc"):
            values = [paper[(16, row, d.name, metric)][0] for d in spec.datasets]
            assert sum(values) / len(values) == pytest.approx(paper[(16, row, "__average__", metric)][0], abs=0.006)


PAPER_NUMBERS_MD = SPEC_DIR / "PAPER_NUMBERS.md"
LAMP_TABLES = ["table1", "table2", "table3", "table4", "table6", "table7", "table9", "table10", "table11", "table12_15"]


def _paper_inconsistencies():
    """Every printed value of the LAMP paper's tables that is not what its row implies, found from the CSVs:
    short decimals, an Average that is not the mean of its row, an HM that is not the HM of its Base / New,
    an "Avg." (hm_mean) that is not (HM-A + HM-M) / 2. Returns [(table, key, printed, line)]."""
    found = []
    for name in LAMP_TABLES:
        spec = load_spec(name)
        paper = read_paper(spec.paper)
        for (b, r, g, m), (v, text, line) in paper.items():
            bad = not re.fullmatch(r"\d+\.\d\d", text)
            if g == "__average__" and name not in ("table3", "table4"):   # Table 3's: see below
                vals = [paper.get((b, r, d.name, m)) for d in spec.datasets]
                bad |= all(vals) and abs(sum(x[0] for x in vals) / len(vals) - v) > 0.015
            if m == "hm_acc" and g != "__average__" and (b, r, g, "base_acc") in paper:
                base, new = paper[(b, r, g, "base_acc")][0], paper[(b, r, g, "new_acc")][0]
                bad |= abs(2 * base * new / (base + new) - v) > 0.015
            if m == "hm_mean":
                bad |= abs((paper[(b, r, g, "hm_acc")][0] + paper[(b, r, g, "hm_f1")][0]) / 2 - v) > 0.015
            if bad:
                found.append((name, (b, r, g, m), text, line))
    return found


def test_every_paper_inconsistency_is_listed_in_paper_numbers_md():
    """A reader comparing with the paper finds each odd printed number explained in PAPER_NUMBERS.md."""
    md = PAPER_NUMBERS_MD.read_text()
    tokens = set(re.findall(r"\d+(?:\.\d+)?", md))
    found = _paper_inconsistencies()
    assert len(found) == 19   # 10 short decimals, 3 in Table 2, Table 7 β = 0.20, 5 averages of Tables 12-15
    missing = [f for f in found if f[2] not in tokens]
    assert not missing, missing
    for must in ("69.25", "68.76", "79.72", "79.80", "88.4", "94.2"):
        assert must in tokens, must
    # Table 3's "Avg. (w/o Source)" includes the source (every row): documented once, with its example
    assert "Avg. (w/o Source)" in md and "63.69" in tokens


def test_text_claims_that_contradict_the_tables_are_listed():
    """Appendix 0.71 / 0.52 vs Tables 9 / 10 (0.75 / 0.62); LFA "first two benchmarks" vs Table 2 without LFA;
    Table 8's Food101 prompt vs the code's template."""
    md = PAPER_NUMBERS_MD.read_text()
    for name, text_gap in (("table9", "0.71"), ("table10", "0.52")):
        spec = load_spec(name)
        paper = read_paper(spec.paper)
        avg = {k[1]: v[0] for k, v in paper.items() if k[2] == "__average__"}
        gap = avg["LAMP"] - max(v for r, v in avg.items() if r != "LAMP")
        assert f"{gap:.2f}" in md and text_gap in md, (name, gap)
    assert "LFA" not in {r.trainer for r in load_spec("table2").rows} and "first two benchmarks" in md
    import datasets  # noqa: F401  (registers the datasets)
    from engine.registry import DATASET_REGISTRY
    assert DATASET_REGISTRY.get("Food101").template in md
    assert '"a photo of a [CLASS], a type of food."' in md
    if PAPER.is_file():
        text = PAPER.read_text()
        assert "0.71% under imbalance ratio 100 and 0.52%" in text and "first two benchmarks" in text
        assert 'Food101\t"a photo of a [CLASS], a type of food."' in text


# cells each paper reports (the rest of the layout is ours only): methods.md §3.5 / §4.3
NEW_PAPER_CELLS = {"vamp_b2n": 4 * 3, "vamp_xd": 1 + 8 + 1, "vamp_dg": 2 * 5, "vamp_ablation": 4 * 3,
                   "mmlop_ablation": 5 + 2, "mmlop_rank": 3, "mmlop_dg": 1}
# the one derived number: MMRL's cross-dataset average is VaMP's 67.74 minus the "0.49 above MMRL" of line 469
_DERIVED = {("vamp_xd", "MMRL", "__average__", "acc"): 67.74 - 0.49}


@pytest.mark.parametrize("name", NEW_SPECS)
def test_vamp_mmlop_paper_numbers_match_layout_and_methods_md(name):
    spec = load_spec(name)
    assert spec.paper_source == "methods.md" and spec.paper.parent.name == "paper"
    paper = read_paper(spec.paper)
    assert len(paper) == NEW_PAPER_CELLS[name]
    assert set(paper) <= set(layout_keys(spec))       # every reported number has its cell in our layout
    assert {k[1] for k in paper} == {r.label for r in spec.rows}    # and every row has at least one
    require_shared(METHODS_MD)
    text = METHODS_MD.read_text().split("\n")
    info = yaml.safe_load((SPEC_DIR / "datasets.yaml").read_text())
    by_line = {}
    for key, (value, printed, line) in paper.items():
        if (name,) + key[1:] in _DERIVED:
            assert value == pytest.approx(_DERIVED[(name,) + key[1:]])
            assert re.search(r"\b67\.74\b.*\b0\.49 above MMRL", text[line - 1]), line
            continue
        by_line.setdefault(line, []).append((key, printed))
    for line, recs in by_line.items():
        src = text[line - 1]
        numbers = re.findall(r"\d+\.\d+", src)
        it = iter(numbers)
        assert all(p in it for _, p in recs), (line, [p for _, p in recs], numbers)   # in order, as printed
        for (_, row, group, _), _ in recs:     # the line names the row (or the dataset of a per-target list)
            names = [re.sub(r"^\+ | \(.*\)$", "", row)] + re.findall(r"\((.*)\)$", row)   # "shared U", "MMLoP"
            target = group != "__average__" and info[group]["label"].replace("-", "") in src
            headline = (name, line) == ("mmlop_dg", 592) and "DG average over the 4 ImageNet variants" in src
            assert any(n in src for n in names) or target or headline or (name, line) == ("vamp_xd", 469), (line, row, group)


def test_config_by_dataset_picks_the_scripts_imagenet_config(tmp_path):
    plan = build_plan(load_spec("table1"), tmp_path / "o")
    units = [u for u in plan.units if u.row.label == "MMRL+LA" and u.setting == 10 and u.seed == 1]
    assert len(units) == 11
    for u in units:
        cfg = "vit_b16_b2n_imagenet" if u.steps[0].dataset == "imagenet" else "vit_b16_b2n"
        assert u.config == cfg
        for step in u.steps:                          # training and new-class evaluation: folder and --config-file
            assert Path(step.folder).parts[-2] == f"{cfg}_la"
            assert step.argv[step.argv.index("--config-file") + 1].endswith(f"configs/trainers/MMRL/{cfg}.yaml")
    imnet = next(u for u in units if u.steps[0].dataset == "imagenet")
    assert imnet.key.endswith("base2new_imb10/train_base/imagenet/MMRL/vit_b16_b2n_imagenet_la/seed1")
    dtd = next(u for u in units if u.steps[0].dataset == "dtd")
    # batch 32 / 5 epochs (ImageNet config) vs batch 4 / 10 epochs: the estimate reads the config used
    assert dtd.train_steps == 10 * (sum(int(max(min(100, 2820 // 47) * 0.1 ** (i / 23), 1)) for i in range(24)) // 4)
    mmlop = {u.config for u in plan.units if u.row.label == "MMLoP+LA"}
    assert mmlop == {"vit_b16_b2n"}                   # no override: every dataset uses the row's config
    with pytest.raises(SpecError, match="config_by_dataset names \\['imagnet'\\]"):
        _tiny_spec(methods=[{"label": "M", "trainer": "MMRL", "config": "vit_b16_b2n",
                             "config_by_dataset": {"imagnet": "vit_b16_b2n_imagenet"}}])
    with pytest.raises(SpecError, match="maps dataset names to config names"):
        _tiny_spec(methods=[{"label": "M", "trainer": "MMRL", "config": "vit_b16_b2n", "config_by_dataset": ["x"]}])


def test_vamp_transfer_specs_train_16_shot_imagenet_once():
    xd, dg = build_plan(load_spec("vamp_xd"), "out"), build_plan(load_spec("vamp_dg"), "out")
    assert {u.key for u in xd.units} == {u.key for u in dg.units}
    u = next(u for u in xd.units if u.row.label == "VaMP" and u.seed == 2)
    assert u.key.endswith("/xd_imb1/train_all/imagenet/VaMP/vit_b16_xd_num_shots16/seed2")   # = lib.sh with EXTRA
    a = u.steps[0].argv
    shots = [a[i + 1] for i, x in enumerate(a) if x == "DATASET.NUM_SHOTS"]
    assert shots == ["100", "16"]                     # the spec's opt comes last, so it wins
    assert u.train_steps == 1000 * 16 // 32           # 1 epoch, batch 32, 16 images of each of 1000 classes
    assert [Path(s.folder).parts[-4] for s in dg.units[0].steps[1:]] == ["imagenetv2", "imagenet_sketch",
                                                                          "imagenet_a", "imagenet_r"]


def test_paper_chains_share_their_default_runs():
    b2n, abl = build_plan(load_spec("vamp_b2n"), "o"), build_plan(load_spec("vamp_ablation"), "o")
    vamp = {u.key for u in b2n.units if u.row.label == "VaMP"}
    assert vamp == {u.key for u in abl.units if u.row.label == "+ class-aware prior (VaMP)"}
    assert len(vamp) == 33 and any("/imagenet/VaMP/vit_b16_b2n_imagenet/" in k for k in vamp)
    mmrl_step = next(u for u in abl.units if u.row.label == "MMRL")
    assert Path(mmrl_step.key).parts[-2].endswith("_sample_specificFalse")
    rank, chain = build_plan(load_spec("mmlop_rank"), "o"), build_plan(load_spec("mmlop_ablation"), "o")
    r1 = {u.key for u in rank.units if u.row.label == "r = 1"}
    assert r1 == {u.key for u in chain.units if u.row.label == "+ shared U (MMLoP)"}
    assert {Path(u.key).parts[-2] for u in rank.units} == {"vit_b16_b2n", "vit_b16_b2n_rank2", "vit_b16_b2n_rank4"}
    assert len({Path(u.key).parts[-2] for u in chain.units}) == 5   # five chain steps, five config folders


def test_rows_without_paper_numbers_render_as_absent(tmp_path):
    spec = load_spec("table9")
    plan = build_plan(spec, tmp_path)
    for u in plan.units:
        if u.steps[0].dataset == "dtd" and u.row.label in ("LAMP", "MMRL+LA"):
            _write_result(u.steps[0], "base", 60, 50, u.seed)
            _write_result(u.steps[1], "new", 40, 30, u.seed)
    paper = read_paper(spec.paper)
    cells = collect(plan)
    md = markdown(spec, cells, paper)
    paper_part = md.split("Paper (lines")[1].split("Ours − paper:")[0]
    assert "of lamp_paper.txt" in md.split("Paper (lines")[1].splitlines()[0]
    mmrl = next(l for l in paper_part.splitlines() if l.startswith("| MMRL+LA † |"))
    assert set(mmrl.strip("| ").split(" | ")[1:]) == {"–"}
    lamp = next(l for l in paper_part.splitlines() if l.startswith("| LAMP |"))
    assert "–" not in lamp
    ours = next(l for l in md.split("Paper (lines")[0].splitlines() if l.startswith("| MMRL+LA † |"))
    assert "48.00 ± 0.00" in ours                     # our number is there, the paper's is absent
    rows = list(csv.DictReader(to_csv(spec, cells, paper).splitlines()))
    r = next(r for r in rows if (r["row"], r["group"], r["metric"]) == ("MMRL+LA", "dtd", "hm_acc"))
    assert r["paper"] == "" and r["diff"] == "" and float(r["mean"]) == pytest.approx(48.0)
    md_vamp = markdown(load_spec("vamp_b2n"), collect(build_plan(load_spec("vamp_b2n"), tmp_path)),
                       read_paper(load_spec("vamp_b2n").paper))
    assert "Paper (lines 461–464 of methods.md):" in md_vamp


def _bench_figures(**kw):
    """One ``python -m tools.bench ... --out FILE`` object (the fields the planner reads, plus a few others)."""
    fig = {"trainer": "LAMP", "config": "vit_b16_lt_b2n.yaml", "backbone": "ViT-B/16", "device": "cuda",
           "precision": "bf16", "batch": 4, "classes": 50, "opts": [], "trainable_params": 469760,
           "step_kind": "training", "ms_per_step": 100.0, "peak_mb": 1000.0}
    fig.update(kw)
    return fig


def test_step_times_give_gpu_hours(tmp_path):
    d = tmp_path / "bench"
    d.mkdir()
    (d / "lamp50.json").write_text(json.dumps(_bench_figures(classes=50, ms_per_step=100.0)))
    (d / "lamp500.json").write_text(json.dumps(_bench_figures(classes=500, ms_per_step=1000.0)))
    plan = build_plan(_tiny_spec(), "o")
    t = plan.totals(load_step_times(d))
    lamp = [u for u in plan.units if u.row.trainer == "LAMP"]
    # caltech101 / dtd base have 50 / 24 classes: both nearest to the 50-class entry
    assert t["gpu_hours"] == pytest.approx(sum(u.train_steps for u in lamp) * 100.0 / 3.6e6)
    assert t["gpu_hours_missing_trainers"] == ["CoOp"]
    one = load_step_times([d / "lamp500.json"])
    assert plan.totals(one)["gpu_hours"] == pytest.approx(sum(u.train_steps for u in lamp) * 1000.0 / 3.6e6)
    from tools.tables.plan import step_ms
    assert step_ms(load_step_times(d), "LAMP", "vit_b16_lt_b2n", 400) == 1000.0   # nearest class count
    assert step_ms(load_step_times(d), "LAMP", "other_config", 400) == 1000.0     # any config of the trainer
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a tools.bench --out file"):
        load_step_times(tmp_path / "bad.json")


def test_dry_run_prints_gpu_hours(tmp_path, capsys):
    from tools.tables.__main__ import main
    f = tmp_path / "lamp.json"
    f.write_text(json.dumps(_bench_figures(classes=500, ms_per_step=360.0)))
    assert main(["table7", "--dry-run", "--quiet", "--output", str(tmp_path / "o"), "--step-times", str(f)]) == 0
    text = capsys.readouterr().out
    steps = build_plan(load_spec("table7"), tmp_path / "o").totals()["training_steps"]
    assert f"GPU-hours (training steps x ms/step of 1 bench file(s), cuda): {steps * 360.0 / 3.6e6:.1f}" in text


def test_folder_tag_matches_scripts_convention():
    spec = _tiny_spec(methods=[{"label": "x", "trainer": "CoOp", "config": "vit_b16_ep50", "loss": "la",
                                "opts": ["TRAINER.COOP.N_CTX", "4"]}])
    assert folder_tag(spec.rows[0]) == "vit_b16_ep50_la_n_ctx4"


# ---- launcher pieces

def test_slurm_parameters_reach_submitit(tmp_path, monkeypatch):
    import submitit
    from submitit.slurm.slurm import SlurmExecutor
    from tools.tables.launcher import slurm_parameters
    p = slurm_parameters({"partition": "gpu", "gpus_per_run": 2, "time_min": 90, "array_parallelism": 7,
                          "cpus_per_run": 4, "account": "acc"}, "table1")
    assert p["slurm_partition"] == "gpu" and p["gpus_per_node"] == 2 and p["timeout_min"] == 90
    assert p["slurm_array_parallelism"] == 7 and p["cpus_per_task"] == 4
    assert p["slurm_additional_parameters"] == {"account": "acc"}
    monkeypatch.setattr(SlurmExecutor, "affinity", staticmethod(lambda: 1))   # no srun on this machine
    ex = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    ex.update_parameters(**p)                     # the launcher's exact call; unknown keys would raise
    text = ex._executor._make_submission_file_text("cmd", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2", "#SBATCH --time=90",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --account=acc", "#SBATCH --job-name=table-table1"):
        assert line in text, line
    assert ex._executor.parameters["array_parallelism"] == 7


def test_locked_run_is_not_started_twice_and_failures_do_not_stop_others(tmp_path):
    import fcntl
    from tools.tables.launcher import run_lane
    locked = tmp_path / "locked"
    locked.mkdir()
    fd = os.open(locked / ".table.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    assert lock_held(str(locked))
    bad = tmp_path / "bad"
    done = tmp_path / "done"
    _write_result(done, "base", 1, 1, 1)
    units = [{"key": "a", "steps": [{"folder": str(locked), "argv": ["--never-run"]}]},
             {"key": "b", "steps": [{"folder": str(bad), "argv": ["--output-dir", str(bad), "--config-file", "/nonexistent.yaml"]}]},
             {"key": "c", "steps": [{"folder": str(done), "argv": ["--never-run"]}]}]
    out = run_lane(units, 0)
    assert [o["status"] for o in out] == ["busy", "failed", "done"]
    assert out[1]["error_log"] == str(bad / "table_error.log") and (bad / "table_error.log").is_file()
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    assert not lock_held(str(locked))


def test_sweep_and_expert_load_plots(tmp_path):
    from PIL import Image
    from tools.tables.plots import plot_all
    spec = load_spec({"name": "fig", "regime": "lt_b2n", "settings": [10], "seeds": [1, 2], "datasets": ["imagenet"],
                      "methods": [{"label": "(a)", "trainer": "LAMP", "config": "vit_b16_lt_b2n",
                                   "sweep": [{"name": "K", "key": "TRAINER.LAMP.TOP_K", "values": [2, 6]},
                                             {"name": "S", "key": "TRAINER.LAMP.SHARED_TOKENS", "values": [1, 2]}]},
                                  {"label": "(b)", "trainer": "LAMP", "config": "vit_b16_lt_b2n",
                                   "sweep": [{"name": "D", "key": "TRAINER.LAMP.PROMPT_DIM", "values": [16, 32, 64]}]}],
                      "layout": {"metrics": ["hm_acc", "hm_f1"], "average": "none"}, "plot": {"kind": "sweep"}})
    plan = build_plan(spec, tmp_path)
    assert len(spec.rows) == 4 + 3 and len(plan.units) == 7 * 2
    freq = [0.02] * 10 + [0.08] * 10  # per pool entry (sums to 1), as trainers/lamp.py records it
    diag = {str(l): {"freq": freq, "min": 0.02, "max": 0.08, "entropy": 2.9, "max_entropy": 2.995732,
                     "bias_min": -1e-3, "bias_max": 1e-3} for l in range(3, 13)}
    for i, u in enumerate(plan.units):
        _write_result(u.steps[0], "base", 50 + i, 40 + i, u.seed, head=60, tail=45)
        _write_result(u.steps[1], "new", 55 + i, 45, u.seed)
        rec = json.loads(Path(u.steps[0].folder, "results.json").read_text())
        rec["load_diagnostics"] = diag
        Path(u.steps[0].folder, "results.json").write_text(json.dumps(rec))
    paths = plot_all(plan, collect(plan), tmp_path / "plots")
    names = sorted(p.name for p in paths)
    assert "fig.png" in names and "fig.pdf" in names and "fig_head_tail.png" in names
    assert sum(n.startswith("fig_load_10_") and n.endswith(".png") for n in names) == 7   # one per LAMP row
    assert Image.open(tmp_path / "plots/fig.png").size == (1000, 400)
    assert Image.open(tmp_path / "plots/fig_head_tail.png").size == (1000, 400)
    load_png = next(p for p in paths if p.name.startswith("fig_load_") and p.suffix == ".png")
    assert Image.open(load_png).size == (600, 400)  # layers x pool entries
    for p in paths:
        img = Image.open(p) if p.suffix == ".png" else None
        assert p.stat().st_size > 1000
        if img is not None:
            assert img.convert("L").getextrema()[0] < img.convert("L").getextrema()[1]   # not a blank image


def test_cli_collect_only_and_seed_override(tmp_path, capsys):
    from tools.tables.__main__ import main
    spec_path = tmp_path / "mini.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "mini", "regime": "lt_b2n", "settings": [10], "seeds": [1, 2, 3], "datasets": ["dtd"],
        "methods": [{"label": "CoOp", "trainer": "CoOp", "config": "vit_b16_ep50_ctxv1"}],
        "layout": {"metrics": ["hm_acc"], "average": "last", "average_label": "Mean of all"}}))
    plan = build_plan(load_spec(spec_path, {"seeds": [1]}), tmp_path / "out")
    assert len(plan.units) == 1
    _write_result(plan.units[0].steps[0], "base", 80, 70, 1)
    _write_result(plan.units[0].steps[1], "new", 60, 50, 1)
    assert main([str(spec_path), "--collect-only", "--seeds", "1", "--no-plots", "--output", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out/tables/mini/mini.md").read_text()
    assert not (tmp_path / "out/tables/mini/launch_report.json").exists()      # nothing was launched
    assert "| Method | DTD HM-A | Mean of all HM-A |" in md
    assert f"| CoOp | **{2 * 80 * 60 / 140:.2f} ± 0.00** |" in md or f"| CoOp | {2 * 80 * 60 / 140:.2f} ± 0.00 |" in md
    assert "(1/" not in md                                                      # --seeds 1: one of one seed
    assert not list((tmp_path / "out/tables/mini").glob("*.png"))                # --no-plots
    assert main([str(spec_path), "--collect-only", "--no-plots", "--output", str(tmp_path / "out")]) == 0
    assert "(1/3)" in (tmp_path / "out/tables/mini/mini.md").read_text()       # the spec's 3 seeds


def test_component_variants_have_their_own_folders():
    plan = build_plan(load_spec("table6"), "o")
    tags = sorted({Path(u.key).parts[-2] for u in plan.units if u.row.trainer == "LAMP"})
    assert tags == ["vit_b16_lt_b2n", "vit_b16_lt_b2n_use_lboFalse", "vit_b16_lt_b2n_use_lboFalse_use_mspFalse",
                    "vit_b16_lt_b2n_use_lboFalse_use_poolFalse", "vit_b16_lt_b2n_use_mspFalse"]
    assert [r.label for r in load_spec("table6").rows] == ["CLIP", "MPP", "MSP", "MPP+MSP", "MPP+LBO", "MPP+MSP+LBO"]


def test_unknown_dataset_is_planned_without_a_cost(capsys, monkeypatch):
    """A dataset config without a size in configs/tables/datasets.yaml (here: dtd's, hidden) is planned; its
    cost is unknown. (A dataset without a config at all is a plan-time error: test_plan_time_errors.)"""
    from tools.tables import plan as plan_mod
    from tools.tables.__main__ import dry_run
    info = {k: v for k, v in plan_mod.dataset_info().items() if k != "dtd"}
    monkeypatch.setattr(plan_mod, "dataset_info", lambda: info)
    plan_mod.train_images.cache_clear()
    spec = _tiny_spec(datasets=["caltech101", {"name": "mine", "config": "dtd"}])
    plan = build_plan(spec, "o")
    plan_mod.train_images.cache_clear()
    assert len(plan.units) == 8
    t = dry_run(plan, quiet=True)
    assert t["runs_without_estimate"] == 4
    assert t["training_steps"] == sum(u.train_steps for u in plan.units if u.steps[0].dataset == "caltech101")
    assert "4 training run(s) without a step estimate" in capsys.readouterr().out


def test_unit_busy_elsewhere_is_submitted_again_once_free(tmp_path, monkeypatch):
    """A unit locked by another process is not started; once the lock is free and the unit still unfinished,
    the launcher submits it again (here it fails fast: the datasets folder does not exist)."""
    import fcntl
    import threading
    from tools.tables.launcher import launch
    spec = _tiny_spec(datasets=["dtd"], seeds=[1],
                      methods=[{"label": "X", "trainer": "CoOp", "config": "vit_b16_ep50_ctxv1"}])
    plan = build_plan(spec, tmp_path / "out", tmp_path / "data")
    unit = plan.units[0]
    os.makedirs(unit.steps[0].folder)
    fd = os.open(os.path.join(unit.steps[0].folder, ".table.lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    assert plan.states()[unit.key] == "running"
    timer = threading.Timer(1.0, lambda: (fcntl.flock(fd, fcntl.LOCK_UN), os.close(fd)))
    timer.start()
    lines = []
    report = launch(plan, jobs=1, log=lines.append, poll_s=0.2)
    timer.join()
    assert report["running_elsewhere"] == [unit.key] and report["pending"] == 0
    assert any("submitting them again" in l for l in lines)
    assert len(report["jobs"]) == 1 and [o["status"] for o in report["outcomes"]] == ["failed"]
    assert any(l.startswith("[failed] ") and "table_error.log" in l for l in lines)
    assert (Path(unit.steps[0].folder) / "table_error.log").is_file()


def test_average_and_dry_run_totals_with_a_dataset_missing_or_a_unit_finished(tmp_path):
    """The Average column is absent while a dataset has no result, uses the fewest seeds any dataset has, and
    the dry-run's training steps left drop a unit as soon as its training run is done (eval still missing)."""
    from tools.tables.results import AVERAGE

    spec = _tiny_spec()
    plan = build_plan(spec, tmp_path)
    units = [u for u in plan.units if u.row.label == "CoOp" and u.setting == 10]
    caltech = [u for u in units if u.steps[0].dataset == "caltech101"]
    dtd = [u for u in units if u.steps[0].dataset == "dtd"]
    for u in caltech:  # both seeds
        _write_result(u.steps[0], "base", 60 + u.seed, 50, u.seed)
        _write_result(u.steps[1], "new", 40 + u.seed, 30, u.seed)
    cells = collect(plan)
    assert cells[(10, "CoOp", "caltech101", "base_acc")].mean == pytest.approx(61.5)
    assert cells[(10, "CoOp", AVERAGE, "base_acc")].mean is None          # DTD missing: no average
    first = next(u for u in dtd if u.seed == 1)
    _write_result(first.steps[0], "base", 80, 70, 1)
    _write_result(first.steps[1], "new", 20, 10, 1)
    cells = collect(plan)
    avg = cells[(10, "CoOp", AVERAGE, "base_acc")]
    assert avg.mean == pytest.approx((61.5 + 80) / 2) and avg.n == 1       # the mean of the dataset means
    totals = plan.totals()
    done_steps = sum(u.train_steps for u in caltech + [first])
    assert totals["training_steps_left"] == totals["training_steps"] - done_steps
    second = next(u for u in dtd if u.seed == 2)
    _write_result(second.steps[0], "base", 70, 60, 2)               # trained, not evaluated yet
    assert second.state() == "partial"
    assert plan.totals()["training_steps_left"] == totals["training_steps_left"] - second.train_steps


def test_a_slurm_lane_uses_the_cpus_of_its_job(monkeypatch):
    """SLURM_CPUS_PER_TASK sets torch's threads in a job unless OMP_NUM_THREADS is set (a one-node cluster
    without task pinning otherwise runs every job with one thread per core)."""
    import torch
    from tools.tables.launcher import run_lane
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
        torch.set_num_threads(2)
        assert run_lane([], 0) == [] and torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        run_lane([], 0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
