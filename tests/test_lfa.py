"""LFA (docs/methods/lfa.md) on the generated long-tailed dataset with the tiny random CLIP."""
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests import cli
from engine.config import get_cfg_default, merge_from_file
from tests.helpers_run import REPO, assert_metrics, run_eval, run_train, tensorboard_scalars, train_args
from tools import bench
from trainers.lfa import LFA, adaptive_reranking_loss, ema_momentum

CONFIG = "vit_b16_b2n_beta0.9.yaml"
TEST_PER_CLASS = 20
ITERS = 30


def build(root, out, *opts, subsample="base"):
    cfg = cli.build_cfg(cli.parse_args(train_args(root, out, "LFA", CONFIG, *opts, subsample=subsample)))
    return cli.build_trainer(cfg)


@pytest.fixture(scope="module")
def trained(root, tmp_path_factory):
    """A finished base run built in-process: (trainer, output dir, W_0, results)."""
    out = tmp_path_factory.mktemp("lfa") / "train_base"
    trainer = build(root, out, "TRAINER.LFA.ITERS", str(ITERS))
    original = trainer.set_training_features
    init = {}

    def record(features, labels, init_map):
        original(features, labels, init_map)
        init["w0"] = trainer.map.weight.detach().clone()

    trainer.set_training_features = record
    trainer.train()
    return trainer, out, init["w0"], json.loads((out / "results.json").read_text())


def test_procrustes_init_matches_an_independent_svd(root, tmp_path):
    trainer = build(root, tmp_path / "x")
    trainer.before_train(resumed=False)
    feats, labels = trainer.train_features, trainer.train_labels
    n = len(trainer.dataset.train_x)
    assert feats.shape == (n, 5, 64) and labels.shape == (n,)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(n, 5), atol=1e-5)  # L2-normalised
    assert not torch.allclose(feats[:, 0], feats[:, 4])                    # five different crops

    x = feats.reshape(-1, 64).double()
    y = trainer.text_features[labels.repeat_interleave(5)].double()
    m = x.t() @ y
    u, s, vh = torch.linalg.svd(m)
    eye = torch.eye(64, dtype=torch.float64)
    expected = 0.1 * (u @ vh) + 0.9 * eye
    w = trainer.map.weight.detach().double()
    assert torch.allclose(w, expected, atol=1e-5)
    # With 10 classes X^T Y has rank <= 10, so U V^T is unique only up to the null space; check the
    # defining properties too: R = (W - beta I) / (1 - beta) is orthogonal and maximises tr(R^T X^T Y).
    r = (w - 0.9 * eye) / 0.1
    assert torch.allclose(r @ r.t(), eye, atol=1e-4)
    assert torch.trace(r.t() @ m).item() == pytest.approx(s.sum().item(), rel=1e-5)
    assert torch.equal(trainer.map.weight_ema, torch.eye(64))  # the EMA starts at I


def test_refined_map_lowers_the_training_loss(trained):
    trainer, _, w0, res = trained
    w = trainer.map.weight.detach()
    assert not torch.allclose(w, w0)
    assert trainer.full_loss(w) < trainer.full_loss(w0)
    assert len(res["epoch_losses"]) == 1 and res["epochs"] == 1  # one epoch of ITERS full-batch steps
    assert res["trainable_parameters"] == 64 * 64
    # the EMA moved away from I towards W, but slowly (momentum >= 0.9)
    ema = trainer.map.weight_ema
    eye = torch.eye(64)
    assert 0 < (ema - eye).norm() < (w - eye).norm()


def test_end_to_end_base_to_new_writes_every_metric_and_new_test_uses_the_ema(root, trained, tmp_path):
    trainer, out, _, res = trained
    assert_metrics(res["results"]["test"], 10, 10 * TEST_PER_CLASS)
    ckpt = torch.load(out / "lfa" / "model.pth.tar-0", weights_only=False)  # after the last step
    assert set(ckpt["state_dict"]) == {"weight", "weight_ema"}

    new = run_eval(root, tmp_path / "test_new", out, "LFA", CONFIG, "TRAINER.LFA.ITERS", str(ITERS))
    assert_metrics(new["results"]["test"], 10, 10 * TEST_PER_CLASS, with_head_tail=False)
    assert "testing with the EMA map" in (tmp_path / "test_new" / "log.txt").read_text()

    evaluator = build(root, tmp_path / "manual", subsample="new")
    evaluator.load_model(str(out))
    assert evaluator.eval_map() is evaluator.map.weight_ema
    assert torch.equal(evaluator.map.weight_ema, ckpt["state_dict"]["weight_ema"])
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        f = F.normalize(evaluator.clip.encode_image(images), dim=-1)
        expected = F.normalize(f @ ckpt["state_dict"]["weight_ema"], dim=-1) @ evaluator.text_features.t() / 0.07
        assert torch.allclose(evaluator.model_inference(images), expected, atol=1e-4)
    assert trainer.eval_map() is trainer.map.weight  # base test: the refined map


