"""Issue 18 §3: each trainer declares its keys (type and valid range, next to its code); build_cfg checks them
before CLIP is loaded. The walk below tries a value out of range for every declared key of every trainer."""
import argparse
from pathlib import Path

import pytest

from tests import cli
from engine import config as config_module
from engine.cli import call_cli
from engine.config import (BACKBONE_DEPTHS, CN, ConfigError, build_cfg, declared_sections, get_cfg_default,
                           merge_from_list, validate_cfg)
from engine.registry import TRAINER_REGISTRY
from tests.helpers_run import train_args

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = REPO / "tests" / "fixtures" / "official_yamls"


def _walk():
    cfg = get_cfg_default()
    cfg.MODEL.BACKBONE.NAME = "ViT-B/16"
    for section, (rules, _, _) in sorted(declared_sections().items()):
        for key, rule in sorted(rules.items()):
            for bad in rule.bad_examples(cfg):
                yield f"{section}.{key}", bad


CASES = list(_walk())


def test_every_trainer_section_is_declared():
    cfg = get_cfg_default()
    sections = {f"TRAINER.{k}" for k, v in cfg.TRAINER.items() if isinstance(v, CN)}
    assert sections == set(declared_sections()), sections ^ set(declared_sections())
    for name in TRAINER_REGISTRY.names() if hasattr(TRAINER_REGISTRY, "names") else []:
        assert name.upper() in cfg.TRAINER or name == "ZeroshotCLIP"
    # every declared key has at least one out-of-range example unless any value of its type is valid
    open_keys = {k for k, bad in [(k, [b for kk, b in CASES if kk == k]) for k in
                                  (f"{s}.{key}" for s, (r, _, _) in declared_sections().items() for key in r)] if not bad}
    for key in open_keys:
        section, name = key.rsplit(".", 1)
        rule = declared_sections()[section][0][name]
        assert type(rule).__name__ in ("Bool", "Str") or (type(rule).__name__ == "Float" and rule.low is None), key


@pytest.mark.parametrize("key, bad", CASES, ids=[f"{k}={b!r}" for k, b in CASES])
def test_every_declared_key_refuses_a_value_out_of_range(key, bad):
    cfg = get_cfg_default()
    merge_from_list(cfg, ["MODEL.BACKBONE.NAME", "ViT-B/16", key, repr(bad) if not isinstance(bad, str) else bad])
    with pytest.raises(ConfigError) as info:
        validate_cfg(cfg)
    message = str(info.value)
    assert key in message or key.rsplit(".", 1)[0] in message, message
    assert "declared in trainers/" in message and "\n" not in message


def test_defaults_and_every_backbone_pass():
    for name in BACKBONE_DEPTHS:
        cfg = get_cfg_default()
        cfg.MODEL.BACKBONE.NAME = name
        validate_cfg(cfg)


def _build(trainer, config_file, dataset_file="", *opts):
    return build_cfg(argparse.Namespace(trainer=trainer, config_file=str(config_file), root="", output_dir="",
                                        dataset_config_file=str(dataset_file), opts=list(opts), seed=1))


