"""engine/config.py: Dassl defaults, trainer extensions, merge order, clear errors, dump."""
import os
from types import SimpleNamespace

import pytest
from yacs.config import CfgNode as CN

import engine.config as config
from engine.config import ConfigError, build_cfg, dump_cfg, get_cfg_default, register_config, validate_cfg

# The text of CoOp's configs/trainers/CoOp/vit_b16_ep50.yaml (note the YAML-1.1 string "1e-5").
COOP_YAML = """\
DATALOADER:
  TRAIN_X:
    BATCH_SIZE: 32
  TEST:
    BATCH_SIZE: 100
  NUM_WORKERS: 8

INPUT:
  SIZE: (224, 224)
  INTERPOLATION: "bicubic"
  PIXEL_MEAN: [0.48145466, 0.4578275, 0.40821073]
  PIXEL_STD: [0.26862954, 0.26130258, 0.27577711]
  TRANSFORMS: ["random_resized_crop", "random_flip", "normalize"]

OPTIM:
  NAME: "sgd"
  LR: 0.002
  MAX_EPOCH: 50
  LR_SCHEDULER: "cosine"
  WARMUP_EPOCH: 1
  WARMUP_TYPE: "constant"
  WARMUP_CONS_LR: 1e-5

TRAIN:
  PRINT_FREQ: 5

MODEL:
  BACKBONE:
    NAME: "ViT-B/16"
"""

# MaPLe's vit_b16_c2_ep5_batch4_2ctx.yaml adds a trainer section.
MAPLE_SECTION = """
TRAINER:
  MAPLE:
    N_CTX: 2
    CTX_INIT: "a photo of a"
    PREC: "fp16"
    PROMPT_DEPTH: 9
"""


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch):
    """Tests see only the sections they register; registrations do not leak between tests."""
    monkeypatch.setattr(config, "_CONFIG_EXTENSIONS", [])


def make_args(**kw):
    base = dict(root=None, seed=None, trainer=None, config_file=None, dataset_config_file=None,
                output_dir=None, opts=[])
    base.update(kw)
    return SimpleNamespace(**base)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def add_maple(cfg):
    cfg.TRAINER.MAPLE = CN()
    cfg.TRAINER.MAPLE.N_CTX = 2
    cfg.TRAINER.MAPLE.CTX_INIT = ""
    cfg.TRAINER.MAPLE.PREC = "fp16"
    cfg.TRAINER.MAPLE.PROMPT_DEPTH = 9


def test_dassl_defaults_and_project_keys():
    cfg = get_cfg_default()
    assert cfg.OUTPUT_DIR == "./output" and cfg.SEED == -1 and cfg.VERSION == 1
    assert cfg.INPUT.SIZE == (224, 224) and cfg.INPUT.INTERPOLATION == "bilinear"
    assert cfg.INPUT.PIXEL_MEAN == [0.485, 0.456, 0.406] and cfg.INPUT.RRCROP_SCALE == (0.08, 1.0)
    assert cfg.INPUT.GB_K == 21 and cfg.INPUT.COLORJITTER_H == 0.1
    assert cfg.DATASET.NUM_SHOTS == -1 and cfg.DATASET.SUBSAMPLE_CLASSES == "all"
    assert cfg.DATASET.IMB_FACTOR == 1.0 and cfg.DATASET.IMB_PROFILE == "exp"
    assert cfg.DATASET.HEAD_FRACTION == 0.2 and cfg.DATASET.STEP_HEAD_FRACTION == 0.5
    assert cfg.DATALOADER.TRAIN_X.BATCH_SIZE == 32 and cfg.DATALOADER.TRAIN_U.N_INS == 16
    assert cfg.DATALOADER.TEST.SAMPLER == "SequentialSampler"
    assert cfg.MODEL.BACKBONE.PRETRAINED is True and cfg.MODEL.BACKBONE.PATH == ""
    assert cfg.OPTIM.NAME == "adam" and cfg.OPTIM.LR == 0.0003 and cfg.OPTIM.WEIGHT_DECAY == 5e-4
    assert cfg.OPTIM.ADAM_BETA2 == 0.999 and cfg.OPTIM.ADAM_EPS == 1e-8
    assert cfg.OPTIM.STEPSIZE == (-1,) and cfg.OPTIM.WARMUP_EPOCH == -1 and cfg.OPTIM.WARMUP_RECOUNT is True
    assert cfg.TEST.FINAL_MODEL == "last_step" and cfg.TRAIN.COUNT_ITER == "train_x"
    assert cfg.TRAINER.LOSS == "ce" and cfg.TRAINER.LA_TAU == 1.0


