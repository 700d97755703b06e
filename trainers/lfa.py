"""LFA, Linear Feature Alignment (Ouali et al., ICCV 2023; docs/methods/lfa.md).

A black-box method on pre-computed, L2-normalised frozen CLIP features: one linear map W (D x D) applied to
image features, x_hat = normalize(x W), logits = x_hat . t_c / 0.07 with the frozen template text
features t_c. Trainable parameters: D^2 (262,144 for ViT-B/16).

Steps (``before_train``, then the engine's epoch loop):

1. Features, computed once and kept in memory: every training image under five-crop augmentation
   (resize the short side to FIVE_CROP_RESIZE x INPUT.SIZE, then torchvision FiveCrop: 4 corners + centre;
   5 features per image; ``FIVE_CROP False``: one test-transform feature per image), L2-normalised.
2. beta-Procrustes init: X = all crop features, Y = the text feature of each crop's label,
   X^T Y = U S V^T, W_0 = (1 - beta) U V^T + beta I.
3. Refinement: AdamW (OPTIM.LR, OPTIM.WEIGHT_DECAY), per-iteration cosine to END_LR, full-batch
   iterations; each iteration takes one crop per image (one crop position drawn per iteration, as the
   reference code does), adds Gaussian noise (std NOISE_STD) with probability NOISE_P and applies dropout
   (DROPOUT) with probability DROPOUT_P, and minimises the adaptive re-ranking loss (KNN nearest
   prototypes, margins (1 - t_j . t_y) / MARGIN_SCALE).
4. An EMA of W (starts at I; momentum 0.9 + 0.1 (1 - exp(-5 min(i, n/2) / (n/2))) at iteration i of n,
   i.e. ramping from 0.9 to ~1.0 over the first half) is kept as a persistent buffer.

Mapping onto the engine: a step-based schedule (``engine.steps.Schedule.full_batch_steps``), one engine
epoch of ITERS full-batch steps; each step reads the cached features itself (it gets no batch), torch is
re-seeded before it from (seed, step), and the learning rate follows LFA's per-iteration cosine (torch
CosineAnnealingLR, eta_min END_LR) stepped after it. The iteration count is TRAINER.LFA.ITERS, or (ITERS 0)
the dataset's entry of TRAINER.LFA.ITERS_PER_DATASET (LFA's base-to-new table), else DEFAULT_ITERS; it
replaces OPTIM.MAX_EPOCH. The checkpoint (W, W_ema, optimizer, scheduler) is written after the last
step; an interrupted run starts its refinement over (the features are recomputed on any restart).
results.json has ``epochs`` 1 (one mean loss in ``epoch_losses``); TensorBoard has the loss of every step.

Text prototypes t_c: the dataset's template, except for ImageNet and its four variants, which use LFA's
8-template ensemble (``IMAGENET_TEMPLATES``; mean of the normalised features, normalised), as the official
``save_features.py`` does.

Evaluation: the base test (and any other split) uses the refined W; the new-class test
(DATASET.SUBSAMPLE_CLASSES new, the eval-only run) uses W_ema (NEW_TEST_MAP ema). Both are loaded from
the checkpoint. LFA has no cross-entropy to logit-adjust: TRAINER.LOSS la is an error.
"""
import math
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm
from yacs.config import CfgNode as CN

from engine.config import ConfigError, register_config
from engine.config import Block, Blocks, Bool, Choice, Float, Int, PerDataset, PRECISIONS, Str, declare_keys  # noqa: F401
from engine.data import INTERPOLATIONS, T
from engine.optim import build_optimizer
from engine.registry import TRAINER_REGISTRY, MethodInfo
from engine.steps import Schedule
from engine.trainer import TrainerX
from trainers.common import frozen_text_features

# LFA's base-to-new iteration counts (saic-fi/LFA README), keyed by DATASET.NAME.
B2N_ITERS = {"Caltech101": 40, "DescribableTextures": 100, "EuroSAT": 50, "Food101": 50, "FGVCAircraft": 100,
             "OxfordFlowers": 50, "OxfordPets": 10, "StanfordCars": 50, "SUN397": 50, "UCF101": 100,
             "ImageNet": 100}
NEW_TEST_MAPS = ("ema", "refined")
# LFA's save_features.py: ImageNet and its four variants use this 8-template ensemble for the text
# prototypes (per class: mean of the normalised template features, normalised again); every other dataset
# uses its single hand-crafted template (the same as the dataset's CoOp template).
IMAGENET_TEMPLATES = ("a photo of a {}.", "itap of a {}.", "a bad photo of the {}.", "a origami {}.",
                      "a photo of the large {}.", "a {} in a video game.", "art of the {}.",
                      "a photo of the small {}.")