def test_the_schedule_is_step_based(trained):
    """Every iteration is a step of one epoch: the lr follows the per-iteration cosine to END_LR, the EMA
    momentum ramps with the step, and the epoch loss is the mean of the step losses (TensorBoard)."""
    trainer, out, _, res = trained
    scalars = tensorboard_scalars(out)
    steps = [e.step for e in scalars["train/loss"]]
    assert steps == list(range(ITERS))
    lr0, end = trainer.cfg.OPTIM.LR, trainer.cfg.TRAINER.LFA.END_LR
    cosine = [end + (lr0 - end) * (1 + math.cos(math.pi * i / ITERS)) / 2 for i in range(ITERS)]
    assert [e.value for e in scalars["train/lr"]] == pytest.approx(cosine, rel=1e-5)
    assert [e.value for e in scalars["train/ema_momentum"]] == pytest.approx(
        [ema_momentum(i, ITERS) for i in range(ITERS)], rel=1e-6)
    losses = [e.value for e in scalars["train/loss"]]
    assert res["epoch_losses"][0] == pytest.approx(sum(losses) / ITERS, rel=1e-5)
    assert trainer.get_current_lr() == pytest.approx(end, rel=1e-5)  # stepped after every iteration


def test_interrupted_run_starts_over_to_the_same_result(root, tmp_path, monkeypatch):
    """A run killed between steps has no checkpoint yet (it is written after the last step): the rerun
    starts the refinement over, and each step is seeded by (seed, step), so the result is the same."""
    opts = ("TRAINER.LFA.ITERS", "6", "TRAINER.LFA.FIVE_CROP", "False")  # one view per image: faster
    full = run_train(root, tmp_path / "full", "LFA", CONFIG, *opts)
    original = LFA.forward_backward

    def crash(self, batch=None):
        if self.step_index == 3:
            raise KeyboardInterrupt("simulated crash")
        return original(self, batch)

    monkeypatch.setattr(LFA, "forward_backward", crash)
    with pytest.raises(KeyboardInterrupt):
        run_train(root, tmp_path / "cut", "LFA", CONFIG, *opts)
    monkeypatch.setattr(LFA, "forward_backward", original)
    assert not list((tmp_path / "cut").glob("lfa/model.pth.tar-*"))
    rerun = run_train(root, tmp_path / "cut", "LFA", CONFIG, *opts)
    assert rerun["epoch_losses"] == full["epoch_losses"]
    assert rerun["results"]["test"] == full["results"]["test"]


def test_adaptive_reranking_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    x, t = torch.randn(5, 8), torch.randn(6, 8)
    labels = torch.tensor([0, 1, 5, 2, 2])
    xn, tn = F.normalize(x, dim=-1), F.normalize(t, dim=-1)
    total = 0.0
    for i, y in enumerate(labels.tolist()):
        d = [float((xn[i] - tn[j]).norm()) for j in range(6)]
        nearest = sorted(range(6), key=lambda j: d[j])[:3]
        for j in nearest:
            margin = (1 - float(tn[j] @ tn[y])) / 4
            total += max(0.0, d[y] + margin - d[j])
    assert adaptive_reranking_loss(x, t, labels, knn=3, scale=4.0).item() == pytest.approx(total / 15, rel=1e-5)


def test_ema_momentum_ramps_from_0_9_towards_1_over_the_first_half():
    assert ema_momentum(0, 100) == pytest.approx(0.9)
    assert ema_momentum(25, 100) == pytest.approx(0.9 + 0.1 * (1 - math.exp(-2.5)))
    assert ema_momentum(50, 100) == ema_momentum(99, 100) == pytest.approx(0.9 + 0.1 * (1 - math.exp(-5)))


def test_iterations_come_from_the_per_dataset_table():
    cfg = get_cfg_default()
    merge_from_file(cfg, str(REPO / "configs/trainers/LFA" / CONFIG))
    probe = SimpleNamespace(cfg=cfg)
    for name, iters in (("Caltech101", 40), ("OxfordPets", 10), ("ImageNet", 100), ("SyntheticShapes", 50)):
        cfg.DATASET.NAME = name
        assert LFA.resolve_iters(probe) == iters
    cfg.TRAINER.LFA.ITERS = 7
    assert LFA.resolve_iters(probe) == 7


def test_la_loss_is_rejected_with_a_clear_error(root, tmp_path, capsys):
    args = train_args(root, tmp_path / "run", "LFA", CONFIG, "TRAINER.LOSS", "la")
    assert cli.main(args) == 2
    assert "no cross-entropy to logit-adjust" in capsys.readouterr().err


def test_parameter_count_on_full_size_vit_b16(capsys):
    config_file = os.path.join(bench.REPO_ROOT, "configs", "trainers", "LFA", CONFIG)
    assert bench.main(["--trainer", "LFA", "--params-only", "--config-file", config_file]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "262144"
