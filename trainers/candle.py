"""Candle (Shi et al., KDD 2024; docs/methods/candle.md): a feature-level head on frozen CLIP.

CLIP stays frozen (the image encoder runs under no_grad). The trainable head holds

- ``a_img``, ``a_txt`` (D x D, identity init): linear maps for image-side and text-side features;
- ``virtual_prototypes`` (C_n x D): one visual prototype per new class, initialised from the new-class
  text features (``VIR_INIT text``) or from the mean base prototype plus N(0, 0.05^2) noise (``visual``);
- a cross-modal fusion block: ``X' = r * MHA(LN X) + LN X`` (LayerNorm, MultiheadAttention(D, 8 heads,
  dropout 0.1), learnable residual scale ``r`` initialised to 0.1),

plus two persistent buffers that the eval-only run needs: ``visual_prototypes`` (C_b x D, the mean frozen
image feature of each base class over the long-tailed training set, computed once per run with the test
transform in ``before_train``) and ``text_features`` (C_all x D, the frozen template text features of
every trained class name, base then new). Both travel in the checkpoint, so the new-class eval-only run
(whose ``train_x`` holds new-class images) never recomputes them.

Training step (B images): f = frozen image features, Q = [p; u] (C_all prototypes), T = text features.
Pre-fusion logits over rows [f A_img; Q A_img] and columns T A_txt; the sequence [f A_img; Q A_img;
T A_txt] goes through the fusion block; post-fusion logits z_vt = s cos([f'; Q'], T') and
z_vv = s SCALE cos([f'; Q'], Q'). Labels are [y; 0..C_all-1] (each prototype is a sample of its own
class). Loss: Candle's compensating logit-adjusted CE on each of the three logits (class counts = base
training counts, 0 for new classes, +1 for every class; ``engine.losses.compensating_la_ce``). Candle's
loss is always this one; ``TRAINER.LOSS`` ("+LA") has no further effect on it.

Inference fuses every test batch with the prototypes and text features (so predictions depend on the
test-batch composition; keep the test batch at 100) and predicts with z_vt + z_vv restricted to the
evaluated split's columns: base test -> base columns only, new test -> new columns only.

Feature cache (``TRAINER.CANDLE.CACHE_FEATURES``, off by default): the prototype pass already encodes every
training image once with the test transform. With the switch on, training reuses those frozen features
(shuffled per epoch, same batch size and drop-last rule as the image loader) instead of re-encoding
augmented images every epoch, i.e. training sees no random crop / flip. Use it only where training
without augmentation is intended; it makes an epoch cost a few head steps instead of a pass of the image
encoder.

Class sets at evaluation: the trained class list (base names, then new names when
``USE_NEW_NAMES``) is stored with the checkpoint. On the same dataset the evaluated split is a block of
that list. On another dataset (cross-dataset / domain-generalisation runs, which train once on the
source) each evaluated class name is looked up in the trained list; names not found are added as extra
classes whose prototype is their text feature (the virtual-prototype text initialisation, untrained).

Deliberate differences from the official code (shijxcs/Candle ``trainers/candle.py``):

- Base test over base classes only. The official ``model_inference`` restricts the prediction to the base
  columns only in its training phase (task ``B2Ntrainbase``); an evaluation-phase run on the base split
  (``B2Ntestbase``) falls through to the prediction over all classes, so a base image can be predicted as
  a new class. Here the base test always scores base columns and the new test new columns, as every
  method in this harness (metrics within the split's own classes), so Candle's numbers compare with theirs.
- New-class text rows are not tied to the virtual prototypes. The official ``Head`` makes
  ``virtual_prototypes = nn.Parameter(text_features[C_b:])``, a view that shares storage with the text
  features the head keeps (``text_features.data``), so every optimizer step on a virtual prototype also
  moves the new-class text row it was initialised from (an aliasing side effect the paper does not
  describe). Here the text features are a frozen buffer: new-class text rows stay the CLIP text features,
  and the virtual prototypes are their own trainable copy.
"""
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm
from yacs.config import CfgNode as CN

from engine.config import ConfigError, register_config
from engine.config import Block, Blocks, Bool, Choice, Float, Int, PerDataset, PRECISIONS, Str, declare_keys  # noqa: F401
from engine.losses import compensating_la_ce
from engine.registry import TRAINER_REGISTRY, MethodInfo
from engine.trainer import TrainerX
from trainers.common import frozen_text_features

VIR_INITS = ("text", "visual")


