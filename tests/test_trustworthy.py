"""Issue 8: a run folder holds one config, bad input is one line and exit code 2, data errors are named."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import cli
from engine.cli import call_cli
from engine.run_identity import RUN_NEUTRAL_KEYS, config_diff, run_tag
from tests.helpers_data import REAL_SPLIT, require_shared
from tests.helpers_run import REPO, run_interrupted, run_train, train_args
from trainers.coop import CoOp

COOP = ("CoOp", "vit_b16_ep50_ctxv1.yaml")
PY = sys.executable


def _one_line_error(capsys, rc, *names):
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for name in names:
        assert str(name) in lines[0], (name, err)
    return lines[0]


# ------------------------------------------------------------------------------------------ run identity

def test_resume_with_another_config_is_refused(root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    run_interrupted(monkeypatch, CoOp, 0, root, out, *COOP, "OPTIM.MAX_EPOCH", "1", "OPTIM.WARMUP_EPOCH", "0")
    stored = (out / "config.yaml").read_text()
    manifest = (out / "manifest.json").read_text()
    line = _one_line_error(capsys, cli.main(train_args(root, out, *COOP, "OPTIM.MAX_EPOCH", "1", "OPTIM.WARMUP_EPOCH", "0", imb=1)),
                           "DATASET.IMB_FACTOR", out)
    assert "10.0 in the folder" in line and "1.0 requested" in line
    assert (out / "config.yaml").read_text() == stored and (out / "manifest.json").read_text() == manifest
    # A run-neutral key (print frequency, workers) may change: the run resumes and finishes as imb 10.
    res = run_train(root, out, *COOP, "OPTIM.MAX_EPOCH", "1", "OPTIM.WARMUP_EPOCH", "0", "TRAIN.PRINT_FREQ", "3")
    assert res["imb_factor"] == 10.0 and "TRAIN.PRINT_FREQ" in RUN_NEUTRAL_KEYS
    # A finished folder of another config is an error even with --skip-finished; the same config is skipped.
    args = train_args(root, out, *COOP, "OPTIM.MAX_EPOCH", "2")
    _one_line_error(capsys, cli.main(["--skip-finished"] + args), "OPTIM.MAX_EPOCH")
    assert cli.main(["--skip-finished"] + train_args(root, out, *COOP, "OPTIM.MAX_EPOCH", "1", "OPTIM.WARMUP_EPOCH", "0")) == 0
    assert "[skip]" in capsys.readouterr().out

    # --eval-only --model-dir of another trainer: the folder's trainer is named, nothing is written.
    ev = tmp_path / "eval"
    args = ["--eval-only", "--model-dir", str(out)] + train_args(root, ev, "TCP", "vit_b16_ep50_ctx4.yaml",
                                                                 subsample="new")
    _one_line_error(capsys, cli.main(args), "holds a CoOp run", "vit_b16_ep50_ctxv1", "TCP")
    assert not ev.exists()
    # Same trainer, another architecture: the differing key, not a state_dict size mismatch.
    args = ["--eval-only", "--model-dir", str(out)] + train_args(root, ev, *COOP, "OPTIM.MAX_EPOCH", "1", "OPTIM.WARMUP_EPOCH", "0",
                                                                 "TRAINER.COOP.N_CTX", "8",
                                                                 "TRAINER.COOP.CTX_INIT", "", subsample="new")
    _one_line_error(capsys, cli.main(args), "TRAINER.COOP.N_CTX", "does not fit")
    # A recorded split that differs from the one drawn now (dataset files changed): named, refused.
    out2 = tmp_path / "run2"
    run_interrupted(monkeypatch, CoOp, 0, root, out2, *COOP, "OPTIM.MAX_EPOCH", "1", "OPTIM.WARMUP_EPOCH", "0")
    m = json.loads((out2 / "manifest.json").read_text())
    m["hash"] = "0" * 64
    (out2 / "manifest.json").write_text(json.dumps(m))
    _one_line_error(capsys, cli.main(train_args(root, out2, *COOP, "OPTIM.MAX_EPOCH", "1", "OPTIM.WARMUP_EPOCH", "0")), "manifest.json",
                    "another training split")


def test_config_diff_and_run_tag():
    stored = {"OUTPUT_DIR": "a", "DATASET": {"IMB_FACTOR": 10.0, "ROOT": "/x"}, "INPUT": {"SIZE": [32, 32]},
              "DATALOADER": {"NUM_WORKERS": 4}, "OLD": {"GONE": 1}}
    now = {"OUTPUT_DIR": "b", "DATASET": {"IMB_FACTOR": 1.0, "ROOT": "/y"}, "INPUT": {"SIZE": (32, 32)},
           "DATALOADER": {"NUM_WORKERS": 0}, "NEW": {"KEY": 2}}
    assert config_diff(stored, now) == [("DATASET.IMB_FACTOR", 10.0, 1.0)]
    opts = ["DATALOADER.NUM_WORKERS", "0", "OPTIM.MAX_EPOCH", "5", "MODEL.BACKBONE.NAME", "tiny"]
    assert run_tag(opts) == "_nametiny_max_epoch5"
    assert run_tag(["DATALOADER.NUM_WORKERS", "2"]) == ""


def _cfg_tag(**env):
    script = f'PYTHON={PY}; source "{REPO}/scripts/lib.sh"; CFG=vit_b16_ep50_ctxv1; cfg_tag'
    full = {k: v for k, v in os.environ.items() if k not in ("EXTRA", "TAG", "LOSS")}
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env={**full, **env})
    return out.returncode, out.stdout.strip(), out.stderr


def test_script_variants_get_their_own_folders():
    assert _cfg_tag() == (0, "vit_b16_ep50_ctxv1", "")
    assert _cfg_tag(EXTRA="OPTIM.MAX_EPOCH 5")[1] == "vit_b16_ep50_ctxv1_max_epoch5"
    assert _cfg_tag(EXTRA="OPTIM.MAX_EPOCH 10")[1] == "vit_b16_ep50_ctxv1_max_epoch10"
    assert _cfg_tag(EXTRA="DATALOADER.NUM_WORKERS 0")[1] == "vit_b16_ep50_ctxv1"  # run-neutral
    assert _cfg_tag(EXTRA="OPTIM.MAX_EPOCH 5", LOSS="la")[1] == "vit_b16_ep50_ctxv1_la_max_epoch5"
    assert _cfg_tag(EXTRA="OPTIM.MAX_EPOCH 5", TAG="short")[1] == "vit_b16_ep50_ctxv1_short"
    assert _cfg_tag(TAG="a/b")[0] == 2


def test_scripts_pass_the_variant_folder_and_skip_only_same_config(tmp_path):
    """scripts/coop/base2new.sh hands the environment to the run API's entry point (python -m tools.runs; a
    stand-in interpreter records the call and runs it with --dry-run): a variant goes to its own folder, the
    worker count is run-neutral, and the script stops with the entry point's exit code. (The skip / refuse rules
    of the steps it runs: test_resume_with_another_config_is_refused above, test_lamp's script test.)"""
    log = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$@" >> {log}\nexec {PY} "$1" "$2" "$3" --dry-run "${{@:4}}"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "DATA": str(tmp_path / "data"), "OUTPUT": str(tmp_path / "out")}
    env.pop("TAG", None)
    cmd = ["bash", str(REPO / "scripts/coop/base2new.sh"), "caltech101", "10", "1"]
    dirs = []
    for extra in ("", "OPTIM.MAX_EPOCH 5", "OPTIM.MAX_EPOCH 5 DATALOADER.NUM_WORKERS 0"):
        out = subprocess.run(cmd, capture_output=True, text=True, env={**env, "EXTRA": extra})
        assert out.returncode == 0 and "results go to" in out.stdout, out.stderr
        dirs += [line.split()[1] for line in out.stdout.splitlines() if line.startswith("[step] ")]
    calls = log.read_text().splitlines()
    assert len(calls) == 3 and all(c.startswith("-m tools.runs base2new ") and "--trainer CoOp" in c for c in calls)
    base = str(tmp_path / "out/base2new_imb10/{}/caltech101/CoOp/{}/seed1")
    variant = [base.format(kind, "vit_b16_ep50_ctxv1_max_epoch5") for kind in ("train_base", "test_new")]
    assert dirs[:2] == [base.format(kind, "vit_b16_ep50_ctxv1") for kind in ("train_base", "test_new")]
    assert dirs[2:4] == variant and dirs[4:6] == variant  # the worker count is run-neutral: same folder
    fake.write_text("#!/usr/bin/env bash\nexit 2\n")  # the entry point refusing: the script stops with its code
    assert subprocess.run(cmd, capture_output=True, text=True, env={**env, "TAG": "x"}).returncode == 2


