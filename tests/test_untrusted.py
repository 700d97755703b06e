"""Issue 18 §1: untrusted files never execute code; unreadable ones are one line naming the file."""
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import cli
from engine.checkpoint import CheckpointError, load_checkpoint, numpy_rng_state_from_plain, numpy_rng_state_to_plain
from engine.cli import call_cli
from engine.config import ConfigError
from tests.helpers_run import run_train, train_args

COOP = ("CoOp", "vit_b16_ep50_ctxv1.yaml")
MARKER = "ltpl_payload_ran"


class _Payload:
    """Pickling this object makes ``torch.load(weights_only=False)`` call ``Path.touch`` on the marker."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _one_line(capsys, rc, *names):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert str(name) in lines[0], (name, err)
    return lines[0]


def _plant(model_dir, obj):
    folder = Path(model_dir) / "prompt_learner"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.pth.tar-0"
    torch.save(obj, path)
    return path


def test_crafted_checkpoint_never_runs_its_payload(tmp_path):
    marker = tmp_path / MARKER
    path = _plant(tmp_path / "m", {"state_dict": {}, "epoch": 0, "payload": _Payload(marker)})
    with pytest.raises(CheckpointError, match="could run code") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_crafted_checkpoint_via_eval_only_is_one_line(root, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LTPL_DEBUG", raising=False)
    marker = tmp_path / MARKER
    path = _plant(tmp_path / "m", {"state_dict": {}, "epoch": 0, "payload": _Payload(marker)})
    args = ["--eval-only", "--model-dir", str(tmp_path / "m")] + train_args(root, tmp_path / "ev", *COOP)
    _one_line(capsys, call_cli(cli.run, args), path, "could run code")
    assert not marker.exists()


@pytest.mark.parametrize("bad", [[1, 2], {"state_dict": [1]}, {"state_dict": {}, "optimizer": "x"}])
def test_checkpoint_of_another_shape_is_named(tmp_path, bad):
    path = _plant(tmp_path, bad)
    with pytest.raises(CheckpointError, match="not a checkpoint of this harness") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_numpy_rng_state_round_trips_through_a_safe_checkpoint(tmp_path):
    np.random.seed(3)
    np.random.standard_normal()  # sets the cached Gaussian
    state = np.random.get_state()
    path = tmp_path / "c"
    torch.save({"state_dict": {}, "rng": {"numpy": numpy_rng_state_to_plain(state), "python": random.getstate()}},
               path)
    loaded = load_checkpoint(path)
    np.random.set_state(numpy_rng_state_from_plain(loaded["rng"]["numpy"]))
    again = np.random.get_state()
    assert again[0] == state[0] and np.array_equal(again[1], state[1]) and again[2:] == state[2:]
    assert loaded["rng"]["python"] == random.getstate()


def test_legacy_checkpoint_with_a_numpy_array_still_loads(tmp_path):
    """Checkpoints written before this change hold ``np.random.get_state()`` itself (a numpy array)."""
    state = np.random.get_state()
    path = tmp_path / "c"
    torch.save({"state_dict": {"w": torch.ones(2)}, "rng": {"numpy": state}}, path)
    loaded = load_checkpoint(path)
    np.random.set_state(numpy_rng_state_from_plain(loaded["rng"]["numpy"]))
    assert np.array_equal(np.random.get_state()[1], state[1])


def test_resume_reads_its_own_checkpoints_safely(root, tmp_path):
    """A real run's checkpoint loads with weights_only=True (what resume and --eval-only use)."""
    run_train(root, tmp_path / "run", *COOP, "OPTIM.MAX_EPOCH", "1", "OPTIM.WARMUP_EPOCH", "0")
    ckpt = load_checkpoint(tmp_path / "run" / "prompt_learner" / "model.pth.tar-0")
    assert set(ckpt) >= {"state_dict", "optimizer", "scheduler", "rng", "extra", "history"}
    torch.load(tmp_path / "run" / "prompt_learner" / "model.pth.tar-0", weights_only=True)


# ------------------------------------------------------------------------------------------- CLIP weights


def _clip_run(root, tmp_path, weights):
    return train_args(root, tmp_path / "run", *COOP, "MODEL.BACKBONE.NAME", "tiny-world",
                      "MODEL.BACKBONE.PATH", str(weights))


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 not a whole zip", b"\x80\x02garbage", b"plain text"])
def test_corrupt_clip_weights_are_one_line(root, tmp_path, capsys, monkeypatch, content):
    monkeypatch.delenv("LTPL_DEBUG", raising=False)
    weights = tmp_path / "tiny-world.pt"
    weights.write_bytes(content)
    line = _one_line(capsys, call_cli(cli.run, _clip_run(root, tmp_path, weights)), weights)
    assert "Traceback" not in line


