"""Trainer configs inherit (``_BASE_``): the resolved config of every shipped trainer yaml is the one it had
before the shared CLIP input block moved into configs/base/ (fixture captured from the pre-inheritance files),
and the inheritance itself (order, relative paths, lists, cycles, bad values) behaves as documented.

The fixture is a snapshot: a deliberate change of a shipped config (or a new one) is recorded with
``PYTHONPATH=. python tests/test_config_inherit.py`` and reviewed in the diff."""
import argparse
import json
from pathlib import Path

import pytest

import trainers  # noqa: F401  (registers every trainer's config section)
from engine.config import BASE_KEY, ConfigError, build_cfg, read_config_file
from engine.run_identity import flatten_config

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "resolved_trainer_configs.json"
SHIPPED = sorted(p.relative_to(REPO / "configs" / "trainers").as_posix()
                 for p in (REPO / "configs" / "trainers").rglob("*.yaml"))


def _resolved(rel):
    path = REPO / "configs" / "trainers" / rel
    return flatten_config(build_cfg(argparse.Namespace(trainer=path.parent.name, config_file=str(path))))


def test_the_fixture_covers_every_shipped_trainer_yaml():
    assert sorted(json.loads(FIXTURE.read_text())) == SHIPPED


@pytest.mark.parametrize("rel", SHIPPED)
def test_every_shipped_yaml_resolves_as_before(rel):
    """Every key the fixture holds resolves to the same value (a key added to the code's defaults later is
    not a change of the yaml)."""
    before = json.loads(FIXTURE.read_text())[rel]
    now = _resolved(rel)
    changed = {k: (v, now.get(k, "<missing>")) for k, v in before.items() if now.get(k, "<missing>") != v}
    assert not changed, f"{rel}: resolved config changed: {changed}"


@pytest.mark.parametrize("rel", SHIPPED)
def test_every_shipped_yaml_writes_the_clip_input_block_through_its_base(rel):
    text = (REPO / "configs" / "trainers" / rel).read_text()
    assert f"{BASE_KEY}: ../../base/clip_vit_b16.yaml" in text
    assert "PIXEL_MEAN" not in text and "INTERPOLATION" not in text


def test_base_order_paths_lists_and_override(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text("OPTIM:\n  LR: 0.1\n  MAX_EPOCH: 3\nINPUT:\n  SIZE: (32, 32)\n")
    (tmp_path / "sub" / "b.yaml").write_text("_BASE_: ../a.yaml\nOPTIM:\n  LR: 0.2\n")
    (tmp_path / "c.yaml").write_text("OPTIM:\n  MAX_EPOCH: 7\n")
    (tmp_path / "d.yaml").write_text("_BASE_: [sub/b.yaml, c.yaml]\nOPTIM:\n  NAME: adam\n")
    data = read_config_file(tmp_path / "d.yaml")
    assert data == {"OPTIM": {"LR": 0.2, "MAX_EPOCH": 7, "NAME": "adam"}, "INPUT": {"SIZE": "(32, 32)"}}
    cfg = build_cfg(argparse.Namespace(trainer="CoOp", config_file=str(tmp_path / "d.yaml"), opts=["OPTIM.LR", "0.5"]))
    assert (cfg.OPTIM.LR, cfg.OPTIM.MAX_EPOCH, cfg.OPTIM.NAME, cfg.INPUT.SIZE) == (0.5, 7, "adam", (32, 32))


@pytest.mark.parametrize("body, message", [
    ("_BASE_: missing.yaml\n", "missing.yaml"),
    ("_BASE_: self.yaml\n", "inherits from itself"),
    ("_BASE_: 3\n", "_BASE_ must be a file name"),
    ("_BASE_: []\n", "_BASE_ must be a file name"),
])
def test_bad_bases_are_one_clear_error(tmp_path, body, message):
    (tmp_path / "self.yaml").write_text(body)
    with pytest.raises(ConfigError, match=message):
        read_config_file(tmp_path / "self.yaml")


if __name__ == "__main__":
    FIXTURE.write_text(json.dumps({rel: _resolved(rel) for rel in SHIPPED}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE} ({len(SHIPPED)} configs)")