def test_defaults_are_fresh_copies():
    a = get_cfg_default()
    a.OPTIM.LR = 5.0
    assert get_cfg_default().OPTIM.LR == 0.0003


def test_register_config_adds_trainer_node():
    @register_config
    def add_fake(cfg):
        cfg.TRAINER.FAKE = CN()
        cfg.TRAINER.FAKE.N_CTX = 16

    register_config(add_fake)  # registering twice applies once
    assert config._CONFIG_EXTENSIONS == [add_fake]
    assert get_cfg_default().TRAINER.FAKE.N_CTX == 16


def test_build_cfg_uses_the_sections_registered_before_it():
    register_config(add_maple)  # what importing the trainers package does (train.py, tools.bench, conftest)
    cfg = build_cfg(make_args(opts=["TRAINER.MAPLE.N_CTX", "4"]))
    assert cfg.TRAINER.MAPLE.N_CTX == 4


def test_engine_imports_nothing_above_it():
    """engine/ is the bottom layer: no import (static or importlib) of trainers, datasets or tools."""
    import ast
    from pathlib import Path

    above = {"trainers", "datasets", "tools", "train"}
    for path in sorted((Path(config.__file__).parent).glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module" and node.args \
                    and isinstance(node.args[0], ast.Constant):
                names = [node.args[0].value]
            assert not [n for n in names if n.split(".")[0] in above], f"{path.name} imports {names}"


def test_coop_yaml_loads_unchanged(tmp_path):
    path = write(tmp_path, "vit_b16_ep50.yaml", COOP_YAML)
    cfg = build_cfg(make_args(config_file=path))
    assert cfg.is_frozen()
    assert cfg.OPTIM.NAME == "sgd" and cfg.OPTIM.LR == 0.002 and cfg.OPTIM.MAX_EPOCH == 50
    assert cfg.OPTIM.LR_SCHEDULER == "cosine" and cfg.OPTIM.WARMUP_TYPE == "constant"
    assert isinstance(cfg.OPTIM.WARMUP_CONS_LR, float) and cfg.OPTIM.WARMUP_CONS_LR == 1e-5
    assert cfg.INPUT.SIZE == (224, 224) and cfg.INPUT.INTERPOLATION == "bicubic"
    assert cfg.INPUT.TRANSFORMS == ("random_resized_crop", "random_flip", "normalize")
    assert cfg.INPUT.PIXEL_STD == [0.26862954, 0.26130258, 0.27577711]
    assert cfg.DATALOADER.TEST.BATCH_SIZE == 100 and cfg.DATALOADER.NUM_WORKERS == 8
    assert cfg.TRAIN.PRINT_FREQ == 5 and cfg.MODEL.BACKBONE.NAME == "ViT-B/16"
    # Untouched keys keep their defaults.
    assert cfg.OPTIM.WEIGHT_DECAY == 5e-4 and cfg.OPTIM.MOMENTUM == 0.9


def test_maple_yaml_with_registered_section(tmp_path):
    register_config(add_maple)
    path = write(tmp_path, "maple.yaml", COOP_YAML + MAPLE_SECTION)
    cfg = build_cfg(make_args(config_file=path))
    assert cfg.TRAINER.MAPLE.CTX_INIT == "a photo of a" and cfg.TRAINER.MAPLE.PROMPT_DEPTH == 9


def test_unregistered_trainer_section_names_key_and_file(tmp_path):
    path = write(tmp_path, "maple.yaml", COOP_YAML + MAPLE_SECTION)
    with pytest.raises(ConfigError) as err:
        build_cfg(make_args(config_file=path))
    assert "TRAINER.MAPLE" in str(err.value) and path in str(err.value)
    assert "register_config" in str(err.value)


def test_merge_order(tmp_path):
    ds = write(tmp_path, "ds.yaml", "DATASET:\n  NAME: Caltech101\nOPTIM:\n  LR: 0.1\n  MAX_EPOCH: 3\nSEED: 7\n")
    tr = write(tmp_path, "tr.yaml", "OPTIM:\n  LR: 0.2\n  MAX_EPOCH: 5\nOUTPUT_DIR: from_yaml\n")
    args = make_args(dataset_config_file=ds, config_file=tr, root="data", seed=2, trainer="CoOp",
                     output_dir="from_cli", opts=["OPTIM.LR", "0.3", "DATASET.NUM_SHOTS", "100"])
    cfg = build_cfg(args)
    assert cfg.DATASET.NAME == "Caltech101"  # dataset yaml
    assert cfg.OPTIM.MAX_EPOCH == 5  # trainer yaml overrides dataset yaml
    assert cfg.OPTIM.LR == 0.3  # opts override everything
    assert cfg.OUTPUT_DIR == "from_cli" and cfg.DATASET.ROOT == "data"  # CLI flags override yaml
    assert cfg.SEED == 2 and cfg.TRAINER.NAME == "CoOp" and cfg.DATASET.NUM_SHOTS == 100
    # opts come after CLI flags; a negative / missing seed keeps the file's value (CoOp's -1 default).
    cfg = build_cfg(make_args(dataset_config_file=ds, output_dir="cli", seed=-1, opts=["OUTPUT_DIR", "opt"]))
    assert cfg.OUTPUT_DIR == "opt" and cfg.SEED == 7


def test_opts_values_are_decoded_and_coerced():
    cfg = build_cfg(make_args(opts=[
        "OPTIM.LR", "1",  # int -> float key
        "OPTIM.STEPSIZE", "[10, 20]",  # list -> tuple key
        "OPTIM.SGD_NESTEROV", "True",
        "TRAINER.LOSS", "la",  # not a literal: stays a string
        "MODEL.BACKBONE.NAME", "ViT-B/16",
    ]))
    assert cfg.OPTIM.LR == 1.0 and isinstance(cfg.OPTIM.LR, float)
    assert cfg.OPTIM.STEPSIZE == (10, 20) and cfg.OPTIM.SGD_NESTEROV is True
    assert cfg.TRAINER.LOSS == "la" and cfg.MODEL.BACKBONE.NAME == "ViT-B/16"


def test_missing_config_file_names_path(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not found") as err:
        build_cfg(make_args(config_file=missing))
    assert missing in str(err.value)


def test_unknown_key_in_file_names_dotted_key_and_file(tmp_path):
    path = write(tmp_path, "bad.yaml", "OPTIM:\n  LRR: 0.1\n")
    with pytest.raises(ConfigError) as err:
        build_cfg(make_args(config_file=path))
    msg = str(err.value)
    assert "OPTIM.LRR" in msg and path in msg and "did you mean OPTIM.LR" in msg


def test_unknown_key_in_opts_names_command_line():
    with pytest.raises(ConfigError) as err:
        build_cfg(make_args(opts=["DATALOADER.TRAIN_X.BATCHSIZE", "4"]))
    assert "DATALOADER.TRAIN_X.BATCHSIZE" in str(err.value) and "command line opts" in str(err.value)


def test_type_mismatch_names_key_type_and_value(tmp_path):
    path = write(tmp_path, "bad.yaml", "OPTIM:\n  MAX_EPOCH: many\n")
    with pytest.raises(ConfigError) as err:
        build_cfg(make_args(config_file=path))
    msg = str(err.value)
    assert "OPTIM.MAX_EPOCH" in msg and "expected int" in msg and "'many'" in msg and path in msg
    with pytest.raises(ConfigError, match="OPTIM.LR .*expected float"):
        build_cfg(make_args(opts=["OPTIM.LR", "fast"]))


def test_section_and_value_confusion(tmp_path):
    path = write(tmp_path, "bad.yaml", "OPTIM: 0.1\n")
    with pytest.raises(ConfigError, match="OPTIM .*section"):
        build_cfg(make_args(config_file=path))
    with pytest.raises(ConfigError, match="OPTIM.LR .*not a section"):
        build_cfg(make_args(config_file=write(tmp_path, "bad2.yaml", "OPTIM:\n  LR:\n    X: 1\n")))


def test_odd_number_of_opts():
    with pytest.raises(ConfigError, match="odd number"):
        build_cfg(make_args(opts=["OPTIM.LR", "0.1", "OPTIM.MAX_EPOCH"]))


@pytest.mark.parametrize("opts, fragments", [
    (["DATASET.IMB_FACTOR", "0.1"], ["DATASET.IMB_FACTOR", "0.1", "balanced", "imb 10"]),
    (["DATASET.SUBSAMPLE_CLASSES", "old"], ["DATASET.SUBSAMPLE_CLASSES", "'old'"]),
    (["DATASET.IMB_PROFILE", "linear"], ["DATASET.IMB_PROFILE", "'linear'"]),
    (["DATASET.HEAD_FRACTION", "1.5"], ["DATASET.HEAD_FRACTION", "1.5"]),
    (["TRAINER.LOSS", "focal"], ["TRAINER.LOSS", "'focal'"]),
    (["TRAINER.LA_TAU", "-0.5"], ["TRAINER.LA_TAU", "-0.5"]),
    (["OPTIM.MAX_EPOCH", "0"], ["OPTIM.MAX_EPOCH", "0"]),
    (["DATALOADER.TRAIN_X.BATCH_SIZE", "0"], ["DATALOADER.TRAIN_X.BATCH_SIZE"]),
    (["DATALOADER.TEST.BATCH_SIZE", "-1"], ["DATALOADER.TEST.BATCH_SIZE"]),
    (["OPTIM.NAME", "lbfgs"], ["OPTIM.NAME", "'lbfgs'", "sgd"]),
    (["OPTIM.LR_SCHEDULER", "poly"], ["OPTIM.LR_SCHEDULER", "'poly'", "cosine"]),
    (["OPTIM.WARMUP_TYPE", "exp"], ["OPTIM.WARMUP_TYPE", "'exp'"]),
])
def test_validate_rejects_impossible_settings(opts, fragments):
    with pytest.raises(ConfigError) as err:
        build_cfg(make_args(opts=opts))
    for frag in fragments:
        assert frag in str(err.value)


def test_validate_accepts_paper_settings():
    cfg = get_cfg_default()
    cfg.merge_from_list(["DATASET.IMB_FACTOR", 10.0, "TRAINER.LOSS", "la", "TRAINER.LA_TAU", 0.0,
                         "DATASET.SUBSAMPLE_CLASSES", "base", "DATASET.IMB_PROFILE", "step"])
    assert validate_cfg(cfg) is cfg


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_dump_cfg_round_trip(tmp_path):
    register_config(add_maple)
    cfg = build_cfg(make_args(config_file=write(tmp_path, "c.yaml", COOP_YAML + MAPLE_SECTION),
                              opts=["DATASET.IMB_FACTOR", "10", "SEED", "3"]))
    out = tmp_path / "run" / "config.yaml"
    dump_cfg(cfg, str(out))
    assert sorted(os.listdir(out.parent)) == ["config.yaml"]  # no temp file left behind
    again = build_cfg(make_args(config_file=str(out)))
    assert again == cfg
    assert again.DATASET.IMB_FACTOR == 10.0 and again.INPUT.SIZE == (224, 224)


# ---- atomic writes (engine/checkpoint.py), used by dump_cfg and the trainer


def test_atomic_writes_round_trip(tmp_path):
    import json

    import torch

    from engine.checkpoint import atomic_torch_save, atomic_write_json, atomic_write_text

    atomic_write_json({"a": [1, 2]}, tmp_path / "sub" / "r.json")
    assert json.loads((tmp_path / "sub" / "r.json").read_text()) == {"a": [1, 2]}
    atomic_write_text("hello\n", tmp_path / "t.txt")
    assert (tmp_path / "t.txt").read_text() == "hello\n"
    atomic_torch_save({"w": torch.arange(3)}, tmp_path / "m.pt")
    assert torch.equal(torch.load(tmp_path / "m.pt")["w"], torch.arange(3))
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(tmp_path / "t.txt").st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600
    assert sorted(os.listdir(tmp_path)) == ["m.pt", "sub", "t.txt"]


def test_failed_atomic_write_keeps_old_file_and_removes_temp(tmp_path):
    from engine.checkpoint import atomic_torch_save, atomic_write_json

    path = tmp_path / "ckpt.pt"
    atomic_write_json({"old": True}, path)
    with pytest.raises(Exception):
        atomic_torch_save({"bad": lambda: None}, path)  # lambdas cannot be pickled
    with pytest.raises(TypeError):
        atomic_write_json({"bad": object()}, path)
    assert path.read_text().strip() == '{\n  "old": true\n}'
    assert os.listdir(tmp_path) == ["ckpt.pt"]
