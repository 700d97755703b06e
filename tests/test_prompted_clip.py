import pytest
import torch

from engine.clip_loader import load_clip, resolve_weights_path
from engine.prompted_clip import (PromptedCLIP, TowerHooks, TowerState, append_tokens, insert_after_first, repeat_batch,
                                  replace_after_first)

PROMPTS = ["a photo of a dog.", "a photo of a red circle, a type of shape.", "x", "a centered satellite photo of forest."]


@pytest.fixture(scope="module")
def vitb16():
    return PromptedCLIP(load_clip("ViT-B/16-random"))


class DeepPrompts(TowerHooks):
    """Insert n random tokens before ``first`` and replace them before every later block."""

    def __init__(self, width, n=3, first=3, last=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.tokens = {l: torch.randn(1, n, width, generator=g) for l in range(first, last + 1)}
        self.start_layer = first
        self.first = first
        self.seen_eot = None

    def before_block(self, layer, x, state):
        if layer not in self.tokens:
            return x
        if layer == self.first:
            return insert_after_first(x, self.tokens[layer], state)
        self.seen_eot = state.eot
        return replace_after_first(x, self.tokens[layer])


@pytest.mark.parametrize("name", ["tiny", "vitb16"])
def test_no_hooks_equals_clip_package(name, request):
    enc = request.getfixturevalue(name)
    res = enc.clip.visual.input_resolution
    images = torch.randn(2, 3, res, res, generator=torch.Generator().manual_seed(1))
    tokens = enc.tokenize(PROMPTS)
    with torch.no_grad():
        ref_img = enc.clip.encode_image(images)
        ref_txt = enc.clip.encode_text(tokens)
        enc.clear_text_cache()
        out_img = enc.encode_image(images)
        out_txt = enc.encode_text(tokens)
    assert out_img.shape == ref_img.shape == (2, enc.embed_dim)
    assert torch.allclose(out_img, ref_img, atol=1e-5)
    assert torch.allclose(out_txt, ref_txt, atol=1e-5)


def test_widths_come_from_the_model(tiny, vitb16):
    assert (vitb16.vision_width, vitb16.text_width, vitb16.embed_dim) == (768, 512, 512)
    assert (tiny.vision_width, tiny.text_width, tiny.embed_dim) == (64, 64, 64)
    assert vitb16.n_text_layers == vitb16.n_vision_layers == 12


@pytest.mark.parametrize("name", ["tiny", "vitb16"])
def test_truncation_and_prefix_cache_are_exact_with_prompts(name, request):
    enc = request.getfixturevalue(name)
    tokens = enc.tokenize(PROMPTS)
    hooks = DeepPrompts(enc.text_width)
    with torch.no_grad():
        enc.truncate_text, enc.cache_text_prefix = False, False
        plain = enc.encode_text(tokens, hooks)
        enc.truncate_text, enc.cache_text_prefix = True, True
        enc.clear_text_cache()
        fast = enc.encode_text(tokens, hooks)
        assert len(enc._text_cache) == 1  # layers 1..2 cached once
        cached = enc.encode_text(tokens, hooks)
    assert torch.allclose(plain, fast, atol=1e-5)
    assert torch.allclose(plain, cached, atol=1e-5)


def test_prefix_cache_is_keyed_by_tokens(tiny):
    hooks = DeepPrompts(tiny.text_width)
    tiny.clear_text_cache()
    with torch.no_grad():
        a = tiny.encode_text(tiny.tokenize(PROMPTS[:2]), hooks)
        b = tiny.encode_text(tiny.tokenize(PROMPTS[2:]), hooks)
        tiny.cache_text_prefix = False
        b_ref = tiny.encode_text(tiny.tokenize(PROMPTS[2:]), hooks)
        tiny.cache_text_prefix = True
    assert len(tiny._text_cache) == 2
    assert torch.allclose(b, b_ref, atol=1e-6)
    assert not torch.allclose(a, b)


def test_eot_readout_shifts_by_inserted_tokens(tiny):
    tokens = tiny.tokenize(PROMPTS)
    hooks = DeepPrompts(tiny.text_width, n=5)
    _, state = tiny.encode_text(tokens, hooks, return_state=True)
    assert torch.equal(state.eot, tokens.argmax(-1) + 5)
    assert state.n_inserted == 5
    assert torch.equal(hooks.seen_eot, tokens.argmax(-1) + 5)


def test_inserted_prompts_change_the_text_features(tiny):
    tokens = tiny.tokenize(PROMPTS)
    with torch.no_grad():
        base = tiny.encode_text(tokens)
        prompted = tiny.encode_text(tokens, DeepPrompts(tiny.text_width))
    assert (base - prompted).abs().max() > 1e-3


def test_token_helpers():
    x = torch.arange(2 * 6 * 1, dtype=torch.float).view(2, 6, 1)
    state = TowerState("text", eot=torch.tensor([4, 2]))
    y = insert_after_first(x, torch.full((1, 2, 1), -1.0), state)
    assert y.shape == (2, 8, 1)
    assert y[0, :4, 0].tolist() == [0, -1, -1, 1]
    assert state.eot.tolist() == [6, 4] and state.n_inserted == 2
    z = replace_after_first(y, torch.full((2, 2, 1), -2.0))
    assert z[1, :4, 0].tolist() == [6, -2, -2, 7]
    w = append_tokens(x, torch.full((1, 3, 1), 9.0), state)
    assert w.shape == (2, 9, 1) and w[0, -3:, 0].tolist() == [9, 9, 9]
    state.eot = torch.tensor([4, 2])
    r = repeat_batch(x, state, 3)
    assert r.shape == (6, 6, 1) and torch.equal(r[2], x[0]) and state.eot.tolist() == [4, 2] * 3


def test_vision_hooks_see_cls_entering_each_block(tiny):
    class Recorder(TowerHooks):
        def __init__(self):
            self.cls = {}

        def before_block(self, layer, x, state):
            self.cls[layer] = x[:, 0].clone()
            return x

    images = torch.randn(2, 3, 32, 32)
    rec = Recorder()
    with torch.no_grad():
        out = tiny.encode_image(images, rec)
        ref = tiny.clip.encode_image(images)
    assert sorted(rec.cls) == list(range(1, 13))
    assert torch.allclose(out, ref, atol=1e-5)
    # block 1 input is ln_pre([cls; patches] + pos): its cls row is the same for every image
    assert torch.allclose(rec.cls[1][0], rec.cls[1][1])
    assert not torch.allclose(rec.cls[2][0], rec.cls[2][1])


def test_adapter_branch_is_added_to_block_output(tiny):
    class Adapter(TowerHooks):
        def __init__(self, scale):
            self.scale = scale

        def adapter(self, layer, x_ln1):
            return self.scale * x_ln1 if layer >= 5 else None

    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = tiny.encode_image(images)
        zero = tiny.encode_image(images, Adapter(0.0))
        some = tiny.encode_image(images, Adapter(0.5))
    assert torch.allclose(zero, ref, atol=1e-6)
    assert (some - ref).abs().max() > 1e-3


def test_missing_weights_name_every_path(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIP_WEIGHTS_DIR", str(tmp_path / "weights"))
    with pytest.raises(FileNotFoundError) as err:
        resolve_weights_path("ViT-B/16")
    msg = str(err.value)
    assert str(tmp_path / "weights" / "ViT-B-16.pt") in msg
    assert "CLIP_WEIGHTS_DIR" in msg and "MODEL.BACKBONE.PATH" in msg and "never downloads" in msg
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_clip("ViT-B/16", str(tmp_path / "nowhere.pt"))


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown CLIP backbone 'ViT-B/17'"):
        resolve_weights_path("ViT-B/17")


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_loads_an_openai_style_checkpoint_from_a_local_file(tmp_path, monkeypatch):
    """The real loading path (clip.load on a local file) rebuilds the architecture from the state dict."""
    source = load_clip("tiny")
    (tmp_path / "w").mkdir()
    torch.save(source.state_dict(), tmp_path / "w" / "ViT-B-16.pt")
    monkeypatch.setenv("CLIP_WEIGHTS_DIR", str(tmp_path / "w"))
    loaded = load_clip("ViT-B/16")
    assert all(not p.requires_grad for p in loaded.parameters())
    # clip.load stores the matrices in fp16 (as OpenAI checkpoints are) and returns float32 on the CPU
    for key, value in source.state_dict().items():
        got = loaded.state_dict()[key]
        assert torch.equal(got, value) or torch.equal(got, value.half().float()), key


def test_resnet_clip_runs_text_methods_and_refuses_vision_hooks():
    """RN50-style CLIP (ModifiedResNet image tower): the image side runs unhooked, the text side as usual."""
    from engine.compat import import_clip

    torch.manual_seed(0)
    model = import_clip().model.CLIP(embed_dim=32, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=32,
                                     vision_patch_size=None, context_length=77, vocab_size=49408,
                                     transformer_width=64, transformer_heads=1, transformer_layers=2).float().eval()
    enc = PromptedCLIP(model)
    assert not enc.is_vit and enc.vision_width is None
    images = torch.randn(2, 3, 64, 64)
    tokens = enc.tokenize(PROMPTS)
    with torch.no_grad():
        assert torch.allclose(enc.encode_image(images), model.encode_image(images), atol=1e-5)
        assert torch.allclose(enc.encode_text(tokens), model.encode_text(tokens), atol=1e-5)
        with pytest.raises(ValueError, match="need a ViT backbone"):
            enc.encode_image(images, TowerHooks())
