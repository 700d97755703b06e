"""MaPLe: coupled deep prompts (vision prompts = projections of the text prompts), layout, counts, training."""
import os

import pytest
import torch

from tests import cli
from engine.clip_loader import load_clip
from engine.config import ConfigError
from engine.prompted_clip import PromptedCLIP, TowerHooks
from tests.helpers_run import assert_step_uses_la_loss, assert_metrics, run_eval, run_train, train_args
from tools import bench
from trainers.maple import MaPLePromptLearner

CONFIG = "vit_b16_c2_ep5_batch4_2ctx.yaml"
XD_CONFIG = "vit_b16_c2_ep2_batch4_2ctx_cross_datasets.yaml"
NAMES = ["red circle", "blue square", "green_triangle"]


class Recorder(TowerHooks):
    """Wraps a method's hooks and keeps a copy of the sequence after the embedding hook and entering each block."""

    shared_prefix_ok = False  # reads the sequences directly: always the plain path

    def __init__(self, inner):
        self.inner = inner
        self.start_layer = inner.start_layer
        self.embedded = None
        self.entering = {}

    def embed(self, x, state):
        x = self.inner.embed(x, state)
        self.embedded = x.detach().clone()
        return x

    def before_block(self, layer, x, state):
        x = self.inner.before_block(layer, x, state)
        self.entering[layer] = x.detach().clone()
        return x

    def adapter(self, layer, x_ln1):
        return self.inner.adapter(layer, x_ln1)


@pytest.fixture(scope="module")
def tiny():
    return PromptedCLIP(load_clip("tiny"), truncate_text=False)  # full 77-token text sequences


def encode_recorded(enc, learner, images):
    learner.set_prompts()
    text_rec, vision_rec = Recorder(learner.text_hooks), Recorder(learner.vision_hooks)
    with torch.no_grad():
        text = enc.encode_text(learner.tokens, text_rec)
        image = enc.encode_image(images, vision_rec)
    return text, image, text_rec, vision_rec


def test_vision_prompts_are_the_projections_of_the_text_prompts_at_every_depth(tiny):
    torch.manual_seed(0)
    learner = MaPLePromptLearner(tiny, NAMES, 2, "a photo of a", 9)
    images = torch.randn(2, 3, 32, 32)
    _, _, text_rec, vision_rec = encode_recorded(tiny, learner, images)
    # What the hooks put into the sequences: text positions 1..2, the last 2 vision tokens.
    text_prompts = {1: text_rec.embedded[:, 1:3]}
    vision_prompts = {1: vision_rec.embedded[:, -2:]}
    for j in range(2, 10):
        text_prompts[j] = text_rec.entering[j][:, 1:3]
        vision_prompts[j] = vision_rec.entering[j][:, -2:]
    projections = [learner.proj] + list(learner.compound_prompt_projections)
    params = learner.text_prompts()
    with torch.no_grad():
        for j in range(1, 10):
            for c in range(len(NAMES)):
                assert torch.equal(text_prompts[j][c], params[j - 1])  # the same prompt in every class sequence
            expected = projections[j - 1](text_prompts[j][0])
            for b in range(images.shape[0]):
                assert torch.allclose(vision_prompts[j][b], expected, atol=1e-6), f"depth {j}"
    # Past depth J nothing is replaced: block 10 sees what block 9 made of the prompts.
    assert not torch.allclose(vision_rec.entering[10][:, -2:], vision_prompts[9])
    assert not torch.allclose(text_rec.entering[10][:, 1:3], text_prompts[9])


def test_text_prompts_occupy_positions_1_2_and_the_77_token_layout_does_not_grow(tiny):
    torch.manual_seed(0)
    learner = MaPLePromptLearner(tiny, NAMES, 2, "a photo of a", 9)
    expected_tokens = tiny.tokenize(["a photo of a red circle.", "a photo of a blue square.",
                                     "a photo of a green triangle."])
    assert torch.equal(learner.tokens, expected_tokens)
    plain = tiny.token_embedding(expected_tokens)
    # ctx is initialised from the word embeddings of "a photo" (the tokens it replaces).
    assert torch.allclose(learner.ctx.detach(), plain[0, 1:3])
    with torch.no_grad():
        learner.ctx.add_(1.0)  # move it away from the init so the check below is not trivial
    images = torch.randn(1, 3, 32, 32)
    text, _, text_rec, vision_rec = encode_recorded(tiny, learner, images)
    assert text.shape == (3, tiny.embed_dim)
    emb = text_rec.embedded
    assert emb.shape == plain.shape == (3, 77, tiny.text_width)
    assert torch.equal(emb[:, 1:3], learner.ctx.detach().expand(3, -1, -1))
    assert torch.equal(emb[:, :1], plain[:, :1]) and torch.equal(emb[:, 3:], plain[:, 3:])  # "of a <name>." stays
    for layer in range(1, 13):
        assert text_rec.entering[layer].shape[1] == 77, f"text block {layer}"
        assert vision_rec.entering[layer].shape[1] == 16 + 1 + 2, f"vision block {layer}"