def test_collect_results_eval_key_keeps_base_runs(tmp_path, capsys):
    from tools.collect_results import main
    metrics = {"accuracy": 50.0, "macro_f1": 40.0, "mean_class_acc": 50.0, "head_acc": None, "tail_acc": None}
    for split, results in (("base", {"test": metrics}), ("new", {"test": metrics, "test_inductive": metrics})):
        run = tmp_path / f"b2n/{split}/seed1"
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps({
            "trainer": "LAMP", "dataset": "X", "seed": 1, "subsample_classes": split, "config": "c",
            "experiment": "b2n", "results": results}))
    assert main([str(tmp_path), "--eval-key", "test_inductive"]) == 0
    out = capsys.readouterr().out
    assert "read from 'test'" in out and "base seed 1" in out
    assert "| X" in out and "50.00 ± 0.00 | 50.00 ± 0.00 | 50.00" in out


# ------------------------------------------------------------------------------------------ data

def test_base_new_split_stable_when_a_class_loses_its_training_images():
    require_shared(REAL_SPLIT)
    from datasets.base import DatasetBase
    from lt_sampling.protocol import apply_protocol
    train_, val, test = DatasetBase.read_split(str(REAL_SPLIT), "")
    full = apply_protocol(train_, val, test, seed=1, subsample="new")
    lost = [x for x in train_ if x.label != 7]  # class 7 (a base class) has lost every training image
    new = apply_protocol(lost, val, test, seed=1, subsample="new")
    assert new.classnames == full.classnames and len(new.classnames) == 50
    name = full.all_classnames[7]
    with pytest.raises(ValueError, match=f"no training images: '{name}'"):
        apply_protocol(lost, val, test, seed=1, subsample="base")


