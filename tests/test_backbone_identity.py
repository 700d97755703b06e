"""A run records the sha256 of the backbone weights file it loads; it is never skipped as done, resumed or
evaluated on other weights (a re-pretrained tiny-world keeps its name and its config), and a table never takes
such a run as done or as one of its cells."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from engine.clip_loader import backbone_identity, load_clip
from tests import cli
from tests.helpers_run import train_args

COOP = ("CoOp", "vit_b16_ep50_ctxv1.yaml")
ONE_EPOCH = ("OPTIM.MAX_EPOCH", "1", "OPTIM.WARMUP_EPOCH", "0", "MODEL.BACKBONE.NAME", "tiny-world")


def _save_weights(folder, shift=0.0):
    """A tiny-world weights file (the tiny architecture; ``shift`` changes one weight, as re-pretraining would)."""
    state = load_clip("tiny").state_dict()
    state["positional_embedding"] = state["positional_embedding"] + shift
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "tiny-world.pt")
    return hashlib.sha256((folder / "tiny-world.pt").read_bytes()).hexdigest()


def _error_line(capsys, rc):
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_runs_record_their_weights_and_refuse_other_weights(root, tmp_path, monkeypatch, capsys):
    weights = tmp_path / "weights"
    first = _save_weights(weights)
    monkeypatch.setenv("CLIP_WEIGHTS_DIR", str(weights))
    out, new = tmp_path / "base", tmp_path / "new"
    assert cli.main(train_args(root, out, *COOP, *ONE_EPOCH)) == 0
    rec = json.loads((out / "results.json").read_text())
    assert rec["backbone_sha256"] == first
    assert json.loads((out / "backbone.json").read_text())["sha256"] == first
    # same weights: a finished run is skipped; the weights' path is not part of the identity, their hash is
    assert cli.main(["--skip-finished"] + train_args(root, out, *COOP, *ONE_EPOCH)) == 0
    moved = tmp_path / "moved"
    shutil.copytree(weights, moved)
    assert cli.main(["--skip-finished"] + train_args(root, out, *COOP, *ONE_EPOCH, "MODEL.BACKBONE.PATH",
                                                     str(moved / "tiny-world.pt"))) == 0
    capsys.readouterr()

    second = _save_weights(weights, shift=1e-3)   # re-pretrained in place: same name, same config
    assert second != first
    line = _error_line(capsys, cli.main(["--skip-finished"] + train_args(root, out, *COOP, *ONE_EPOCH)))
    assert str(out) in line and first[:12] in line and second[:12] in line
    line = _error_line(capsys, cli.main(["--eval-only", "--model-dir", str(out)]
                                        + train_args(root, new, *COOP, *ONE_EPOCH, subsample="new")))
    assert "--model-dir" in line and first[:12] in line and not new.exists()

    # the old weights again (another folder): evaluation goes ahead and records them
    assert cli.main(["--eval-only", "--model-dir", str(out)]
                    + train_args(root, new, *COOP, *ONE_EPOCH, "MODEL.BACKBONE.PATH", str(moved / "tiny-world.pt"),
                                 subsample="new")) == 0
    assert json.loads((new / "results.json").read_text())["backbone_sha256"] == first

    # a run folder that records no weights (an older version wrote it) cannot be checked: refused
    (out / "backbone.json").unlink()
    line = _error_line(capsys, cli.main(["--skip-finished"] + train_args(
        root, out, *COOP, *ONE_EPOCH, "MODEL.BACKBONE.PATH", str(moved / "tiny-world.pt"))))
    assert "records no backbone weights" in line


def test_random_architectures_have_no_weights_hash():
    assert backbone_identity("tiny")["sha256"] is None


def test_tables_refuse_finished_runs_made_with_other_weights(tmp_path, monkeypatch, capsys):
    from tools.tables import build_plan, collect, load_spec
    from tools.tables.__main__ import main
    weights = tmp_path / "weights"
    first = _save_weights(weights)
    monkeypatch.setenv("CLIP_WEIGHTS_DIR", str(weights))
    spec = {"name": "mini", "regime": "lt_b2n", "settings": [10], "seeds": [1], "datasets": ["world_shapes"],
            "opts": ["MODEL.BACKBONE.NAME", "tiny-world"],
            "methods": [{"label": "CoOp+LA", "trainer": "CoOp", "config": "vit_b16_ep50_ctxv1", "loss": "la"}],
            "layout": {"metrics": ["hm_acc"], "average": "last"}}
    spec_path = tmp_path / "mini.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    plan = build_plan(load_spec(spec_path), out)
    for i, step in enumerate(plan.units[0].steps):
        assert step.expected()["backbone_sha256"] == first
        Path(step.folder).mkdir(parents=True)
        rec = {**step.expected(), "results": {"test": {"accuracy": 70.0 - i, "macro_f1": 60.0, "head_acc": None,
                                                       "tail_acc": None}}}
        Path(step.folder, "results.json").write_text(json.dumps(rec))
    cells = collect(plan)
    assert cells[(10, "CoOp+LA", "world_shapes", "base_acc")].mean == 70.0

    second = _save_weights(weights, shift=1e-3)
    line = _error_line(capsys, cli_tables(main, spec_path, out))
    assert "2 finished run(s)" in line and first[:12] in line and second[:12] in line
    warnings = []
    cells = collect(build_plan(load_spec(spec_path), out), warn=warnings.append)
    assert cells[(10, "CoOp+LA", "world_shapes", "base_acc")].mean is None
    assert len(warnings) == 2 and all("backbone_sha256" in w for w in warnings)


def cli_tables(main, spec_path, out):
    from engine.cli import call_cli
    return call_cli(main, [str(spec_path), "--output", str(out), "--data", str(out / "data"), "--jobs", "1"])
