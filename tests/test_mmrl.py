"""MMRL: representation tokens in both encoders, the representation branch, two-branch loss, base/new inference."""
import os

import pytest
import torch
import torch.nn.functional as F

from tests import cli
from engine.config import ConfigError
from engine.prompted_clip import TowerHooks
from engine.losses import logit_adjusted_ce
from tests.helpers_run import assert_metrics, run_eval, run_train, train_args
from tools import bench
from trainers.mmrl import by_dataset

CONFIG = "vit_b16_b2n.yaml"


def build(root, tmp_path, *opts, subsample="base"):
    args = train_args(root, tmp_path / "run", "MMRL", CONFIG, *opts, subsample=subsample)
    return cli.build_trainer(cli.build_cfg(cli.parse_args(args)))


class Recorder(TowerHooks):
    def __init__(self, inner):
        self.inner, self.start_layer, self.entering = inner, inner.start_layer, {}
        self.shared_prefix_ok = False

    def before_block(self, layer, x, state):
        x = self.inner.before_block(layer, x, state)
        self.entering[layer] = x.detach().clone()
        return x


def test_parameter_count_on_full_size_vit_b16(capsys):
    config_file = os.path.join(bench.REPO_ROOT, "configs", "trainers", "MMRL", CONFIG)
    assert bench.main(["--trainer", "MMRL", "--params-only", "--config-file", config_file]) == 0
    expected = 5 * 512 + 7 * (512 * 768 + 768 + 512 * 512 + 512) + 768 * 512
    assert int(capsys.readouterr().out.strip().splitlines()[-1]) == expected == 4_992_256


def test_dataset_tables_and_explicit_values(root, tmp_path):
    table = ["EuroSAT:0.01", "ImageNet:0.5", "*:1.0"]
    assert by_dataset(table, "EuroSAT", "K") == 0.01 and by_dataset(table, "DTD", "K") == 1.0
    with pytest.raises(ConfigError, match="no entry for dataset 'DTD'"):
        by_dataset(["EuroSAT:0.01"], "DTD", "K")
    assert build(root, tmp_path).reg_weight == 1.0  # SyntheticShapes falls to '*'
    trainer = build(root, tmp_path, "TRAINER.MMRL.REG_WEIGHT_BY_DATASET", "['SyntheticShapes:3.0', '*:1.0']",
                    "TRAINER.MMRL.REP_DIM_BY_DATASET", "['SyntheticShapes:16', '*:512']")
    assert trainer.reg_weight == 3.0
    assert trainer.count_trainable_parameters() == 5 * 16 + 7 * (16 * 64 + 64) * 2 + 64 * 64
    explicit = build(root, tmp_path, "TRAINER.MMRL.REG_WEIGHT", "0.25", "TRAINER.MMRL.REP_DIM", "8",
                     "TRAINER.MMRL.TEST_BRANCH", "rep", "TRAINER.MMRL.SCALE", "0.4")
    assert explicit.reg_weight == 0.25 and explicit.rep.compound_rep_tokens.shape == (5, 8)
    assert explicit.active_branch() == "rep" and explicit.alpha == 0.4
    layers = build(root, tmp_path, "TRAINER.MMRL.N_REP_TOKENS", "3", "TRAINER.MMRL.REP_LAYERS", "[10, 11, 12]")
    assert layers.count_trainable_parameters() == 3 * 512 + 3 * (512 * 64 + 64) * 2 + 64 * 64
    assert layers.rep.text_hooks.start_layer == 10


def test_tokens_enter_blocks_6_to_12_after_cls_and_bot(root, tmp_path):
    torch.manual_seed(0)
    trainer = build(root, tmp_path)
    rep, enc = trainer.rep, trainer.clip
    rep.set_vision_tokens()
    rep.set_text_tokens()
    text_rec, vision_rec = Recorder(rep.text_hooks), Recorder(rep.vision_hooks)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, state = enc.encode_text(trainer.tokens, text_rec, return_state=True)
        enc.encode_image(images, vision_rec)
        R = rep.compound_rep_tokens
        eot = trainer.tokens.argmax(-1)
        assert torch.equal(state.eot, eot + 5)  # read-out at EOT + n
        for i, layer in enumerate(range(6, 13)):
            t = rep.compound_rep_tokens_r2tproj[i](R)
            v = rep.compound_rep_tokens_r2vproj[i](R)
            assert torch.allclose(text_rec.entering[layer][:, 1:6], t.expand(len(trainer.classnames), -1, -1))
            assert torch.allclose(vision_rec.entering[layer][:, 1:6], v.expand(2, -1, -1))
            assert vision_rec.entering[layer].shape[1] == 16 + 1 + 5
        assert vision_rec.entering[5].shape[1] == 16 + 1  # nothing before block 6