@pytest.fixture
def broken_root(root, tmp_path):
    """A copy of the synthetic dataset with one base-class test image truncated."""
    data = tmp_path / "data"
    shutil.copytree(root, data)
    split = json.loads((data / "synthetic_shapes/split_zhou_SyntheticShapes.json").read_text())
    rel = next(p for p, label, _ in split["test"] if label < 10)
    bad = data / "synthetic_shapes/images" / rel
    bad.write_bytes(bad.read_bytes()[:60])
    return data, bad


@pytest.mark.parametrize("workers", ["0", "1"])
def test_corrupt_image_is_named(broken_root, tmp_path, capsys, workers):
    data, bad = broken_root
    args = train_args(data, tmp_path / "zs", "ZeroshotCLIP", "vit_b16.yaml", "DATALOADER.NUM_WORKERS", workers)
    _one_line_error(capsys, cli.main(args), bad, "corrupt or truncated", "tools.check_data")


def test_check_data_decodes_every_image(broken_root, capsys):
    from tools.check_data import check
    data, bad = broken_root
    assert check(data, "SyntheticShapes", fast=True) == 0
    assert str(bad) not in capsys.readouterr().out
    assert check(data, "SyntheticShapes") == 1
    out = capsys.readouterr().out
    assert "1 images do not decode" in out and str(bad) in out


# ------------------------------------------------------------------------------------------ one line per error

def _split_root(tmp_path, text):
    folder = tmp_path / "data/caltech-101"
    folder.mkdir(parents=True)
    (folder / "split_zhou_Caltech101.json").write_text(text)
    return tmp_path / "data", folder / "split_zhou_Caltech101.json"


def _trunc_ckpt(tmp_path):
    folder = tmp_path / "model/prompt_learner"
    folder.mkdir(parents=True)
    (folder / "model.pth.tar-0").write_bytes(b"PK\x03\x04 not a whole zip")
    return tmp_path / "model", folder / "model.pth.tar-0"


def _train(root, tmp_path, *opts, trainer=COOP, out=None, **kw):
    return cli.run, train_args(root, out or tmp_path / "run", *trainer, *opts, **kw)


