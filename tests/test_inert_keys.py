"""Issue 18 §4: every key of the base config is honoured or refused; TEST.FINAL_MODEL best_val has Dassl's
meaning; the transform parameters drive the transforms."""
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from tests import cli
from engine.cli import call_cli
from engine.config import (INERT_KEYS, TRANSFORM_PARAMS, ConfigError, _base_defaults, get_cfg_default,
                           merge_from_file, merge_from_list, validate_cfg)
from engine.run_identity import flatten_config
from tests.helpers_run import run_train, train_args

REPO = Path(__file__).resolve().parents[1]
COOP = ("CoOp", "vit_b16_ep50_ctxv1.yaml")
SHORT = ["OPTIM.MAX_EPOCH", "3", "OPTIM.WARMUP_EPOCH", "0", "OPTIM.LR", "0.05"]

# Keys of the base config that the code reads (pinned: a new key must be classified here or in INERT_KEYS).
HONOURED = {
    "OUTPUT_DIR", "RESUME", "SEED", "USE_CUDA",
    "INPUT.SIZE", "INPUT.INTERPOLATION", "INPUT.TRANSFORMS", "INPUT.NO_TRANSFORM", "INPUT.PIXEL_MEAN",
    "INPUT.PIXEL_STD", "INPUT.CROP_PADDING", "INPUT.RRCROP_SCALE", "INPUT.COLORJITTER_B", "INPUT.COLORJITTER_C",
    "INPUT.COLORJITTER_S", "INPUT.COLORJITTER_H", "INPUT.RGS_P", "INPUT.GB_P", "INPUT.GB_K",
    "DATASET.ROOT", "DATASET.NAME", "DATASET.NUM_SHOTS", "DATASET.SUBSAMPLE_CLASSES", "DATASET.IMB_FACTOR",
    "DATASET.IMB_PROFILE", "DATASET.STEP_HEAD_FRACTION", "DATASET.HEAD_FRACTION", "DATASET.CACHE_DIR",
    "DATALOADER.NUM_WORKERS", "DATALOADER.TRAIN_X.BATCH_SIZE", "DATALOADER.TEST.BATCH_SIZE",
    "MODEL.BACKBONE.NAME", "MODEL.BACKBONE.PATH", "MODEL.TRUNCATE_TEXT", "MODEL.TEXT_PREFIX_CACHE",
    "MODEL.SHARED_TEXT_PREFIX", "MODEL.CLS_ONLY_LAST_VISION_BLOCK", "MODEL.SKIP_REPLACED_PROMPT_OUTPUTS",
    "MODEL.COMPILE_MLP",
    "OPTIM.NAME", "OPTIM.LR", "OPTIM.WEIGHT_DECAY", "OPTIM.MOMENTUM", "OPTIM.SGD_DAMPNING", "OPTIM.SGD_NESTEROV",
    "OPTIM.RMSPROP_ALPHA", "OPTIM.ADAM_BETA1", "OPTIM.ADAM_BETA2", "OPTIM.ADAM_EPS", "OPTIM.STAGED_LR",
    "OPTIM.NEW_LAYERS", "OPTIM.BASE_LR_MULT", "OPTIM.LR_SCHEDULER", "OPTIM.STEPSIZE", "OPTIM.GAMMA",
    "OPTIM.MAX_EPOCH", "OPTIM.WARMUP_EPOCH", "OPTIM.WARMUP_TYPE", "OPTIM.WARMUP_CONS_LR", "OPTIM.WARMUP_MIN_LR",
    "OPTIM.WARMUP_RECOUNT",
    "TRAIN.CHECKPOINT_FREQ", "TRAIN.PRINT_FREQ", "TEST.FINAL_MODEL",
    "TRAINER.NAME", "TRAINER.LOSS", "TRAINER.LA_TAU",
}


