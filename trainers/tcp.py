"""TCP, Textual-based Class-aware Prompt tuning (Yao et al., CVPR 2024; methods.md §8).

CoOp-style shared context (n = 4 tokens, random N(0, 0.02^2)) in "[ctx] {class}<dataset suffix>", plus the
Textual Knowledge Embedding (TKE): the frozen, normalised zero-shot text features t_c^zs of the dataset
template (computed once per class set) go through Linear(embed_dim, embed_dim/4) -> QuickGELU ->
Linear(embed_dim/4, n * text_width) and are reshaped into class-aware tokens T_c (n, text_width). At the
input of text block INJECT_LAYER (1-indexed; 9 = the official 0-indexed block 8) the context positions
of class c's sequence become w * T_c + (1 - w) * x (w = INJECT_WEIGHT = 1: replaced). Vision is frozen.
Loss: CE (or LA) + KG_WEIGHT * (1 - mean_c cos(W_c, t_c^zs)). New classes: the TKE is applied to the new
classes' own zero-shot features, since every trainer instance builds them for its active class names.
"""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from engine.config import ConfigError, register_config
from engine.prompted_clip import write_tokens
from engine.registry import TRAINER_REGISTRY
from engine.trainer import TrainerX
from trainers.common import ContextHooks, build_context_prompts, cosine_logits, frozen_text_features, init_context


@register_config
def add_tcp_config(cfg):
    c = cfg.TRAINER.TCP = CN()
    c.N_CTX = 4  # shared context tokens (= class-aware tokens per class)
    c.CTX_INIT = ""  # "" = random N(0, 0.02^2) (released config); e.g. "a photo of a"
    c.CLASS_TOKEN_POSITION = "end"  # end | middle | front (CoOp); TCP uses end
    c.INJECT_LAYER = 9  # class-aware tokens enter at the input of this text block (1-indexed)
    c.INJECT_WEIGHT = 1.0  # w in x <- w * T_c + (1 - w) * x at the context positions
    c.TKE_REDUCTION = 4  # TKE hidden width = embed_dim // this (512 -> 128)
    c.KG_WEIGHT = 8.0  # weight of the text-consistency term 1 - mean_c cos(W_c, t_c^zs)
    c.PREC = "fp16"  # fp16/amp -> autocast on GPU; CPU always runs fp32


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def template_suffix(template):
    """What follows the class name in a hand-crafted template: "a photo of a {}, a type of pet." ->
    ", a type of pet."."""
    if "{}" not in template:
        raise ConfigError(f"dataset template '{template}' has no '{{}}' for the class name")
    return template.split("{}", 1)[1]


class TCPTextHooks(ContextHooks):
    """Shared context at the embedding stage (``ContextHooks``); class-aware tokens mixed into the
    context positions of every class sequence before block ``layer``."""

    def __init__(self, positions, layer, weight):
        super().__init__(positions)
        self.layer = layer
        self.weight = weight
        self.class_tokens = None  # (C, n, D_t)

    def before_block(self, layer, x, state):
        if layer != self.layer or self.class_tokens is None:
            return x
        # Class-aware tokens differ per class: the shared-prefix path leaves off here (write_tokens checks).
        return write_tokens(x, self.positions, self.class_tokens, state, weight=self.weight)


class TCPPromptLearner(nn.Module):
    """Trainable state: ``ctx`` (n, D_t) and the TKE ``meta_net`` (names as in the official code).
    Non-persistent: the prompt tokens and the zero-shot features of the class set."""

    def __init__(self, encoder, classnames, template, c):
        super().__init__()
        if not 1 <= c.INJECT_LAYER <= encoder.n_text_layers:
            raise ConfigError(f"TRAINER.TCP.INJECT_LAYER must be a text block in 1..{encoder.n_text_layers}, "
                              f"got {c.INJECT_LAYER}")
        if c.TKE_REDUCTION < 1 or encoder.embed_dim // c.TKE_REDUCTION < 1:
            raise ConfigError(f"TRAINER.TCP.TKE_REDUCTION must be in 1..{encoder.embed_dim}, got {c.TKE_REDUCTION}")
        vectors, placeholder = init_context(encoder, c.N_CTX, c.CTX_INIT)
        self.ctx = nn.Parameter(vectors)
        self.n_ctx = vectors.shape[0]
        self.text_width = encoder.text_width
        hidden = encoder.embed_dim // c.TKE_REDUCTION
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(encoder.embed_dim, hidden)),
            ("gelu", QuickGELU()),
            ("linear2", nn.Linear(hidden, self.n_ctx * encoder.text_width)),
        ]))
        tokens, positions = build_context_prompts(encoder, classnames, placeholder, self.n_ctx,
                                                  c.CLASS_TOKEN_POSITION, suffix=template_suffix(template))
        self.register_buffer("tokens", tokens, persistent=False)
        # t^zs: computed once for this class set (base names when training, new names for the new test).
        self.register_buffer("zs_features", frozen_text_features(encoder, template, classnames), persistent=False)
        self.hooks = TCPTextHooks(positions, c.INJECT_LAYER, float(c.INJECT_WEIGHT))

    def class_tokens(self):
        """TKE: (C, n, D_t) class-aware tokens from the zero-shot features."""
        return self.meta_net(self.zs_features).view(-1, self.n_ctx, self.text_width)

    def text_features(self, encoder):
        self.hooks.ctx = self.ctx
        self.hooks.class_tokens = self.class_tokens()
        return encoder.encode_text(self.tokens, self.hooks)


@TRAINER_REGISTRY.register("TCP")
class TCP(TrainerX):
    default_config = "vit_b16_ep50_ctx4.yaml"

    def build_model(self):
        c = self.cfg.TRAINER.TCP
        self.prompt_learner = TCPPromptLearner(self.clip, self.classnames, self.dataset.template, c).to(self.device)
        self.register_model("prompt_learner", self.prompt_learner, *self.build_optim_sched(self.prompt_learner))
        self.eval_text_features = None

    def logits(self, images):
        """(logits (B, C), text features W (C, D)); the image encoder is frozen and prompt-free."""
        with torch.no_grad():
            image_features = self.clip.encode_image(images)
        text_features = self.prompt_learner.text_features(self.clip)
        return cosine_logits(image_features, text_features, self.clip.logit_scale), text_features

    def forward_backward(self, batch):
        images, labels = self.parse_batch_train(batch)
        with self.autocast():
            logits, text_features = self.logits(images)
            ce = self.compute_loss(logits, labels)
            zs = self.prompt_learner.zs_features
            kg = 1.0 - F.cosine_similarity(text_features.float(), zs.float(), dim=-1).mean()
            loss = ce + self.cfg.TRAINER.TCP.KG_WEIGHT * kg
        self.model_backward_and_update(loss)
        return {"loss": loss.item(), "ce": ce.item(), "kg": kg.item(),
                "acc": (logits.argmax(1) == labels).float().mean().item() * 100}

    def before_test(self):
        # Static prompts (TKE of this class set included): one text pass for the whole test set.
        with torch.no_grad(), self.autocast():
            self.eval_text_features = self.prompt_learner.text_features(self.clip)

    def model_inference(self, images):
        return cosine_logits(self.clip.encode_image(images), self.eval_text_features, self.clip.logit_scale)
