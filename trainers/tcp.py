"""TCP, Textual-based Class-aware Prompt tuning (Yao et al., CVPR 2024; docs/methods/tcp.md).

CoOp-style shared context (n = 4 tokens, random N(0, 0.02^2)) in "[ctx] {class}<dataset suffix>", plus the
Textual Knowledge Embedding (TKE): the frozen, normalised zero-shot text features t_c^zs of the dataset
template (computed once per class set) go through Linear(embed_dim, embed_dim/4) -> QuickGELU ->
Linear(embed_dim/4, n * text_width) and are reshaped into class-aware tokens T_c (n, text_width). At the
input of text block INJECT_LAYER (1-indexed; 9 = the official 0-indexed block 8) the context positions
of class c's sequence become w * T_c + (1 - w) * x (w = INJECT_WEIGHT = 1: replaced). Vision is frozen.
Loss: CE (or LA) + KG_WEIGHT * (1 - mean_c cos(W_c, t_c^zs)). New classes: the TKE is applied to the new
classes' own zero-shot features, since every trainer instance builds them for its active class names.

Texts, as in the official ``trainers/tcp.py``: the zero-shot features t^zs come from TCP's own per-dataset
table ``ZS_TEMPLATES`` (its ``CUSTOM_TEMPLATES_ori``) and the prompt from ``PROMPT_TEMPLATES`` (its
``CUSTOM_TEMPLATES``), whose first four words are the slot of the four context tokens. Both differ from the
CoOp templates of the datasets for StanfordCars, UCF101, FGVCAircraft, DTD and Food101 (e.g. the car prompt
"X X X X {}, a type of car" has no final period, UCF101 keeps "person doing {}." after the context). A
dataset outside the table (e.g. SyntheticShapes) uses its own template for both.

Official-config keys: TCP's code reads TRAINER.COOP.*; with ``--trainer TCP`` those keys are read as
TRAINER.TCP.* (a notice says so). ``TRAINER.COOP.W`` becomes KG_WEIGHT: the official code ignores W (the
injection weight is hard-coded 1.0 and the text-consistency weight 8.0), but its scripts pass W = 8.0 and
name their folders by it, so W is the knob its authors meant for the consistency weight.

Optimizer: Adam with eps 1e-8, as the official Dassl optimizer. Its README's eps 1e-3 is a workaround for
weights that are really fp16; here trainable weights are always fp32 (PREC fp16 means autocast), so the
workaround is never needed.
"""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from engine.config import ConfigError, register_config, register_config_alias
from engine.config import Block, Blocks, Bool, Choice, Float, Int, PerDataset, PRECISIONS, Str, declare_keys  # noqa: F401
from engine.prompted_clip import write_tokens
from engine.registry import TRAINER_REGISTRY, MethodInfo
from engine.trainer import TrainerX
from trainers.common import ContextHooks, build_context_prompts, cosine_logits, frozen_text_features, init_context


# Official TCP configs and scripts set TCP's knobs under TRAINER.COOP (see the module docstring).
register_config_alias({"TRAINER.COOP.N_CTX": "TRAINER.TCP.N_CTX", "TRAINER.COOP.CTX_INIT": "TRAINER.TCP.CTX_INIT",
                       "TRAINER.COOP.CLASS_TOKEN_POSITION": "TRAINER.TCP.CLASS_TOKEN_POSITION",
                       "TRAINER.COOP.PREC": "TRAINER.TCP.PREC", "TRAINER.COOP.W": "TRAINER.TCP.KG_WEIGHT"},
                      trainer="TCP")

# Official trainers/tcp.py: CUSTOM_TEMPLATES_ori (zero-shot text of the TKE and of the consistency loss) ...
ZS_TEMPLATES = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of an aircraft {}.",
    "DescribableTextures": "a photo of a {}, a type of texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of a {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
}
# ... and CUSTOM_TEMPLATES (the prompt; its first four words are where the context tokens go).
PROMPT_TEMPLATES = {
    "OxfordPets": "X X X X {}, a type of pet.",
    "OxfordFlowers": "X X X X {}, a type of flower.",
    "FGVCAircraft": "X X X X {}, a type of aircraft.",
    "DescribableTextures": "X X X X {} texture.",
    "EuroSAT": "X X X X {}.",
    "StanfordCars": "X X X X {}, a type of car",
    "Food101": "X X X X {}, a type of food.",
    "SUN397": "X X X X {}.",
    "Caltech101": "X X X X {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
}
CTX_SLOT_WORDS = 4  # words of a PROMPT_TEMPLATES entry that the context replaces


