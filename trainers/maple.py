"""MaPLe (Khattak et al., CVPR 2023; docs/methods/maple.md): multi-modal deep prompts with vision prompts coupled
to the text prompts by per-depth linear projections.

Text: "a photo of a {class}." whose positions 1..n (the first n words of CTX_INIT, "a photo") hold the
learnable context at the embedding stage; before blocks 2..J fresh text prompts P_t^j replace
positions 1..n (the text sequence never grows). Vision: P_v^j = F_j(P_t^j) with
F_j = Linear(text_width, vision_width), one per depth; P_v^1 is appended after the patch tokens at the
embedding stage (after the positional embedding, before ln_pre: 197 -> 199 tokens on ViT-B/16) and
P_v^j replaces the last n tokens before blocks 2..J. Blocks J+1.. keep processing the last prompts.
The prompts do not depend on the image, so text features and vision prompts are computed once per test.
"""
import copy

import torch
import torch.nn as nn
from yacs.config import CfgNode as CN

from engine.config import ConfigError, register_config
from engine.config import Block, Blocks, Bool, Choice, Float, Int, PerDataset, PRECISIONS, Str, declare_keys  # noqa: F401
from engine.prompted_clip import TowerHooks, append_tokens, replace_after_first, replace_last
from engine.registry import TRAINER_REGISTRY, MethodInfo
from engine.trainer import TrainerX
from trainers.common import ContextHooks, build_context_prompts, cosine_logits, init_context


@register_config
def add_maple_config(cfg):
    c = cfg.TRAINER.MAPLE = CN()
    c.N_CTX = 2  # prompt tokens per depth (text and vision)
    c.CTX_INIT = "a photo of a"  # prompt text; its first N_CTX word embeddings initialise the context ("" = random)
    c.PROMPT_DEPTH = 9  # J: prompts at the embedding stage and entering blocks 2..J (1 = shallow prompts only)
    c.PREC = "fp16"  # fp16/amp -> autocast on GPU; CPU always runs fp32
    declare_keys(cfg, "TRAINER.MAPLE", N_CTX=Int(1), CTX_INIT=Str(), PROMPT_DEPTH=Block("both"),
                 PREC=Choice(*PRECISIONS))


class MaPLeTextHooks(ContextHooks):
    """Context at positions 1..n at the embedding stage (``ContextHooks``), then the deep text prompt of
    each depth replacing positions 1..n before blocks 2..J."""

    def __init__(self, positions):
        super().__init__(positions)
        self.deep = {}  # block (1-indexed) -> (n, D_t)

    def before_block(self, layer, x, state):
        prompts = self.deep.get(layer)
        return x if prompts is None else replace_after_first(x, prompts.unsqueeze(0), state)


class MaPLeVisionHooks(TowerHooks):
    """P_v^1 appended after the patch tokens at the embedding stage; P_v^j replaces the last n tokens
    before block j = 2..J."""

    start_layer = 0

    def __init__(self):
        self.prompts = None  # [P_v^1, ..., P_v^J], each (n, D_v)

    def embed(self, x, state):
        return append_tokens(x, self.prompts[0].unsqueeze(0), state)

    def before_block(self, layer, x, state):
        if 2 <= layer <= len(self.prompts):
            return replace_last(x, self.prompts[layer - 1].unsqueeze(0))
        return x