ENSEMBLE_DATASETS = ("ImageNet", "ImageNetSketch", "ImageNetV2", "ImageNetA", "ImageNetR")


def lfa_text_features(encoder, dataset_name, template, classnames):
    """(C, D) normalised text prototypes: the 8-template ensemble for ImageNet and its variants, else
    ``template``."""
    if dataset_name not in ENSEMBLE_DATASETS:
        return frozen_text_features(encoder, template, classnames).float()
    feats = torch.stack([frozen_text_features(encoder, t, classnames).float() for t in IMAGENET_TEMPLATES])
    return F.normalize(feats.mean(dim=0), dim=-1)


@register_config
def add_lfa_config(cfg):
    c = cfg.TRAINER.LFA = CN()
    c.BETA = 0.9                 # beta-Procrustes: W0 = (1 - beta) U V^T + beta I
    c.ITERS = 0                  # > 0: refinement iterations; 0: ITERS_PER_DATASET[DATASET.NAME] or DEFAULT_ITERS
    c.DEFAULT_ITERS = 50
    c.ITERS_PER_DATASET = CN(dict(B2N_ITERS))
    c.END_LR = 1e-7              # cosine schedule end
    c.KNN = 3                    # adaptive re-ranking loss: k nearest prototypes
    c.MARGIN_SCALE = 4.0         # margins (1 - t_j . t_y) / MARGIN_SCALE
    c.TEMPERATURE = 0.07         # logits = cos / TEMPERATURE
    c.NOISE_STD = 0.035          # feature augmentation: Gaussian noise ...
    c.NOISE_P = 0.5              # ... applied with this probability per iteration
    c.DROPOUT = 0.05             # feature dropout ...
    c.DROPOUT_P = 0.5            # ... applied with this probability per iteration
    c.FIVE_CROP = True           # five crops per training image (False: one test-transform view)
    c.FIVE_CROP_RESIZE = 1.143   # short side resized to this x INPUT.SIZE before FiveCrop (224 -> 256)
    c.EMA_MOMENTUM = 0.9         # EMA momentum at iteration 0 (ramps to ~1.0 over the first half)
    c.NEW_TEST_MAP = "ema"       # map for the new-class test: ema | refined
    c.PREC = "fp16"              # feature extraction under autocast on GPU; the map is always fp32
    declare_keys(cfg, "TRAINER.LFA", BETA=Float(0, 1), ITERS=Int(0), DEFAULT_ITERS=Int(1), END_LR=Float(0),
                 KNN=Int(1), MARGIN_SCALE=Float(0, open_low=True), TEMPERATURE=Float(0, open_low=True),
                 NOISE_STD=Float(0), NOISE_P=Float(0, 1), DROPOUT=Float(0, 1, open_high=True), DROPOUT_P=Float(0, 1),
                 FIVE_CROP=Bool(), FIVE_CROP_RESIZE=Float(1), EMA_MOMENTUM=Float(0, 1),
                 NEW_TEST_MAP=Choice(*NEW_TEST_MAPS), PREC=Choice(*PRECISIONS),
                 relations=[lambda c, cfg: next((f"ITERS_PER_DATASET.{k} must be an integer >= 1, got {v!r}"
                                                 for k, v in c.ITERS_PER_DATASET.items()
                                                 if isinstance(v, bool) or not isinstance(v, int) or v < 1), None)])


def beta_procrustes(x, y, beta):
    """W = (1 - beta) U V^T + beta I with X^T Y = U S V^T (x, y: (N, D))."""
    u, _, vh = torch.linalg.svd(x.t().double() @ y.double())
    eye = torch.eye(x.shape[1], dtype=torch.float64, device=x.device)
    return ((1 - beta) * (u @ vh) + beta * eye).to(x.dtype)


def adaptive_reranking_loss(features, prototypes, labels, knn=3, scale=4.0):
    """mean_{i, j<=k} max(0, d_y + m_j - d_j): d_j distances of normalize(features) to the k nearest
    normalised prototypes, d_y to the true class's, m_j = (1 - t_j . t_y) / scale."""
    x = F.normalize(features, dim=-1)
    t = F.normalize(prototypes, dim=-1)
    knn = min(knn, t.shape[0])
    near, idx = torch.cdist(x, t).topk(knn, dim=1, largest=False)
    pos = t[labels]
    d_pos = (x - pos).norm(dim=-1, keepdim=True)
    margins = (1.0 - (t[idx] * pos.unsqueeze(1)).sum(-1)) / scale
    return (d_pos + margins - near).clamp_min(0).mean()