@pytest.mark.parametrize("config", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs/trainers").rglob("*.yaml")))
def test_every_shipped_trainer_config_still_loads(config):
    trainer = Path(config).parent.name
    for dataset in ("imagenet", "caltech101", "eurosat"):
        _build(trainer, REPO / config, REPO / "configs/datasets" / f"{dataset}.yaml")


@pytest.mark.parametrize("dataset", sorted(p.name for p in (REPO / "configs/datasets").glob("*.yaml")))
def test_every_shipped_dataset_config_still_loads(dataset):
    _build("CoOp", REPO / "configs/trainers/CoOp/vit_b16_ep50_ctxv1.yaml", REPO / "configs/datasets" / dataset)


def test_official_yamls_pass_the_declarations():
    for path in sorted(OFFICIAL.glob("*.yaml")):
        _build(path.name.split("_")[0], path)


def test_backbone_depths_match_the_loader():
    from engine.clip_loader import RANDOM_ARCHS, WORLD_MODELS
    from engine.compat import import_clip

    for name, arch in list(RANDOM_ARCHS.items()) + [(k, v["arch"]) for k, v in WORLD_MODELS.items()]:
        assert BACKBONE_DEPTHS[name] == (arch["vision_layers"], arch["transformer_layers"]), name
    assert set(import_clip().clip._MODELS) <= set(BACKBONE_DEPTHS)


@pytest.mark.parametrize("trainer, config, key, value, words", [
    ("MMLoP", "vit_b16_b2n.yaml", "TRAINER.MMLOP.TEXT_LOSS_WEIGHT", "-25", ">= 0"),
    ("VaMP", "vit_b16_b2n.yaml", "TRAINER.VAMP.KL_WEIGHT", "-1", ">= 0"),
    ("LAMP", "vit_b16_lt_b2n.yaml", "TRAINER.LAMP.MAX_TEXT_SEQS_WITH_GRAD", "0", ">= 1"),
    ("VaMP", "vit_b16_b2n.yaml", "TRAINER.VAMP.N_SAMPLES", "0", ">= 1"),
    ("MMLoP", "vit_b16_b2n.yaml", "TRAINER.MMLOP.PROMPT_DEPTH", "13", "1..12"),
    ("MMRL", "vit_b16_b2n.yaml", "TRAINER.MMRL.REP_LAYERS", "[6, 13]", "1..12"),
    ("LAMP", "vit_b16_lt_b2n.yaml", "TRAINER.LAMP.TOP_K", "21", "POOL_SIZE"),
    ("TCP", "vit_b16_ep50_ctx4.yaml", "TRAINER.TCP.INJECT_LAYER", "13", "1..12"),
    ("MMA", "vit_b16_ep5.yaml", "TRAINER.MMA.ADAPTER_START", "9", "ADAPTER_END"),
])
def test_issue_examples_are_refused_before_clip_loads(root, tmp_path, capsys, monkeypatch, trainer, config, key,
                                                      value, words):
    import engine.trainer

    def no_clip(*args, **kwargs):
        raise AssertionError("CLIP was loaded before the config was checked")

    monkeypatch.setattr(engine.trainer, "load_clip", no_clip)
    monkeypatch.delenv("LTPL_DEBUG", raising=False)
    opts = [key, value] + (["TRAINER.MMA.ADAPTER_END", "6"] if trainer == "MMA" else [])
    args = train_args(root, tmp_path / "run", trainer, config, *opts)
    args[args.index("MODEL.BACKBONE.NAME") + 1] = "ViT-B/16" if "13" in value else "tiny"
    args[args.index("INPUT.SIZE") + 1] = "(224, 224)" if "13" in value else "(32, 32)"
    assert call_cli(cli.run, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key.rsplit(".", 1)[0] in err[0] and words in err[0], err
    assert not (tmp_path / "run").exists()


def test_declaring_a_section_must_cover_every_key():
    cfg = get_cfg_default()
    cfg.TRAINER.TMP_FOR_TEST = CN()
    cfg.TRAINER.TMP_FOR_TEST.A = 1
    cfg.TRAINER.TMP_FOR_TEST.B = 2
    with pytest.raises(RuntimeError, match="undeclared keys \\['B'\\]"):
        config_module.declare_keys(cfg, "TRAINER.TMP_FOR_TEST", A=config_module.Int(0))
    assert "TRAINER.TMP_FOR_TEST" not in declared_sections()


def test_lfa_iterations_per_dataset_are_checked():
    cfg = get_cfg_default()
    name = next(iter(cfg.TRAINER.LFA.ITERS_PER_DATASET))
    merge_from_list(cfg, [f"TRAINER.LFA.ITERS_PER_DATASET.{name}", "0"])
    with pytest.raises(ConfigError, match=f"TRAINER.LFA.ITERS_PER_DATASET.{name} must be an integer >= 1"):
        validate_cfg(cfg)


def _code_without_declarations():
    import re

    texts = []
    for path in list((REPO / "trainers").glob("*.py")) + list((REPO / "engine").glob("*.py")) + [REPO / "train.py"]:
        if path.name == "config.py":
            continue
        text = path.read_text()
        text = re.sub(r"declare_keys\((?:[^()]|\((?:[^()]|\([^()]*\))*\))*\)", "", text)  # the declarations
        text = re.sub(r"^\s*(c|cfg\.TRAINER\.[A-Z]+)\.[A-Z_0-9]+ = .*$", "", text, flags=re.M)  # the defaults
        texts.append(text)
    return "\n".join(texts)


def test_every_declared_key_is_read_somewhere():
    """A declared key that nothing reads would be an inert knob: each one is used outside its declaration and
    its default (attribute, item or name access)."""
    import re

    code = _code_without_declarations()
    unread = []
    for section, (rules, _, _) in declared_sections().items():
        for key in rules:
            if not re.search(rf"(\.{key}\b|\[\"{key}\"\]|\"{key}\"|'{key}')", code):
                unread.append(f"{section}.{key}")
    assert not unread, unread