class MaPLePromptLearner(nn.Module):
    """Trainable state: ctx (n, D_t), proj (depth 1), compound_prompts_text (J-1 x (n, D_t)) and
    compound_prompt_projections (J-1 Linear(D_t, D_v)), named as in the official code."""

    def __init__(self, encoder, classnames, n_ctx, ctx_init, depth):
        super().__init__()
        if not encoder.is_vit:
            raise ConfigError("MaPLe needs a ViT backbone (it prompts the image transformer)")
        max_depth = min(encoder.n_text_layers, encoder.n_vision_layers)
        if not 1 <= depth <= max_depth:
            raise ConfigError(f"TRAINER.MAPLE.PROMPT_DEPTH must be in 1..{max_depth} (number of blocks), got {depth}")
        if n_ctx < 1:
            raise ConfigError(f"TRAINER.MAPLE.N_CTX must be >= 1, got {n_ctx}")
        text_width, vision_width = encoder.text_width, encoder.vision_width
        vectors, placeholder = init_context(encoder, n_ctx, ctx_init)
        if ctx_init:
            if vectors.shape[0] < n_ctx:
                raise ConfigError(f"TRAINER.MAPLE.CTX_INIT '{ctx_init}' has {vectors.shape[0]} tokens, fewer than "
                                  f"N_CTX ({n_ctx}); lengthen it or set CTX_INIT \"\" for random context")
            vectors = vectors[:n_ctx]  # "a photo of a", n = 2 -> the embeddings of "a photo"
        self.n_ctx, self.depth = n_ctx, depth
        self.ctx = nn.Parameter(vectors.clone())
        self.proj = nn.Linear(text_width, vision_width)
        self.compound_prompts_text = nn.ParameterList(
            [nn.Parameter(torch.empty(n_ctx, text_width).normal_(0, 0.02)) for _ in range(depth - 1)])
        # As in the official code the deep projections are copies of one freshly initialised layer.
        single = nn.Linear(text_width, vision_width)
        self.compound_prompt_projections = nn.ModuleList([copy.deepcopy(single) for _ in range(depth - 1)])
        # "a photo of a {class}." with the context at positions 1..n (the words it replaces stay as tokens).
        tokens, positions = build_context_prompts(encoder, classnames, placeholder, n_ctx)
        self.register_buffer("tokens", tokens, persistent=False)
        self.text_hooks = MaPLeTextHooks(positions)
        self.vision_hooks = MaPLeVisionHooks()

    def text_prompts(self):
        """[P_t^1 (= ctx), ..., P_t^J], each (n, D_t)."""
        return [self.ctx] + list(self.compound_prompts_text)

    def visual_prompts(self):
        """[F_1(P_t^1), ..., F_J(P_t^J)], each (n, D_v)."""
        return [self.proj(self.ctx)] + [f(p) for f, p in zip(self.compound_prompt_projections,
                                                             self.compound_prompts_text)]

    def set_prompts(self):
        """Load the current prompts into both hook objects (call once per forward)."""
        self.text_hooks.ctx = self.ctx
        self.text_hooks.deep = {layer: p for layer, p in enumerate(self.compound_prompts_text, start=2)}
        self.vision_hooks.prompts = self.visual_prompts()

    def text_features(self, encoder):
        return encoder.encode_text(self.tokens, self.text_hooks)

    def image_features(self, encoder, images):
        return encoder.encode_image(images, self.vision_hooks)


METHOD = MethodInfo(
    configs={"b2n": "vit_b16_c2_ep5_batch4_2ctx", "fewshot": "vit_b16_c2_ep5_batch4_2ctx",
             "xd": "vit_b16_c2_ep2_batch4_2ctx_cross_datasets"})


@TRAINER_REGISTRY.register("MaPLe", info=METHOD)
class MaPLe(TrainerX):
    def build_model(self):
        c = self.cfg.TRAINER.MAPLE
        self.prompt_learner = MaPLePromptLearner(self.clip, self.classnames, c.N_CTX, c.CTX_INIT,
                                                 c.PROMPT_DEPTH).to(self.device)
        self.register_model("prompt_learner", self.prompt_learner, *self.build_optim_sched(self.prompt_learner))
        self.eval_text_features = None

    def logits(self, images):
        pl = self.prompt_learner
        pl.set_prompts()
        return cosine_logits(pl.image_features(self.clip, images), pl.text_features(self.clip), self.clip.logit_scale)

    def before_test(self):
        # Prompts are static at test time: vision prompts and text features once for the whole test set.
        with torch.no_grad(), self.autocast():
            self.prompt_learner.set_prompts()
            self.eval_text_features = self.prompt_learner.text_features(self.clip)

    def model_inference(self, images):
        image_features = self.prompt_learner.image_features(self.clip, images)
        return cosine_logits(image_features, self.eval_text_features, self.clip.logit_scale)
