"""Pieces shared by several methods: prompt texts, cosine logits, learnable-context placement."""
import torch
import torch.nn.functional as F

from engine.config import ConfigError
from engine.prompted_clip import TowerHooks, repeat_batch, write_tokens


def template_prompts(template, classnames):
    return [template.format(name.replace("_", " ")) for name in classnames]


def cosine_logits(image_features, text_features, scale):
    """scale * cos(f, w). text_features (C, D) -> (B, C); (B, C, D) -> per-image classifiers."""
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    if text_features.dim() == 2:
        return scale * image_features @ text_features.t()
    return scale * torch.einsum("bd,bcd->bc", image_features, text_features)


@torch.no_grad()
def frozen_text_features(encoder, template, classnames, normalize=True):
    """Zero-shot classifier weights (C, D) from a hand-crafted template (text prefix cache applies)."""
    tokens = encoder.tokenize(template_prompts(template, classnames)).to(next(encoder.parameters()).device)
    feats = encoder.encode_text(tokens)
    return F.normalize(feats, dim=-1) if normalize else feats


@torch.no_grad()
def init_context(encoder, n_ctx, ctx_init, std=0.02, class_count=None):
    """Context vectors (n_ctx, D) (or (C, n_ctx, D) class-specific) and the text that stands in for them.
    With ``ctx_init`` ("a photo of a"), vectors are that text's word embeddings and n_ctx its length."""
    device = next(encoder.parameters()).device
    width = encoder.text_width
    if ctx_init:
        ctx_init = ctx_init.replace("_", " ")
        tokens = encoder.tokenize([ctx_init]).to(device)
        n_words = int(tokens.argmax(dim=-1)) - 1
        vectors = encoder.token_embedding(tokens)[0, 1: 1 + n_words].float()
        if class_count:
            vectors = vectors.unsqueeze(0).repeat(class_count, 1, 1)
        return vectors.clone(), ctx_init
    shape = (class_count, n_ctx, width) if class_count else (n_ctx, width)
    vectors = torch.empty(shape, device=device).normal_(0, std)
    return vectors, " ".join(["X"] * n_ctx)


def build_context_prompts(encoder, classnames, placeholder, n_ctx, position="end", suffix="."):
    """Token ids of "[placeholder] name." (placeholder where the context goes) and the (C, n_ctx)
    positions that the learnable context occupies in each sequence (CoOp's class-token positions)."""
    names = [n.replace("_", " ") for n in classnames]
    name_lens = [int(t.argmax()) - 1 for t in encoder.tokenize(names)]
    words = placeholder.split(" ")
    half = n_ctx // 2
    texts, positions = [], []
    for name, n_len in zip(names, name_lens):
        if position == "end":
            texts.append(f"{placeholder} {name}{suffix}")
            positions.append(list(range(1, 1 + n_ctx)))
        elif position == "middle":
            texts.append(" ".join(words[:half] + [name] + words[half:]) + suffix)
            positions.append(list(range(1, 1 + half)) + list(range(1 + half + n_len, 1 + n_ctx + n_len)))
        elif position == "front":
            texts.append(f"{name} {placeholder}{suffix}")
            positions.append(list(range(1 + n_len, 1 + n_len + n_ctx)))
        else:
            raise ConfigError(f"CLASS_TOKEN_POSITION must be end, middle or front, got '{position}'")
    return encoder.tokenize(texts), torch.tensor(positions, dtype=torch.long)


class ContextHooks(TowerHooks):
    """Text hooks that write learnable context vectors into given token positions at the embedding stage.

    ``ctx``: (n, D) shared, (C, n, D) class-specific or, set per call, (B, n, D) per image; in the last
    case the C class sequences are repeated for every image (B*C sequences, image-major)."""

    start_layer = 0

    def __init__(self, positions):
        self.positions = positions  # (C, n)
        self.ctx = None
        self.per_image = False

    def embed(self, x, state):
        ctx = self.ctx
        if self.per_image:
            x = repeat_batch(x, state, ctx.shape[0])          # one context per image (group)
        elif ctx.dim() == 2:
            ctx = ctx.unsqueeze(0)                              # shared by every class
        return write_tokens(x, self.positions, ctx, state)
