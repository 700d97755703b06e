"""Issue 18 §2 and §5: paths stay where they belong; the remaining raw errors are one line."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests import cli
from engine.cli import call_cli
from tests.helpers_run import REPO, train_args
from tools import check_data, make_world

COOP = ("CoOp", "vit_b16_ep50_ctxv1.yaml")
SPLIT = "synthetic_shapes/split_zhou_SyntheticShapes.json"


def _one_line(capsys, rc, *names):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for name in names:
        assert str(name) in lines[0], (name, err)
    return lines[0]


@pytest.fixture
def escaping_root(root, tmp_path):
    """A copy of the synthetic dataset whose split names an image outside the dataset folder (which exists,
    so that only the confinement can refuse it)."""
    data = tmp_path / "data"
    shutil.copytree(root, data)
    split = json.loads((data / SPLIT).read_text())
    outside = tmp_path / "outside.png"
    shutil.copy(data / "synthetic_shapes/images" / split["test"][0][0], outside)
    entry = os.path.relpath(outside, data / "synthetic_shapes/images")  # ../../outside.png
    split["test"][3][0] = entry
    (data / SPLIT).write_text(json.dumps(split))
    return data, entry


def test_train_refuses_a_split_entry_outside_the_dataset(escaping_root, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LTPL_DEBUG", raising=False)
    data, entry = escaping_root
    args = train_args(data, tmp_path / "zs", "ZeroshotCLIP", "vit_b16.yaml")
    _one_line(capsys, call_cli(cli.run, args), repr(entry), SPLIT.split("/")[1])
    assert not (tmp_path / "zs" / "results.json").exists()


def test_check_data_refuses_a_split_entry_outside_the_dataset(escaping_root, capsys):
    data, entry = escaping_root
    assert check_data.check(data, "SyntheticShapes", fast=True) == 1
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if repr(entry) in line)
    assert line.startswith("ERROR: ") and "outside" in line, out


@pytest.mark.parametrize("entry", ["/etc/hostname", "a/../../../outside.png"])
def test_absolute_and_dotdot_entries_are_refused(root, tmp_path, entry):
    from datasets.base import DatasetError
    from datasets.synthetic import SyntheticShapes

    data = tmp_path / "data"
    shutil.copytree(root, data)
    split = json.loads((data / SPLIT).read_text())
    split["train"][0][0] = entry
    (data / SPLIT).write_text(json.dumps(split))
    with pytest.raises(DatasetError, match=repr(entry).replace("/", "/").replace(".", r"\.")):
        SyntheticShapes.read_raw(str(data), str(tmp_path / "cache"))


def test_entries_going_down_and_back_inside_are_accepted(root, tmp_path):
    from datasets.synthetic import SyntheticShapes

    data = tmp_path / "data"
    shutil.copytree(root, data)
    split = json.loads((data / SPLIT).read_text())
    rel = split["train"][0][0]
    split["train"][0][0] = f"{rel.split('/')[0]}/../{rel}"
    (data / SPLIT).write_text(json.dumps(split))
    train_items, _, _ = SyntheticShapes.read_raw(str(data), str(tmp_path / "cache"))
    assert os.path.isfile(train_items[0].impath)


def test_every_dataset_class_is_confined(tmp_path):
    """Datasets that read their own lists (not a CoOp split) pass through the same check."""
    from datasets.base import DatasetBase, DatasetError, Datum
    from datasets.fgvc_aircraft import FGVCAircraft

    self = FGVCAircraft.__new__(FGVCAircraft)
    self.dataset_dir, self.image_dir, self.split_path = str(tmp_path / "fgvc"), str(tmp_path / "fgvc/images"), ""
    inside = Datum(str(tmp_path / "fgvc/images/1.jpg"), 0, "a")
    outside = Datum(str(tmp_path / "fgvc/images/../../x.jpg"), 0, "a")
    assert DatasetBase.confined(self, ([inside], [], [])) == ([inside], [], [])
    with pytest.raises(DatasetError, match="outside the dataset folder"):
        DatasetBase.confined(self, ([inside], [outside], []))


# ------------------------------------------------------------------------------------------------ make_world

SMALL = ["--datasets", "WorldTextures", "--train-per-class", "2", "--val-per-class", "1", "--test-per-class", "1"]


def test_make_world_refuses_a_folder_it_did_not_generate(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LTPL_DEBUG", raising=False)
    folder = tmp_path / "world_textures"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / "images").mkdir()
    _one_line(capsys, call_cli(make_world.main, ["--root", str(tmp_path)] + SMALL), folder, "not generated")
    assert sorted(p.name for p in folder.iterdir()) == ["images", "notes.txt"]
    assert (folder / "notes.txt").read_text() == "mine" and not list((folder / "images").iterdir())


def test_make_world_regenerates_its_own_folder_and_an_interrupted_one(tmp_path):
    assert call_cli(make_world.main, ["--root", str(tmp_path)] + SMALL) == 0
    folder = tmp_path / "world_textures"
    assert (folder / make_world.OWNER_FILE).is_file()
    (folder / "world_params.json").unlink()  # as if interrupted before the end: still ours
    assert call_cli(make_world.main, ["--root", str(tmp_path)] + SMALL[:3] + ["3"] + SMALL[4:]) == 0
    # a folder written before the ownership marker existed (params of that dataset) is ours too
    (folder / make_world.OWNER_FILE).unlink()
    assert call_cli(make_world.main, ["--root", str(tmp_path)] + SMALL) == 0


def test_make_world_never_writes_through_a_link(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LTPL_DEBUG", raising=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "root").mkdir()
    os.symlink(elsewhere, tmp_path / "root" / "world_textures")
    _one_line(capsys, call_cli(make_world.main, ["--root", str(tmp_path / "root")] + SMALL), "link")
    assert not list(elsewhere.iterdir())


@pytest.mark.parametrize("flag, value", [("--train-per-class", "-1"), ("--train-per-class", "0"),
                                         ("--val-per-class", "0"), ("--test-per-class", "0"), ("--seed", "-3")])
def test_make_world_counts_are_checked(tmp_path, capsys, monkeypatch, flag, value):
    monkeypatch.delenv("LTPL_DEBUG", raising=False)
    argv = ["--root", str(tmp_path), "--datasets", "WorldTextures", flag, value]
    _one_line(capsys, call_cli(make_world.main, argv), flag, value)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ §5 raw errors

@pytest.mark.parametrize("flag, value", [("--eval-every", "0"), ("--threads", "0"), ("--warmup", "-1"),
                                         ("--seed", "-1")])
def test_pretrain_clip_options_are_checked(tmp_path, capsys, monkeypatch, flag, value):
    from tools import pretrain_clip

    monkeypatch.delenv("LTPL_DEBUG", raising=False)
    argv = ["--out", str(tmp_path / "w.pt"), "--steps", "1", "--batch-size", "2", "--pool", "2", flag, value]
    _one_line(capsys, call_cli(pretrain_clip.main, argv), flag, value)
    assert not (tmp_path / "w.pt").exists()


def _cfg_tag(extra):
    script = f'PYTHON={sys.executable}; source "{REPO}/scripts/lib.sh"; CFG=vit_b16_ep50_ctxv1; cfg_tag'
    env = {k: v for k, v in os.environ.items() if k not in ("EXTRA", "TAG", "LOSS")}
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env={**env, "EXTRA": extra})


@pytest.mark.parametrize("extra", ["OPTIM.MAX_EPOCH", "OPTIM.MAX_EPOCH 5 OPTIM.LR"])
def test_odd_extra_is_one_line(extra):
    out = _cfg_tag(extra)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: EXTRA"), out.stderr
    assert "Traceback" not in out.stderr and "ValueError" not in out.stderr


def test_demo_refuses_odd_demo_extra_before_any_setup(tmp_path):
    env = {**os.environ, "DEMO_EXTRA": "OPTIM.MAX_EPOCH", "DEMO_OUTPUT": str(tmp_path / "demo")}
    out = subprocess.run(["bash", str(REPO / "scripts/demo.sh")], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "error: DEMO_EXTRA must be KEY VALUE pairs, got an odd number of words: 'OPTIM.MAX_EPOCH'"], out.stderr
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("module, argv", [
    ("datasets.synthetic", ["--train-per-class", "-1"]), ("datasets.synthetic", ["--image-size", "0"]),
    ("tools.tables", ["demo", "--jobs", "0"]), ("tools.tables", ["demo", "--seeds", "1", "-1", "--dry-run"]),
    ("tools.world_claims", ["--seeds", "-2"]),
])
def test_other_counts_are_one_line(module, argv, tmp_path, capsys, monkeypatch):
    import importlib

    monkeypatch.delenv("LTPL_DEBUG", raising=False)
    main = importlib.import_module(module if module != "tools.tables" else "tools.tables.__main__").main
    extra = ["--root", str(tmp_path / "r")] if module == "datasets.synthetic" else [
        "--output", str(tmp_path / "o"), "--data", str(tmp_path / "d")]
    _one_line(capsys, call_cli(main, argv + extra), argv[-1] if argv[-1] != "--dry-run" else "-1")
    assert not list(tmp_path.iterdir())
