"""The run API (engine/runs.py) and the methods' registry entries (MethodInfo): one layout for scripts and
tables, results named by the caller (not parsed from the folder), and tools that read the registry instead of
naming methods."""
import ast
import dataclasses
import json
from pathlib import Path

import pytest

import datasets  # noqa: F401
import trainers  # noqa: F401
from engine.cli import call_cli
from engine.config import ConfigError
from engine.registry import REGIMES, TRAINER_REGISTRY, MethodInfo
from engine.runs import (DataRef, RunConfig, Step, b2n_steps, config_folder, execute_step, experiment_name,
                         trainer_config_file, transfer_steps)
from tests.helpers_run import synthetic_root, train_args

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthetic_root(tmp_path_factory)


# ---- layout

def test_experiment_names_and_config_folders():
    assert [experiment_name(r, s) for r, s in (("lt_b2n", 10), ("fewshot", 16), ("xd", 100), ("dg", 50))] == \
        ["base2new_imb10", "fewshot_16shots", "xd_imb100", "dg_imb50"]
    with pytest.raises(ValueError, match="unknown regime 'b2n'"):
        experiment_name("b2n", 10)
    opts = ["OPTIM.MAX_EPOCH", "5", "DATALOADER.NUM_WORKERS", "0", "TRAINER.LAMP.TEXT_CHUNK", "8"]
    assert config_folder("vit_b16_lt_b2n", "la", opts) == "vit_b16_lt_b2n_la_max_epoch5"  # neutral keys left out
    assert config_folder("c", "ce", opts, neutral_in_tag=True) == "c_num_workers0_max_epoch5_text_chunk8"
    assert config_folder("c", "la", opts, tag="short") == "c_la_short"


def test_a_methods_run_neutral_keys_come_from_its_registry_entry(monkeypatch):
    """LAMP's text chunking is run-neutral because LAMP's entry says so (not a list in engine/)."""
    from engine.run_identity import config_diff, is_run_neutral, run_tag
    assert is_run_neutral("TRAINER.LAMP.TEXT_CHUNK") and run_tag(["TRAINER.LAMP.TEXT_CHUNK", "8"]) == ""
    monkeypatch.setitem(TRAINER_REGISTRY._info, "LAMP", dataclasses.replace(TRAINER_REGISTRY.info("LAMP"), run_neutral=()))
    assert not is_run_neutral("TRAINER.LAMP.TEXT_CHUNK") and run_tag(["TRAINER.LAMP.TEXT_CHUNK", "8"]) == "_text_chunk8"
    a = {"TRAINER": {"LAMP": {"TEXT_CHUNK": 0}}}
    assert config_diff(a, {"TRAINER": {"LAMP": {"TEXT_CHUNK": 8}}}) == [("TRAINER.LAMP.TEXT_CHUNK", 0, 8)]


def test_regime_steps(tmp_path):
    run = RunConfig("CoOp", "vit_b16_ep50_ctxv1", "vit_b16_ep50_ctxv1_la", "la", ("OPTIM.MAX_EPOCH", "3"))
    train, new = b2n_steps(run, str(tmp_path), "/data", "fewshot", 16, DataRef("dtd", "dtd"), 2)
    assert train.folder == str(tmp_path / "fewshot_16shots/train_base/dtd/CoOp/vit_b16_ep50_ctxv1_la/seed2")
    assert new.folder == str(tmp_path / "fewshot_16shots/test_new/dtd/CoOp/vit_b16_ep50_ctxv1_la/seed2")
    assert (train.eval_only, new.eval_only) == (False, True)
    assert new.argv[new.argv.index("--model-dir") + 1] == train.folder
    assert new.expected() == {"trainer": "CoOp", "dataset": "DescribableTextures", "seed": 2,
                              "config": "vit_b16_ep50_ctxv1_la", "subsample_classes": "new", "imb_factor": 1.0,
                              "num_shots": 16, "loss": "la"}
    assert train.argv[-4:] == ["TRAINER.LOSS", "la", "OPTIM.MAX_EPOCH", "3"]      # the run's opts come last
    xd = transfer_steps(run, str(tmp_path), "/data", "dg", 100, DataRef("imagenet", "imagenet"),
                        [DataRef("imagenet_a", "imagenet_a"), DataRef("imagenet_r", "imagenet_r")], 1)
    assert [Path(s.folder).relative_to(tmp_path).parts[:4] for s in xd] == [
        ("xd_imb100", "train_all", "imagenet", "CoOp"), ("dg_imb100", "test_all", "imagenet_a", "CoOp"),
        ("dg_imb100", "test_all", "imagenet_r", "CoOp")]
    assert [s.experiment for s in xd] == ["xd_imb100", "dg_imb100", "dg_imb100"]


