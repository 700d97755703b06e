"""MMLoP (Ghiasvand et al., ECCV 2026; docs/methods/mmlop.md): IVLP-style deep prompts in both encoders whose
prompts are rank-r products sharing the token-side factor, tied to frozen zero-shot anchors.

Per prompted layer j = 1..J: P_j^t = U_j V_j^t (n x D_t), P_j^v = U_j V_j^v (n x D_v), U_j (n x r) shared by
the two modalities. Placement as in IVLP/MaPLe (the MaPLe hooks are reused): text "X X {class}." with
positions 1..n replaced at the embedding stage and before blocks 2..J; vision prompts appended after the
patches at the embedding stage and replacing the last n tokens before blocks 2..J. Unlike MaPLe there is
no coupling: each modality has its own V.

Anchors (frozen): zero-shot image features and text features averaged over the 60 CLIP ImageNet templates.
Loss (PromptSRC's form; docs/methods/mmlop.md): CE (or LA) + TEXT_LOSS_WEIGHT * L1(w_hat, w_zs)
+ IMAGE_LOSS_WEIGHT * L1(f, f_zs) + LOGIT_LOSS_WEIGHT * KL(p_zs || p) summed / numel (F.kl_div with
log-targets, as PromptSRC computes it). Drift correction: w_hat_c = normalize(w_c - mean_c'(w_c' - w_zs_c'))
over the class set being scored.

Switches (the paper's ablation chain, Table 4): LOW_RANK off = IVLP (free n x D prompts); ANCHORS;
DRIFT_CORRECTION train_test | test | off; SHARED_U (off: U^t and U^v); U_PER_LAYER (off: one U for all
layers); RANK; PROMPT_DEPTH. Every inferred choice (docs/methods/mmlop.md) is the default here: n = 2,
U per layer, U ~ N(0, 1), V ~ N(0, 0.02^2), text placeholder "X X", drift correction also in training,
PromptSRC's distances and weights for the anchor losses (a literal reading writes the logit term as
KL(p || p_zs); PromptSRC's F.kl_div(log p, log p_zs) is KL(p_zs || p), which is what runs here), and no
PromptSRC Gaussian prompt aggregation. The IVLP row (LOW_RANK False) keeps depth J and the "X X" layout
unless CTX_INIT is given; official IVLP uses depth 12 and "a photo of a" (set PROMPT_DEPTH / CTX_INIT).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from engine.config import ConfigError, register_config
from engine.config import Block, Blocks, Bool, Choice, Float, Int, PerDataset, PRECISIONS, Str, declare_keys  # noqa: F401
from engine.registry import TRAINER_REGISTRY, MethodInfo
from engine.trainer import TrainerX
from trainers.common import build_context_prompts, cosine_logits, init_context, template_prompts
from trainers.maple import MaPLeTextHooks, MaPLeVisionHooks

# The 60 ImageNet templates of CLIP's prompt-engineering notebook as PromptSRC uses them
# (muzairkhattak/PromptSRC:trainers/imagenet_templates.py, IMAGENET_TEMPLATES).
IMAGENET_TEMPLATES_60 = [
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.",
    "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.",
    "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.",
    "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.",
    "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.",
]
DRIFT_MODES = ("train_test", "test", "off")


@register_config
def add_mmlop_config(cfg):
    c = cfg.TRAINER.MMLOP = CN()
    c.N_CTX = 2               # n prompt tokens per modality and layer [inferred: IVLP 2+2]
    c.RANK = 1                # r
    c.PROMPT_DEPTH = 9        # J: embedding stage + blocks 2..J (9 for B2N, 3 for cross-dataset / DG)
    c.LOW_RANK = True         # off: free n x D prompts per layer and modality (IVLP)
    c.SHARED_U = True         # one U_j for both modalities (off: U_j^t and U_j^v)
    c.U_PER_LAYER = True      # off: a single U for all layers [alternative to the inferred default]
    c.U_INIT_STD = 1.0        # U ~ N(0, std^2) [inferred]
    c.V_INIT_STD = 0.02       # V (and the free IVLP prompts) ~ N(0, std^2) [inferred]
    c.CTX_INIT = ""           # "" -> "X X {class}."; words (IVLP only, LOW_RANK off) initialise P_1^t
    c.ANCHORS = True          # zero-shot anchors and the three consistency losses
    c.TEXT_LOSS_WEIGHT = 25.0   # PromptSRC's weights [inferred]
    c.IMAGE_LOSS_WEIGHT = 10.0
    c.LOGIT_LOSS_WEIGHT = 1.0
    c.DRIFT_CORRECTION = "train_test"  # train_test | test (test only) | off
    c.PREC = "fp16"
    declare_keys(cfg, "TRAINER.MMLOP", N_CTX=Int(1), RANK=Int(1), PROMPT_DEPTH=Block("both"), LOW_RANK=Bool(),
                 SHARED_U=Bool(), U_PER_LAYER=Bool(), U_INIT_STD=Float(0),
                 V_INIT_STD=Float(0), CTX_INIT=Str(), ANCHORS=Bool(), TEXT_LOSS_WEIGHT=Float(0),
                 IMAGE_LOSS_WEIGHT=Float(0), LOGIT_LOSS_WEIGHT=Float(0), DRIFT_CORRECTION=Choice(*DRIFT_MODES),
                 PREC=Choice(*PRECISIONS),
                 relations=[lambda c, cfg: None if not (c.LOW_RANK and c.CTX_INIT) else
                            "CTX_INIT needs LOW_RANK False: a rank-r product cannot start from word embeddings"])


class MMLoPPrompts(nn.Module):
    """The prompt factors and the hooks that place P_j^t / P_j^v (j = 1..J)."""

    def __init__(self, encoder, classnames, c):
        super().__init__()
        if not encoder.is_vit:
            raise ConfigError("MMLoP needs a ViT backbone (it prompts the image transformer)")
        max_depth = min(encoder.n_text_layers, encoder.n_vision_layers)
        if not 1 <= c.PROMPT_DEPTH <= max_depth:
            raise ConfigError(f"TRAINER.MMLOP.PROMPT_DEPTH must be in 1..{max_depth}, got {c.PROMPT_DEPTH}")
        if c.N_CTX < 1 or c.RANK < 1:
            raise ConfigError(f"TRAINER.MMLOP.N_CTX and RANK must be >= 1, got {c.N_CTX} and {c.RANK}")
        if c.LOW_RANK and c.CTX_INIT:
            raise ConfigError("TRAINER.MMLOP.CTX_INIT needs LOW_RANK False: a rank-r product cannot start "
                              "from word embeddings")
        n, r, depth = c.N_CTX, c.RANK, c.PROMPT_DEPTH
        dt, dv = encoder.text_width, encoder.vision_width
        self.depth, self.low_rank = depth, c.LOW_RANK
        vectors, placeholder = init_context(encoder, n, c.CTX_INIT)
        if c.LOW_RANK:
            n_u = depth if c.U_PER_LAYER else 1
            self.u = nn.Parameter(torch.randn(n_u, n, r) * c.U_INIT_STD)
            self.u_vision = None if c.SHARED_U else nn.Parameter(torch.randn(n_u, n, r) * c.U_INIT_STD)
            self.v_text = nn.Parameter(torch.randn(depth, r, dt) * c.V_INIT_STD)
            self.v_vision = nn.Parameter(torch.randn(depth, r, dv) * c.V_INIT_STD)
        else:
            p_text = torch.randn(depth, n, dt) * c.V_INIT_STD
            if c.CTX_INIT:
                if vectors.shape[0] < n:
                    raise ConfigError(f"TRAINER.MMLOP.CTX_INIT '{c.CTX_INIT}' has fewer than N_CTX ({n}) tokens")
                p_text[0] = vectors[:n]
            self.p_text = nn.Parameter(p_text)
            self.p_vision = nn.Parameter(torch.randn(depth, n, dv) * c.V_INIT_STD)
        tokens, positions = build_context_prompts(encoder, classnames, placeholder, n)
        self.register_buffer("tokens", tokens, persistent=False)
        self.text_hooks = MaPLeTextHooks(positions)
        self.vision_hooks = MaPLeVisionHooks()

    def prompts(self):
        """(P^t (J, n, D_t), P^v (J, n, D_v))."""
        if not self.low_rank:
            return self.p_text, self.p_vision
        u_t = self.u.expand(self.depth, -1, -1)
        u_v = u_t if self.u_vision is None else self.u_vision.expand(self.depth, -1, -1)
        return u_t @ self.v_text, u_v @ self.v_vision

    def set_prompts(self):
        p_text, p_vision = self.prompts()
        self.text_hooks.ctx = p_text[0]
        self.text_hooks.deep = {layer: p_text[layer - 1] for layer in range(2, self.depth + 1)}
        self.vision_hooks.prompts = list(p_vision)


def drift_correct(text_features, anchors):
    """normalize(w_c - mean_c'(w_c' - w_zs_c')) with w, w_zs L2-normalised (C, D)."""
    w = F.normalize(text_features, dim=-1)
    return F.normalize(w - (w - anchors).mean(dim=0, keepdim=True), dim=-1)


@torch.no_grad()
def template_averaged_features(encoder, templates, classnames):
    """Zero-shot text anchors: per class the mean over templates of the (unnormalised) text features,
    then L2-normalised (PromptSRC's fixed_embeddings)."""
    device = next(encoder.parameters()).device
    total = 0
    for template in templates:
        tokens = encoder.tokenize(template_prompts(template, classnames)).to(device)
        total = total + encoder.encode_text(tokens).float()
    return F.normalize(total / len(templates), dim=-1)


METHOD = MethodInfo(configs={"b2n": "vit_b16_b2n", "fewshot": "vit_b16_b2n", "xd": "vit_b16_xd"})


@TRAINER_REGISTRY.register("MMLoP", info=METHOD)
class MMLoP(TrainerX):
    def build_model(self):
        c = self.cfg.TRAINER.MMLOP
        if c.DRIFT_CORRECTION not in DRIFT_MODES:
            raise ConfigError(f"TRAINER.MMLOP.DRIFT_CORRECTION must be one of {DRIFT_MODES}, "
                              f"got '{c.DRIFT_CORRECTION}'")
        self.mc = c
        self.prompt_learner = MMLoPPrompts(self.clip, self.classnames, c).to(self.device)
        self.register_model("prompt_learner", self.prompt_learner, *self.build_optim_sched(self.prompt_learner))
        self._anchors = None  # zero-shot text anchors, computed on first use (60 x C text sequences)
        self.eval_text_features = None

    def text_anchors(self):
        if self._anchors is None:
            self._anchors = template_averaged_features(self.clip, IMAGENET_TEMPLATES_60, self.classnames)
        return self._anchors

    def drift_applies(self, training):
        mode = self.mc.DRIFT_CORRECTION
        return mode == "train_test" or (mode == "test" and not training)

    def text_features(self, training):
        pl = self.prompt_learner
        w = F.normalize(self.clip.encode_text(pl.tokens, pl.text_hooks), dim=-1)
        return drift_correct(w, self.text_anchors().to(w.dtype)) if self.drift_applies(training) else w

    def features(self, images, training=True):
        pl = self.prompt_learner
        pl.set_prompts()
        return F.normalize(self.clip.encode_image(images, pl.vision_hooks), dim=-1), self.text_features(training)

    def logits(self, images):
        f, w = self.features(images)
        return cosine_logits(f, w, self.clip.logit_scale)

    def forward_backward(self, batch):
        images, labels = self.parse_batch_train(batch)
        c = self.mc
        with self.autocast():
            f, w = self.features(images)
            logits = cosine_logits(f, w, self.clip.logit_scale)
            ce = self.compute_loss(logits, labels)
            loss, out = ce, {"ce": ce.item()}
            if c.ANCHORS:
                with torch.no_grad():
                    f_zs = F.normalize(self.clip.encode_image(images), dim=-1)
                w_zs = self.text_anchors().to(w.dtype)
                zs_logits = cosine_logits(f_zs, w_zs, self.clip.logit_scale)
                l_text = F.l1_loss(w, w_zs)
                l_image = F.l1_loss(f, f_zs)
                l_logit = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(zs_logits, dim=1),
                                   reduction="sum", log_target=True) / logits.numel()
                loss = (loss + c.TEXT_LOSS_WEIGHT * l_text + c.IMAGE_LOSS_WEIGHT * l_image
                        + c.LOGIT_LOSS_WEIGHT * l_logit)
                out.update(l1_text=l_text.item(), l1_image=l_image.item(), kl=l_logit.item())
        self.model_backward_and_update(loss)
        return {"loss": loss.item(), **out, "acc": (logits.argmax(1) == labels).float().mean().item() * 100}

    def before_test(self):
        with torch.no_grad(), self.autocast():
            self.prompt_learner.set_prompts()
            self.eval_text_features = self.text_features(training=False)

    def model_inference(self, images):
        f = self.clip.encode_image(images, self.prompt_learner.vision_hooks)
        return cosine_logits(f, self.eval_text_features, self.clip.logit_scale)
