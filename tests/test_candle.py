"""Candle (docs/methods/candle.md) on the generated long-tailed dataset with the tiny random CLIP."""
import math
import os

import pytest
import torch

from tests import cli
from tests.helpers_run import assert_metrics, run_eval, run_train, train_args
from tools import bench
from trainers.candle import Candle

CONFIG = "vit_b16_bs128_lr0.0003_ep50.yaml"
TEST_PER_CLASS = 20
FAST = ("OPTIM.MAX_EPOCH", "3", "OPTIM.LR", "0.05", "OPTIM.WARMUP_EPOCH", "0", "DATALOADER.TRAIN_X.BATCH_SIZE", "32")


@pytest.fixture(scope="module")
def trained(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("candle") / "train_base"
    return out, run_train(root, out, "Candle", CONFIG, *FAST)


def build(root, out, *opts, subsample="base"):
    cfg = cli.build_cfg(cli.parse_args(train_args(root, out, "Candle", CONFIG, *opts, subsample=subsample)))
    return cli.build_trainer(cfg)


def test_end_to_end_base_to_new_lowers_loss_and_writes_every_metric(root, trained, tmp_path, monkeypatch):
    out, res = trained
    d = 64  # tiny CLIP feature width; 10 base and 10 new classes
    assert res["trainable_parameters"] == 2 * d * d + (4 * d * d + 4 * d) + 2 * d + 1 + 10 * d
    assert len(res["epoch_losses"]) == 3 and res["epoch_losses"][-1] < res["epoch_losses"][0]
    assert_metrics(res["results"]["test"], 10, 10 * TEST_PER_CLASS)
    ckpt = torch.load(out / "head" / "model.pth.tar-2", weights_only=False)
    state = ckpt["state_dict"]
    assert state["visual_prototypes"].shape == (10, d) and state["text_features"].shape == (20, d)
    assert state["virtual_prototypes"].shape == (10, d)
    assert not any(k.startswith("clip") for k in state)  # trainable state and buffers only
    assert ckpt["extra"]["candle_classnames"][:3] == ["red circle", "red square", "red triangle"]

    # The eval-only new-class run never encodes training images (its train_x are new-class images):
    # prototypes come from the checkpoint.
    def no_training_images(self, items, desc):
        raise AssertionError("eval-only run encoded training images")

    monkeypatch.setattr(Candle, "encode_items", no_training_images)
    new = run_eval(root, tmp_path / "test_new", out, "Candle", CONFIG)
    assert_metrics(new["results"]["test"], 10, 10 * TEST_PER_CLASS, with_head_tail=False)
    assert new["trainable_parameters"] == res["trainable_parameters"]


def test_prototypes_are_class_means_of_training_features(root, tmp_path):
    trainer = build(root, tmp_path / "x")
    trainer.before_train(resumed=False)
    feats, labels = trainer.encode_items(trainer.dataset.train_x, "check")
    assert len(labels) == len(trainer.dataset.train_x) == sum(trainer.dataset.train_counts)
    for c in (0, 9):
        expected = feats[labels == c].mean(0)
        assert torch.allclose(trainer.head.visual_prototypes[c], expected, atol=1e-5)
    # virtual prototypes start at the new classes' text features
    text_new = trainer.head.text_features[10:]
    assert torch.equal(trainer.head.virtual_prototypes.detach(), text_new)


def test_compensating_la_adds_one_to_every_class_count(root, tmp_path):
    trainer = build(root, tmp_path / "x")
    counts = list(trainer.dataset.train_counts)
    assert trainer.class_counts == counts + [0] * 10  # base counts, 0 for the 10 new classes
    torch.manual_seed(0)
    logits = [torch.randn(7, 20) * 5 for _ in range(3)]
    labels = torch.tensor([0, 3, 9, 12, 19, 5, 15])  # image and prototype labels, new classes included
    total, terms = trainer.candle_loss(logits, labels)

    plus_one = [n + 1 for n in counts + [0] * 10]
    log_prior = [math.log(n / sum(plus_one)) for n in plus_one]
    for z, term in zip(logits, terms):
        hand = 0.0
        for row, y in zip(z.tolist(), labels.tolist()):
            adjusted = [v + lp for v, lp in zip(row, log_prior)]
            hand += math.log(sum(math.exp(a) for a in adjusted)) - adjusted[y]
        assert term.item() == pytest.approx(hand / len(labels), rel=1e-5)
    assert total.item() == pytest.approx(sum(t.item() for t in terms), rel=1e-6)
    assert math.isfinite(total.item())


def _crafted_head(monkeypatch, trainer, winner):
    """Make the head return z_vt + z_vv whose largest entry in every row is column ``winner``."""
    def forward(features, prototypes, text, training=False):
        n, c = features.shape[0], prototypes.shape[0]
        z = torch.arange(c, dtype=torch.float32).repeat(n, 1) * 0.01
        z[:, winner] = 100.0
        return z, z / 2, z / 2

    monkeypatch.setattr(trainer.head, "forward", forward)


def test_base_test_uses_only_base_columns_and_new_test_only_new_columns(root, trained, tmp_path, monkeypatch):
    out, _ = trained
    images = torch.randn(6, 3, 32, 32)

    base = build(root, tmp_path / "base")
    base.load_model(str(out))
    base.before_test()
    assert base.eval_set[2].tolist() == list(range(10))
    _crafted_head(monkeypatch, base, winner=15)  # a new-class column would win...
    scores = base.model_inference(images)
    assert scores.shape == (6, 10)               # ...but the base test only sees base columns
    assert scores.argmax(1).tolist() == [9] * 6  # the best base column (largest ramp value)

    new = build(root, tmp_path / "new", subsample="new")
    new.load_model(str(out))
    new.before_test()
    assert new.eval_set[2].tolist() == list(range(10, 20))
    assert len(new.trained_names) == 20 and new.head.visual_prototypes.shape[0] == 10
    _crafted_head(monkeypatch, new, winner=3)    # a base-class column would win...
    scores = new.model_inference(images)
    assert scores.shape == (6, 10)
    assert scores.argmax(1).tolist() == [9] * 6  # ...the new test picks among new columns only (col 19)


def test_unseen_evaluation_classes_get_text_prototypes(root, trained, tmp_path):
    """A class set the model was not trained on (cross-dataset) is matched by name; unknown names are
    appended with their text features as prototypes."""
    out, _ = trained
    trainer = build(root, tmp_path / "x")
    trainer.load_model(str(out))
    trainer.trained_names = ["zz " + n for n in trainer.trained_names[:15]] + trainer.trained_names[15:]
    trainer.dataset.all_classnames = list(trainer.classnames)  # pretend another dataset
    q, t, cols = trainer.eval_class_set()
    assert q.shape[0] == t.shape[0] == 20 + 10 and cols.tolist() == list(range(20, 30))
    assert torch.equal(q[20:], t[20:])
    images = torch.randn(4, 3, 32, 32)
    trainer.eval_set = (q, t, cols)
    with torch.no_grad():
        assert trainer.model_inference(images).shape == (4, 10)


def test_feature_cache_matches_image_training_without_augmentation(root, tmp_path):
    """With no random augmentation, training on cached features gives the same losses as re-encoding
    the images every epoch (the switch only saves the encoder passes)."""
    opts = ("OPTIM.MAX_EPOCH", "2", "OPTIM.LR", "0.05", "OPTIM.WARMUP_EPOCH", "0",
            "DATALOADER.TRAIN_X.BATCH_SIZE", "32", "INPUT.TRANSFORMS", "['normalize']")
    plain = run_train(root, tmp_path / "plain", "Candle", CONFIG, *opts)
    cached = run_train(root, tmp_path / "cached", "Candle", CONFIG, *opts, "TRAINER.CANDLE.CACHE_FEATURES", "True")
    assert "cached frozen features" in (tmp_path / "cached" / "log.txt").read_text()
    assert cached["epoch_losses"] == pytest.approx(plain["epoch_losses"], rel=1e-4)


def test_parameter_count_on_full_size_vit_b16(capsys):
    config_file = os.path.join(bench.REPO_ROOT, "configs", "trainers", "Candle", CONFIG)
    assert bench.main(["--trainer", "Candle", "--params-only", "--config-file", config_file]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(1_575_937 + 512 * 50)  # 50 new classes