def test_loss_is_the_two_branch_loss_with_both_regularizers(root, tmp_path):
    torch.manual_seed(0)
    trainer = build(root, tmp_path, "TRAINER.MMRL.REG_WEIGHT", "2.0", "TRAINER.LOSS", "la")
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 5, 9])
    with torch.no_grad():
        z_cls, z_rep, f_cls, w = trainer.branch_logits(images)
        f_zs = F.normalize(trainer.clip.encode_image(images), dim=-1)
        w_zs = F.normalize(trainer.clip.encode_text(trainer.tokens), dim=-1)
    counts = trainer.dataset.train_counts
    expected = (0.7 * logit_adjusted_ce(z_cls, labels, counts) + 0.3 * logit_adjusted_ce(z_rep, labels, counts)
                + 2.0 * (1 - F.cosine_similarity(f_cls, f_zs).mean()) + 2.0 * (1 - F.cosine_similarity(w, w_zs).mean()))
    assert not torch.allclose(z_cls, z_rep)
    out = trainer.forward_backward({"img": images, "label": labels})
    assert out["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert out["reg_img"] > 0 and out["reg_txt"] > 0


def test_base_inference_mixes_branches_and_new_inference_uses_the_class_token(root, tmp_path):
    torch.manual_seed(0)
    trainer = build(root, tmp_path)
    with torch.no_grad():  # hand-set: P_rep = -P_v and R = 1 make the two branches clearly different
        trainer.rep.proj_rep.copy_(-trainer.clip.clip.visual.proj)
        trainer.rep.compound_rep_tokens.fill_(1.0)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        z_cls, z_rep, _, _ = trainer.branch_logits(images)
        trainer.before_test()
        base = trainer.model_inference(images)
        trained_on = trainer.trained_on
        trainer.trained_on = (trained_on[0], ["other"] * len(trainer.classnames))  # as in a new-class eval run
        trainer.before_test()
        new = trainer.model_inference(images)
        trainer.trained_on = ("ImageNet", trained_on[1])  # same class names, another dataset (ImageNet-V2 case)
        assert trainer.active_branch() == "cls"
        trainer.trained_on = trained_on
        for branch, expected in (("fusion", 0.7 * z_cls + 0.3 * z_rep), ("cls", z_cls), ("rep", z_rep)):
            trainer.test_branch = branch  # TEST_BRANCH forces one branch everywhere
            trainer.before_test()
            assert torch.allclose(trainer.model_inference(images), expected, atol=1e-4)
    assert torch.allclose(base, 0.7 * z_cls + 0.3 * z_rep, atol=1e-4)
    assert torch.allclose(new, z_cls, atol=1e-4)
    assert not torch.allclose(base, new, atol=1e-2)


def test_trains_on_base_and_tests_on_new(root, tmp_path, caplog):
    out = tmp_path / "train_base"
    res = run_train(root, out, "MMRL", CONFIG, "OPTIM.MAX_EPOCH", "2", "OPTIM.LR", "0.003",
                    "DATALOADER.TRAIN_X.BATCH_SIZE", "8", "OPTIM.WARMUP_EPOCH", "0")
    assert res["trainer"] == "MMRL" and res["trainable_parameters"] == 5 * 512 + 7 * (512 * 64 + 64) * 2 + 64 * 64
    assert res["epoch_losses"][-1] < res["epoch_losses"][0]
    assert_metrics(res["results"]["test"], 10, 200)
    assert "MMRL inference branch: fusion" in (out / "log.txt").read_text()
    new_dir = tmp_path / "test_new"
    new = run_eval(root, new_dir, out, "MMRL", CONFIG)
    assert_metrics(new["results"]["test"], 10, 200, with_head_tail=False)
    assert "MMRL inference branch: cls" in (new_dir / "log.txt").read_text()
