"""MMA: adapter placement, the gradient-scaling semantics against hand-built references, caching, training."""
import os

import pytest
import torch
import torch.nn.functional as F

from tests import cli
from engine.config import ConfigError
from engine.prompted_clip import TowerHooks
from tests.helpers_run import assert_step_uses_la_loss, assert_metrics, run_eval, run_train, train_args
from tools import bench
from trainers.common import cosine_logits
from trainers.mma import MMAdapters

CONFIG = "vit_b16_ep5.yaml"
ALPHA = 0.001
PROMPTS = ["a photo of a red circle.", "a photo of a blue square.", "a photo of a green triangle."]


def adapters(enc, alpha=ALPHA, seed=0):
    torch.manual_seed(seed)
    return MMAdapters(enc, 5, 12, 32, alpha)


def close(a, b, rel=1e-5):
    """Equal up to float32 rounding, relative to the larger tensor's scale."""
    return bool((a - b).abs().max() <= rel * max(a.abs().max(), b.abs().max()))


def unscaled_branch(ad, tower, layer, h):
    """The adapter without alpha and without gradient scaling: up(shared(down(h)))."""
    a = (ad.text_adapter if tower == "text" else ad.visual_adapter)[str(layer)]
    return a.up(ad.shared_adapter[str(layer)](a.down(h)))


class PlainHooks(TowerHooks):
    """Hand-built reference: y = alpha * adapter(ln_1 x) with ordinary autograd (true gradients)."""

    def __init__(self, ad, tower):
        self.ad, self.tower, self.start_layer = ad, tower, 5

    def adapter(self, layer, x_ln1):
        if layer < 5:
            return None
        return self.ad.alpha * unscaled_branch(self.ad, self.tower, layer, x_ln1)


def test_structure_and_init(tiny):
    ad = adapters(tiny)
    assert sorted(int(k) for k in ad.text_adapter) == list(range(5, 13)) == sorted(int(k) for k in ad.shared_adapter)
    blk = ad.visual_adapter["5"]
    assert blk.down[0].weight.shape == (32, tiny.vision_width) and blk.up.weight.shape == (tiny.vision_width, 32)
    assert ad.text_adapter["5"].down[0].weight.shape == (32, tiny.text_width)
    assert ad.shared_adapter["5"][0].weight.shape == (32, 32)
    assert isinstance(ad.shared_adapter["5"][1], torch.nn.ReLU)
    for m in ad.modules():
        if isinstance(m, torch.nn.Linear):
            assert torch.count_nonzero(m.bias) == 0
    # Kaiming normal, fan_out, ReLU gain: std = sqrt(2 / fan_out); check on the widest layer.
    w = ad.visual_adapter["5"].down[0].weight
    assert w.std().item() == pytest.approx((2 / 32) ** 0.5, rel=0.1)


def test_alpha_zero_gives_the_frozen_clip_encoders(tiny):
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = tiny.tokenize(PROMPTS)
    zero, live = adapters(tiny, alpha=0.0), adapters(tiny, alpha=ALPHA)
    with torch.no_grad():
        ref_img, ref_txt = tiny.clip.encode_image(images), tiny.clip.encode_text(tokens)  # the clip package
        img0, txt0 = tiny.encode_image(images, zero.vision_hooks), tiny.encode_text(tokens, zero.text_hooks)
        img1, txt1 = tiny.encode_image(images, live.vision_hooks), tiny.encode_text(tokens, live.text_hooks)
    assert torch.allclose(img0, ref_img, atol=1e-5) and torch.allclose(txt0, ref_txt, atol=1e-5)
    # ... and the same hooks with alpha > 0 do change both towers.
    assert (img1 - ref_img).abs().max() > 1e-6 and (txt1 - ref_txt).abs().max() > 1e-6


@pytest.mark.parametrize("tower", ["vision", "text"])
def test_gradient_scaling_in_one_block_matches_the_hand_built_reference(tiny, tower):
    """Forward alpha*A(ln_1 x); adapter weights get the gradient of the unscaled adapter A (1/alpha times the
    true one); x gets alpha times the unscaled adapter's gradient through the branch (the true gradient)."""
    blocks = tiny.clip.visual.transformer.resblocks if tower == "vision" else tiny.clip.transformer.resblocks
    block = blocks[6]  # block 7
    ad = adapters(tiny)
    hooks = ad.vision_hooks if tower == "vision" else ad.text_hooks
    params = [p for n, p in ad.named_parameters() if n.split(".")[1] == "7"
              and n.split(".")[0] in (("visual_adapter" if tower == "vision" else "text_adapter"), "shared_adapter")]
    assert len(params) == 6
    width = tiny.vision_width if tower == "vision" else tiny.text_width
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 17, width, generator=g).requires_grad_()
    upstream = torch.randn(3, 17, width, generator=g)
    causal = tower == "text"

    out = tiny._run_block(block, x, causal, hooks, 7)
    ours = torch.autograd.grad(out, [x] + params, upstream)
    frozen_out = tiny._run_block(block, x, causal, None, 7)
    (frozen_x,) = torch.autograd.grad(frozen_out, [x], upstream, retain_graph=True)
    branch = unscaled_branch(ad, tower, 7, block.ln_1(x))
    unscaled = torch.autograd.grad(branch, [x] + params, upstream, retain_graph=True)

    assert close(out, frozen_out + ALPHA * branch)
    for got, want in zip(ours[1:], unscaled[1:]):
        assert close(got, want)
    assert close(ours[0], frozen_x + ALPHA * unscaled[0])
    assert not close(ours[0], frozen_x + unscaled[0])  # the branch's share of x's gradient is really scaled
    # The reference computed with plain autograd: true gradients = ALPHA * ours for the weights.
    true = torch.autograd.grad(frozen_out + ALPHA * branch, [x] + params, upstream)
    assert close(ours[0], true[0])
    for got, want in zip(ours[1:], true[1:]):
        assert close(got * ALPHA, want)