CASES = {
    "output dir is a file": lambda root, t: (
        (t / "f").write_text("x"), (cli.run, train_args(root, t / "f", *COOP)), [t / "f", "is a file"])[1:],
    "malformed INPUT.SIZE": lambda root, t: (_train(root, t, "INPUT.SIZE", "(32,)"), ["INPUT.SIZE"]),
    "INPUT.SIZE not a tuple": lambda root, t: (_train(root, t, "INPUT.SIZE", "big"), ["INPUT.SIZE", "big"]),
    "unknown transform": lambda root, t: (_train(root, t, "INPUT.TRANSFORMS", "('flip_it',)"), ["flip_it"]),
    "NUM_SHOTS 0": lambda root, t: (_train(root, t, shots=0), ["DATASET.NUM_SHOTS", "-1"]),
    "negative LR": lambda root, t: (_train(root, t, "OPTIM.LR", "-0.1"), ["OPTIM.LR"]),
    "unknown trainer": lambda root, t: (_train(root, t, trainer=("NoSuchNet", "x.yaml")), ["NoSuchNet"]),
    "missing --root": lambda root, t: (_train("", t), ["--root"]),
    "split not JSON": lambda root, t: (
        lambda r: ((cli.run, train_args(r[0], t / "run", *COOP, "DATASET.NAME", "Caltech101")), [r[1], "malformed"])
    )(_split_root(t, "{not json")),
    "split lacks keys": lambda root, t: (
        lambda r: ((cli.run, train_args(r[0], t / "run", *COOP, "DATASET.NAME", "Caltech101")), [r[1], "'val'"])
    )(_split_root(t, '{"train": [], "test": []}')),
    "truncated checkpoint": lambda root, t: (
        lambda m: ((cli.run, ["--eval-only", "--model-dir", str(m[0])] + train_args(root, t / "ev", *COOP)),
                   [m[1], "truncated or corrupt", "delete it"])
    )(_trunc_ckpt(t)),
    "bench unknown trainer": lambda root, t: (
        (__import__("tools.bench", fromlist=["main"]).main, ["--trainer", "NoSuchNet", "--params-only"]), ["NoSuchNet"]),
    "bench unknown key": lambda root, t: (
        (__import__("tools.bench", fromlist=["main"]).main, ["--trainer", "CoOp", "--params-only", "OPTIM.NOPE", "1"]),
        ["OPTIM.NOPE"]),
    "lt_sampling split not JSON": lambda root, t: (
        lambda r: ((__import__("lt_sampling.__main__", fromlist=["main"]).main,
                    ["--split-file", str(r[1]), "--out", str(t / "m.json")]), [r[1]])
    )(_split_root(t, "[1, 2")),
    "lt_sampling shots 0": lambda root, t: (
        (__import__("lt_sampling.__main__", fromlist=["main"]).main,
         ["--split-file", str(REAL_SPLIT), "--shots", "0", "--out", str(t / "m.json")]), ["--shots"]),
    "collect_results no folder": lambda root, t: (
        (__import__("tools.collect_results", fromlist=["main"]).main, [str(t / "nope")]), [t / "nope"]),
    "make_synthetic root is a file": lambda root, t: (
        (t / "f").write_text("x"), (__import__("datasets.synthetic", fromlist=["main"]).main,
                                    ["--root", str(t / "f")]), [t / "f"])[1:],
    "check_data unknown dataset": lambda root, t: (
        (__import__("tools.check_data", fromlist=["main"]).main, ["--root", str(root), "--dataset", "Nope"]),
        ["'Nope'"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_cli_error_is_one_line(case, root, tmp_path, capsys, monkeypatch):
    (fn, argv), names = CASES[case](root, tmp_path)
    monkeypatch.delenv("LTPL_DEBUG", raising=False)
    _one_line_error(capsys, call_cli(fn, argv), *names)


def test_debug_shows_the_traceback(root, tmp_path, monkeypatch):
    args = train_args(root, tmp_path / "run", *COOP, "INPUT.SIZE", "(32,)")
    with pytest.raises(ValueError, match="INPUT.SIZE"):
        call_cli(cli.run, ["--debug"] + args)
    monkeypatch.setenv("LTPL_DEBUG", "1")
    with pytest.raises(ValueError, match="INPUT.SIZE"):
        call_cli(cli.run, args)


def test_entry_point_exits_2_as_a_process(tmp_path):
    (tmp_path / "file").write_text("x")
    cmd = [PY, str(REPO / "train.py"), "--trainer", "CoOp", "--output-dir", str(tmp_path / "file")]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2 and "is a file" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
