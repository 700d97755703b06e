"""MMRL (Guo & Gu, CVPR 2025; docs/methods/mmrl.md; official code yunncheng/MMRL).

Shared representation tokens R (n x d_r, one set for all layers) are mapped by per-layer projections
(text Linear(d_r, D_t), vision Linear(d_r, D_v)) into both encoders: inserted right after cls / BOT before
the first representation layer (6), replacing the same positions before the later ones (7..12); the text
read-out moves to EOT + n. Image outputs: f_cls = ln_post(cls) P_v (frozen) and
f_rep = mean(ln_post(rep tokens)) P_rep (P_rep trainable, random init std D_v^-1/2 as in the official code).
Text: the dataset's hand-crafted template with the representation tokens.

Loss: alpha CE(z_cls) + (1 - alpha) CE(z_rep) + lambda (1 - mean cos(f_cls, f_cls^zs))
+ lambda (1 - mean_c cos(w_c, w_c^zs)), z = 100 cos (MMRL hard-codes 100); with TRAINER.LOSS la both CE
terms are logit-adjusted. Inference: alpha z_cls + (1 - alpha) z_rep on the classes it was trained on
(base test, the source dataset of a transfer run), z_cls only elsewhere (new classes, other datasets),
which is the official B2N / CD rule written as one condition (TEST_BRANCH auto).

Per-dataset settings: the official code overrides lambda (and EuroSAT's d_r = 2048) by dataset name after
reading the config file; here REG_WEIGHT -1 / REP_DIM 0 mean "look the dataset up in REG_WEIGHT_BY_DATASET /
REP_DIM_BY_DATASET" ("*" = any other dataset), and any other value is used as given (the official scripts'
opts come after the table: the cross-dataset scripts pass lambda 0.2 and d_r 512, configs/trainers/MMRL/
vit_b16_xd.yaml). Official names: TRAINER.MMRL.ALPHA (the current official key) is SCALE; the scripts' TASK
(B2N / FS / CD) picks the inference branch (TASK below; "" = TEST_BRANCH alone decides).
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from engine.config import ConfigError, register_config, register_config_alias
from engine.config import Block, Blocks, Bool, Choice, Float, Int, PerDataset, PRECISIONS, Str, declare_keys  # noqa: F401
from engine.prompted_clip import TowerHooks, insert_after_first, repeat_batch, replace_after_first
from engine.registry import TRAINER_REGISTRY, MethodInfo
from engine.trainer import TrainerX
from trainers.common import frozen_text_features, template_prompts

LOGIT_SCALE = 100.0  # MMRL multiplies cosines by 100 whatever the backbone's logit_scale
TEST_BRANCHES = ("auto", "fusion", "cls", "rep")
# yunncheng/MMRL:trainers/config.py (get_dataset_specified_config), applied in every task
REG_WEIGHT_BY_DATASET = -1.0   # TRAINER.MMRL.REG_WEIGHT: this value = "by dataset"; any other is used as given
TASKS = ("", "B2N", "FS", "CD")
REG_WEIGHTS = ["StanfordCars:7.0", "FGVCAircraft:6.0", "SUN397:6.0", "DescribableTextures:6.0", "Food101:5.0",
               "OxfordFlowers:4.0", "UCF101:3.0", "ImageNet:0.5", "Caltech101:0.5", "OxfordPets:0.2",
               "EuroSAT:0.01", "*:1.0"]


@register_config
def add_mmrl_config(cfg):
    c = cfg.TRAINER.MMRL = CN()
    c.N_REP_TOKENS = 5
    c.REP_DIM = 0                       # d_r; 0 = by dataset (REP_DIM_BY_DATASET)
    c.REP_DIM_BY_DATASET = ["EuroSAT:2048", "*:512"]
    c.REP_LAYERS = [6, 7, 8, 9, 10, 11, 12]
    c.SCALE = 0.7                       # alpha, the class-token branch weight (official key name)
    c.REG_WEIGHT = -1.0                 # lambda; -1 = by dataset (REG_WEIGHT_BY_DATASET)
    c.REG_WEIGHT_BY_DATASET = list(REG_WEIGHTS)
    c.TEST_BRANCH = "auto"              # auto (fusion on trained classes, cls elsewhere) | fusion | cls | rep
    c.TASK = ""                         # official TASK: B2N / CD = auto, FS = fusion; "" = TEST_BRANCH decides
    c.PREC = "amp"
    declare_keys(cfg, "TRAINER.MMRL", N_REP_TOKENS=Int(1), REP_DIM=Int(1, also=(0,)),
                 REP_DIM_BY_DATASET=PerDataset(Int(1)), REP_LAYERS=Blocks("both"), SCALE=Float(0, 1),
                 REG_WEIGHT=Float(), REG_WEIGHT_BY_DATASET=PerDataset(Float(0)),
                 TEST_BRANCH=Choice(*TEST_BRANCHES), TASK=Choice(*TASKS), PREC=Choice(*PRECISIONS))


# The official code's names: its current key ALPHA (an older commit: SCALE, ours) and its scripts' TASK opt.
register_config_alias({"TRAINER.MMRL.ALPHA": "TRAINER.MMRL.SCALE"})
for _trainer in ("MMRL", "VaMP"):
    register_config_alias({"TASK": "TRAINER.MMRL.TASK"}, trainer=_trainer)


def resolve_settings(c, dataset):
    """(d_r, lambda, test branch) of a run on ``dataset`` (a DATASET.NAME) with TRAINER.MMRL node ``c``:
    REP_DIM 0 / REG_WEIGHT -1 look the dataset up in the tables, any other value is used as given; an
    official TASK (B2N / CD / FS) sets the branch when TEST_BRANCH is auto (FS: fusion, as the official test)."""
    if c.TASK not in TASKS:
        raise ConfigError(f"TRAINER.MMRL.TASK (the official TASK) must be one of B2N, FS, CD or empty, got '{c.TASK}'")
    rep_dim = c.REP_DIM or int(by_dataset(c.REP_DIM_BY_DATASET, dataset, "TRAINER.MMRL.REP_DIM_BY_DATASET"))
    reg_weight = (by_dataset(c.REG_WEIGHT_BY_DATASET, dataset, "TRAINER.MMRL.REG_WEIGHT_BY_DATASET")
                  if c.REG_WEIGHT == REG_WEIGHT_BY_DATASET else float(c.REG_WEIGHT))
    branch = "fusion" if (c.TASK == "FS" and c.TEST_BRANCH == "auto") else c.TEST_BRANCH
    return rep_dim, reg_weight, branch


def by_dataset(entries, dataset, key):
    """Value for ``dataset`` in ["Name:value", ..., "*:value"]."""
    table = {}
    for entry in entries:
        name, sep, value = str(entry).rpartition(":")
        if not sep or not name:
            raise ConfigError(f"{key} entries must look like 'DatasetName:value', got '{entry}'")
        table[name] = float(value)
    if dataset in table:
        return table[dataset]
    if "*" in table:
        return table["*"]
    raise ConfigError(f"{key} has no entry for dataset '{dataset}' and no '*' default")


class RepTokenHooks(TowerHooks):
    """Insert the layer's tokens after position 0 before the first representation layer, replace them before
    the later ones. Text tokens may come one set per group (G, n, D): the class sequences are then repeated
    per group (image-major, ``repeat_batch``) before the first layer."""

    def __init__(self, layers):
        self.layers = layers
        self.start_layer = layers[0]
        self.tokens = {}  # layer -> (1 or G, n, D)

    def before_block(self, layer, x, state):
        tokens = self.tokens.get(layer)
        if tokens is None:
            return x
        if layer == self.start_layer and tokens.shape[0] > 1 and state.tower == "text":
            x = repeat_batch(x, state, tokens.shape[0])
        if layer == self.start_layer:
            return insert_after_first(x, tokens, state)
        return replace_after_first(x, tokens, state)


class MMRLRepresentation(nn.Module):
    """R, the per-layer projections and P_rep (names as in the official code)."""

    def __init__(self, encoder, n_tokens, rep_dim, layers):
        super().__init__()
        if not encoder.is_vit:
            raise ConfigError("MMRL needs a ViT backbone (it puts tokens into the image transformer)")
        depth = min(encoder.n_text_layers, encoder.n_vision_layers)
        layers = sorted(int(l) for l in layers)
        if not layers or layers[0] < 1 or layers[-1] > depth or len(set(layers)) != len(layers):
            raise ConfigError(f"TRAINER.MMRL.REP_LAYERS {layers} must be distinct block indices in 1..{depth}")
        if n_tokens < 1 or rep_dim < 1:
            raise ConfigError(f"TRAINER.MMRL.N_REP_TOKENS and REP_DIM must be >= 1, got {n_tokens}, {rep_dim}")
        self.layers = layers
        self.compound_rep_tokens = nn.Parameter(torch.empty(n_tokens, rep_dim).normal_(0, 0.02))
        # As in the official code each layer's projection starts as a copy of one freshly initialised layer.
        r2v, r2t = nn.Linear(rep_dim, encoder.vision_width), nn.Linear(rep_dim, encoder.text_width)
        self.compound_rep_tokens_r2vproj = nn.ModuleList([copy.deepcopy(r2v) for _ in layers])
        self.compound_rep_tokens_r2tproj = nn.ModuleList([copy.deepcopy(r2t) for _ in layers])
        width = encoder.vision_width
        self.proj_rep = nn.Parameter(width ** -0.5 * torch.randn(width, encoder.embed_dim))
        self.text_hooks = RepTokenHooks(layers)
        self.vision_hooks = RepTokenHooks(layers)

    def set_vision_tokens(self):
        rep = self.compound_rep_tokens
        self.vision_hooks.tokens = {layer: proj(rep).unsqueeze(0)
                                    for layer, proj in zip(self.layers, self.compound_rep_tokens_r2vproj)}

    def set_text_tokens(self, text_shift=None):
        """``text_shift``: None, or {layer: (G, d_r)} added to R on the text side (VaMP's sample-specific
        tokens; G groups of class sequences)."""
        self.text_hooks.tokens = {}
        for layer, proj in zip(self.layers, self.compound_rep_tokens_r2tproj):
            r = self.compound_rep_tokens.unsqueeze(0)
            if text_shift is not None and layer in text_shift:
                r = r + text_shift[layer].unsqueeze(1)        # (G, n, d_r)
            self.text_hooks.tokens[layer] = proj(r)

    def image_features(self, encoder, images):
        """(f_cls, f_rep), not normalised."""
        self.set_vision_tokens()
        f_cls, state = encoder.encode_image(images, self.vision_hooks, return_state=True)
        n = self.compound_rep_tokens.shape[0]
        rep = encoder.clip.visual.ln_post(state.last_hidden[:, 1:1 + n]).mean(dim=1)
        return f_cls, rep @ self.proj_rep.to(rep.dtype)


def scaled_cos(f, w):
    """100 cos: f (B, D) with w (C, D) -> (B, C), or with per-image w (B, C, D)."""
    f, w = F.normalize(f, dim=-1), F.normalize(w, dim=-1)
    if w.dim() == 2:
        return LOGIT_SCALE * f @ w.t()
    return LOGIT_SCALE * torch.einsum("bd,bcd->bc", f, w)


METHOD = MethodInfo(
    configs={"b2n": "vit_b16_b2n", "fewshot": "vit_b16_b2n", "xd": "vit_b16_xd"},
    imagenet={"b2n": "vit_b16_b2n_imagenet", "fewshot": "vit_b16_b2n_imagenet"})


@TRAINER_REGISTRY.register("MMRL", info=METHOD)
class MMRL(TrainerX):
    def build_model(self):
        c = self.cfg.TRAINER.MMRL
        if c.TEST_BRANCH not in TEST_BRANCHES:
            raise ConfigError(f"TRAINER.MMRL.TEST_BRANCH must be one of {TEST_BRANCHES}, got '{c.TEST_BRANCH}'")
        if not 0.0 <= c.SCALE <= 1.0:
            raise ConfigError(f"TRAINER.MMRL.SCALE (alpha) must be in [0, 1], got {c.SCALE}")
        rep_dim, self.reg_weight, self.test_branch = resolve_settings(c, self.cfg.DATASET.NAME)
        self.alpha = c.SCALE
        self.rep = MMRLRepresentation(self.clip, c.N_REP_TOKENS, rep_dim, c.REP_LAYERS).to(self.device)
        self.build_extra_modules()
        self.register_model("representation_learner", self.trained_module(), *self.build_optim_sched(self.trained_module()))
        self.tokens = self.clip.tokenize(template_prompts(self.dataset.template, self.classnames)).to(self.device)
        self.trained_on = (self.cfg.DATASET.NAME, list(self.classnames))  # the checkpoint's in --eval-only
        self._text_zs = None
        self.eval_text_features = None
        self.log(f"MMRL: d_r {rep_dim}, lambda {self.reg_weight}, alpha {self.alpha}")

    # ---- hooks for VaMP
    def build_extra_modules(self):
        pass

    def trained_module(self):
        return self.rep

    # ---- pieces
    def text_zero_shot(self):
        """Frozen hand-crafted-template text features (C, D), normalised (computed on first use)."""
        if self._text_zs is None:
            self._text_zs = frozen_text_features(self.clip, self.dataset.template, self.classnames)
        return self._text_zs

    @torch.no_grad()
    def image_zero_shot(self, images):
        return F.normalize(self.clip.encode_image(images), dim=-1)

    def text_features(self, text_shift=None):
        """(C, D); with per-group shifts (G, C, D)."""
        self.rep.set_text_tokens(text_shift)
        w = self.clip.encode_text(self.tokens, self.rep.text_hooks)
        return w if text_shift is None else w.view(-1, self.tokens.shape[0], w.shape[-1])

    def mmrl_loss(self, z_cls, z_rep, f_cls, w, f_zs, labels):
        """alpha CE(z_cls) + (1 - alpha) CE(z_rep) + lambda (1 - cos(f_cls, f_zs)) + lambda (1 - cos(w, w_zs))."""
        ce_cls, ce_rep = self.compute_loss(z_cls, labels), self.compute_loss(z_rep, labels)
        reg_img = 1 - F.cosine_similarity(f_cls, f_zs.to(f_cls.dtype), dim=-1).mean()
        w_zs = self.text_zero_shot().to(w.dtype)
        reg_txt = 1 - F.cosine_similarity(w, w_zs.expand_as(w), dim=-1).mean()
        loss = self.alpha * ce_cls + (1 - self.alpha) * ce_rep + self.reg_weight * (reg_img + reg_txt)
        return loss, {"ce_cls": ce_cls.item(), "ce_rep": ce_rep.item(), "reg_img": reg_img.item(),
                      "reg_txt": reg_txt.item()}

    def branch_logits(self, images):
        """(z_cls, z_rep, f_cls, w) with the current parameters (training forward)."""
        f_cls, f_rep = self.rep.image_features(self.clip, images)
        w = self.text_features()
        return scaled_cos(f_cls, w), scaled_cos(f_rep, w), f_cls, w

    def fuse(self, z_cls, z_rep):
        return self.alpha * z_cls + (1 - self.alpha) * z_rep

    def logits(self, images):
        z_cls, z_rep, _, _ = self.branch_logits(images)
        return self.fuse(z_cls, z_rep)

    def forward_backward(self, batch):
        images, labels = self.parse_batch_train(batch)
        with self.autocast():
            f_zs = self.image_zero_shot(images)
            z_cls, z_rep, f_cls, w = self.branch_logits(images)
            loss, parts = self.mmrl_loss(z_cls, z_rep, f_cls, w, f_zs, labels)
        self.model_backward_and_update(loss)
        acc = (self.fuse(z_cls, z_rep).argmax(1) == labels).float().mean().item() * 100
        return {"loss": loss.item(), **parts, "acc": acc}

    # ---- inference
    def active_branch(self):
        """auto: fusion on the dataset and classes the model was trained on, the class-token branch elsewhere
        (new classes; other datasets, ImageNet-V2/-Sketch included, as the official CD rule)."""
        if self.test_branch != "auto":
            return self.test_branch
        return "fusion" if (self.cfg.DATASET.NAME, list(self.classnames)) == self.trained_on else "cls"

    def select(self, z_cls, z_rep):
        branch = self.active_branch()
        return {"fusion": lambda: self.fuse(z_cls, z_rep), "cls": lambda: z_cls, "rep": lambda: z_rep}[branch]()

    def before_test(self):
        self.log(f"MMRL inference branch: {self.active_branch()}")
        with torch.no_grad(), self.autocast():
            self.eval_text_features = self.text_features()

    def model_inference(self, images):
        f_cls, f_rep = self.rep.image_features(self.clip, images)
        w = self.eval_text_features
        return self.select(scaled_cos(f_cls, w), scaled_cos(f_rep, w))

    def extra_checkpoint_state(self):
        return {"trained_dataset": self.trained_on[0], "trained_classnames": self.trained_on[1]}

    def load_extra_checkpoint_state(self, state):
        if "trained_classnames" in state:
            self.trained_on = (state.get("trained_dataset", ""), list(state["trained_classnames"]))
