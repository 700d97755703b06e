"""TCP: CoOp equivalence at injection weight 0, class-aware token placement at block 9, TKE on the class set,
loss terms, parameter count, training."""
import os

import pytest
import torch
import torch.nn.functional as F

from tests import cli
from engine.config import ConfigError, get_cfg_default
from engine.losses import logit_adjusted_ce
from engine.prompted_clip import TowerHooks
from tests.helpers_run import assert_metrics, run_eval, run_train, train_args
from tools import bench
from trainers.common import frozen_text_features
from trainers.coop import CoOpPromptLearner
from trainers.tcp import TCPPromptLearner

CONFIG = "vit_b16_ep50_ctx4.yaml"
NAMES = ["red circle", "blue square", "green_triangle"]
TEMPLATE = "a photo of a {}."


class Recorder(TowerHooks):
    """Wraps a method's hooks; keeps the sequence entering each block before and after the method's hook."""

    shared_prefix_ok = False  # reads the sequences directly: always the plain path

    def __init__(self, inner):
        self.inner = inner
        self.start_layer = inner.start_layer
        self.embedded = None
        self.before, self.after = {}, {}

    def embed(self, x, state):
        x = self.inner.embed(x, state)
        self.embedded = x.detach().clone()
        return x

    def before_block(self, layer, x, state):
        self.before[layer] = x.detach().clone()
        x = self.inner.before_block(layer, x, state)
        self.after[layer] = x.detach().clone()
        return x


def tcp_cfg(**overrides):
    c = get_cfg_default().TRAINER.TCP.clone()
    for k, v in overrides.items():
        c[k] = v
    return c


def test_injection_weight_zero_gives_coop_text_features(tiny):
    torch.manual_seed(0)
    tcp = TCPPromptLearner(tiny, NAMES, TEMPLATE, tcp_cfg(INJECT_WEIGHT=0.0))
    coop = CoOpPromptLearner(tiny, NAMES, 4, "", False, "end")
    with torch.no_grad():
        coop.ctx.copy_(tcp.ctx)
        assert torch.equal(tcp.tokens, coop.tokens)
        ours, theirs = tcp.text_features(tiny), coop.text_features(tiny)
        assert torch.allclose(ours, theirs, atol=1e-6)
        # With the released weight 1 the class-aware tokens change the features.
        tcp.hooks.weight = 1.0
        assert not torch.allclose(tcp.text_features(tiny), theirs, atol=1e-4)


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_class_aware_tokens_enter_block_9_at_the_context_positions(tiny, weight):
    torch.manual_seed(0)
    tcp = TCPPromptLearner(tiny, NAMES, TEMPLATE, tcp_cfg(INJECT_WEIGHT=weight))
    rec = Recorder(tcp.hooks)
    with torch.no_grad():
        tcp.hooks.ctx = tcp.ctx
        tcp.hooks.class_tokens = tcp.class_tokens()
        tiny.encode_text(tcp.tokens, rec)
        tokens = tcp.class_tokens()
    assert tokens.shape == (3, 4, tiny.text_width)
    assert torch.equal(rec.embedded[:, 1:5], tcp.ctx.detach().expand(3, -1, -1))  # shared ctx at the input
    for layer in range(1, 13):
        if layer != 9:
            assert torch.equal(rec.after[layer], rec.before[layer]), f"block {layer} must be untouched"
    before, after = rec.before[9], rec.after[9]
    expected = weight * tokens + (1 - weight) * before[:, 1:5]
    assert torch.allclose(after[:, 1:5], expected, atol=1e-6)
    assert torch.equal(after[:, :1], before[:, :1]) and torch.equal(after[:, 5:], before[:, 5:])
    if weight == 1.0:
        assert torch.equal(after[:, 1:5], tokens)  # replaced, per class
        assert not torch.allclose(tokens[0], tokens[1])  # class-aware: one set per class