def test_vit_b16_shapes_and_cross_dataset_parameter_count():
    enc = PromptedCLIP(load_clip("ViT-B/16-random"))
    learner = MaPLePromptLearner(enc, ["dog", "cat"], 2, "a photo of a", 9)
    assert learner.proj.weight.shape == (768, 512)  # Linear(text_width, vision_width) from the model
    _, image, _, vision_rec = encode_recorded(enc, learner, torch.randn(1, 3, 224, 224))
    assert image.shape == (1, 512)
    assert vision_rec.embedded.shape == (1, 199, 768)  # 197 + 2 prompts
    assert all(vision_rec.entering[l].shape == (1, 199, 768) for l in range(1, 13))
    xd = MaPLePromptLearner(enc, ["dog", "cat"], 2, "a photo of a", 3)
    assert sum(p.numel() for p in xd.parameters()) == 3 * (2 * 512 + 512 * 768 + 768) == 1_185_024


def test_parameter_count_on_full_size_vit_b16(capsys):
    config_file = os.path.join(bench.REPO_ROOT, "configs", "trainers", "MaPLe", CONFIG)
    assert bench.main(["--trainer", "MaPLe", "--params-only", "--config-file", config_file]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "3555072"


@pytest.mark.parametrize("depth, n_ctx, init, message", [
    (0, 2, "a photo of a", "PROMPT_DEPTH must be in 1..12"),
    (13, 2, "a photo of a", "PROMPT_DEPTH must be in 1..12"),
    (9, 5, "a photo of a", "CTX_INIT 'a photo of a' has 4 tokens, fewer than N_CTX (5)"),
])
def test_bad_settings_give_clear_errors(tiny, depth, n_ctx, init, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MaPLePromptLearner(tiny, NAMES, n_ctx, init, depth)


def test_random_init_without_ctx_init(tiny):
    learner = MaPLePromptLearner(tiny, NAMES, 3, "", 4)
    assert torch.equal(learner.tokens, tiny.tokenize([f"X X X {n.replace('_', ' ')}." for n in NAMES]))
    assert learner.ctx.shape == (3, tiny.text_width) and len(learner.compound_prompts_text) == 3


def test_la_loss_is_used_for_training(root, tmp_path):
    cfg = cli.build_cfg(cli.parse_args(train_args(root, tmp_path / "la", "MaPLe", CONFIG, "TRAINER.LOSS", "la")))
    trainer = cli.build_trainer(cfg)
    assert_step_uses_la_loss(trainer)


def test_trains_on_base_and_tests_on_new(root, tmp_path):
    out = tmp_path / "train_base"
    res = run_train(root, out, "MaPLe", CONFIG, "OPTIM.MAX_EPOCH", "3", "OPTIM.LR", "0.05",
                    "DATALOADER.TRAIN_X.BATCH_SIZE", "8", "OPTIM.WARMUP_EPOCH", "0")
    assert res["trainer"] == "MaPLe" and res["config"] == "vit_b16_c2_ep5_batch4_2ctx"
    assert res["trainable_parameters"] == 9 * (2 * 64 + 64 * 64 + 64)  # tiny: widths 64
    assert len(res["epoch_losses"]) == 3 and res["epoch_losses"][-1] < res["epoch_losses"][0]
    assert_metrics(res["results"]["test"], 10, 200)
    ckpt = torch.load(out / "prompt_learner" / "model.pth.tar-2", weights_only=False)
    assert set(ckpt["state_dict"]) == ({"ctx", "proj.weight", "proj.bias"}
                                       | {f"compound_prompts_text.{i}" for i in range(8)}
                                       | {f"compound_prompt_projections.{i}.{k}" for i in range(8)
                                          for k in ("weight", "bias")})
    new = run_eval(root, tmp_path / "test_new", out, "MaPLe", CONFIG)
    assert new["subsample_classes"] == "new"
    assert_metrics(new["results"]["test"], 10, 200, with_head_tail=False)