def test_truncated_clip_weights_are_one_line(root, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LTPL_DEBUG", raising=False)
    from engine.clip_loader import build_random_clip

    whole = tmp_path / "whole.pt"
    torch.save(build_random_clip("tiny").state_dict(), whole)
    weights = tmp_path / "tiny-world.pt"
    weights.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    _one_line(capsys, call_cli(cli.run, _clip_run(root, tmp_path, weights)), weights)


def test_untrusted_clip_weights_never_run_a_payload(root, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LTPL_DEBUG", raising=False)
    marker = tmp_path / MARKER
    weights = tmp_path / "tiny-world.pt"
    torch.save({"visual.proj": _Payload(marker)}, weights)
    _one_line(capsys, call_cli(cli.run, _clip_run(root, tmp_path, weights)), weights)
    assert not marker.exists()


def test_clip_weights_of_another_model_are_one_line(root, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LTPL_DEBUG", raising=False)
    weights = tmp_path / "tiny-world.pt"
    torch.save({"w": torch.ones(3)}, weights)
    _one_line(capsys, call_cli(cli.run, _clip_run(root, tmp_path, weights)), weights, "CLIP")


def test_valid_state_dict_weights_load_like_clip_load(tmp_path):
    """The safe loader builds the same model as ``clip.load`` for a state-dict file."""
    from engine.clip_loader import build_random_clip, load_clip
    from engine.compat import import_clip

    weights = tmp_path / "tiny-world.pt"
    torch.save(build_random_clip("tiny").half().state_dict(), weights)
    ours = load_clip("tiny-world", str(weights))
    theirs, _ = import_clip().load(str(weights), device="cpu", jit=False)
    a, b = ours.state_dict(), theirs.float().state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------- YAML


def test_yaml_python_tags_are_refused_naming_the_file(tmp_path):
    from engine.config import get_cfg_default, merge_from_file

    marker = tmp_path / MARKER
    path = tmp_path / "evil.yaml"
    path.write_text(f"OPTIM:\n  LR: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path "
                    f"['{marker}']]\n")
    with pytest.raises(ConfigError, match="evil.yaml"):
        merge_from_file(get_cfg_default(), str(path))
    assert not marker.exists()


def test_every_yaml_reader_gives_one_line_naming_the_file(tmp_path):
    """Table specs, the datasets table, run configs and dataset configs: a broken yaml is a one-line error."""
    from engine.config import load_yaml
    from engine.run_identity import read_run_config
    from tools.tables.efficiency import load_efficiency_spec
    from tools.tables.spec import load_spec

    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\nb: {")
    from engine.cli import UserError

    for reader in (load_yaml, load_efficiency_spec, load_spec):
        with pytest.raises(UserError) as info:
            reader(bad)
        assert str(bad) in str(info.value) and "\n" not in str(info.value), reader
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("a: [1, 2\n")
    with pytest.raises(Exception) as info:
        read_run_config(str(tmp_path / "run"))
    assert "config.yaml" in str(info.value) and "\n" not in str(info.value)
    bad.write_text("!!python/name:os.system\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_yaml(bad)


def test_yaml_readers_use_the_safe_loader():
    """No module reads yaml with a loader that can build Python objects."""
    repo = Path(__file__).resolve().parents[1]
    for path in list(repo.glob("engine/*.py")) + list(repo.glob("tools/**/*.py")) + list(repo.glob("datasets/*.py")) \
            + list(repo.glob("trainers/*.py")) + [repo / "train.py"]:
        text = path.read_text()
        for bad in ("yaml.load(", "yaml.unsafe_load", "yaml.full_load", "yaml.Loader", "yaml.UnsafeLoader",
                    "yaml.FullLoader", "weights_only=False", "pickle.load"):
            assert bad not in text, (path, bad)


def test_resume_from_a_checkpoint_that_does_not_fit_is_one_line(root, tmp_path, capsys, monkeypatch):
    """A checkpoint in the run folder whose tensors do not fit the model (tampered, or another run's)."""
    monkeypatch.delenv("LTPL_DEBUG", raising=False)
    opts = ("OPTIM.MAX_EPOCH", "2", "OPTIM.WARMUP_EPOCH", "0")
    from tests.helpers_run import run_interrupted
    from engine.trainer import TrainerX

    run_interrupted(monkeypatch, TrainerX, 1, root, tmp_path / "run", *COOP, *opts)
    path = tmp_path / "run" / "prompt_learner" / "model.pth.tar-0"
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"] = {k: torch.zeros(3) for k in ckpt["state_dict"]}
    torch.save(ckpt, path)
    _one_line(capsys, call_cli(cli.run, train_args(root, tmp_path / "run", *COOP, *opts)), path, "cannot resume")
