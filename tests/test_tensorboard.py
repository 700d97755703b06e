"""Issue 19 §4: every run writes TensorBoard scalars into ``<run>/tensorboard/`` (as Dassl does): each loss
term and the lr per step, the epoch's loss, training accuracy and lr, the test metrics, and LAMP's load
statistics per epoch. Read back with tensorboard's EventAccumulator."""
import math

import pytest

from engine.tensorboard import ScalarLog
from tests.helpers_run import run_eval, run_train, tensorboard_scalars

FAST = ["OPTIM.MAX_EPOCH", "2", "DATALOADER.TRAIN_X.BATCH_SIZE", "8", "DATASET.NUM_SHOTS", "8"]


def values(events):
    return [e.value for e in events]


def test_a_run_writes_its_losses_lr_and_accuracy(root, tmp_path):
    res = run_train(root, tmp_path / "run", "CoOp", "vit_b16_ep50.yaml", *FAST, "TRAINER.LOSS", "la")
    scalars = tensorboard_scalars(tmp_path / "run")
    assert {"train/loss", "train/acc", "train/lr", "epoch/loss", "epoch/train_acc", "epoch/lr",
            "test/accuracy", "test/macro_f1", "test/mean_class_acc", "test/head_acc", "test/tail_acc"} <= set(scalars)
    steps = [e.step for e in scalars["train/loss"]]
    per_epoch = len(steps) // 2
    assert per_epoch >= 2 and steps == list(range(2 * per_epoch))
    assert values(scalars["epoch/loss"]) == pytest.approx(res["epoch_losses"], rel=1e-6)
    for epoch in range(2):  # the epoch loss is the mean of its steps' losses
        part = values(scalars["train/loss"])[epoch * per_epoch:(epoch + 1) * per_epoch]
        assert res["epoch_losses"][epoch] == pytest.approx(sum(part) / per_epoch, rel=1e-5)
        acc = values(scalars["train/acc"])[epoch * per_epoch:(epoch + 1) * per_epoch]
        assert values(scalars["epoch/train_acc"])[epoch] == pytest.approx(sum(acc) / per_epoch, rel=1e-5)
    # CoOp's warm-up: constant 1e-5 in the first epoch, then the cosine's first value (OPTIM.LR)
    assert values(scalars["epoch/lr"]) == pytest.approx([1e-5, 0.002], rel=1e-6)
    assert values(scalars["train/lr"]) == pytest.approx([1e-5] * per_epoch + [0.002] * per_epoch, rel=1e-6)
    assert [e.step for e in scalars["epoch/loss"]] == [1, 2]
    for key in ("accuracy", "macro_f1", "head_acc", "tail_acc"):
        assert values(scalars[f"test/{key}"]) == [pytest.approx(res["results"]["test"][key], rel=1e-6)]


def test_each_loss_term_gets_its_own_scalar(root, tmp_path):
    run_train(root, tmp_path / "run", "Candle", "vit_b16_bs128_lr0.0003_ep50.yaml", *FAST)
    scalars = tensorboard_scalars(tmp_path / "run")
    for term in ("loss", "loss_pre", "loss_vt", "loss_vv"):
        assert len(scalars[f"train/{term}"]) == len(scalars["train/loss"])
    total = [a + b + c for a, b, c in zip(*(values(scalars[f"train/{t}"]) for t in ("loss_pre", "loss_vt", "loss_vv")))]
    assert values(scalars["train/loss"]) == pytest.approx(total, rel=1e-5)


def test_lamp_writes_its_load_statistics_per_epoch(root, tmp_path):
    res = run_train(root, tmp_path / "run", "LAMP", "vit_b16_lt_b2n.yaml", *FAST,
                    "TRAINER.LAMP.NEW_BIAS_ADAPT", "False")
    scalars = tensorboard_scalars(tmp_path / "run")
    for term in ("ce", "sim"):
        assert f"train/{term}" in scalars
    diag = res["load_diagnostics"]  # the last epoch's
    assert diag
    for layer, d in diag.items():
        for key in ("cv", "entropy", "min", "max", "bias_min", "bias_max"):
            events = scalars[f"lamp_load/L{layer}/{key}"]
            assert [e.step for e in events] == [1, 2]
            assert events[-1].value == pytest.approx(d[key], rel=1e-5, abs=1e-7)


def test_an_eval_only_run_writes_its_test_metrics(root, tmp_path):
    run_train(root, tmp_path / "train", "CoOp", "vit_b16_ep50.yaml", *FAST)
    new = run_eval(root, tmp_path / "new", tmp_path / "train", "CoOp", "vit_b16_ep50.yaml", *FAST)
    scalars = tensorboard_scalars(tmp_path / "new")
    assert "train/loss" not in scalars
    assert values(scalars["test/accuracy"]) == [pytest.approx(new["results"]["test"]["accuracy"], rel=1e-6)]
    assert "test/head_acc" not in scalars  # the new-class test has no head / tail groups (None is skipped)


def test_missing_and_non_finite_values_are_skipped(tmp_path):
    log = ScalarLog(str(tmp_path))
    log.scalars({"a": 1.5, "b": None, "c": math.nan, "d": math.inf}, 3)
    log.close()
    scalars = tensorboard_scalars(tmp_path)
    assert set(scalars) == {"a"} and scalars["a"][0].step == 3 and scalars["a"][0].value == 1.5
    ScalarLog("").scalars({"a": 1.0}, 0)  # no run folder: nothing is written, no error