@register_config
def add_candle_config(cfg):
    c = cfg.TRAINER.CANDLE = CN()
    c.SCALE = 0.5             # temperature ratio of the visual-visual logits (reference default 0.5;
    #                           the reference example run and our config use 1.0)
    c.VIR_INIT = "text"       # virtual prototypes of new classes: text | visual
    c.VIR_INIT_STD = 0.05     # noise std of the "visual" init
    c.NUM_HEADS = 8           # fusion attention heads
    c.DROPOUT = 0.1           # fusion attention dropout
    c.RATIO_INIT = 0.1        # initial residual scale r of the fusion block
    c.USE_NEW_NAMES = True    # B2N: train with virtual prototypes / text of the new class names (Candle)
    c.CACHE_FEATURES = False  # train on cached test-transform features (no augmentation); see module doc
    c.PREC = "fp16"           # fp16/amp -> autocast on GPU; CPU always runs fp32
    declare_keys(cfg, "TRAINER.CANDLE", SCALE=Float(0, open_low=True), VIR_INIT=Choice(*VIR_INITS),
                 VIR_INIT_STD=Float(0), NUM_HEADS=Int(1), DROPOUT=Float(0, 1, open_high=True), RATIO_INIT=Float(0),
                 USE_NEW_NAMES=Bool(), CACHE_FEATURES=Bool(), PREC=Choice(*PRECISIONS))


class CandleHead(nn.Module):
    """Trainable Candle head plus the persistent prototype / text buffers (see the module docstring)."""

    def __init__(self, text_features, num_base, logit_scale, scale, num_heads=8, dropout=0.1, ratio_init=0.1):
        super().__init__()
        dim = text_features.shape[1]
        self.num_base = num_base
        self.logit_scale = float(logit_scale)
        self.scale = float(scale)
        self.a_img = nn.Parameter(torch.eye(dim))
        self.a_txt = nn.Parameter(torch.eye(dim))
        self.virtual_prototypes = nn.Parameter(text_features[num_base:].clone().float())
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout)
        self.ratio = nn.Parameter(torch.tensor([float(ratio_init)]))
        self.register_buffer("text_features", text_features.clone().float())
        self.register_buffer("visual_prototypes", torch.zeros(num_base, dim))

    def prototypes(self):
        """Q = [base visual prototypes; virtual prototypes] (C_all x D)."""
        return torch.cat([self.visual_prototypes, self.virtual_prototypes])

    def fuse(self, x):
        x = self.norm(x)
        out, _ = self.attn(x, x, x, need_weights=False)
        return self.ratio * out + x

    def forward(self, image_features, prototypes, text_features, training=True):
        """Return (z0, z_vt, z_vv). Rows: images then prototypes when ``training``, images only
        otherwise; columns: the classes of ``text_features`` / ``prototypes`` (same order)."""
        n_img, n_cls = image_features.shape[0], prototypes.shape[0]
        f = image_features @ self.a_img
        q = prototypes @ self.a_img
        t = text_features @ self.a_txt
        rows = torch.cat([f, q]) if training else f
        z0 = self.logit_scale * F.normalize(rows, dim=-1) @ F.normalize(t, dim=-1).t()
        x = self.fuse(torch.cat([f, q, t]))
        f2, q2, t2 = x[:n_img], x[n_img:n_img + n_cls], x[n_img + n_cls:]
        rows = F.normalize(torch.cat([f2, q2]) if training else f2, dim=-1)
        z_vt = self.logit_scale * rows @ F.normalize(t2, dim=-1).t()
        z_vv = self.logit_scale * self.scale * rows @ F.normalize(q2, dim=-1).t()
        return z0, z_vt, z_vv

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # An eval-only run on another class set builds the head with its own sizes; take the trained
        # sizes of the class-set tensors from the checkpoint before loading them.
        for name in ("text_features", "visual_prototypes", "virtual_prototypes"):
            incoming = state_dict.get(prefix + name)
            current = getattr(self, name)
            if incoming is None or incoming.shape == current.shape:
                continue
            fresh = current.new_zeros(incoming.shape)
            if name in self._parameters:
                self._parameters[name] = nn.Parameter(fresh, requires_grad=current.requires_grad)
            else:
                self._buffers[name] = fresh
        self.num_base = (state_dict[prefix + "visual_prototypes"].shape[0]
                         if prefix + "visual_prototypes" in state_dict else self.num_base)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _FeatureSet(Dataset):
    def __init__(self, features, labels):
        self.features, self.labels = features, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"feat": self.features[i], "label": self.labels[i], "index": i}


def class_means(features, labels, num_classes):
    """(num_classes, D) mean feature per label and the (num_classes,) sample counts (0 -> zero row)."""
    sums = features.new_zeros(num_classes, features.shape[1]).index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes)
    return sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype), counts


def match_names(names, reference):
    """For each name, the index of the first not yet used equal name in ``reference`` (or None)."""
    free = {}
    for i, name in enumerate(reference):
        free.setdefault(name, []).append(i)
    return [free[n].pop(0) if free.get(n) else None for n in names]