def ema_momentum(iteration, iters, start=0.9):
    """LFA's ramp: start + (1 - start) * (1 - exp(-5 * min(i, n/2) / (n/2)))."""
    half = iters // 2
    ramp = 1.0 if half == 0 else 1.0 - math.exp(-5.0 * min(max(iteration, 0), half) / half)
    return start + (1.0 - start) * ramp


class LFAMap(nn.Module):
    """The map W (trainable) and its EMA (persistent buffer, used for the new-class test)."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(dim))
        self.register_buffer("weight_ema", torch.eye(dim))


def lfa_iterations(value, images, classes, dataset):
    """Training steps for estimates: one engine epoch is one full-batch iteration, so the steps are the
    iteration count (TRAINER.LFA.ITERS, else the dataset's ITERS_PER_DATASET entry, else DEFAULT_ITERS)."""
    iters = value("TRAINER.LFA.ITERS", 0)
    if not iters:
        table = value("TRAINER.LFA.ITERS_PER_DATASET", {}) or {}
        iters = table.get(dataset, value("TRAINER.LFA.DEFAULT_ITERS", 50))
    return int(iters)


METHOD = MethodInfo(
    configs={"b2n": "vit_b16_b2n_beta0.9", "fewshot": "vit_b16_b2n_beta0.9"}, la="refused",
    train_steps=lfa_iterations, bench_prepare=lambda trainer, batch: trainer.prepare_benchmark(batch))


@TRAINER_REGISTRY.register("LFA", info=METHOD)
class LFA(TrainerX):
    def build_model(self):
        c = self.cfg.TRAINER.LFA
        if self.cfg.TRAINER.LOSS == "la":
            raise ConfigError("TRAINER.LOSS la: LFA trains with its re-ranking loss, there is no cross-entropy to "
                              "logit-adjust (LAMP compares LFA without LA); use TRAINER.LOSS ce")
        if c.NEW_TEST_MAP not in NEW_TEST_MAPS:
            raise ConfigError(f"TRAINER.LFA.NEW_TEST_MAP must be one of {list(NEW_TEST_MAPS)}, got {c.NEW_TEST_MAP!r}")
        if not 0.0 <= c.BETA <= 1.0:
            raise ConfigError(f"TRAINER.LFA.BETA must be in [0, 1], got {c.BETA}")
        self.iters = self.resolve_iters()
        self.schedule = Schedule.full_batch_steps(self.iters)
        self.map = LFAMap(self.clip.embed_dim).to(self.device)
        optim = build_optimizer(self.map, self.cfg.OPTIM)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=self.iters, eta_min=c.END_LR)
        self.register_model("lfa", self.map, optim, sched)
        self.text_features = lfa_text_features(self.clip, self.cfg.DATASET.NAME, self.dataset.template,
                                               self.classnames)
        self.train_features = None   # (N, V, D) normalised crop features
        self.train_labels = None
        self.log(f"LFA: {self.iters} full-batch iterations (OPTIM.MAX_EPOCH is not used), "
                 f"beta {c.BETA}, new-class test with the {c.NEW_TEST_MAP} map")

    def resolve_iters(self):
        c = self.cfg.TRAINER.LFA
        if c.ITERS < 0:
            raise ConfigError(f"TRAINER.LFA.ITERS must be >= 0 (0 = per-dataset table), got {c.ITERS}")
        if c.ITERS > 0:
            return int(c.ITERS)
        iters = c.ITERS_PER_DATASET.get(self.cfg.DATASET.NAME, c.DEFAULT_ITERS)
        if iters < 1:
            raise ConfigError(f"LFA iterations for {self.cfg.DATASET.NAME or 'this dataset'} must be >= 1, got {iters}")
        return int(iters)

    # ---- features
    def five_crop_transform(self):
        inp = self.cfg.INPUT
        size = tuple(int(s) for s in inp.SIZE)
        resize = round(max(size) * self.cfg.TRAINER.LFA.FIVE_CROP_RESIZE)
        to_tensor = [T.ToTensor()]
        if "normalize" in inp.TRANSFORMS:
            to_tensor.append(T.Normalize(mean=list(inp.PIXEL_MEAN), std=list(inp.PIXEL_STD)))
        to_tensor = T.Compose(to_tensor)
        return T.Compose([T.Resize(resize, interpolation=INTERPOLATIONS[inp.INTERPOLATION]), T.FiveCrop(size),
                          T.Lambda(lambda crops: torch.stack([to_tensor(c) for c in crops]))])

    @torch.no_grad()
    def encode_views(self, images):
        """(B, V, 3, H, W) or (B, 3, H, W) -> normalised features (B, V, D)."""
        if images.dim() == 4:
            images = images.unsqueeze(1)
        b, v = images.shape[:2]
        with self.autocast():
            feats = self.clip.encode_image(images.flatten(0, 1).to(self.device))
        return F.normalize(feats.float(), dim=-1).view(b, v, -1)

    @torch.no_grad()
    def extract_train_features(self):
        c = self.cfg.TRAINER.LFA
        transform = self.five_crop_transform() if c.FIVE_CROP else None
        loader = self.dm.build_loader(self.dataset.train_x, is_train=False, transform=transform)
        feats, labels = [], []
        for batch in tqdm(loader, desc="LFA: training features", leave=False, disable=not sys.stderr.isatty()):
            feats.append(self.encode_views(batch["img"]))
            labels.append(batch["label"].to(self.device))
        return torch.cat(feats), torch.cat(labels)

    def set_training_features(self, features, labels, init_map):
        self.train_features, self.train_labels = features, labels
        if init_map:
            n, v, d = features.shape
            x = features.reshape(n * v, d)
            y = self.text_features[labels].repeat_interleave(v, dim=0)
            with torch.no_grad():
                self.map.weight.copy_(beta_procrustes(x, y, self.cfg.TRAINER.LFA.BETA))
                self.map.weight_ema.copy_(torch.eye(d, device=self.device))
            self.log(f"LFA: beta-Procrustes init from {n} images x {v} views; training loss "
                     f"{self.full_loss(torch.eye(d, device=self.device)):.4f} (identity) -> "
                     f"{self.full_loss(self.map.weight):.4f} (init)")

    def before_train(self, resumed):
        features, labels = self.extract_train_features()
        self.set_training_features(features, labels, init_map=not resumed)

    def prepare_benchmark(self, batch):
        """tools.bench: its images do not exist on disk; use the random batch, each image as 5 views."""
        views = 5 if self.cfg.TRAINER.LFA.FIVE_CROP else 1
        feats = self.encode_views(batch["img"]).expand(-1, views, -1).contiguous()
        self.set_training_features(feats, batch["label"].to(self.device), init_map=True)

    @torch.no_grad()
    def full_loss(self, weight):
        """Re-ranking loss over every training view without feature augmentation (diagnostics, tests)."""
        n, v, d = self.train_features.shape
        x = self.train_features.reshape(n * v, d)
        y = self.train_labels.repeat_interleave(v)
        c = self.cfg.TRAINER.LFA
        return adaptive_reranking_loss(x @ weight, self.text_features, y, c.KNN, c.MARGIN_SCALE).item()

    def forward_backward(self, batch=None):
        """One full-batch iteration on the cached features; ``batch`` is not used (LFA's steps are
        full-batch; tools.bench passes its random batch after ``prepare_benchmark``)."""
        if self.train_features is None:
            raise RuntimeError("LFA: training features are missing (before_train / prepare_benchmark not run)")
        c = self.cfg.TRAINER.LFA
        n, v, _ = self.train_features.shape
        view = int(torch.randint(v, ()).item())
        x = self.train_features[:, view]
        labels = self.train_labels
        if c.NOISE_STD > 0 and torch.rand(()).item() < c.NOISE_P:
            x = x + torch.randn_like(x) * c.NOISE_STD
        if c.DROPOUT > 0 and torch.rand(()).item() < c.DROPOUT_P:
            x = F.dropout(x, p=c.DROPOUT, training=True)
        mapped = x @ self.map.weight
        loss = adaptive_reranking_loss(mapped, self.text_features, labels, c.KNN, c.MARGIN_SCALE)
        self.model_backward_and_update(loss)
        momentum = ema_momentum(self.step_index, self.iters, c.EMA_MOMENTUM)
        with torch.no_grad():
            self.map.weight_ema.mul_(momentum).add_(self.map.weight.detach(), alpha=1.0 - momentum)
            acc = ((mapped @ self.text_features.t()).argmax(1) == labels).float().mean().item() * 100
        return {"loss": loss.item(), "acc": acc, "ema_momentum": momentum}

    # ---- evaluation
    def uses_ema_map(self):
        return self.cfg.DATASET.SUBSAMPLE_CLASSES == "new" and self.cfg.TRAINER.LFA.NEW_TEST_MAP == "ema"

    def eval_map(self):
        return self.map.weight_ema if self.uses_ema_map() else self.map.weight

    def before_test(self):
        self.log(f"LFA: testing with the {'EMA' if self.uses_ema_map() else 'refined'} map")

    def model_inference(self, images):
        feats = F.normalize(self.clip.encode_image(images).float(), dim=-1)
        mapped = F.normalize(feats @ self.eval_map(), dim=-1)
        return mapped @ self.text_features.t() / self.cfg.TRAINER.LFA.TEMPERATURE
