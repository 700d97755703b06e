"""The README's "Adding a method" example is a test: its two files (one trainer file, one config) go into a
fresh copy of the repository, nothing else, and the method runs through the run API (python -m tools.runs):
its default config comes from its registry entry, the base-to-new steps train and evaluate it, a rerun skips
both finished steps."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers_run import synthetic_root

REPO = Path(__file__).resolve().parents[1]
RUNTIME = ("engine", "trainers", "datasets", "lt_sampling", "tools", "configs", "scripts", "train.py")
TINY = ("MODEL.BACKBONE.NAME tiny INPUT.SIZE (32,32) DATALOADER.NUM_WORKERS 0 DATALOADER.TEST.BATCH_SIZE 50 "
        "OPTIM.MAX_EPOCH 1 OPTIM.WARMUP_EPOCH 0 DATALOADER.TRAIN_X.BATCH_SIZE 16")


def readme_examples():
    """{relative path: text} of the README blocks marked ``<!-- example: PATH -->``."""
    text = (REPO / "README.md").read_text()
    found = re.findall(r"<!-- example: (\S+) -->\n```\w*\n(.*?)\n```", text, re.S)
    return {path: body + "\n" for path, body in found}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthetic_root(tmp_path_factory)


def test_the_readme_example_is_one_trainer_file_and_its_config():
    assert sorted(readme_examples()) == ["configs/trainers/CLIPAdapter/vit_b16.yaml", "trainers/clip_adapter.py"]


def test_readme_method_runs_through_the_run_api(root, tmp_path):
    copy = tmp_path / "repo"
    for name in RUNTIME:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, copy / name)
    for rel, body in readme_examples().items():
        assert not (copy / rel).exists(), f"{rel} already exists in the repository"
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).write_text(body)
    naming = sorted(str(p.relative_to(copy)) for p in copy.rglob("*")
                    if p.is_file() and "CLIPAdapter" in str(p) + p.read_text(errors="ignore"))
    assert naming == ["configs/trainers/CLIPAdapter/vit_b16.yaml", "trainers/clip_adapter.py"]  # nothing else names it

    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tools.runs", "base2new", "--trainer", "CLIPAdapter", "--data", str(root),
           "--output", str(out), "--extra", TINY, "--tag", "tiny", "--", "synthetic_shapes", "10", "1"]
    first = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = out / "base2new_imb10"
    base = json.loads((runs / "train_base/synthetic_shapes/CLIPAdapter/vit_b16_tiny/seed1/results.json").read_text())
    new = json.loads((runs / "test_new/synthetic_shapes/CLIPAdapter/vit_b16_tiny/seed1/results.json").read_text())
    for res, split in ((base, "base"), (new, "new")):
        assert (res["trainer"], res["config"], res["experiment"], res["subsample_classes"]) == \
            ("CLIPAdapter", "vit_b16_tiny", "base2new_imb10", split)
        assert 0.0 <= res["results"]["test"]["accuracy"] <= 100.0
    width = 64  # the tiny CLIP's embedding width: two bias-free linear layers, width x width/4 each
    assert base["trainable_parameters"] == 2 * width * (width // 4)
    saved = yaml.safe_load((runs / "train_base/synthetic_shapes/CLIPAdapter/vit_b16_tiny/seed1/config.yaml").read_text())
    assert saved["INPUT"]["INTERPOLATION"] == "bicubic" and saved["OPTIM"]["LR"] == 0.002  # _BASE_ and its own keys
    again = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("[skip]") == 2, again.stderr[-2000:]