def test_scripts_and_tables_build_the_same_steps(tmp_path):
    """The table planner and the scripts' entry point go through the same builders: same folders, same
    arguments (so a table reuses a script's runs)."""
    from tools import runs as script_runs
    from tools.tables import build_plan, load_spec
    out, data = str(tmp_path / "o"), str(tmp_path / "d")
    plan = build_plan(load_spec("table1"), out, data)
    unit = next(u for u in plan.units if u.row.label == "MaPLe+LA" and u.setting == 20 and u.seed == 3
                and u.steps[0].dataset == "dtd")
    args = script_runs.parse_args(["base2new", "--trainer", "MaPLe", "--loss", "la", "--data", data, "--output", out,
                                   "--", "dtd", "20", "3"])
    steps, where = script_runs.plan_steps(args, "lt_b2n")
    assert [(s.folder, s.argv, s.config, s.experiment) for s in steps] == \
        [(s.folder, s.argv, s.config, s.experiment) for s in unit.steps]
    assert "results go to" in where


# ---- one step: results named by the caller

def test_results_record_the_names_the_caller_passes(root, tmp_path):
    """Nothing is parsed back from the folder: --experiment / --config-name are recorded; without them the
    config is the yaml's stem (+ _la) and the experiment is empty, whatever the folder looks like."""
    from engine.runs import main
    named = tmp_path / "base2new_imb99/train_base/x/ZeroshotCLIP/other_name/seed1"
    assert main(["--experiment", "exp", "--config-name", "vit_b16_v2"] +
                train_args(root, named, "ZeroshotCLIP", "vit_b16.yaml")) == 0
    res = json.loads((named / "results.json").read_text())
    assert (res["experiment"], res["config"]) == ("exp", "vit_b16_v2")
    plain = tmp_path / "base2new_imb99/train_base/x/ZeroshotCLIP/vit_b16_la_x/seed1"
    assert main(train_args(root, plain, "ZeroshotCLIP", "vit_b16.yaml", "TRAINER.LOSS", "la")) == 0
    res = json.loads((plain / "results.json").read_text())
    assert (res["experiment"], res["config"]) == ("", "vit_b16_la")


def test_execute_step_skips_only_a_finished_run_of_the_same_config(root, tmp_path, capsys):
    out = tmp_path / "run"
    step = Step(str(out), "synthetic_shapes", train_args(root, out, "ZeroshotCLIP", "vit_b16.yaml"))
    assert execute_step(step) == 0
    assert execute_step(step) == 2 and "already holds a finished run" in capsys.readouterr().err
    assert execute_step(step, skip_finished=True) == 0 and "[skip]" in capsys.readouterr().out
    other = Step(str(out), "synthetic_shapes", train_args(root, out, "ZeroshotCLIP", "vit_b16.yaml", imb=20))
    assert execute_step(other, skip_finished=True) == 2 and "DATASET.IMB_FACTOR" in capsys.readouterr().err


# ---- the registry

def test_every_method_names_existing_configs():
    for name in TRAINER_REGISTRY.names():
        info = TRAINER_REGISTRY.info(name)
        assert info.configs.get("b2n"), name
        for config in list(info.configs.values()) + list(info.imagenet.values()):
            assert Path(trainer_config_file(name, config)).is_file(), (name, config)


def test_method_info_rejects_unknown_roles_and_la_modes():
    with pytest.raises(ValueError, match="unknown regime role"):
        MethodInfo(configs={"b2n_lt": "x"})
    with pytest.raises(ValueError, match="MethodInfo.la"):
        MethodInfo(la="maybe")
    assert set(REGIMES) == {"b2n", "fewshot", "xd"}


def test_scripts_take_the_method_config_per_regime_and_its_imagenet_variant(capsys):
    from tools.runs import main
    for args, config in ((["base2new", "--trainer", "MMRL", "--", "imagenet", "10", "1"], "vit_b16_b2n_imagenet"),
                         (["base2new", "--trainer", "MMRL", "--", "dtd", "10", "1"], "vit_b16_b2n"),
                         (["fewshot", "--trainer", "MMA", "--", "imagenet", "16", "1"], "vit_b16_ep5_fewshot_imagenet"),
                         (["xd", "--trainer", "MaPLe", "--", "1"], "vit_b16_c2_ep2_batch4_2ctx_cross_datasets"),
                         (["base2new", "--trainer", "MMRL", "--config", "vit_b16_xd", "--", "imagenet", "10", "1"],
                          "vit_b16_xd")):
        assert main(["--dry-run", "--output", "o"] + args) == 0
        text = capsys.readouterr().out
        assert f"--config-file {trainer_config_file(args[2], config)} " in text, (args, text)


def test_plus_la_is_refused_early_where_the_method_refuses_it(capsys):
    from tools.runs import main
    with pytest.raises(ConfigError, match="LFA has no cross-entropy"):
        RunConfig("LFA", "vit_b16_b2n_beta0.9", "x", "la")
    assert call_cli(main, ["base2new", "--trainer", "LFA", "--loss", "la", "--dry-run", "--", "dtd", "10"]) == 2
    assert "LFA has no cross-entropy" in capsys.readouterr().err
    assert call_cli(main, ["xd", "--trainer", "LFA", "--dry-run"]) == 2  # LFA has no transfer config
    assert "LFA has no xd config" in capsys.readouterr().err


