"""Shared-prefix text attention (engine/prompted_clip.py): the same logits and gradients as the plain path.

Every method that prompts right after BOT gets it; TCP's class-aware tokens make its prefix class-dependent,
so the encoder must leave the shared path there (and stay exact)."""
import pytest
import torch

from tests import cli
from engine.prompted_clip import SharedPrefixText, TowerState, write_tokens
from tests.helpers_run import train_args
from trainers.cocoop import CoCoOpPromptLearner
from trainers.common import cosine_logits
from trainers.coop import CoOpPromptLearner
from trainers.maple import MaPLePromptLearner

# single-token, multi-token, a long name, and two names that share their first word
NAMES = ["dog", "red striped circle", "a very long class name with many words in it", "cat", "dog house"]
SAME_START = ["red circle", "red square", "red star"]  # the shared prefix runs into the class names
REL_TOL = 1e-5  # fp32: the largest difference relative to the largest magnitude of the plain result


def images(n=4, res=32, seed=0):
    return torch.randn(n, 3, res, res, generator=torch.Generator().manual_seed(seed))


def run_both(enc, params, fn):
    """fn() -> logits, on the plain path and the shared-prefix path: logits and every parameter's gradient."""
    out = {}
    for shared in (False, True):
        enc.shared_text_prefix = shared
        enc.clear_text_cache()
        for p in params:
            p.grad = None
        logits = fn()
        weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
        (logits * weights).sum().backward()
        out[shared] = (logits.detach(), [p.grad.clone() for p in params])
    enc.shared_text_prefix = True
    return out[False], out[True]


def close(a, b):
    return float((a - b).abs().max()) <= REL_TOL * max(1.0, float(a.abs().max()))


def assert_same(plain, shared):
    assert close(plain[0], shared[0]), (plain[0] - shared[0]).abs().max()
    for g_plain, g_shared in zip(plain[1], shared[1]):
        assert close(g_plain, g_shared), ((g_plain - g_shared).abs().max(), g_plain.abs().max())
    assert any(g.abs().sum() > 0 for g in shared[1])


@pytest.mark.parametrize("names", [NAMES, SAME_START])
def test_coop_exact(tiny, names):
    learner = CoOpPromptLearner(tiny, names, 4, "a photo of a", False, "end")
    feats = tiny.encode_image(images()).detach()
    plain, shared = run_both(tiny, list(learner.parameters()),
                             lambda: cosine_logits(feats, learner.text_features(tiny), tiny.logit_scale))
    assert_same(plain, shared)


@pytest.mark.parametrize("names", [NAMES, SAME_START])
def test_cocoop_exact(tiny, names):
    learner = CoCoOpPromptLearner(tiny, names, 4, "a photo of a", 16)
    feats = torch.nn.functional.normalize(tiny.encode_image(images()).detach(), dim=-1)
    plain, shared = run_both(tiny, list(learner.parameters()),
                             lambda: cosine_logits(feats, learner.text_features(tiny, feats), tiny.logit_scale))
    assert_same(plain, shared)


def test_maple_exact(tiny):
    learner = MaPLePromptLearner(tiny, NAMES, 2, "a photo of a", 9)

    def logits():
        learner.set_prompts()
        return cosine_logits(learner.image_features(tiny, images()), learner.text_features(tiny), tiny.logit_scale)

    plain, shared = run_both(tiny, list(learner.parameters()), logits)
    assert_same(plain, shared)


@pytest.mark.parametrize("config, n_p", [("vit_b16_lt_b2n.yaml", 14), ("vit_b16_fewshot.yaml", 28)])
@pytest.mark.parametrize("chunk", [100000, 4 * 2])  # one call, or 2 classes per call (5 classes: 2 + 2 + 1)
def test_lamp_exact(root, tmp_path, config, n_p, chunk):
    args = train_args(root, tmp_path / "run", "LAMP", config, "TRAINER.LAMP.TEXT_CHUNK", str(chunk),
                      "DATALOADER.TRAIN_X.BATCH_SIZE", "4")
    t = cli.build_trainer(cli.build_cfg(cli.parse_args(args)))
    tokens = t.clip.tokenize([f"a photo of a {n}." for n in NAMES])
    batch = images()
    with torch.no_grad():
        t.encode_images(batch)
        _, state = t.clip.encode_text(tokens, t.lamp.text_hooks, return_state=True)
    assert torch.equal(state.eot, tokens.argmax(-1).repeat(4) + n_p)

    def logits():
        out, sim = t.logits(batch, tokens)
        return out + sim
    plain, shared = run_both(t.clip, [p for p in t.lamp.parameters() if p.requires_grad], logits)
    assert_same(plain, shared)


def test_tcp_class_aware_tokens_take_the_plain_path_and_stay_exact(root, tmp_path):
    args = train_args(root, tmp_path / "run", "TCP", "vit_b16_ep50_ctx4.yaml")
    t = cli.build_trainer(cli.build_cfg(cli.parse_args(args)))
    plain, shared = run_both(t.clip, list(t.prompt_learner.parameters()), lambda: t.logits(images())[0])
    assert_same(plain, shared)


def test_write_tokens_leaves_the_shared_path_only_for_class_dependent_tokens():
    prefix, suffix = torch.randn(1, 6, 8), torch.randn(3, 4, 8)
    x = SharedPrefixText(prefix, suffix, n_classes=3)
    positions = torch.tensor([[1, 2]] * 3)
    state = TowerState("text", eot=torch.tensor([7, 8, 9]))
    same = write_tokens(x, positions, torch.ones(1, 2, 8), state)
    assert isinstance(same, SharedPrefixText) and torch.equal(same.prefix[0, 1:3], torch.ones(2, 8))
    per_class = torch.arange(3.0).view(3, 1, 1).expand(3, 2, 8)
    plain = write_tokens(x, positions, per_class, state)
    assert isinstance(plain, torch.Tensor) and plain.shape == (3, 10, 8)
    assert torch.equal(plain[:, 1:3], per_class) and torch.equal(plain[:, 6:], suffix)
    identical = write_tokens(x, positions, torch.ones(3, 2, 8), state)  # per class but all equal: shared
    assert isinstance(identical, SharedPrefixText)


def test_shared_path_computes_the_prefix_once_per_image(tiny):
    """CoCoOp: the text blocks see one prefix row per image and only class positions per sequence."""
    learner = CoCoOpPromptLearner(tiny, NAMES, 4, "a photo of a", 16)
    seen = []
    block = tiny.clip.transformer.resblocks[5]
    handle = block.ln_1.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    try:
        with torch.no_grad():
            learner.text_features(tiny, torch.randn(4, tiny.embed_dim))
    finally:
        handle.remove()
    tokens = learner.tokens[:, : int(learner.tokens.argmax(-1).max()) + 1]
    plen = 1 + 4 + 0  # BOT, the 4 context tokens; the names differ from their first token on
    assert seen == [(4, plen, tiny.text_width), (4 * len(NAMES), tokens.shape[1] - plen, tiny.text_width)]