def tcp_templates(dataset_name, dataset_template):
    """(zero-shot template, what follows the context in the prompt) for a dataset: TCP's tables, or the
    dataset's own template ("a photo of a {}." -> "{}.") for a dataset outside them."""
    if dataset_name in PROMPT_TEMPLATES:
        rest = PROMPT_TEMPLATES[dataset_name].split(" ", CTX_SLOT_WORDS)[CTX_SLOT_WORDS]
        return ZS_TEMPLATES[dataset_name], rest
    return dataset_template, "{}" + template_suffix(dataset_template)


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
    declare_keys(cfg, "TRAINER.TCP", N_CTX=Int(1), CTX_INIT=Str(), CLASS_TOKEN_POSITION=Choice("end", "middle", "front"),
                 INJECT_LAYER=Block("text"), INJECT_WEIGHT=Float(0, 1), TKE_REDUCTION=Int(1), KG_WEIGHT=Float(0),
                 PREC=Choice(*PRECISIONS))


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

    def __init__(self, encoder, classnames, template, c, dataset_name=""):
        super().__init__()
        zs_template, rest = tcp_templates(dataset_name, template)
        if not 1 <= c.INJECT_LAYER <= encoder.n_text_layers:
            raise ConfigError(f"TRAINER.TCP.INJECT_LAYER must be a text block in 1..{encoder.n_text_layers}, "
                              f"got {c.INJECT_LAYER}")
        if c.TKE_REDUCTION < 1 or encoder.embed_dim // c.TKE_REDUCTION < 1:
            raise ConfigError(f"TRAINER.TCP.TKE_REDUCTION must be in 1..{encoder.embed_dim}, got {c.TKE_REDUCTION}")
        vectors, placeholder = init_context(encoder, c.N_CTX, c.CTX_INIT, unit="words")
        self.ctx = nn.Parameter(vectors)
        self.n_ctx = vectors.shape[0]
        self.text_width = encoder.text_width
        hidden = encoder.embed_dim // c.TKE_REDUCTION
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(encoder.embed_dim, hidden)),
            ("gelu", QuickGELU()),
            ("linear2", nn.Linear(hidden, self.n_ctx * encoder.text_width)),
        ]))
        if c.CLASS_TOKEN_POSITION == "end":  # "[ctx] <rest with the class name>", as the official prompts
            tokens = encoder.tokenize([f"{placeholder} {rest.format(n.replace('_', ' '))}" for n in classnames])
            positions = torch.arange(1, 1 + self.n_ctx).unsqueeze(0).repeat(len(classnames), 1)
        else:  # CoOp's middle / front placement (not in the official TCP code), with the text after "{}"
            tokens, positions = build_context_prompts(encoder, classnames, placeholder, self.n_ctx,
                                                      c.CLASS_TOKEN_POSITION, suffix=template_suffix(rest))
        self.register_buffer("tokens", tokens, persistent=False)
        # t^zs: computed once for this class set (base names when training, new names for the new test).
        self.register_buffer("zs_features", frozen_text_features(encoder, zs_template, classnames),
                             persistent=False)
        self.hooks = TCPTextHooks(positions, c.INJECT_LAYER, float(c.INJECT_WEIGHT))

    def class_tokens(self):
        """TKE: (C, n, D_t) class-aware tokens from the zero-shot features."""
        return self.meta_net(self.zs_features).view(-1, self.n_ctx, self.text_width)

    def text_features(self, encoder):
        self.hooks.ctx = self.ctx
        self.hooks.class_tokens = self.class_tokens()
        return encoder.encode_text(self.tokens, self.hooks)


METHOD = MethodInfo(configs=dict.fromkeys(("b2n", "fewshot", "xd"), "vit_b16_ep50_ctx4"))


@TRAINER_REGISTRY.register("TCP", info=METHOD)
class TCP(TrainerX):
    def build_model(self):
        c = self.cfg.TRAINER.TCP
        self.prompt_learner = TCPPromptLearner(self.clip, self.classnames, self.dataset.template, c,
                                               dataset_name=self.cfg.DATASET.NAME).to(self.device)
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
