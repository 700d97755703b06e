"""End to end: a synthetic table spec (2 methods x 2 datasets x 2 seeds, one epoch, tiny CLIP) through the
submitit local executor with 2 parallel jobs; then an interrupted launch (launcher and one job killed) and a
relaunch that finishes only the missing runs and renders the same table."""
import csv
import glob
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from datasets.synthetic import generate_synthetic_shapes
from tests.helpers_run import REPO, TINY

SEEDS = [1, 2]


def _spec(root2):
    return {
        "name": "synth",
        "title": "Synthetic table",
        "regime": "lt_b2n",
        "settings": [10],
        "seeds": SEEDS,
        "datasets": ["synthetic_shapes", {"name": "synthetic_b", "config": "synthetic_shapes",
                                          "opts": ["DATASET.ROOT", root2]}],     # inside --data
        "opts": TINY + ["OPTIM.MAX_EPOCH", "1", "OPTIM.WARMUP_EPOCH", "0"],   # one epoch, no warm-up epoch
        "methods": [
            {"label": "ZS-CLIP", "trainer": "ZeroshotCLIP", "config": "vit_b16"},
            {"label": "CoOp+LA", "trainer": "CoOp", "config": "vit_b16_ep50_ctxv1", "loss": "la",
             "opts": ["OPTIM.LR", "0.05", "DATALOADER.TRAIN_X.BATCH_SIZE", "8"]},
        ],
        "layout": {"metrics": ["hm_acc", "hm_f1", "base_acc", "new_acc"], "average": "last"},
        "plot": {"kind": "bars"},
        "notes": ["A synthetic check: 100% tiny_CLIP & one epoch, β = 2, #1 (the caption escapes these)."],
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory, root):
    base = tmp_path_factory.mktemp("tables_e2e")
    data = base / "data"             # --data: the session's dataset (linked) and a second one in data/b
    data.mkdir()
    for entry in Path(root).iterdir():
        (data / entry.name).symlink_to(entry)
    generate_synthetic_shapes(str(data / "b"), seed=7, train_per_class=30, test_per_class=15)
    spec_path = base / "synth.yaml"
    spec_path.write_text(yaml.safe_dump(_spec("b")))
    return {"base": base, "root": data, "spec": spec_path}


def _cli(world, out, *extra):
    from tools.tables.__main__ import main
    return main([str(world["spec"]), "--output", str(out), "--data", str(world["root"]), *extra])


@pytest.fixture(scope="module")
def uninterrupted(world):
    out = world["base"] / "out_a"
    rc = _cli(world, out, "--jobs", "2")
    assert rc == 0
    return out


def _hm(a, b):
    return 2 * a * b / (a + b) if a + b else 0.0


def _expected(out):
    """Cell values straight from the results.json files (own glob, own arithmetic)."""
    exp = {}
    for trainer, label in (("ZeroshotCLIP", "ZS-CLIP"), ("CoOp", "CoOp+LA")):
        per_ds = {}
        for ds in ("synthetic_shapes", "synthetic_b"):
            vals = {}
            for part, split in (("train_base", "base"), ("test_new", "new")):
                files = sorted(glob.glob(str(out / "base2new_imb10" / part / ds / trainer / "*" / "seed*" / "results.json")))
                assert len(files) == len(SEEDS), files
                recs = [json.loads(Path(f).read_text()) for f in files]
                assert all(r["subsample_classes"] == split for r in recs)
                vals[split] = {k: [r["results"]["test"][k] for r in recs] for k in ("accuracy", "macro_f1")}
            hm_a = _hm(statistics.mean(vals["base"]["accuracy"]), statistics.mean(vals["new"]["accuracy"]))
            hm_m = _hm(statistics.mean(vals["base"]["macro_f1"]), statistics.mean(vals["new"]["macro_f1"]))
            per_seed_a = [_hm(b, n) for b, n in zip(vals["base"]["accuracy"], vals["new"]["accuracy"])]
            per_ds[ds] = {"hm_acc": (hm_a, statistics.stdev(per_seed_a)), "hm_f1": (hm_m, None),
                          "base_acc": (statistics.mean(vals["base"]["accuracy"]), statistics.stdev(vals["base"]["accuracy"])),
                          "new_acc": (statistics.mean(vals["new"]["accuracy"]), statistics.stdev(vals["new"]["accuracy"]))}
        exp[label] = per_ds
        exp[label]["__average__"] = {m: (statistics.mean(per_ds[d][m][0] for d in ("synthetic_shapes", "synthetic_b")), None)
                                     for m in ("hm_acc", "hm_f1", "base_acc", "new_acc")}
    return exp


