"""CoCoOp (Zhou et al., CVPR 2022; docs/methods/cocoop.md): context shifted per image by a meta-net on the
image feature.
All B x C prompts go through the text encoder as one batch (no per-image loop)."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from engine.config import register_config
from engine.config import Block, Blocks, Bool, Choice, Float, Int, PerDataset, PRECISIONS, Str, declare_keys  # noqa: F401
from engine.registry import TRAINER_REGISTRY, MethodInfo
from engine.trainer import TrainerX
from trainers.common import ContextHooks, build_context_prompts, cosine_logits, init_context


@register_config
def add_cocoop_config(cfg):
    cfg.TRAINER.COCOOP = CN()
    cfg.TRAINER.COCOOP.N_CTX = 16
    cfg.TRAINER.COCOOP.CTX_INIT = ""
    cfg.TRAINER.COCOOP.PREC = "fp16"
    cfg.TRAINER.COCOOP.META_NET_REDUCTION = 16  # hidden width = embed_dim // this (512 -> 32)
    cfg.TRAINER.COCOOP.MAX_TEXT_BATCH = 20000  # text sequences (images x classes) per text-encoder call
    declare_keys(cfg, "TRAINER.COCOOP", N_CTX=Int(1), CTX_INIT=Str(), PREC=Choice(*PRECISIONS),
                 META_NET_REDUCTION=Int(1), MAX_TEXT_BATCH=Int(1))


class CoCoOpPromptLearner(nn.Module):
    def __init__(self, encoder, classnames, n_ctx, ctx_init, reduction):
        super().__init__()
        vectors, placeholder = init_context(encoder, n_ctx, ctx_init, unit="words")  # official: words
        self.ctx = nn.Parameter(vectors)
        hidden = encoder.embed_dim // reduction
        self.meta_net = nn.Sequential(nn.Linear(encoder.embed_dim, hidden), nn.ReLU(inplace=True),
                                      nn.Linear(hidden, encoder.text_width))
        tokens, positions = build_context_prompts(encoder, classnames, placeholder, vectors.shape[0])
        self.register_buffer("tokens", tokens, persistent=False)
        self.hooks = ContextHooks(positions)
        self.hooks.per_image = True

    def text_features(self, encoder, image_features):
        """(B, C, D) classifiers, one set per image."""
        shift = self.meta_net(image_features)                     # (B, D_t)
        self.hooks.ctx = self.ctx.unsqueeze(0) + shift.unsqueeze(1)  # (B, n_ctx, D_t)
        feats = encoder.encode_text(self.tokens, self.hooks)     # (B*C, D)
        return feats.view(image_features.shape[0], self.tokens.shape[0], -1)


METHOD = MethodInfo(
    configs=dict.fromkeys(("b2n", "fewshot", "xd"), "vit_b16_c4_ep10_batch1_ctxv1"),
    run_neutral=("TRAINER.COCOOP.MAX_TEXT_BATCH",))


@TRAINER_REGISTRY.register("CoCoOp", info=METHOD)
class CoCoOp(TrainerX):
    def build_model(self):
        c = self.cfg.TRAINER.COCOOP
        self.prompt_learner = CoCoOpPromptLearner(self.clip, self.classnames, c.N_CTX, c.CTX_INIT,
                                                  c.META_NET_REDUCTION).to(self.device)
        self.register_model("prompt_learner", self.prompt_learner, *self.build_optim_sched(self.prompt_learner))

    def logits(self, images):
        with torch.no_grad():
            image_features = F.normalize(self.clip.encode_image(images), dim=-1)
        text_features = self.prompt_learner.text_features(self.clip, image_features)
        return cosine_logits(image_features, text_features, self.clip.logit_scale)

    def images_per_micro_batch(self, batch):
        """Bound the B*C text sequences per text-encoder call (training and test) by splitting the image
        batch: exact, images are independent (training accumulates the parts' gradients into one step)."""
        return max(1, min(batch, self.cfg.TRAINER.COCOOP.MAX_TEXT_BATCH // self.num_classes))

    def model_inference(self, images):
        return torch.cat([self.logits(chunk) for chunk in images.split(self.images_per_micro_batch(len(images)))])
