"""Issue 17, §3: only the planned run goes into a cell; plan-time errors are one line; a failed run's reason
reaches the launch report. No training (runs fail before loading any data)."""
import json
import os
from pathlib import Path

import pytest
import yaml

from tools.tables import build_plan, collect, load_spec
from tools.tables.spec import SpecError

TWO_ROWS = {"name": "mini", "regime": "lt_b2n", "settings": [10], "seeds": [1, 2], "datasets": ["dtd", "caltech101"],
            "methods": [{"label": "ZS", "trainer": "ZeroshotCLIP", "config": "vit_b16"},
                        {"label": "CoOp+LA", "trainer": "CoOp", "config": "vit_b16_ep50_ctxv1", "loss": "la"}],
            "layout": {"metrics": ["hm_acc"], "average": "last"}}


def _write(step, acc, **fields):
    """A results.json as train.py writes it for ``step``; ``fields`` change recorded fields."""
    os.makedirs(step.folder, exist_ok=True)
    rec = {**step.expected(), "experiment": "x", **fields,
           "results": {"test": {"accuracy": acc, "macro_f1": acc - 5, "head_acc": None, "tail_acc": None}}}
    Path(step.folder, "results.json").write_text(json.dumps(rec))
    return Path(step.folder, "results.json")


def _fill(plan, acc=60.0):
    for u in plan.units:
        _write(u.steps[0], acc + 10)
        _write(u.steps[1], acc)


def _unit(plan, label, dataset, seed):
    return next(u for u in plan.units if (u.row.label, u.steps[0].dataset, u.seed) == (label, dataset, seed))


def test_expected_record_is_what_the_arguments_say(tmp_path):
    plan = build_plan(load_spec(TWO_ROWS), tmp_path)
    u = _unit(plan, "CoOp+LA", "dtd", 2)
    assert u.steps[0].expected() == {"trainer": "CoOp", "dataset": "DescribableTextures", "seed": 2,
                                     "config": "vit_b16_ep50_ctxv1_la", "subsample_classes": "base",
                                     "imb_factor": 10.0, "num_shots": 100, "loss": "la"}
    assert u.steps[1].expected()["subsample_classes"] == "new"
    xd = build_plan(load_spec("vamp_xd"), tmp_path)      # the spec's NUM_SHOTS 16 comes after the regime's 100
    src, target = xd.units[0].steps[0].expected(), xd.units[0].steps[1].expected()
    assert (src["num_shots"], src["imb_factor"], src["subsample_classes"]) == (16, 1.0, "all")
    assert target["dataset"] == "Caltech101" and "imb_factor" not in target


