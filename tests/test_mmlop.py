"""MMLoP: rank-r deep prompts with a shared U, zero-shot anchors, drift correction; counts, switches, training."""
import os

import pytest
import torch
import torch.nn.functional as F

from tests import cli
from engine.clip_loader import load_clip
from engine.config import ConfigError, get_cfg_default, merge_from_file
from engine.prompted_clip import PromptedCLIP, TowerHooks
from tests.helpers_run import assert_metrics, assert_step_uses_la_loss, run_eval, run_train, train_args
from tools import bench
from trainers.mmlop import IMAGENET_TEMPLATES_60, MMLoPPrompts, drift_correct

CONFIG = "vit_b16_b2n.yaml"
ALL_OFF = ["TRAINER.MMLOP.LOW_RANK", "False", "TRAINER.MMLOP.ANCHORS", "False",
           "TRAINER.MMLOP.DRIFT_CORRECTION", "off", "TRAINER.MMLOP.SHARED_U", "False"]


def build(root, tmp_path, *opts, subsample="base"):
    args = train_args(root, tmp_path / "run", "MMLoP", CONFIG, *opts, subsample=subsample)
    return cli.build_trainer(cli.build_cfg(cli.parse_args(args)))


class DeepPromptReference(TowerHooks):
    """Plain IVLP deep prompting written out on tensors: text prompts at positions 1..n (embedding stage,
    then before blocks 2..J), vision prompts appended after the patches, then replacing the last n."""

    shared_prefix_ok = False

    def __init__(self, prompts, text):
        self.prompts, self.text = prompts, text  # (J, n, D)

    def embed(self, x, state):
        p = self.prompts[0].unsqueeze(0).expand(x.shape[0], -1, -1)
        if self.text:
            return torch.cat([x[:, :1], p, x[:, 1 + p.shape[1]:]], dim=1)
        return torch.cat([x, p], dim=1)

    def before_block(self, layer, x, state):
        if not 2 <= layer <= self.prompts.shape[0]:
            return x
        p = self.prompts[layer - 1].unsqueeze(0).expand(x.shape[0], -1, -1)
        if self.text:
            return torch.cat([x[:, :1], p, x[:, 1 + p.shape[1]:]], dim=1)
        return torch.cat([x[:, : x.shape[1] - p.shape[1]], p], dim=1)


def reference_logits(trainer, images, p_text, p_vision):
    enc = trainer.clip
    with torch.no_grad():
        w = enc.encode_text(trainer.prompt_learner.tokens, DeepPromptReference(p_text, True))
        f = enc.encode_image(images, DeepPromptReference(p_vision, False))
    return enc.logit_scale * F.normalize(f, dim=-1) @ F.normalize(w, dim=-1).t()


def test_parameter_count_on_full_size_vit_b16(capsys):
    config_file = os.path.join(bench.REPO_ROOT, "configs", "trainers", "MMLoP", CONFIG)
    assert bench.main(["--trainer", "MMLoP", "--params-only", "--config-file", config_file]) == 0
    assert int(capsys.readouterr().out.strip().splitlines()[-1]) == 9 * (2 * 1 + 1 * (768 + 512)) == 11_538
    cfg = get_cfg_default()
    merge_from_file(cfg, config_file)  # the project's loader: the yaml inherits from configs/base (_BASE_)
    cfg.TRAINER.MMLOP.SHARED_U = False
    enc = PromptedCLIP(load_clip("ViT-B/16-random"))
    unshared = MMLoPPrompts(enc, ["dog", "cat"], cfg.TRAINER.MMLOP)
    assert sum(p.numel() for p in unshared.parameters()) == 9 * (2 * 2 + 1280) == 11_556


@pytest.mark.parametrize("opts, expected", [
    ([], 9 * (2 + 64 + 64)),                                            # tiny widths 64: J(n r + r (D_v + D_t))
    (["TRAINER.MMLOP.SHARED_U", "False"], 9 * (4 + 128)),
    (["TRAINER.MMLOP.U_PER_LAYER", "False"], 2 + 9 * 128),
    (["TRAINER.MMLOP.RANK", "3"], 9 * (2 * 3 + 3 * 128)),
    (["TRAINER.MMLOP.PROMPT_DEPTH", "3"], 3 * (2 + 128)),
    (["TRAINER.MMLOP.LOW_RANK", "False"], 9 * 2 * 128),                 # IVLP
])
def test_parameter_counts_follow_the_formula(root, tmp_path, opts, expected):
    assert build(root, tmp_path, *opts).count_trainable_parameters() == expected