def _md_rows(md):
    """The first markdown table of the rendered file: {row label: [cell texts]}."""
    lines = [l for l in md.splitlines() if l.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for l in lines[1:]:
        cells = [c.strip() for c in l.strip("|").split("|")]
        if cells[0] in rows or cells[0] == "Setting":
            break
        rows[cells[0]] = cells[1:]
    return header, rows


def test_table_end_to_end_matches_results_json(uninterrupted):
    out = uninterrupted
    report = json.loads((out / "tables/synth/launch_report.json").read_text())
    assert len(report["jobs"]) == 2                       # --jobs 2: two local submitit jobs
    assert {o["lane"] for o in report["outcomes"]} <= {0, 1}
    assert report["pending"] == 8 and all(o["status"] in ("done", "busy") for o in report["outcomes"])
    md = (out / "tables/synth/synth.md").read_text()
    header, rows = _md_rows(md)
    assert header[1:] == [f"{g} {m}" for g in ("SyntheticShapes", "synthetic_b", "Average")
                          for m in ("HM-A", "HM-M", "Base", "New")]
    exp = _expected(out)
    assert set(rows) == {"ZS-CLIP", "CoOp+LA"}
    checked = 0
    for label, cells in rows.items():
        i = 0
        for g in ("synthetic_shapes", "synthetic_b", "__average__"):
            for m in ("hm_acc", "hm_f1", "base_acc", "new_acc"):
                text = cells[i].replace("**", "")
                mean, std = exp[label][g][m]
                assert text.split(" ± ")[0] == f"{mean:.2f}", (label, g, m, text)
                if std is not None:
                    assert text.split(" ± ")[1] == f"{std:.2f}", (label, g, m, text)
                i += 1
                checked += 1
    assert checked == 24
    # the CSV carries the same means with four decimals
    with open(out / "tables/synth/synth.csv") as f:
        for rec in csv.DictReader(f):
            if rec["metric"] in ("hm_acc", "base_acc"):
                assert float(rec["mean"]) == pytest.approx(exp[rec["row"]][rec["group"]][rec["metric"]][0], abs=1e-4)
    # the methods differ on the data, so a mixed-up cell would show
    assert rows["ZS-CLIP"] != rows["CoOp+LA"]
    tex = (out / "tables/synth/synth.tex").read_text()
    assert "\\toprule" in tex and "\\textbf{" in tex
    # plots: bars (Fig. 1 kind) and head/tail, PNG of the fixed size, and PDF
    from PIL import Image
    for stem in ("synth", "synth_head_tail"):
        png = out / f"tables/synth/{stem}.png"
        assert Image.open(png).size == (1000, 400)
        assert (out / f"tables/synth/{stem}.pdf").stat().st_size > 1000


def test_every_rendered_tex_compiles_with_pdflatex(uninterrupted, tmp_path):
    """Every .tex the end-to-end spec renders compiles with pdflatex
    (texlive-latex-recommended; .ci/run installs it, and in CI a missing pdflatex fails this test)."""
    from tests.test_tables_publish import compile_tex
    texs = sorted((uninterrupted / "tables/synth").glob("*.tex"))
    assert [t.name for t in texs] == ["synth.tex"]
    text = texs[0].read_text()
    assert "\\label{tab:synth}" in text and "100\\% tiny\\_CLIP \\& one epoch, $\\beta$ = 2, \\#1" in text
    for tex in texs:
        log = compile_tex(tex, tmp_path)
        assert "Output written" in log


def test_second_launch_submits_nothing(world, uninterrupted, capsys):
    assert _cli(world, uninterrupted, "--jobs", "2", "--no-plots") == 0
    report = json.loads((uninterrupted / "tables/synth/launch_report.json").read_text())
    assert report["pending"] == 0 and report["jobs"] == [] and report["skipped_done"] == 8


def _lock_pids(out):
    pids = []
    for lock in glob.glob(str(out / "**" / ".table.lock"), recursive=True):
        from tools.tables.plan import lock_held
        if lock_held(os.path.dirname(lock)):
            try:
                pids.append(json.loads(Path(lock).read_text())["pid"])
            except (ValueError, KeyError):
                pass
    return pids


def test_interrupted_launch_relaunch_finishes_only_missing(world, uninterrupted):
    out = world["base"] / "out_b"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    launcher = subprocess.Popen([sys.executable, "-m", "tools.tables", str(world["spec"]), "--output", str(out),
                                 "--data", str(world["root"]), "--jobs", "2", "--no-plots"],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = None
    deadline = time.time() + 120
    try:
        while time.time() < deadline and killed is None:
            done = glob.glob(str(out / "base2new_imb10" / "*" / "*" / "*" / "*" / "seed*" / "results.json"))
            pids = _lock_pids(out)
            if done and pids:
                killed = pids[0]
                os.kill(killed, signal.SIGKILL)          # one running job
            time.sleep(0.05)
    finally:
        launcher.kill()                                  # and the launcher
        launcher.wait()
    assert killed is not None, "no job was caught running"
    from tools.tables import build_plan, load_spec
    plan = build_plan(load_spec(world["spec"]), out, world["root"])
    before = plan.states()
    assert sum(v == "done" for v in before.values()) < 8
    assert _cli(world, out, "--jobs", "2", "--no-plots") == 0
    report = json.loads((out / "tables/synth/launch_report.json").read_text())
    # only the unfinished units were submitted (never one that was done before the relaunch)
    assert report["skipped_done"] >= sum(v == "done" for v in before.values())
    submitted = {o["unit"] for o in report["outcomes"]}
    assert not submitted & {k for k, v in before.items() if v == "done"}
    assert all(v == "done" for v in plan.states().values())
    ref = (uninterrupted / "tables/synth/synth.csv").read_text()
    assert (out / "tables/synth/synth.csv").read_text() == ref


def test_table5_efficiency_is_measured(tmp_path, root, capsys):
    """LAMP alone (the knob: the spec's methods), tiny CLIP on CPU: a subset epoch, measured parameters."""
    from tools.bench import main as bench
    from tools.tables.__main__ import main
    spec = yaml.safe_load((REPO / "configs/tables/table5.yaml").read_text())
    spec["methods"] = [m for m in spec["methods"] if m["label"] == "LAMP"]
    spec.pop("hm_from")
    (tmp_path / "table5.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "table5_paper.csv").write_text((REPO / "configs/tables/table5_paper.csv").read_text())
    tiny = ["MODEL.BACKBONE.NAME", "tiny", "INPUT.SIZE", "(32, 32)", "DATALOADER.NUM_WORKERS", "0"]
    assert main([str(tmp_path / "table5.yaml"), "--output", str(tmp_path / "out"), "--data", str(root),
                 "--efficiency-dataset", "synthetic_shapes", "--cpu-shots", "3", "--opts", *tiny]) == 0
    capsys.readouterr()
    rows = json.loads((tmp_path / "out/tables/table5/measurements.json").read_text())
    assert [r["label"] for r in rows] == ["LAMP"] and rows[0]["shots_cap"] == 3
    assert rows[0]["train_epoch_min"] > 0 and rows[0]["test_images"] == 200      # 10 base classes x 20
    assert bench(["--trainer", "LAMP", "--backbone", "tiny", "--params-only",
                  "--config-file", str(REPO / "configs/trainers/LAMP/vit_b16_lt_b2n.yaml")]) == 0
    assert int(capsys.readouterr().out.strip().splitlines()[-1]) == rows[0]["trainable_params"]
    md = (tmp_path / "out/tables/table5/table5.md").read_text()
    assert f"| LAMP | {rows[0]['train_epoch_min']:.2f}min" in md and f"{rows[0]['trainable_params'] / 1000:.0f}K" in md
    assert "CPU: the training set is a subset (at most 3 images per class" in md
    assert "| LAMP | 1.08min | 470K | 80.93 | 75.66 |" in md                      # the paper's row beside ours
