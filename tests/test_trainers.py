"""End-to-end runs of the foundation trainers on the generated long-tailed dataset (tiny random CLIP)."""
import json
import os

import pytest
import torch

from tests import cli
import trainers  # noqa: F401  (registers every trainer)
from engine.registry import TRAINER_REGISTRY
from engine.trainer import TrainerX
from tests.helpers_run import run_interrupted, assert_metrics, run_eval, run_train, train_args
from tools import bench

TEST_PER_CLASS = 20


def test_zeroshot_clip_scores_base_and_new_without_training(root, tmp_path):
    base = run_train(root, tmp_path / "base", "ZeroshotCLIP", "vit_b16.yaml")
    assert base["trainable_parameters"] == 0 and base["epoch_losses"] == []
    assert_metrics(base["results"]["test"], 10, 10 * TEST_PER_CLASS)
    new = run_eval(root, tmp_path / "new", "", "ZeroshotCLIP", "vit_b16.yaml")
    assert_metrics(new["results"]["test"], 10, 10 * TEST_PER_CLASS, with_head_tail=False)
    assert new["subsample_classes"] == "new"


def test_coop_trains_on_base_and_tests_on_new(root, tmp_path):
    out = tmp_path / "train_base"
    res = run_train(root, out, "CoOp", "vit_b16_ep50_ctxv1.yaml", "OPTIM.MAX_EPOCH", "4", "OPTIM.LR", "0.02",
                    "DATALOADER.TRAIN_X.BATCH_SIZE", "8")
    assert res["trainer"] == "CoOp" and res["dataset"] == "SyntheticShapes" and res["seed"] == 1
    assert res["config"] == "vit_b16_ep50_ctxv1" and res["imb_factor"] == 10.0 and res["num_shots"] == 100
    assert res["trainable_parameters"] == 4 * 64  # 4 context tokens x tiny text width
    assert len(res["epoch_losses"]) == 4 and res["epoch_losses"][-1] < res["epoch_losses"][0]
    assert_metrics(res["results"]["test"], 10, 10 * TEST_PER_CLASS)
    manifest = json.loads((out / "manifest.json").read_text())
    assert res["manifest_hash"] == manifest["hash"] and len(manifest["hash"]) == 64
    assert sum(manifest["counts"].values()) < 10 * 40  # long-tailed: fewer than the 40 per class generated
    assert (out / "config.yaml").is_file() and (out / "log.txt").is_file()
    ckpt = torch.load(out / "prompt_learner" / "model.pth.tar-3", weights_only=False)
    assert set(ckpt["state_dict"]) == {"ctx"}  # trainable state only, never CLIP weights
    new = run_eval(root, tmp_path / "test_new", out, "CoOp", "vit_b16_ep50_ctxv1.yaml")
    assert_metrics(new["results"]["test"], 10, 10 * TEST_PER_CLASS, with_head_tail=False)


def test_cocoop_trains(root, tmp_path):
    res = run_train(root, tmp_path / "run", "CoCoOp", "vit_b16_c4_ep10_batch1_ctxv1.yaml", "OPTIM.MAX_EPOCH", "3",
                    "DATALOADER.TRAIN_X.BATCH_SIZE", "4", "OPTIM.LR", "0.01")
    assert res["trainable_parameters"] == 4 * 64 + (64 * 4 + 4) + (4 * 64 + 64)
    assert res["epoch_losses"][-1] < res["epoch_losses"][0]
    assert_metrics(res["results"]["test"], 10, 10 * TEST_PER_CLASS)


def test_cocoop_text_batch_split_is_exact(root, tmp_path):
    """Splitting the image batch to bound B*C text sequences gives the same logits."""
    args = train_args(root, tmp_path / "x", "CoCoOp", "vit_b16_c4_ep10_batch1_ctxv1.yaml")
    cfg = cli.build_cfg(cli.parse_args(args))
    trainer = cli.build_trainer(cfg)
    images = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        full = trainer.logits(images)
        cfg.defrost()
        cfg.TRAINER.COCOOP.MAX_TEXT_BATCH = 20  # 2 images per text call
        split = trainer.model_inference(images)
    assert torch.allclose(full, split, atol=1e-5)


def test_la_loss_changes_training(root, tmp_path):
    ce = run_train(root, tmp_path / "ce", "CoOp", "vit_b16_ep50_ctxv1.yaml", "OPTIM.MAX_EPOCH", "2")
    la = run_train(root, tmp_path / "la", "CoOp", "vit_b16_ep50_ctxv1.yaml", "OPTIM.MAX_EPOCH", "2",
                   "TRAINER.LOSS", "la")
    assert la["loss"] == "la" and ce["loss"] == "ce"
    assert la["config"] == "vit_b16_ep50_ctxv1_la" and ce["config"] == "vit_b16_ep50_ctxv1"
    assert la["epoch_losses"] != ce["epoch_losses"]