def test_zero_shot_results_copied_into_a_coop_folder_are_not_averaged_in(tmp_path, capsys):
    """The issue's example: a zero-shot results.json copied into a CoOp seed folder used to be averaged into
    the CoOp cell, and collection exited 0."""
    from tools.tables.__main__ import main
    spec_path = tmp_path / "mini.yaml"
    spec_path.write_text(yaml.safe_dump(TWO_ROWS))
    plan = build_plan(load_spec(spec_path), tmp_path / "out")
    _fill(plan)
    zs, coop = _unit(plan, "ZS", "dtd", 2), _unit(plan, "CoOp+LA", "dtd", 2)
    for i in (0, 1):
        _write(zs.steps[i], 10.0 if i else 20.0)
        Path(coop.steps[i].folder, "results.json").write_text(Path(zs.steps[i].folder, "results.json").read_text())
    warnings, refused = [], []
    cells = collect(plan, warn=warnings.append, refused=refused)
    c = cells[(10, "CoOp+LA", "dtd", "hm_acc")]
    assert c.n == 1 and c.seeds == [1] and c.mean == pytest.approx(2 * 70 * 60 / 130)   # seed 2 left out
    assert cells[(10, "ZS", "dtd", "hm_acc")].n == 2
    assert sorted(refused) == sorted(os.path.join(s.folder, "results.json") for s in coop.steps)
    line = next(w for w in warnings if coop.steps[0].folder in w)
    assert "trainer is 'ZeroshotCLIP', the plan expects 'CoOp'" in line and "\n" not in line
    rc = main([str(spec_path), "--collect-only", "--no-plots", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and "2 results.json left out" in err and f"{coop.steps[1].folder}/results.json: trainer" in err
    md = (tmp_path / "out/tables/mini/mini.md").read_text()
    assert "(1/2)" in md                      # the CoOp cells are marked as one seed short


@pytest.mark.parametrize("field,value", [("seed", 3), ("dataset", "DescribableTextures"), ("imb_factor", 20.0),
                                         ("num_shots", 16), ("loss", "ce"), ("config", "vit_b16_ep50_ctxv1_la_n_ctx4"),
                                         ("subsample_classes", "all"), ("trainer", "LAMP")])
def test_each_mismatching_field_excludes_the_run_and_names_file_and_field(tmp_path, field, value):
    plan = build_plan(load_spec(TWO_ROWS), tmp_path)
    _fill(plan)
    u = _unit(plan, "CoOp+LA", "caltech101", 1)
    path = _write(u.steps[1], 1.0, **{field: value})
    warnings = []
    cells = collect(plan, warn=warnings.append)
    assert cells[(10, "CoOp+LA", "caltech101", "hm_acc")].seeds == [2]
    assert cells[(10, "CoOp+LA", "dtd", "hm_acc")].seeds == [1, 2]
    assert len(warnings) == 1 and warnings[0].startswith(f"{path}: {field} is {value!r}")


def test_a_missing_run_field_is_a_mismatch(tmp_path):
    plan = build_plan(load_spec(TWO_ROWS), tmp_path)
    _fill(plan)
    path = Path(plan.units[0].steps[0].folder, "results.json")
    rec = json.loads(path.read_text())
    del rec["loss"]
    path.write_text(json.dumps(rec))
    warnings = []
    collect(plan, warn=warnings.append)
    assert warnings == [f"{path}: loss is '<missing>', the plan expects 'ce'; not this cell's run, excluded"]


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]"])
def test_corrupt_results_json_is_named_and_its_cell_is_missing(tmp_path, capsys, text):
    from tools.tables.__main__ import main
    spec_path = tmp_path / "mini.yaml"
    spec_path.write_text(yaml.safe_dump(TWO_ROWS))
    plan = build_plan(load_spec(spec_path), tmp_path / "out")
    _fill(plan)
    bad = _unit(plan, "ZS", "dtd", 1)
    Path(bad.steps[1].folder, "results.json").write_text(text)
    rc = main([str(spec_path), "--collect-only", "--no-plots", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and f"{bad.steps[1].folder}/results.json: corrupt results.json" in err
    md = (tmp_path / "out/tables/mini/mini.md").read_text()
    zs = next(l for l in md.splitlines() if l.startswith("| ZS |"))
    coop = next(l for l in md.splitlines() if l.startswith("| CoOp+LA |"))
    assert "(1/2)" in zs.split("|")[2] and "(1/2)" not in coop    # the other cells render in full


# ---- plan-time errors: one line, exit 2, before anything launches

def _spec_file(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


GOOD = yaml.safe_dump(TWO_ROWS)
BAD_SPECS = {
    "malformed YAML": ("name: x\nmethods: [a, b\n", "not valid YAML (line"),
    "python tag": ("name: !!python/object/apply:os.system ['echo hi']\n", "YAML python tags are not allowed"),
    "unknown method": (GOOD.replace("trainer: CoOp", "trainer: CoOpp"), "unknown trainer 'CoOpp'"),
    "unknown dataset": (GOOD.replace("- dtd", "- dtdd"), "unknown dataset 'dtdd'"),
    "unknown metric": (GOOD.replace("- hm_acc", "- hm_accc"), "metric(s) ['hm_accc'] not available"),
    "unknown metric label": (GOOD.replace("average: last", "average: last\n  metric_labels: {acc: A}"),
                             "metric(s) ['acc'] not available"),
    "unknown config": (GOOD.replace("config: vit_b16_ep50_ctxv1", "config: vit_b16_nope"),
                       "unknown config 'vit_b16_nope' of CoOp"),
    "dataset leaving --output": (GOOD.replace("- dtd", "- ../../etc"), "dataset name '../../etc' must be a plain name"),
    "dataset config leaving configs": (GOOD.replace("- dtd", "- {name: d, config: ../trainers/CoOp/vit_b16_ep50}"),
                                       "dataset config '../trainers/CoOp/vit_b16_ep50' must be a plain name"),
    "absolute dataset path": (GOOD.replace("- dtd", "- /tmp/x"), "dataset name '/tmp/x' must be a plain name"),
    "trainer path": (GOOD.replace("trainer: CoOp", "trainer: ../CoOp"), "trainer '../CoOp' must be a plain name"),
    "dataset root leaving --data": (GOOD.replace("- dtd", "- {name: dtd, opts: [DATASET.ROOT, ../elsewhere]}"),
                                    "dataset dtd: DATASET.ROOT ../elsewhere leaves --data"),
    "absolute dataset root outside --data": (GOOD.replace("- dtd", "- {name: dtd, opts: [DATASET.ROOT, /tmp]}"),
                                             "dataset dtd: DATASET.ROOT /tmp leaves --data"),
    "opts moving --data": (GOOD.replace("name: mini", "name: mini\nopts: [DATASET.ROOT, /elsewhere]"),
                           "opts may not set DATASET.ROOT"),
    "not a mapping": ("- a\n- b\n", "a spec is a mapping"),
    "settings not numbers": (GOOD.replace("- 10", "- ten"), "settings and seeds are lists of integers"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_plan_time_errors_are_one_line(tmp_path, capsys, case):
    from engine.cli import call_cli
    from tools.tables.__main__ import main
    text, needle = BAD_SPECS[case]
    assert text != GOOD
    path = _spec_file(tmp_path, text)
    rc = call_cli(main, [str(path), "--output", str(tmp_path / "out"), "--data", str(tmp_path / "data")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()   # nothing launched, nothing written


def test_planner_keys_in_cli_opts_and_jobs_below_one_are_refused(tmp_path, capsys):
    from engine.cli import call_cli
    from tools.tables.__main__ import main
    path = _spec_file(tmp_path, GOOD)
    for argv, needle in ((["--jobs", "0"], "--jobs must be at least 1, got 0"),
                         (["--jobs", "-3"], "--jobs must be at least 1, got -3"),
                         (["--opts", "OUTPUT_DIR", "/x"], "--opts may not set OUTPUT_DIR")):
        rc = call_cli(main, [str(path), "--output", str(tmp_path / "out")] + argv)
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "out").exists()
    from tools.tables.launcher import launch
    with pytest.raises(SpecError.__mro__[1], match="--jobs must be at least 1"):
        launch(build_plan(load_spec(TWO_ROWS), tmp_path / "o2"), jobs=0)


def test_table5_spec_errors_are_one_line(tmp_path, capsys):
    from engine.cli import call_cli
    from tools.tables.__main__ import main
    from tools.tables.spec import SPEC_DIR
    good = (SPEC_DIR / "table5.yaml").read_text()
    for text, needle in (("name: !!python/name:os.system x\n", "YAML python tags are not allowed"),
                         ("methods: [a\n", "not valid YAML"),
                         (good.replace("trainer: LAMP", "trainer: LAMPP", 1), "unknown trainer 'LAMPP'")):
        assert text != good
        path = tmp_path / "table5.yaml"
        path.write_text(text)
        rc = call_cli(main, [str(path), "--output", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and needle in err, err


def test_a_dataset_root_inside_data_is_resolved_there(tmp_path):
    spec = load_spec({**TWO_ROWS, "datasets": [{"name": "b", "config": "dtd", "opts": ["DATASET.ROOT", "sub/b"]}]})
    argv = build_plan(spec, tmp_path / "o", tmp_path / "data").units[0].steps[0].argv
    assert argv[argv.index("DATASET.ROOT") + 1] == str(tmp_path / "data" / "sub" / "b")


def test_every_shipped_spec_passes_the_plan_time_checks():
    from tools.tables.spec import SPEC_DIR
    for p in sorted(SPEC_DIR.glob("*.yaml")):
        if p.stem not in ("datasets", "table5"):
            load_spec(p.stem)


# ---- a failed run's reason

def test_failed_run_reason_reaches_the_launch_report_and_table_error_log(tmp_path):
    """train.py's one-line ``error:`` (here: the datasets folder does not exist) is the outcome's message, the
    launcher's [failed] line and a line of table_error.log, not only in the job's own stderr."""
    from tools.tables.launcher import launch
    spec = load_spec({**TWO_ROWS, "datasets": ["dtd"], "seeds": [1], "methods": TWO_ROWS["methods"][1:]})
    plan = build_plan(spec, tmp_path / "out", tmp_path / "no_data")
    lines = []
    report = launch(plan, jobs=1, log=lines.append, poll_s=0.1)
    (outcome,) = report["outcomes"]
    assert outcome["status"] == "failed"
    msg = outcome["message"]
    assert msg.startswith("train.py exited with code 2: error: ") and "no_data" in msg, msg
    failed = [l for l in lines if l.startswith("[failed] ")]
    assert len(failed) == 1 and msg in failed[0]
    log = Path(outcome["error_log"]).read_text()
    assert msg in log
