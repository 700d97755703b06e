"""The world benchmark and ablation specs (configs/tables/world_{benchmark,ablation}.yaml), their scripts, and
the claims tool (tools/world_claims.py): its arithmetic on hand-computed numbers, and its output on real tiny
runs (random-weight tiny CLIP, one epoch) of both specs, read back through the table library."""
import glob
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tools.tables import build_plan, collect, load_spec, render_all
from tools import world_claims as wc

REPO = Path(__file__).resolve().parents[1]
WORLD = ["world_shapes", "world_clutter", "world_textures"]
WORLD_OPTS = ("MODEL.BACKBONE.NAME", "tiny-world", "INPUT.SIZE", "(32,32)", "DATALOADER.NUM_WORKERS", "0")
TRAINERS = {"ZeroshotCLIP", "CoOp", "CoCoOp", "LFA", "MaPLe", "TCP", "MMA", "Candle", "LAMP", "MMRL", "VaMP", "MMLoP"}


# ---- specs and scripts ------------------------------------------------------------------------------------

def _script_dry_run(tmp_path, name):
    """bash scripts/tables/<name>.sh --dry-run: its output, and proof that it wrote nothing (no data, no
    output, no pretrained weights)."""
    env = dict(os.environ, PYTHON=sys.executable, HOME=str(tmp_path / "home"),
               CLIP_WEIGHTS_DIR=str(tmp_path / "weights"), OMP_NUM_THREADS="1")
    env.pop("OUTPUT", None)
    env.pop("DATA", None)
    r = subprocess.run(["bash", str(REPO / f"scripts/tables/{name}.sh"), "--dry-run", "--output",
                        str(tmp_path / "out"), "--data", str(tmp_path / "data")],
                       env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == []           # no data, no output, no weights, no home folder
    return r.stdout


def _trained(text):
    """{(dataset, trainer)} of the training runs a dry run lists."""
    out = set()
    for line in text.splitlines():
        folder = line.split()[1] if line.startswith("missing ") else ""
        if "/train_base/" in folder:
            parts = folder.split("/train_base/")[1].split("/")
            out.add((parts[0], parts[1]))
    return out


def test_benchmark_script_dry_run_lists_every_row_on_every_world_dataset(tmp_path):
    text = _script_dry_run(tmp_path, "world_benchmark")
    # 12 rows x 2 imbalance factors x 3 datasets x 3 seeds training runs, one new-class test each
    assert "world_benchmark: 216 training runs + 216 evaluation runs = 432 runs" in text
    assert "runs done 0, running 0, partial 0, missing 432" in text
    assert sum(l.startswith("missing ") for l in text.splitlines()) == 432
    assert _trained(text) == {(d, t) for d in WORLD for t in TRAINERS}
    assert "/base2new_imb10/" in text and "/base2new_imb50/" in text and "/base2new_imb20/" not in text
    assert "training run(s) without a step estimate" not in text


def test_settings_override_runs_one_imbalance_factor(tmp_path, capsys):
    from tools.tables.__main__ import main

    assert main(["world_benchmark", "--dry-run", "--output", str(tmp_path / "out"), "--settings", "10"]) == 0
    text = capsys.readouterr().out
    assert "world_benchmark: 108 training runs + 108 evaluation runs = 216 runs" in text
    assert "/base2new_imb10/" in text and "/base2new_imb50/" not in text


def test_datasets_override_keeps_the_spec_s_entries_and_refuses_others(tmp_path, capsys):
    from engine.cli import run_cli
    from tools.tables.__main__ import main

    assert main(["world_ablation", "--dry-run", "--output", str(tmp_path / "out"), "--datasets", "world_shapes"]) == 0
    text = capsys.readouterr().out
    assert "world_ablation: 15 training runs + 15 evaluation runs = 30 runs" in text
    assert "/world_shapes/" in text and "/world_clutter/" not in text and "/world_textures/" not in text
    with pytest.raises(SystemExit) as exit_:
        run_cli(main, ["world_ablation", "--dry-run", "--output", str(tmp_path / "out"), "--datasets", "imagenet"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--datasets: imagenet not in the spec's datasets" in err


def test_ablation_script_dry_run(tmp_path):
    text = _script_dry_run(tmp_path, "world_ablation")
    # zero-shot + LAMP full / w/o MPP / w/o MSP / w/o LBO, imb 10, 3 datasets, 3 seeds
    assert "world_ablation: 45 training runs + 45 evaluation runs = 90 runs" in text
    assert sum(l.startswith("missing ") for l in text.splitlines()) == 90
    assert _trained(text) == {(d, t) for d in WORLD for t in ("ZeroshotCLIP", "LAMP")}
    assert "/base2new_imb50/" not in text


def test_benchmark_rows_are_table1_rows_plus_zero_shot():
    bench, table1 = load_spec("world_benchmark"), load_spec("table1")
    assert [r.label for r in bench.rows] == ["ZS-CLIP"] + [r.label for r in table1.rows]
    zs = bench.rows[0]
    assert (zs.trainer, zs.config, zs.loss, zs.opts, zs.config_by_dataset) == ("ZeroshotCLIP", "vit_b16", "ce", (), ())
    t1 = {r.label: r for r in table1.rows}
    for r in bench.rows[1:]:
        ref = t1[r.label]
        assert (r.method, r.trainer, r.config, r.loss, r.opts, r.axes) == \
               (ref.method, ref.trainer, ref.config, ref.loss, ref.opts, ref.axes), r.label
        # Table 1's config_by_dataset names datasets of its own (ImageNet), none of the world's: every world
        # run takes the config Table 1 would give it
        assert r.config_by_dataset == tuple((d, c) for d, c in ref.config_by_dataset if d in WORLD) == (), r.label
        assert [r.config_for(d) for d in WORLD] == [ref.config_for(d) for d in WORLD], r.label
    assert (bench.regime, bench.settings, bench.seeds, [d.name for d in bench.datasets]) == \
           ("lt_b2n", [10, 50], [1, 2, 3], WORLD)
    assert bench.paper is None and bench.metrics == ["base_acc", "new_acc", "hm_acc", "hm_f1", "base_head_acc",
                                                     "base_tail_acc"]
    assert bench.average == "last" and bench.blocks


def test_global_opts_are_backbone_input_size_and_workers_only():
    for name in ("world_benchmark", "world_ablation"):
        spec = load_spec(name)
        assert spec.opts == WORLD_OPTS, name
        plan = build_plan(spec, "/nonexistent/out", "/nonexistent/data")
        u = plan.units[-1]
        argv = u.steps[0].argv
        assert argv[-len(WORLD_OPTS) - len(u.row.opts):len(argv) - len(u.row.opts)] == list(WORLD_OPTS)


def test_ablation_rows_and_shared_folders():
    abl, bench = load_spec("world_ablation"), load_spec("world_benchmark")
    assert [(r.label, r.trainer, r.config, r.loss, r.opts) for r in abl.rows] == [
        ("ZS-CLIP", "ZeroshotCLIP", "vit_b16", "ce", ()),
        ("LAMP", "LAMP", "vit_b16_lt_b2n", "ce", ()),
        ("LAMP w/o MPP", "LAMP", "vit_b16_lt_b2n", "ce", ("TRAINER.LAMP.USE_POOL", "False")),
        ("LAMP w/o MSP", "LAMP", "vit_b16_lt_b2n", "ce", ("TRAINER.LAMP.USE_MSP", "False")),
        ("LAMP w/o LBO", "LAMP", "vit_b16_lt_b2n", "ce", ("TRAINER.LAMP.USE_LBO", "False"))]
    assert (abl.settings, abl.seeds, [d.name for d in abl.datasets], abl.paper) == ([10], [1, 2, 3], WORLD, None)
    pa, pb = build_plan(abl, "/o", "/d"), build_plan(bench, "/o", "/d")

    def folders(plan, label, setting=10):
        return {tuple(s.folder for s in u.steps) for u in plan.units if u.row.label == label and u.setting == setting}

    assert len(folders(pa, "LAMP")) == 9 and folders(pa, "LAMP") == folders(pb, "LAMP")   # the very same runs
    assert folders(pa, "ZS-CLIP") == folders(pb, "ZS-CLIP")
    lamp_bench = {u.key for u in pb.units if u.row.trainer == "LAMP"}
    for label in ("LAMP w/o MPP", "LAMP w/o MSP", "LAMP w/o LBO"):
        assert len(folders(pa, label)) == 9 and not {f[0] for f in folders(pa, label)} & lamp_bench


def test_diagnosis_rows_change_one_lamp_setting_and_share_the_benchmark_runs():
    diag, bench = load_spec("world_diagnosis"), load_spec("world_benchmark")
    assert (diag.settings, diag.seeds, [d.name for d in diag.datasets]) == ([10], [1, 2, 3], ["world_shapes"])
    assert diag.opts == WORLD_OPTS
    lamp = [r for r in diag.rows if r.trainer == "LAMP"]
    assert len(lamp) == 10 and {r.config for r in lamp} == {"vit_b16_lt_b2n"}
    changed = [r for r in lamp if r.opts or r.loss != "ce"]
    assert len(changed) == 9
    for r in changed:  # one key each (LAMP+LA: the loss), every key a different one or a different value
        assert len(r.opts) == (0 if r.loss == "la" else 2), r.label
    assert len({r.opts for r in changed}) == 9
    pd, pb = build_plan(diag, "/o", "/d"), build_plan(bench, "/o", "/d")

    def folders(plan, label):
        return {tuple(s.folder for s in u.steps) for u in plan.units
                if u.row.label == label and u.setting == 10 and u.steps[0].dataset == "world_shapes"}

    for label in ("LAMP", "CoOp+LA"):
        assert len(folders(pd, label)) == 3 and folders(pd, label) == folders(pb, label)
    assert not folders(pd, "LAMP+LA") & folders(pb, "LAMP")


# ---- claims: the arithmetic on hand-computed numbers --------------------------------------------------------

def test_cv_of_selection_frequencies():
    # mean 0.25; deviations 0.25, 0, 0, -0.25 -> population variance 0.125 / 4 = 0.03125; std 0.176777
    assert wc.cv([0.5, 0.25, 0.25, 0.0]) == pytest.approx(0.176777 / 0.25, rel=1e-5)
    assert wc.cv([0.2] * 5) == 0.0
    assert wc.cv([0.0] * 5) is None and wc.cv([]) is None and wc.cv(None) is None


def test_paired_differences_and_dataset_means():
    p = wc.Paired({1: 50.0, 2: 52.0, 3: 49.0}, {1: 48.0, 2: 53.0, 4: 40.0})
    assert p.seeds == [1, 2] and p.diffs == {1: 2.0, 2: -1.0} and p.mean_diff() == 0.5
    assert wc.Paired({1: 1.0}, {2: 1.0}).mean_diff() is None
    assert wc.dataset_mean({"x": {1: 10.0, 2: 20.0}, "y": {1: 30.0}}, ["x", "y"]) == {1: 20.0}
    assert wc.best_label({"A": {1: 10.0, 2: 20.0}, "B": {1: 16.0, 2: 15.0}, "C": {}}) == "B"   # 15.5 > 15.0
    assert wc.best_label({"C": {}}) is None


def test_verdict_rules():
    assert [wc.verdict(x) for x in (True, False, None)] == ["holds", "does not hold", "not measured"]
    assert wc.all_of([0.1, 0.2], lambda d: d > 0) is True and wc.all_of([0.1, -0.2], lambda d: d > 0) is False
    assert wc.all_of([0.1, None], lambda d: d > 0) is None and wc.all_of([], bool) is None
    # gains {imbalance: (HM-A gain, HM-M gain)}
    assert wc.gain_claim({10: (1.0, 2.0), 50: (1.5, 3.0)}) is True
    assert wc.gain_claim({10: (1.0, 2.0), 50: (1.5, 1.8)}) is False      # HM-M gain shrinks with imbalance
    assert wc.gain_claim({10: (2.5, 2.0), 50: (1.5, 3.0)}) is False      # HM-M gain below HM-A gain at 10
    assert wc.gain_claim({10: (-3.0, -1.0), 50: (-2.0, -0.5)}) is False  # no gain at all
    assert wc.gain_claim({10: (1.0, 2.0), 50: (None, 3.0)}) is None


# ---- claims and rendering on real tiny runs -----------------------------------------------------------------

TINY_RUN = ["MODEL.BACKBONE.NAME", "tiny", "OPTIM.MAX_EPOCH", "1", "OPTIM.WARMUP_EPOCH", "0",
            "DATALOADER.TRAIN_X.BATCH_SIZE", "8"]
OVERRIDES = {"datasets": ["world_textures"], "seeds": [1, 2]}
BENCH_ROWS = {"CoOp+LA", "Candle", "LAMP"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Real runs of both specs (world_textures only, small, seeds 1-2, the random tiny CLIP, one epoch):
    CoOp+LA, Candle and LAMP of the benchmark at imb 10 and 50, and every row of the ablation."""
    from tests import cli
    from datasets.world import generate_world_dataset
    base = tmp_path_factory.mktemp("world_claims")
    data, out = base / "data", base / "out"
    generate_world_dataset("WorldTextures", str(data), train_per_class=20, val_per_class=1, test_per_class=4)
    plans = {n: build_plan(load_spec(n, OVERRIDES), out, data, TINY_RUN) for n in ("world_benchmark", "world_ablation")}
    for name, plan in plans.items():
        for u in plan.units:
            if name == "world_benchmark" and u.row.label not in BENCH_ROWS:
                continue
            for step in u.steps:
                if not step.done:                           # the ablation's LAMP is the benchmark's run
                    assert cli.main(step.argv) == 0, step.folder
    return {"data": data, "out": out, "plans": plans}


def _results(out, setting, trainer, **switches):
    """{seed: (base results.json, new results.json)} of the runs whose resolved config (config.yaml) has these
    TRAINER.LAMP switches (the others on) -- found by globbing the folders, not through the planner."""
    found = {}
    for path in glob.glob(str(out / f"base2new_imb{setting}/train_base/world_textures/{trainer}/*/seed*")):
        cfg = yaml.safe_load(Path(path, "config.yaml").read_text())
        if trainer == "LAMP":
            flags = {k: cfg["TRAINER"]["LAMP"][k] for k in ("USE_POOL", "USE_MSP", "USE_LBO")}
            if flags != {k: switches.get(k, True) for k in flags}:
                continue
        assert cfg["MODEL"]["BACKBONE"]["NAME"] == "tiny" and cfg["OPTIM"]["MAX_EPOCH"] == 1
        assert cfg["TRAINER"]["LOSS"] == ("la" if trainer == "CoOp" else "ce")
        seed = int(Path(path).name[4:])
        new = path.replace("/train_base/", "/test_new/")
        assert seed not in found, path
        found[seed] = tuple(json.loads(Path(p, "results.json").read_text()) for p in (path, new))
    assert sorted(found) == [1, 2], (trainer, switches, sorted(found))
    return found


def _hm(a, b):
    return 2 * a * b / (a + b) if a + b else 0.0


def _line(md, label):
    return next(l for l in md.splitlines() if l.startswith(f"| {label} |"))


def _seed_text(diffs, digits=2):
    return ", ".join(f"s{s} {d:+.{digits}f}" for s, d in sorted(diffs.items()))


def test_claims_on_real_runs_match_the_results_files(runs):
    md, verdicts = wc.claims(runs["out"], runs["data"], TINY_RUN, OVERRIDES)
    out = runs["out"]
    # the ablation's zero-shot and full LAMP runs are the benchmark's own (imb 10): 12 + 2 benchmark units
    assert "world_benchmark 14 of 48 units finished, world_ablation 10 of 10" in md
    full = _results(out, 10, "LAMP")
    no_lbo = _results(out, 10, "LAMP", USE_LBO=False)
    no_msp = _results(out, 10, "LAMP", USE_MSP=False)
    # C1: the CV of each layer from the recorded per-entry frequencies, full minus w/o LBO, per seed
    layers = sorted(full[1][0]["load_diagnostics"], key=int)
    assert layers == [str(l) for l in range(3, 13)]

    def cv(freq):
        return statistics.pstdev(freq) / statistics.mean(freq)

    for l in (layers[0], layers[-1]):
        diffs = {s: cv(full[s][0]["load_diagnostics"][l]["freq"]) - cv(no_lbo[s][0]["load_diagnostics"][l]["freq"])
                 for s in (1, 2)}
        assert _line(md, f"L{l}").endswith(f"| {_seed_text(diffs, 3)} |")
    all_layers = {s: statistics.mean(cv(full[s][0]["load_diagnostics"][l]["freq"]) for l in layers)
                  - statistics.mean(cv(no_lbo[s][0]["load_diagnostics"][l]["freq"]) for l in layers) for s in (1, 2)}
    assert verdicts["C1"] == ("holds" if statistics.mean(all_layers.values()) < 0 else "does not hold")
    # w/o LBO: the bias never moved, the selections were recorded
    assert all(d["bias_min"] == d["bias_max"] == 0.0 and sum(d["freq"]) > 0.99
               for d in no_lbo[1][0]["load_diagnostics"].values())
    # C2: HM-A / HM-M per seed, variant minus full
    for key, metric in (("accuracy", "HM-A"), ("macro_f1", "HM-M")):
        hm = {name: {s: _hm(r[s][0]["results"]["test"][key], r[s][1]["results"]["test"][key]) for s in (1, 2)}
              for name, r in (("full", full), ("msp", no_msp))}
        diffs = {s: hm["msp"][s] - hm["full"][s] for s in (1, 2)}
        line = _line(md, f"LAMP w/o MSP {metric}")
        assert line.endswith(f"| {_seed_text(diffs)} |")
        mean, sd = statistics.mean(hm["msp"].values()), statistics.stdev(hm["msp"].values())
        assert f"| {mean:.2f} ± {sd:.2f} |" in line
    # C4: tail - head gap on the base test, LAMP minus CoOp+LA, at each imbalance factor
    for setting in (10, 50):
        lamp = _results(out, setting, "LAMP")
        coop = _results(out, setting, "CoOp")
        def gap(r):
            return r["results"]["test"]["tail_acc"] - r["results"]["test"]["head_acc"]

        diffs = {s: gap(lamp[s][0]) - gap(coop[s][0]) for s in (1, 2)}
        assert _line(md, f"imb {setting}").endswith(f"| {_seed_text(diffs)} |")
    # every verdict is computed (the one dataset is the Mean here), with CoOp+LA the only +LA row that ran
    assert md.count("best +LA baseline **CoOp+LA**") == 2
    flat = [verdicts["C1"], verdicts["C2"], verdicts["C4"]] + list(verdicts["C3"].values())
    assert set(flat) <= {"holds", "does not hold"} and len(flat) == 6
    for name in ("C1", "C2", "C3", "C4"):
        assert f"### {name}:" in md


def test_claims_cli_reads_the_same_runs_and_reports_errors_in_one_line(runs, capsys):
    from engine.cli import call_cli
    # the specs' three datasets, two of them never run: per-dataset numbers, Mean and verdicts not measured
    assert call_cli(wc.main, ["--output", str(runs["out"]), "--data", str(runs["data"]), "--seeds", "1", "2",
                              "--opts", *TINY_RUN]) == 0
    text = capsys.readouterr().out
    assert "world_benchmark 14 of 144 units finished, world_ablation 10 of 30" in text
    assert "| L3 | " in text and "Verdict: **not measured**" in text and "**holds**" not in text
    # --datasets / --settings restrict the specs: the Mean is over world_textures alone, imb 10 alone
    assert call_cli(wc.main, ["--output", str(runs["out"]), "--data", str(runs["data"]), "--seeds", "1", "2",
                              "--datasets", "world_textures", "--settings", "10", "--opts", *TINY_RUN]) == 0
    text = capsys.readouterr().out
    assert "world_benchmark 8 of 24 units finished, world_ablation 10 of 10" in text  # ZS, CoOp+LA, Candle, LAMP
    assert "imb 50" not in text and "Verdict: **not measured**" not in text.split("### C3")[1]
    assert call_cli(wc.main, ["--output", str(runs["out"] / "nothing_here")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no finished runs of world_benchmark or world_ablation" in err


def test_world_tables_render_with_plots_and_expert_load(runs, tmp_path):
    """Like every table: md / csv / tex, the bars plot, head / tail, and one expert-load heatmap per LAMP row
    with selections (w/o MPP has no pool, so none)."""
    for name, load_rows in (("world_ablation", ["LAMP", "LAMP_w_o_MSP", "LAMP_w_o_LBO"]),
                            ("world_benchmark", ["LAMP"])):
        plan = runs["plans"][name]
        paths = render_all(plan, collect(plan), tmp_path / name)
        names = sorted(p.name for p in paths)
        for ext in ("md", "csv", "tex"):
            assert f"{name}.{ext}" in names
        assert f"{name}.png" in names and f"{name}_head_tail.png" in names
        loads = sorted(n[:-4] for n in names if n.startswith(f"{name}_load_") and n.endswith(".png"))
        assert loads == sorted(f"{name}_load_{s}_{r}" for s in plan.spec.settings for r in load_rows)
        md = (tmp_path / name / f"{name}.md").read_text()
        assert "| LAMP | " in md and "Head / tail accuracy" in md and "Paper (" not in md
    md = (tmp_path / "world_benchmark" / "world_benchmark.md").read_text()
    # ZS-CLIP ran at imb 10 only (the ablation's zero-shot runs are the benchmark's): empty at imb 50
    assert "## imb = 10" in md and "## imb = 50" in md and "| ZS-CLIP | – |" in md