def test_interrupted_run_resumes_to_the_same_result(root, tmp_path, monkeypatch):
    opts = ("OPTIM.MAX_EPOCH", "3", "DATALOADER.TRAIN_X.BATCH_SIZE", "8", "OPTIM.LR", "0.02")
    full = run_train(root, tmp_path / "full", "CoOp", "vit_b16_ep50_ctxv1.yaml", *opts)
    run_interrupted(monkeypatch, TrainerX, 2, root, tmp_path / "cut", "CoOp", "vit_b16_ep50_ctxv1.yaml", *opts)
    assert (tmp_path / "cut" / "prompt_learner" / "model.pth.tar-1").is_file()
    resumed = run_train(root, tmp_path / "cut", "CoOp", "vit_b16_ep50_ctxv1.yaml", *opts)
    assert "Resuming" in (tmp_path / "cut" / "log.txt").read_text()
    assert resumed["epoch_losses"] == full["epoch_losses"]
    assert resumed["results"]["test"] == full["results"]["test"]


def test_same_seed_same_metrics_on_cpu(root, tmp_path):
    a = run_train(root, tmp_path / "a", "CoOp", "vit_b16_ep50_ctxv1.yaml", "OPTIM.MAX_EPOCH", "1", "OPTIM.WARMUP_EPOCH", "0")
    b = run_train(root, tmp_path / "b", "CoOp", "vit_b16_ep50_ctxv1.yaml", "OPTIM.MAX_EPOCH", "1", "OPTIM.WARMUP_EPOCH", "0")
    assert a["results"] == b["results"] and a["manifest_hash"] == b["manifest_hash"]


def test_eval_only_without_checkpoint_fails_and_never_trains(root, tmp_path, capsys):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    args = train_args(root, tmp_path / "eval", "CoOp", "vit_b16_ep50_ctxv1.yaml", subsample="new")
    assert cli.main(["--eval-only", "--model-dir", str(empty)] + args) == 2
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "--eval-only never trains" in err
    assert not (tmp_path / "eval" / "results.json").exists()
    assert not (tmp_path / "eval" / "prompt_learner").exists()
    assert cli.main(["--eval-only"] + args) == 2
    assert "--eval-only needs --model-dir" in capsys.readouterr().err


def test_finished_run_is_not_overwritten(root, tmp_path, capsys):
    out = tmp_path / "run"
    run_train(root, out, "ZeroshotCLIP", "vit_b16.yaml")
    before = (out / "results.json").read_text()
    assert cli.main(train_args(root, out, "ZeroshotCLIP", "vit_b16.yaml")) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before


@pytest.mark.parametrize("opts, root_override, message", [
    (["OPTIM.LRR", "0.1"], None, "unknown config key OPTIM.LRR"),
    (["DATASET.IMB_FACTOR", "0.5"], None, "DATASET.IMB_FACTOR"),
    ([], "missing_root", "synthetic_shapes"),
    (["MODEL.BACKBONE.NAME", "ViT-B/16", "INPUT.SIZE", "(224, 224)"], None, "CLIP weights for 'ViT-B/16' not found"),
    (["INPUT.SIZE", "(224, 224)"], None, "does not match the input resolution 32"),
])
def test_bad_input_gives_a_clear_error(root, tmp_path, capsys, monkeypatch, opts, root_override, message):
    monkeypatch.setenv("CLIP_WEIGHTS_DIR", str(tmp_path / "no_weights"))
    data = tmp_path / root_override if root_override else root
    args = train_args(data, tmp_path / "run", "CoOp", "vit_b16_ep50_ctxv1.yaml", *opts)
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize("trainer, config, expected", [
    ("CoOp", "vit_b16_ep50.yaml", 8192),
    ("CoOp", "vit_b16_ep50_ctxv1.yaml", 2048),
    ("CoCoOp", "vit_b16_c4_ep10_batch1_ctxv1.yaml", 35360),
    ("ZeroshotCLIP", "vit_b16.yaml", 0),
])
def test_parameter_counts_on_full_size_vit_b16(trainer, config, expected, capsys):
    config_file = os.path.join(bench.REPO_ROOT, "configs", "trainers", trainer, config)
    assert bench.main(["--trainer", trainer, "--params-only", "--config-file", config_file]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(expected)


@pytest.mark.parametrize("trainer", TRAINER_REGISTRY.names())
def test_benchmark_runs_for_every_registered_trainer(trainer, capsys):
    assert bench.main(["--trainer", trainer, "--backbone", "tiny", "--batch", "2", "--classes", "6",
                       "--steps", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "trainable params" in out and "peak memory" in out
    step = "inference" if trainer == "ZeroshotCLIP" else "training"
    assert f"ms / {step} step" in out