def test_everything_off_equals_plain_deep_prompting(root, tmp_path):
    torch.manual_seed(0)
    trainer = build(root, tmp_path, *ALL_OFF)
    pl = trainer.prompt_learner
    with torch.no_grad():
        pl.p_text.normal_(0, 0.5)
        pl.p_vision.normal_(0, 0.5)
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 4, 7])
    expected = reference_logits(trainer, images, pl.p_text.detach(), pl.p_vision.detach())
    with torch.no_grad():
        assert torch.allclose(trainer.logits(images), expected, atol=1e-5)
    trainer.before_test()
    with torch.no_grad():
        assert torch.allclose(trainer.model_inference(images), expected, atol=1e-5)
    out = trainer.forward_backward({"img": images, "label": labels})
    assert out["loss"] == pytest.approx(F.cross_entropy(expected, labels).item(), rel=1e-5)


@pytest.mark.parametrize("shared", [True, False])
def test_low_rank_prompts_are_products_with_a_shared_u(root, tmp_path, shared):
    torch.manual_seed(0)
    trainer = build(root, tmp_path, "TRAINER.MMLOP.ANCHORS", "False", "TRAINER.MMLOP.DRIFT_CORRECTION", "off",
                    "TRAINER.MMLOP.SHARED_U", str(shared))
    pl = trainer.prompt_learner
    p_text, p_vision = (p.detach() for p in pl.prompts())
    u_v = pl.u if shared else pl.u_vision
    assert torch.allclose(p_text, pl.u.detach() @ pl.v_text.detach())
    assert torch.allclose(p_vision, u_v.detach() @ pl.v_vision.detach())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(trainer.logits(images), reference_logits(trainer, images, p_text, p_vision), atol=1e-5)
        pl.u.mul_(2.0)  # the text U; with sharing it is also the vision U
        p_text2, p_vision2 = pl.prompts()
    assert torch.allclose(p_text2, 2 * p_text)
    assert torch.allclose(p_vision2, 2 * p_vision) if shared else torch.equal(p_vision2, p_vision)


def test_anchor_losses_follow_promptsrc(root, tmp_path):
    torch.manual_seed(0)
    trainer = build(root, tmp_path, "TRAINER.MMLOP.DRIFT_CORRECTION", "off", "TRAINER.MMLOP.TEXT_LOSS_WEIGHT", "3.0",
                    "TRAINER.MMLOP.IMAGE_LOSS_WEIGHT", "2.0", "TRAINER.MMLOP.LOGIT_LOSS_WEIGHT", "0.5")
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 5, 9])
    enc = trainer.clip
    with torch.no_grad():
        logits = trainer.logits(images)
        f = F.normalize(enc.encode_image(images, trainer.prompt_learner.vision_hooks), dim=-1)
        w = F.normalize(enc.encode_text(trainer.prompt_learner.tokens, trainer.prompt_learner.text_hooks), dim=-1)
        # anchors written out: per class the mean of the 60 templates' features, normalised
        names = [n.replace("_", " ") for n in trainer.classnames]
        feats = torch.stack([enc.encode_text(enc.tokenize([t.format(n) for n in names]))
                             for t in IMAGENET_TEMPLATES_60]).mean(0)
        w_zs = F.normalize(feats, dim=-1)
        f_zs = F.normalize(enc.encode_image(images), dim=-1)
        zs = enc.logit_scale * f_zs @ w_zs.t()
    assert len(IMAGENET_TEMPLATES_60) == 60 and torch.allclose(trainer.text_anchors(), w_zs, atol=1e-6)
    p, q = F.softmax(logits, 1), F.softmax(zs, 1)
    kl = (q * (q.log() - p.log())).sum() / logits.numel()
    expected = (F.cross_entropy(logits, labels) + 3 * (w - w_zs).abs().mean() + 2 * (f - f_zs).abs().mean()
                + 0.5 * kl)
    out = trainer.forward_backward({"img": images, "label": labels})
    assert out["loss"] == pytest.approx(expected.item(), rel=1e-4)
    assert out["loss"] > out["ce"] + 1e-3  # the anchors add something