METHOD = MethodInfo(
    configs=dict.fromkeys(("b2n", "fewshot", "xd"), "vit_b16_bs128_lr0.0003_ep50"),
    la="own", bench_prepare=lambda trainer, batch: trainer.prepare_benchmark(batch))


@TRAINER_REGISTRY.register("Candle", info=METHOD)
class Candle(TrainerX):
    def build_model(self):
        c = self.cfg.TRAINER.CANDLE
        if c.VIR_INIT not in VIR_INITS:
            raise ConfigError(f"TRAINER.CANDLE.VIR_INIT must be one of {list(VIR_INITS)}, got {c.VIR_INIT!r}")
        dim = self.clip.embed_dim
        if dim % c.NUM_HEADS:
            raise ConfigError(f"TRAINER.CANDLE.NUM_HEADS {c.NUM_HEADS} must divide the feature width {dim}")
        if self.cfg.TRAINER.LOSS == "la":
            self.log("Candle: its loss is already the compensating logit-adjusted CE; TRAINER.LOSS la adds nothing")
        base = list(self.classnames)
        self.trained_names = base + self.unseen_training_names()
        text = frozen_text_features(self.clip, self.dataset.template, self.trained_names, normalize=False)
        self.head = CandleHead(text.float(), len(base), self.clip.logit_scale.item(), c.SCALE, c.NUM_HEADS,
                               c.DROPOUT, c.RATIO_INIT).to(self.device)
        self.register_model("head", self.head, *self.build_optim_sched(self.head))
        # Compensating LA: base training counts, 0 for the new classes (+1 for every class in the loss).
        n_new = len(self.trained_names) - len(base)
        self.class_counts = [float(n) for n in self.dataset.train_counts] + [0.0] * n_new
        self.feature_loader = None  # TRAINER.CANDLE.CACHE_FEATURES: batches of cached frozen features
        self.eval_set = None
        self.log(f"Candle head for {len(base)} classes with visual prototypes and "
                 f"{n_new} with virtual prototypes")

    def unseen_training_names(self):
        """Class names of the dataset outside the trained split (B2N: the new classes), base-first order."""
        if not self.cfg.TRAINER.CANDLE.USE_NEW_NAMES:
            return []
        all_names, names = list(self.dataset.all_classnames), list(self.classnames)
        if all_names[:len(names)] != names:
            return []
        return all_names[len(names):]

    # ---- checkpoint extras: which class names the prototypes / text rows belong to
    def extra_checkpoint_state(self):
        return {"candle_classnames": list(self.trained_names)}

    def load_extra_checkpoint_state(self, state):
        if "candle_classnames" in state:
            self.trained_names = list(state["candle_classnames"])
            n_base = self.head.num_base
            self.log(f"Candle: checkpoint holds {n_base} base classes (visual prototypes) and "
                     f"{len(self.trained_names) - n_base} new classes (virtual prototypes)")

    # ---- prototypes and the feature cache
    @torch.no_grad()
    def encode_items(self, items, desc):
        """Frozen image features (N, D) and labels of ``items`` under the test transform, in order."""
        loader = self.dm.build_loader(items, is_train=False)
        feats, labels = [], []
        for batch in tqdm(loader, desc=desc, leave=False, disable=not sys.stderr.isatty()):
            with self.autocast():
                feats.append(self.clip.encode_image(batch["img"].to(self.device)).float())
            labels.append(batch["label"].to(self.device))
        return torch.cat(feats), torch.cat(labels)

    @torch.no_grad()
    def set_prototypes(self, features, labels):
        """Base visual prototypes = mean frozen feature per base class; a class without any image falls
        back to its text feature (logged)."""
        head = self.head
        means, counts = class_means(features.float(), labels.long(), head.num_base)
        missing = (counts == 0).nonzero().flatten().tolist()
        if missing:
            means[missing] = head.text_features[missing]
            self.log(f"Candle: {len(missing)} base class(es) have no training image; their prototype is "
                     f"the text feature")
        head.visual_prototypes.copy_(means)
        if self.cfg.TRAINER.CANDLE.VIR_INIT == "visual" and head.virtual_prototypes.numel():
            c = self.cfg.TRAINER.CANDLE
            init = means.mean(dim=0, keepdim=True).expand_as(head.virtual_prototypes)
            head.virtual_prototypes.copy_(init + torch.randn_like(init) * c.VIR_INIT_STD)

    def before_train(self, resumed):
        cache = self.cfg.TRAINER.CANDLE.CACHE_FEATURES
        if resumed and not cache:
            return  # prototypes come from the checkpoint
        features, labels = self.encode_items(self.dataset.train_x, "Candle: training-set features")
        if not resumed:
            self.set_prototypes(features, labels)
            self.log(f"Candle: visual prototypes from {len(labels)} training images (test transform)")
        if cache:
            self.use_feature_cache(features, labels)

    def use_feature_cache(self, features, labels):
        """Train on cached frozen features: a loader over the features with the image loader's batch size,
        shuffling and drop-last rule (re-seeded every epoch by the engine) serves the training batches."""
        bs = self.cfg.DATALOADER.TRAIN_X.BATCH_SIZE
        generator = torch.Generator().manual_seed(max(int(self.cfg.SEED), 0))
        self.feature_loader = DataLoader(_FeatureSet(features.cpu(), labels.cpu()), batch_size=bs, shuffle=True,
                                         drop_last=len(labels) >= bs, generator=generator, num_workers=0)
        self.log(f"Candle: training on {len(labels)} cached frozen features (no augmentation)")

    def prepare_benchmark(self, batch):
        """tools.bench: prototypes from the random batch (its images do not exist on disk)."""
        with torch.no_grad():
            features = self.clip.encode_image(batch["img"].to(self.device)).float()
        self.set_prototypes(features, batch["label"].to(self.device))

    # ---- training
    def train_loader(self):
        return self.feature_loader if self.feature_loader is not None else super().train_loader()

    def parse_batch_train(self, batch):
        labels = batch["label"].to(self.device)
        if "feat" in batch:
            return batch["feat"].to(self.device), labels, True
        return batch["img"].to(self.device), labels, False

    def candle_loss(self, outputs, targets):
        """Sum of the compensating LA losses of (z0, z_vt, z_vv) and the three terms."""
        terms = [compensating_la_ce(z.float(), targets, self.class_counts) for z in outputs]
        return terms[0] + terms[1] + terms[2], terms

    def forward_backward(self, batch):
        inputs, labels, is_feature = self.parse_batch_train(batch)
        head = self.head
        with self.autocast():
            if is_feature:
                features = inputs
            else:
                with torch.no_grad():
                    features = self.clip.encode_image(inputs)
            outputs = head(features, head.prototypes(), head.text_features, training=True)
            targets = torch.cat([labels, torch.arange(head.text_features.shape[0], device=self.device)])
            loss, terms = self.candle_loss(outputs, targets)
        self.model_backward_and_update(loss)
        n = labels.shape[0]
        pred = (outputs[1][:n, :head.num_base] + outputs[2][:n, :head.num_base]).argmax(1)
        return {"loss": loss.item(), "loss_pre": terms[0].item(), "loss_vt": terms[1].item(),
                "loss_vv": terms[2].item(), "acc": (pred == labels).float().mean().item() * 100}

    # ---- evaluation
    @torch.no_grad()
    def eval_class_set(self):
        """(Q, T, columns): prototypes and text features of the class set fused at test time and the
        column of each evaluated class (in label order)."""
        head, names = self.head, list(self.classnames)
        trained = list(self.trained_names)
        all_names = list(self.dataset.all_classnames)
        if all_names[:len(trained)] == trained:
            # Same dataset: the evaluated split is a block of the base-then-new class order.
            start = len(self.dataset.base_classnames) if self.cfg.DATASET.SUBSAMPLE_CLASSES == "new" else 0
            if all_names[start:start + len(names)] != names:
                raise RuntimeError("Candle: the evaluated classes are not a block of the dataset's class list")
            positions = [start + i for i in range(len(names))]
            columns = [p if p < len(trained) else None for p in positions]
        else:
            columns = match_names(names, trained)  # another dataset: match by class name
        extra = [n for n, col in zip(names, columns) if col is None]
        q, t = head.prototypes(), head.text_features
        if extra:
            extra_text = frozen_text_features(self.clip, self.dataset.template, extra, normalize=False).float()
            q, t = torch.cat([q, extra_text]), torch.cat([t, extra_text])
            it = iter(range(len(trained), len(trained) + len(extra)))
            columns = [next(it) if col is None else col for col in columns]
            self.log(f"Candle: {len(extra)} evaluated class(es) are not among the trained classes; their "
                     f"prototypes are their text features (untrained)")
        return q, t, torch.tensor(columns, dtype=torch.long, device=self.device)

    def before_test(self):
        self.eval_set = self.eval_class_set()

    def predict_scores(self, z_vt, z_vv):
        """z_vt + z_vv restricted to the evaluated split's columns."""
        return (z_vt + z_vv)[:, self.eval_set[2]]

    def model_inference(self, images):
        if self.eval_set is None:
            self.before_test()
        q, t, _ = self.eval_set
        features = self.clip.encode_image(images)
        _, z_vt, z_vv = self.head(features, q, t, training=False)
        return self.predict_scores(z_vt, z_vv)