def test_tke_uses_the_zero_shot_features_of_the_class_set_and_the_dataset_suffix(tiny):
    template = "a photo of a {}, a type of pet."
    tcp = TCPPromptLearner(tiny, NAMES, template, tcp_cfg())
    assert torch.equal(tcp.tokens, tiny.tokenize([f"X X X X {n.replace('_', ' ')}, a type of pet." for n in NAMES]))
    assert torch.allclose(tcp.zs_features, frozen_text_features(tiny, template, NAMES), atol=1e-6)
    assert tcp.zs_features.norm(dim=-1).allclose(torch.ones(3))
    with torch.no_grad():
        assert torch.allclose(tcp.class_tokens(), tcp.meta_net(tcp.zs_features).view(3, 4, -1))
    assert set(tcp.state_dict()) == {"ctx", "meta_net.linear1.weight", "meta_net.linear1.bias",
                                     "meta_net.linear2.weight", "meta_net.linear2.bias"}
    assert tcp.meta_net.linear1.weight.shape == (tiny.embed_dim // 4, tiny.embed_dim)
    assert tcp.meta_net.linear2.weight.shape == (4 * tiny.text_width, tiny.embed_dim // 4)
    with pytest.raises(ConfigError, match="INJECT_LAYER"):
        TCPPromptLearner(tiny, NAMES, TEMPLATE, tcp_cfg(INJECT_LAYER=13))


def test_parameter_count_on_full_size_vit_b16(capsys):
    config_file = os.path.join(bench.REPO_ROOT, "configs", "trainers", "TCP", CONFIG)
    assert bench.main(["--trainer", "TCP", "--params-only", "--config-file", config_file]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "331904"


def test_loss_is_la_plus_weighted_text_consistency(root, tmp_path):
    cfg = cli.build_cfg(cli.parse_args(train_args(root, tmp_path / "la", "TCP", CONFIG, "TRAINER.LOSS", "la")))
    trainer = cli.build_trainer(cfg)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 5, 9])
    with torch.no_grad():
        logits, text = trainer.logits(images)
    out = trainer.forward_backward({"img": images, "label": labels})
    ce = logit_adjusted_ce(logits, labels, trainer.dataset.train_counts).item()
    kg = 1 - F.cosine_similarity(text, trainer.prompt_learner.zs_features, dim=-1).mean().item()
    assert out["ce"] == pytest.approx(ce, rel=1e-5) and out["kg"] == pytest.approx(kg, rel=1e-4, abs=1e-6)
    assert out["loss"] == pytest.approx(ce + 8.0 * kg, rel=1e-5)
    assert ce != pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-3)


def test_new_class_test_applies_the_tke_to_the_new_classes(root, tmp_path):
    cfg = cli.build_cfg(cli.parse_args(train_args(root, tmp_path / "new", "TCP", CONFIG, subsample="new")))
    trainer = cli.build_trainer(cfg)
    new_names = trainer.dataset.new_classnames
    assert trainer.classnames == new_names
    expected = frozen_text_features(trainer.clip, trainer.dataset.template, new_names)
    assert torch.allclose(trainer.prompt_learner.zs_features, expected, atol=1e-6)


def test_trains_on_base_and_tests_on_new(root, tmp_path):
    out = tmp_path / "train_base"
    res = run_train(root, out, "TCP", CONFIG, "OPTIM.MAX_EPOCH", "3", "OPTIM.LR", "0.01",
                    "DATALOADER.TRAIN_X.BATCH_SIZE", "8", "OPTIM.WARMUP_EPOCH", "0")
    assert res["trainer"] == "TCP" and res["config"] == "vit_b16_ep50_ctx4"
    assert res["trainable_parameters"] == 4 * 64 + (64 * 16 + 16) + (16 * 256 + 256)
    assert len(res["epoch_losses"]) == 3 and res["epoch_losses"][-1] < res["epoch_losses"][0]
    assert_metrics(res["results"]["test"], 10, 200)
    ckpt = torch.load(out / "prompt_learner" / "model.pth.tar-2", weights_only=False)
    assert set(ckpt["state_dict"]) == {"ctx", "meta_net.linear1.weight", "meta_net.linear1.bias",
                                       "meta_net.linear2.weight", "meta_net.linear2.bias"}
    new = run_eval(root, tmp_path / "test_new", out, "TCP", CONFIG)
    assert_metrics(new["results"]["test"], 10, 200, with_head_tail=False)