def _other_value(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 3
    if isinstance(value, float):
        return value + 0.25
    if isinstance(value, str):
        return value + "_other"
    if isinstance(value, (list, tuple)):
        return type(value)(["x"]) if not value or isinstance(value[0], str) else type(value)([v + 1 for v in value])
    raise AssertionError(value)


def test_every_base_key_is_honoured_or_inert():
    keys = set(flatten_config(_base_defaults()))
    assert not HONOURED & set(INERT_KEYS)
    assert keys == HONOURED | set(INERT_KEYS), (keys - HONOURED - set(INERT_KEYS), (HONOURED | set(INERT_KEYS)) - keys)


def _code_text():
    files = [p for p in list(REPO.glob("engine/*.py")) + list(REPO.glob("trainers/*.py"))
             + list(REPO.glob("datasets/*.py")) + list(REPO.glob("lt_sampling/*.py")) + [REPO / "train.py"]
             if p.name != "config.py"]
    return "\n".join(p.read_text() for p in files)


@pytest.mark.parametrize("key", sorted(HONOURED))
def test_every_honoured_key_is_read_by_the_code(key):
    name = key.split(".")[-1]
    assert re.search(rf"(\.{name}\b|\[\"{name}\"\]|\[key\]|\"{name}\")", _code_text()), key


@pytest.mark.parametrize("key", sorted(INERT_KEYS))
def test_every_inert_key_set_to_another_value_is_refused(key):
    cfg = get_cfg_default()
    node = cfg
    for part in key.split(".")[:-1]:
        node = node[part]
    value = _other_value(node[key.split(".")[-1]])
    merge_from_list(cfg, [key, repr(value) if not isinstance(value, str) else value])
    with pytest.raises(ConfigError, match=re.escape(key)) as info:
        validate_cfg(cfg)
    assert "\n" not in str(info.value)


def test_a_dassl_yaml_setting_every_inert_key_to_its_default_loads(tmp_path):
    defaults = _base_defaults()
    data = {}
    for key in INERT_KEYS:
        node, default = data, defaults
        parts = key.split(".")
        for part in parts[:-1]:
            node, default = node.setdefault(part, {}), default[part]
        value = default[parts[-1]]
        node[parts[-1]] = list(value) if isinstance(value, tuple) else value
    path = tmp_path / "dassl.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = get_cfg_default()
    merge_from_file(cfg, str(path))
    validate_cfg(cfg)


@pytest.mark.parametrize("key", sorted(TRANSFORM_PARAMS))
def test_transform_parameter_without_its_transform_is_refused(key):
    cfg = get_cfg_default()
    value = {"GB_K": 9, "RRCROP_SCALE": (0.5, 1.0), "COLORJITTER_H": 0.2}.get(key, _other_value(cfg.INPUT[key]))
    cfg.INPUT[key] = value
    cfg.INPUT.TRANSFORMS = ("random_flip",)
    with pytest.raises(ConfigError, match=f"INPUT.{key}"):
        validate_cfg(cfg)
    cfg.INPUT.TRANSFORMS = ("random_flip", TRANSFORM_PARAMS[key])
    validate_cfg(cfg)


def _train_transform(*opts):
    from engine.data import build_transform

    cfg = get_cfg_default()
    merge_from_list(cfg, ["INPUT.TRANSFORMS", "('random_resized_crop', 'colorjitter', 'randomgrayscale', "
                          "'gaussian_blur', 'normalize')", *opts])
    validate_cfg(cfg)
    return build_transform(cfg, is_train=True).transforms


def test_transform_parameters_drive_the_transforms():
    from engine.compat import import_torchvision

    T = import_torchvision().transforms
    tf = _train_transform()
    blur = next(t for t in tf if isinstance(t, T.RandomApply))
    assert blur.p == 0.5 and blur.transforms[0].kernel_size == (21, 21)  # Dassl's GB_K default, no longer 9
    tf = _train_transform("INPUT.GB_K", "7", "INPUT.GB_P", "0.25", "INPUT.RGS_P", "0.6", "INPUT.COLORJITTER_B",
                          "0.1", "INPUT.COLORJITTER_C", "0.2", "INPUT.COLORJITTER_S", "0.3", "INPUT.COLORJITTER_H",
                          "0.05", "INPUT.RRCROP_SCALE", "(0.5, 0.9)")
    blur = next(t for t in tf if isinstance(t, T.RandomApply))
    assert blur.p == 0.25 and blur.transforms[0].kernel_size == (7, 7)
    jitter = next(t for t in tf if isinstance(t, T.ColorJitter))
    assert jitter.brightness == (0.9, 1.1) and jitter.contrast == (0.8, 1.2)
    assert jitter.saturation == (0.7, 1.3) and jitter.hue == (-0.05, 0.05)
    assert next(t for t in tf if isinstance(t, T.RandomGrayscale)).p == 0.6
    assert next(t for t in tf if isinstance(t, T.RandomResizedCrop)).scale == (0.5, 0.9)


@pytest.mark.parametrize("opts, key", [(["INPUT.GB_K", "8"], "INPUT.GB_K"), (["INPUT.GB_P", "1.5"], "INPUT.GB_P"),
                                       (["INPUT.COLORJITTER_H", "0.7"], "INPUT.COLORJITTER_H")])
def test_bad_transform_parameters_are_refused(opts, key):
    with pytest.raises(ConfigError, match=key):
        _train_transform(*opts)


def test_resume_elsewhere_is_refused(root, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LTPL_DEBUG", raising=False)
    args = ["--resume", str(tmp_path / "elsewhere")] + train_args(root, tmp_path / "run", *COOP)
    assert call_cli(cli.run, args) == 2
    assert "--resume" in capsys.readouterr().err
    # --resume naming the run's own folder is what every run does anyway: accepted
    cfg = get_cfg_default()
    cfg.RESUME = cfg.OUTPUT_DIR
    validate_cfg(cfg)


# ------------------------------------------------------------------------------------------- best_val

def test_final_model_choice_is_checked():
    cfg = get_cfg_default()
    cfg.TEST.FINAL_MODEL = "best"
    with pytest.raises(ConfigError, match="TEST.FINAL_MODEL"):
        validate_cfg(cfg)


def test_last_step_results_are_unchanged(root, tmp_path):
    out = run_train(root, tmp_path / "last", *COOP, *SHORT)
    assert "final_model" not in out and not list((tmp_path / "last").rglob("model-best.pth.tar"))


def test_best_val_tests_the_best_epochs_model(root, tmp_path, monkeypatch):
    """The val accuracies are scripted (epoch 2 best, epoch 3 worse): the test numbers must be those of the
    epoch-2 weights (checked against --eval-only on the kept epoch-2 checkpoint), not the last epoch's."""
    from engine.trainer import TrainerX

    scripted = iter([40.0, 70.0, 55.0])
    monkeypatch.setattr(TrainerX, "val_accuracy", lambda self: next(scripted))
    keep = ["TRAIN.CHECKPOINT_FREQ", "1"]
    best = run_train(root, tmp_path / "best", *COOP, *SHORT, *keep, "TEST.FINAL_MODEL", "best_val")
    assert best["final_model"] == {"mode": "best_val", "epoch": 2, "val_accuracy": 70.0,
                                   "val_accuracy_per_epoch": [40.0, 70.0, 55.0]}
    saved = torch.load(tmp_path / "best/prompt_learner/model-best.pth.tar", weights_only=True)
    epoch2 = torch.load(tmp_path / "best/prompt_learner/model.pth.tar-1", weights_only=True)
    last = torch.load(tmp_path / "best/prompt_learner/model.pth.tar-2", weights_only=True)
    assert saved["epoch"] == 1 and torch.equal(saved["state_dict"]["ctx"], epoch2["state_dict"]["ctx"])
    assert not torch.equal(epoch2["state_dict"]["ctx"], last["state_dict"]["ctx"])
    args = train_args(root, tmp_path / "ev1", *COOP, *SHORT)
    assert cli.main(["--eval-only", "--model-dir", str(tmp_path / "best"), "--load-epoch", "1"] + args) == 0
    at_epoch2 = json.loads((tmp_path / "ev1" / "results.json").read_text())
    assert at_epoch2["results"]["test"] == best["results"]["test"]
    # --eval-only with best_val deploys model-best.pth.tar and records it
    args = train_args(root, tmp_path / "ev2", *COOP, *SHORT, "TEST.FINAL_MODEL", "best_val")
    assert cli.main(["--eval-only", "--model-dir", str(tmp_path / "best")] + args) == 0
    deployed = json.loads((tmp_path / "ev2" / "results.json").read_text())
    assert deployed["results"]["test"] == best["results"]["test"] and deployed["final_model"]["epoch"] == 2


def test_best_val_really_evaluates_val_each_epoch(root, tmp_path):
    out = run_train(root, tmp_path / "best", *COOP, *SHORT, "TEST.FINAL_MODEL", "best_val")
    per_epoch = out["final_model"]["val_accuracy_per_epoch"]
    assert len(per_epoch) == 3 and all(0 <= a <= 100 for a in per_epoch)
    assert out["final_model"]["epoch"] == 1 + max(range(3), key=lambda i: (per_epoch[i], -i))
    log = (tmp_path / "best" / "log.txt").read_text()
    assert log.count("[val]") == 3 and "testing the model of epoch" in log


def test_best_val_survives_an_interruption(root, tmp_path, monkeypatch):
    """Resume keeps the val history: the chosen epoch is the one of the uninterrupted run."""
    from tests.helpers_run import run_interrupted
    from trainers.coop import CoOp

    opts = (*SHORT, "TEST.FINAL_MODEL", "best_val")
    full = run_train(root, tmp_path / "full", *COOP, *opts)
    run_interrupted(monkeypatch, CoOp, 2, root, tmp_path / "cut", *COOP, *opts)
    cut = run_train(root, tmp_path / "cut", *COOP, *opts)
    assert cut["final_model"] == full["final_model"] and cut["results"] == full["results"]


def test_eval_only_best_val_on_a_last_step_run_is_one_line(root, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LTPL_DEBUG", raising=False)
    run_train(root, tmp_path / "last", *COOP, *SHORT[:2], "OPTIM.WARMUP_EPOCH", "0")
    args = train_args(root, tmp_path / "ev", *COOP, "TEST.FINAL_MODEL", "best_val")
    assert call_cli(cli.run, ["--eval-only", "--model-dir", str(tmp_path / "last")] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model-best.pth.tar" in err[0] and "--load-epoch" in err[0], err
