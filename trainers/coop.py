"""CoOp (Zhou et al., IJCV 2022; docs/methods/coop.md): learnable context vectors shared by all classes
(or class-specific).

As in the official code: with CTX_INIT the context is that phrase's embeddings and its length is counted
in words (N_CTX is then ignored). The official code also ignores CSC when CTX_INIT is given (it builds one
shared context); rather than silently dropping CSC, CSC True with an init phrase is an error here.
"""
import torch
import torch.nn as nn
from yacs.config import CfgNode as CN

from engine.config import ConfigError, register_config
from engine.config import Block, Blocks, Bool, Choice, Float, Int, PerDataset, PRECISIONS, Str, declare_keys  # noqa: F401
from engine.registry import TRAINER_REGISTRY, MethodInfo
from engine.trainer import TrainerX
from trainers.common import ContextHooks, build_context_prompts, cosine_logits, init_context


@register_config
def add_coop_config(cfg):
    cfg.TRAINER.COOP = CN()
    cfg.TRAINER.COOP.N_CTX = 16  # context length (ignored when CTX_INIT is given)
    cfg.TRAINER.COOP.CSC = False  # class-specific context
    cfg.TRAINER.COOP.CTX_INIT = ""  # e.g. "a photo of a"
    cfg.TRAINER.COOP.PREC = "fp16"  # fp16/amp -> autocast on GPU; CPU always runs fp32
    cfg.TRAINER.COOP.CLASS_TOKEN_POSITION = "end"  # end | middle | front
    declare_keys(cfg, "TRAINER.COOP", N_CTX=Int(1), CSC=Bool(), CTX_INIT=Str(), PREC=Choice(*PRECISIONS),
                 CLASS_TOKEN_POSITION=Choice("end", "middle", "front"))


class CoOpPromptLearner(nn.Module):
    def __init__(self, encoder, classnames, n_ctx, ctx_init, csc, position):
        super().__init__()
        if csc and ctx_init:
            raise ConfigError(f"TRAINER.COOP.CSC True with TRAINER.COOP.CTX_INIT {ctx_init!r}: the official CoOp ignores "
                              "CSC when an init phrase is given (one shared context); set CTX_INIT \"\" for "
                              "class-specific context or CSC False for the shared one")
        vectors, placeholder = init_context(encoder, n_ctx, ctx_init, class_count=len(classnames) if csc else None,
                                            unit="words")
        self.ctx = nn.Parameter(vectors)
        tokens, positions = build_context_prompts(encoder, classnames, placeholder, vectors.shape[-2], position)
        self.register_buffer("tokens", tokens, persistent=False)
        self.hooks = ContextHooks(positions)

    def text_features(self, encoder):
        self.hooks.ctx = self.ctx
        return encoder.encode_text(self.tokens, self.hooks)


METHOD = MethodInfo(configs=dict.fromkeys(("b2n", "fewshot", "xd"), "vit_b16_ep50_ctxv1"))


@TRAINER_REGISTRY.register("CoOp", info=METHOD)
class CoOp(TrainerX):
    def build_model(self):
        c = self.cfg.TRAINER.COOP
        self.prompt_learner = CoOpPromptLearner(self.clip, self.classnames, c.N_CTX, c.CTX_INIT, c.CSC,
                                                c.CLASS_TOKEN_POSITION).to(self.device)
        self.register_model("prompt_learner", self.prompt_learner, *self.build_optim_sched(self.prompt_learner))
        self.eval_text_features = None

    def logits(self, images):
        with torch.no_grad():
            image_features = self.clip.encode_image(images)
        return cosine_logits(image_features, self.prompt_learner.text_features(self.clip), self.clip.logit_scale)

    def before_test(self):
        # The prompts are static at test time: one text pass for the whole test set.
        with self.autocast():
            self.eval_text_features = self.prompt_learner.text_features(self.clip)

    def model_inference(self, images):
        return cosine_logits(self.clip.encode_image(images), self.eval_text_features, self.clip.logit_scale)