def test_whole_encoder_adapter_gradients_are_the_true_ones_over_alpha(tiny):
    """Through both full towers and a CLIP loss every adapter weight gets exactly (1/alpha) x its true gradient."""
    ad = adapters(tiny)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    tokens, labels = tiny.tokenize(PROMPTS), torch.tensor([0, 2, 1, 2])

    def loss_with(vision_hooks, text_hooks):
        logits = cosine_logits(tiny.encode_image(images, vision_hooks), tiny.encode_text(tokens, text_hooks),
                               tiny.logit_scale)
        return F.cross_entropy(logits, labels)

    names, params = zip(*ad.named_parameters())
    ours = torch.autograd.grad(loss_with(ad.vision_hooks, ad.text_hooks), params)
    true = torch.autograd.grad(loss_with(PlainHooks(ad, "vision"), PlainHooks(ad, "text")), params)
    assert len(params) == 8 * 10
    for name, got, want in zip(names, ours, true):
        assert want.abs().max() > 0, name
        assert close(got * ALPHA, want, rel=1e-4), name


def test_bad_settings_give_clear_errors(tiny):
    with pytest.raises(ConfigError, match="ADAPTER_START/END"):
        MMAdapters(tiny, 0, 12, 32, ALPHA)
    with pytest.raises(ConfigError, match="ADAPTER_START/END"):
        MMAdapters(tiny, 5, 13, 32, ALPHA)
    with pytest.raises(ConfigError, match="ADAPTER_SCALE"):
        MMAdapters(tiny, 5, 12, 32, -1.0)


def test_parameter_count_on_full_size_vit_b16(capsys):
    config_file = os.path.join(bench.REPO_ROOT, "configs", "trainers", "MMA", CONFIG)
    assert bench.main(["--trainer", "MMA", "--params-only", "--config-file", config_file]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "674560"


def test_text_features_are_cached_at_test_and_la_is_used(root, tmp_path, monkeypatch):
    cfg = cli.build_cfg(cli.parse_args(train_args(root, tmp_path / "la", "MMA", CONFIG, "TRAINER.LOSS", "la")))
    trainer = cli.build_trainer(cfg)
    assert torch.equal(trainer.tokens.cpu(), trainer.clip.tokenize([f"a photo of a {n}." for n in trainer.classnames]))
    assert_step_uses_la_loss(trainer)

    images = torch.randn(4, 3, 32, 32)
    trainer.set_model_mode("eval")
    with torch.no_grad():
        trainer.before_test()
        fresh = trainer.logits(images)

        def no_text(*args, **kwargs):
            raise AssertionError("text encoder called at test time after before_test")

        monkeypatch.setattr(trainer.clip, "encode_text", no_text)
        cached = trainer.model_inference(images)
    assert torch.allclose(cached, fresh, atol=1e-5)


def test_trains_on_base_and_tests_on_new(root, tmp_path):
    out = tmp_path / "train_base"
    res = run_train(root, out, "MMA", CONFIG, "OPTIM.MAX_EPOCH", "3", "OPTIM.LR", "0.01",
                    "DATALOADER.TRAIN_X.BATCH_SIZE", "8")
    assert res["trainer"] == "MMA" and res["config"] == "vit_b16_ep5"
    assert res["trainable_parameters"] == 8 * (2 * (64 * 32 + 32 + 32 * 64 + 64) + 32 * 32 + 32)
    assert len(res["epoch_losses"]) == 3 and res["epoch_losses"][-1] < res["epoch_losses"][0]
    assert_metrics(res["results"]["test"], 10, 200)
    ckpt = torch.load(out / "adapter_learner" / "model.pth.tar-2", weights_only=False)
    assert {k.split(".")[0] for k in ckpt["state_dict"]} == {"text_adapter", "visual_adapter", "shared_adapter"}
    new = run_eval(root, tmp_path / "test_new", out, "MMA", CONFIG)
    assert_metrics(new["results"]["test"], 10, 200, with_head_tail=False)