def test_step_estimates_come_from_the_registry(monkeypatch):
    from tools.tables import build_plan, load_spec
    spec = load_spec({"name": "t", "regime": "lt_b2n", "settings": [10], "seeds": [1], "datasets": ["dtd"],
                      "methods": [{"label": "CoOp", "trainer": "CoOp", "config": "vit_b16_ep50_ctxv1"},
                                  {"label": "ZS", "trainer": "ZeroshotCLIP", "config": "vit_b16"},
                                  {"label": "LFA", "trainer": "LFA", "config": "vit_b16_b2n_beta0.9"}],
                      "layout": {"metrics": ["hm_acc"]}})
    steps = {u.row.label: u.train_steps for u in build_plan(spec, "o").units}
    assert steps["ZS"] == 0 and steps["LFA"] == 100          # LFA: DescribableTextures' iteration count
    assert steps["CoOp"] > 0
    seen = []
    counted = dataclasses.replace(TRAINER_REGISTRY.info("CoOp"),
                                  train_steps=lambda value, images, classes, dataset: seen.append(dataset) or 7)
    monkeypatch.setitem(TRAINER_REGISTRY._info, "CoOp", counted)
    assert {u.row.label: u.train_steps for u in build_plan(spec, "o").units}["CoOp"] == 7
    assert seen == ["DescribableTextures"]


def test_image_counts_follow_the_sampling_profile():
    from lt_sampling.profiles import exp_profile
    from tools.tables.plan import train_images
    from tools.tables.spec import dataset_info
    info = dataset_info()["dtd"]
    per_class, base = info["train_images"] // info["classes"], -(-info["classes"] // 2)
    assert train_images("dtd", "lt_b2n", 10) == (base, sum(exp_profile(min(100, per_class), base, 10)))
    assert train_images("dtd", "lt_b2n", 10, cap=-1) == (base, sum(exp_profile(per_class, base, 10)))  # every image
    assert train_images("dtd", "fewshot", 4) == (base, 4 * base)


def test_bench_uses_the_registry_hooks(monkeypatch, capsys):
    from tools.bench import main as bench
    calls = []
    hooked = dataclasses.replace(TRAINER_REGISTRY.info("CoOp"),
                                 bench_prepare=lambda trainer, batch: calls.append(tuple(batch["img"].shape)))
    monkeypatch.setitem(TRAINER_REGISTRY._info, "CoOp", hooked)
    assert bench(["--trainer", "CoOp", "--backbone", "tiny", "--batch", "2", "--classes", "3", "--steps", "1",
                  "--warmup", "0", "INPUT.SIZE", "(32, 32)"]) == 0
    assert calls == [(2, 3, 32, 32)]
    assert "trainer            CoOp (vit_b16_ep50_ctxv1.yaml)" in capsys.readouterr().out  # its registry default


# ---- who imports what

def _imports(path):
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_module_imports_train_py_and_lib_sh_leaves_the_layout_to_the_run_api():
    code = [p for d in ("engine", "tools", "trainers", "datasets", "lt_sampling", "tests") for p in (REPO / d).rglob("*.py")]
    assert code and not [str(p) for p in code if "train" in _imports(p)]
    lib = (REPO / "scripts/lib.sh").read_text()
    assert "tools.runs" in lib and not any(w in lib for w in ("train_base", "test_new", "train_all", "test_all",
                                                                  "train.py"))
    assert not [p for p in (REPO / "scripts").rglob("*.sh") if "train_base" in p.read_text()]


def test_a_spec_row_without_config_takes_the_methods_own():
    from tools.tables import build_plan, load_spec
    from tools.tables.spec import SpecError

    def spec(regime, datasets, **method):
        raw = {"name": "t", "regime": regime, "settings": [16 if regime == "fewshot" else 10], "seeds": [1],
               "datasets": datasets, "methods": [dict(label="M", **method)], "layout": {}}
        return load_spec(raw)

    plan = build_plan(spec("fewshot", ["imagenet", "dtd"], trainer="MMA"), "o")
    assert {u.steps[0].dataset: u.config for u in plan.units} == {"imagenet": "vit_b16_ep5_fewshot_imagenet",
                                                                  "dtd": "vit_b16_ep5_fewshot"}
    assert {u.config for u in build_plan(spec("lt_b2n", ["imagenet"], trainer="LAMP"), "o").units} == {"vit_b16_lt_b2n"}
    row = spec("xd", ["dtd"], trainer="MaPLe").rows[0]
    assert (row.config, row.config_by_dataset) == ("vit_b16_c2_ep2_batch4_2ctx_cross_datasets", ())
    assert spec("lt_b2n", ["dtd"], trainer="MMRL").rows[0].config_by_dataset == ()   # no ImageNet run: no variant
    assert spec("lt_b2n", ["dtd"], trainer="MMRL", config="vit_b16_xd").rows[0].config == "vit_b16_xd"  # named wins
    with pytest.raises(SpecError, match="LFA has no xd config"):
        spec("dg", ["imagenet_a"], trainer="LFA")