def test_drift_correction_modes(root, tmp_path):
    torch.manual_seed(0)
    w, anchors = F.normalize(torch.randn(5, 16), dim=-1), F.normalize(torch.randn(5, 16), dim=-1)
    corrected = drift_correct(w, anchors)
    residual_mean = (w - (w - anchors).mean(0)) - anchors
    assert torch.allclose(residual_mean.mean(0), torch.zeros(16), atol=1e-6)  # mean residual removed
    assert torch.allclose(corrected, F.normalize(w - (w - anchors).mean(0), dim=-1))

    images = torch.randn(3, 3, 32, 32)
    results = {}
    for mode in ("off", "test", "train_test"):
        torch.manual_seed(1)
        trainer = build(root, tmp_path / mode, "TRAINER.MMLOP.ANCHORS", "False", "TRAINER.MMLOP.DRIFT_CORRECTION", mode)
        with torch.no_grad():
            train_logits = trainer.logits(images)
            trainer.before_test()
            test_logits = trainer.model_inference(images)
        results[mode] = (train_logits, test_logits)
    assert torch.allclose(results["test"][0], results["off"][0])            # test-only: training untouched
    assert torch.allclose(results["test"][1], results["train_test"][1])     # ... and corrected at test
    assert not torch.allclose(results["off"][1], results["train_test"][1], atol=1e-4)
    assert not torch.allclose(results["off"][0], results["train_test"][0], atol=1e-4)


def test_la_loss_is_used_for_training(root, tmp_path):
    trainer = build(root, tmp_path, "TRAINER.LOSS", "la", "TRAINER.MMLOP.ANCHORS", "False")
    assert_step_uses_la_loss(trainer)


def test_trains_on_base_and_tests_on_new(root, tmp_path):
    out = tmp_path / "train_base"
    res = run_train(root, out, "MMLoP", CONFIG, "OPTIM.MAX_EPOCH", "2", "OPTIM.LR", "0.05",
                    "DATALOADER.TRAIN_X.BATCH_SIZE", "8", "OPTIM.WARMUP_EPOCH", "0")
    assert res["trainer"] == "MMLoP" and res["trainable_parameters"] == 9 * (2 + 128)
    assert len(res["epoch_losses"]) == 2 and res["epoch_losses"][-1] < res["epoch_losses"][0]
    assert_metrics(res["results"]["test"], 10, 200)
    new = run_eval(root, tmp_path / "test_new", out, "MMLoP", CONFIG)
    assert_metrics(new["results"]["test"], 10, 200, with_head_tail=False)


def test_initialisation_switches(root, tmp_path):
    zero_u = build(root, tmp_path, "TRAINER.MMLOP.U_INIT_STD", "0.0").prompt_learner
    assert torch.count_nonzero(zero_u.u) == 0 and torch.count_nonzero(zero_u.v_text) > 0
    zero_v = build(root, tmp_path, "TRAINER.MMLOP.V_INIT_STD", "0.0").prompt_learner
    assert torch.count_nonzero(zero_v.v_text) == 0 and torch.count_nonzero(zero_v.u) > 0
    ivlp = build(root, tmp_path, "TRAINER.MMLOP.LOW_RANK", "False", "TRAINER.MMLOP.CTX_INIT", "a photo of a")
    enc, pl = ivlp.clip, ivlp.prompt_learner
    names = [n.replace("_", " ") for n in ivlp.classnames]
    assert torch.equal(pl.tokens, enc.tokenize([f"a photo of a {n}." for n in names]))
    assert torch.allclose(pl.p_text[0].detach(), enc.token_embedding(pl.tokens[:1])[0, 1:3])
    with pytest.raises(ConfigError, match="CTX_INIT needs LOW_RANK False"):
        build(root, tmp_path, "TRAINER.MMLOP.CTX_INIT", "a photo of a")


@pytest.mark.parametrize("opts, message", [
    (["TRAINER.MMLOP.DRIFT_CORRECTION", "always"], "DRIFT_CORRECTION must be one of"),
    (["TRAINER.MMLOP.PROMPT_DEPTH", "13"], "PROMPT_DEPTH must be in 1..12"),
    (["TRAINER.MMLOP.RANK", "0"], "TRAINER.MMLOP.RANK must be >= 1"),  # checked at config time (issue 18)
])
def test_bad_settings_give_clear_errors(root, tmp_path, opts, message):
    with pytest.raises(ConfigError, match=message):
        build(root, tmp_path, *opts)
