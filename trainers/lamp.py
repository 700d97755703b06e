"""LAMP: Long-tailed Multimodal Prompt learning (docs/methods/lamp.md).

Per LAMP layer l: a Multimodal Prompt Pool of M image/text prompt pairs (L_p tokens of dim D each), S
Modality-Shared Prompts, and per-modality projectors D -> width. The image cls state entering block l
retrieves the top-K pool entries (cosine with the projected visual prompts + a load-balancing bias);
the retrieved visual prompts and the shared prompts go into the image sequence, the paired text prompts
of the same entries into every class sequence of that image (B x C text sequences). After each optimizer
step the Load Balancing Optimization moves the bias against over-used entries (corrected sign, §2.4).
"""
import math
import random

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from engine.config import ConfigError, register_config
from engine.config import Block, Blocks, Bool, Choice, Float, Int, PerDataset, PRECISIONS, Str, declare_keys  # noqa: F401
from engine.prompted_clip import (TowerHooks, as_tensor, insert_after_first, length_buckets, repeat_batch,
                                  replace_after_first)
from engine.registry import TRAINER_REGISTRY, MethodInfo
from engine.steps import micro_batched_step
from engine.trainer import TrainerX
from trainers.common import cosine_logits, template_prompts


@register_config
def add_lamp_config(cfg):
    c = cfg.TRAINER.LAMP = CN()
    c.LAYERS = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]  # blocks (1-indexed) that get LAMP prompts
    c.POOL_SIZE = 20          # M prompt pairs per layer
    c.TOP_K = 6               # K entries retrieved per image and layer
    c.POOL_TOKENS = 2         # L_p tokens per pool entry
    c.SHARED_TOKENS = 2       # S modality-shared prompt tokens per layer
    c.PROMPT_DIM = 32         # D, the low-dimensional prompt space
    c.PROJ_HIDDEN = 32        # hidden width of the per-layer projectors D -> h -> width
    c.INIT_STD = 0.02         # normal init of pool / shared prompts
    c.BETA = 2.0              # weight of the query-key similarity loss
    c.USE_POOL = True         # MPP on/off
    c.USE_MSP = True          # MSP on/off
    c.USE_LBO = True          # load-balancing bias on/off (off: b = 0)
    c.LBO_SIGN = "corrected"  # corrected: b -= g*sign(load - K/M); literal: Eq. 9 as printed (+=)
    c.GAMMA0 = 5e-4           # initial bias step
    c.GAMMA_SCHEDULE = "cosine"  # cosine decay over all training steps, or constant
    c.QUERY_SOURCE = "layer_cls"  # layer_cls: cls entering block l; frozen_cls: same state in a prompt-free pass
    c.KEY_TYPE = "projected"  # projected: key = mean projected visual prompt; learned: extra key in R^width
    c.TEXT_SELECTION = "paired"  # paired: text prompts of the image's entries; eot_classwise: each class
    # sequence retrieves with its EOT state entering the layer, with its own load-balanced bias and its
    # own similarity term in the loss (§2.1 applied to the text pool; A3-(II))
    c.TRAIN_CLASSNAMES = "base"  # base: softmax over base names; all: new names as extra negatives
    c.NEW_BIAS_ADAPT = True   # adapt a separate bias on unlabeled new-class training images (B2N new test)
    c.NEW_BIAS_BATCH = 4
    c.NEW_BIAS_EPOCHS = 1
    c.NEW_BIAS_GAMMA = -1.0   # constant step of the adaptation pass; < 0: GAMMA0 (so a gamma sweep moves both)
    c.NEW_BIAS_LONG_TAILED = True  # adapt on the new-class train split as §2.5 defines it (100-cap + the same
    # down-sampling); False: the capped split without down-sampling
    # encode the classes in groups of similar token length, each cut after its own longest EOT (exact in
    # arithmetic, not in round-off: other GEMM shapes, so opt-in like MODEL.CLS_ONLY_LAST_VISION_BLOCK)
    c.TEXT_LENGTH_BUCKETS = False
    c.TEXT_CHUNK = 4096       # max text sequences (images x classes) per text-encoder call without gradient
    c.MAX_TEXT_SEQS_WITH_GRAD = 8192  # training: images are split into micro-batches (gradients accumulated,
    # one optimizer step and one LBO update per batch) so that at most this many text sequences keep
    # activations for backward at once; bounds memory on ImageNet-size class sets (exact)
    c.PREC = "amp"
    declare_keys(
        cfg, "TRAINER.LAMP", LAYERS=Blocks("both"), POOL_SIZE=Int(1), TOP_K=Int(1), POOL_TOKENS=Int(1),
        SHARED_TOKENS=Int(1), PROMPT_DIM=Int(1), PROJ_HIDDEN=Int(1), INIT_STD=Float(0), BETA=Float(0),
        USE_POOL=Bool(), USE_MSP=Bool(), USE_LBO=Bool(), LBO_SIGN=Choice("corrected", "literal"), GAMMA0=Float(0),
        GAMMA_SCHEDULE=Choice("cosine", "constant"), QUERY_SOURCE=Choice("layer_cls", "frozen_cls"),
        KEY_TYPE=Choice("projected", "learned"), TEXT_SELECTION=Choice("paired", "eot_classwise"),
        TRAIN_CLASSNAMES=Choice("base", "all"), NEW_BIAS_ADAPT=Bool(), NEW_BIAS_BATCH=Int(1), NEW_BIAS_EPOCHS=Int(1),
        NEW_BIAS_GAMMA=Float(), NEW_BIAS_LONG_TAILED=Bool(), TEXT_LENGTH_BUCKETS=Bool(), TEXT_CHUNK=Int(1),
        MAX_TEXT_SEQS_WITH_GRAD=Int(1),
        PREC=Choice(*PRECISIONS),
        relations=[lambda c, cfg: None if not c.USE_POOL or c.TOP_K <= c.POOL_SIZE else
                   f"TOP_K ({c.TOP_K}) must be <= POOL_SIZE ({c.POOL_SIZE}): K entries are retrieved from a pool of M",
                   lambda c, cfg: None if c.USE_POOL or c.USE_MSP else
                   "USE_POOL and USE_MSP are both off, so there is nothing to learn",
                   lambda c, cfg: None if not (c.TEXT_LENGTH_BUCKETS and c.USE_POOL and c.TEXT_SELECTION != "paired")
                   else "TEXT_LENGTH_BUCKETS needs TEXT_SELECTION paired (eot_classwise records its text retrievals "
                        "over all classes in one call)"])


def _projector(dim, hidden, width):
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, width))


class LampLayer(nn.Module):
    """Pool, shared prompts, projectors and load-balancing state of one layer."""

    def __init__(self, c, vision_width, text_width):
        super().__init__()
        m, lp, d = c.POOL_SIZE, c.POOL_TOKENS, c.PROMPT_DIM
        self.pool_v = nn.Parameter(torch.randn(m, lp, d) * c.INIT_STD) if c.USE_POOL else None
        self.pool_t = nn.Parameter(torch.randn(m, lp, d) * c.INIT_STD) if c.USE_POOL else None
        self.shared = nn.Parameter(torch.randn(c.SHARED_TOKENS, d) * c.INIT_STD) if c.USE_MSP else None
        self.proj_v = _projector(d, c.PROJ_HIDDEN, vision_width)
        self.proj_t = _projector(d, c.PROJ_HIDDEN, text_width)
        self.keys = (nn.Parameter(torch.randn(m, vision_width) * c.INIT_STD)
                     if c.USE_POOL and c.KEY_TYPE == "learned" else None)
        self.register_buffer("bias", torch.zeros(m))       # b, used for training and the base test
        self.register_buffer("bias_new", torch.zeros(m))   # b adapted on unlabeled new-class images
        self.register_buffer("load", torch.zeros(m))       # running mean of selection fractions (this epoch)
        self.register_buffer("text_bias", torch.zeros(m))  # TEXT_SELECTION eot_classwise: the text pool's own b
        self.register_buffer("text_load", torch.zeros(m))

    def vision_keys(self):
        if self.keys is not None:
            return self.keys
        return self.proj_v(self.pool_v).mean(dim=1)      # (M, Dv)

    def text_keys(self):
        return self.proj_t(self.pool_t).mean(dim=1)      # (M, Dt)

    def prompts(self, pool, proj, idx, batch):
        """Projected [retrieved pool tokens (by descending score); shared tokens] -> (B or 1, n_p, width)."""
        parts = []
        if idx is not None:
            parts.append(pool[idx].flatten(1, 2))        # (B, K*L_p, D)
        if self.shared is not None:
            parts.append(self.shared.unsqueeze(0).expand(batch, -1, -1))
        return proj(torch.cat(parts, dim=1))


class LampPrompts(nn.Module):
    """All LAMP layers plus the hooks that plug them into the encoder."""

    def __init__(self, c, encoder):
        super().__init__()
        n_layers = encoder.n_vision_layers
        if not c.LAYERS or any(l < 1 or l > min(n_layers, encoder.n_text_layers) for l in c.LAYERS):
            raise ConfigError(f"TRAINER.LAMP.LAYERS {list(c.LAYERS)} must be block indices in 1..{n_layers}")
        if c.USE_POOL and not 1 <= c.TOP_K <= c.POOL_SIZE:
            raise ConfigError(f"TRAINER.LAMP.TOP_K ({c.TOP_K}) must be in 1..POOL_SIZE ({c.POOL_SIZE})")
        if not (c.USE_POOL or c.USE_MSP):
            raise ConfigError("TRAINER.LAMP: USE_POOL and USE_MSP are both off, so there is nothing to learn")
        for key, allowed in [("LBO_SIGN", ("corrected", "literal")), ("GAMMA_SCHEDULE", ("cosine", "constant")),
                             ("QUERY_SOURCE", ("layer_cls", "frozen_cls")), ("KEY_TYPE", ("projected", "learned")),
                             ("TEXT_SELECTION", ("paired", "eot_classwise")), ("TRAIN_CLASSNAMES", ("base", "all"))]:
            if c[key] not in allowed:
                raise ConfigError(f"TRAINER.LAMP.{key} must be one of {allowed}, got '{c[key]}'")
        self.cfg = c
        self.layer_ids = sorted(int(l) for l in c.LAYERS)
        self.layers = nn.ModuleDict({str(l): LampLayer(c, encoder.vision_width, encoder.text_width)
                                     for l in self.layer_ids})
        self.register_buffer("global_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("epoch_steps", torch.zeros((), dtype=torch.long))  # G in §2.4
        self.use_new_bias = False
        self.indices = {}        # layer -> (B, K) retrieved entries of the last image batch
        self.text_indices = {}   # layer -> (C, K) entries retrieved by the class sequences (eot_classwise)
        self.sim_losses = []
        self.frozen_queries = None
        self.vision_hooks = _VisionHooks(self)
        self.text_hooks = _TextHooks(self)

    @property
    def k(self):
        return self.cfg.TOP_K

    def tokens_per_layer(self):
        """Prompt tokens each LAMP layer puts into a sequence."""
        c = self.cfg
        return c.TOP_K * c.POOL_TOKENS * c.USE_POOL + c.SHARED_TOKENS * c.USE_MSP

    def layer(self, l):
        return self.layers[str(l)]

    def current_bias(self, layer, text=False):
        if not self.cfg.USE_LBO:
            return torch.zeros_like(layer.bias)
        if text:
            return layer.text_bias
        return layer.bias_new if self.use_new_bias else layer.bias

    def retrieve(self, layer, query, keys, text=False):
        """Biased top-K (descending by biased score) and the similarity term for the chosen keys. Scores are
        fp32 even under autocast, so low-precision rounding never reorders the top-K."""
        with torch.autocast(query.device.type, enabled=False):
            sim = F.normalize(query.detach().float(), dim=-1) @ F.normalize(keys.float(), dim=-1).t()  # (B, M)
            idx = (sim.detach() + self.current_bias(layer, text)).topk(self.k, dim=1).indices
            return idx, (1 - sim.gather(1, idx).mean(dim=1)).mean()

    # ---- load balancing (§2.4)
    @torch.no_grad()
    def record_load(self):
        """Add the last batch's selection fractions to the running mean of this epoch (or test pass)."""
        if not self.cfg.USE_POOL or not self.indices:
            return False
        self.epoch_steps += 1
        g = float(self.epoch_steps)
        for l, idx in self.indices.items():
            layer = self.layer(l)
            frac = F.one_hot(idx, self.cfg.POOL_SIZE).sum(dim=1).float().mean(dim=0)  # sums to K
            layer.load.mul_((g - 1) / g).add_(frac / g)
            if l in self.text_indices:
                frac_t = F.one_hot(self.text_indices[l], self.cfg.POOL_SIZE).sum(dim=1).float().mean(dim=0)
                layer.text_load.mul_((g - 1) / g).add_(frac_t / g)
        return True

    @torch.no_grad()
    def lbo_update(self, gamma, use_new_bias=False):
        """Record the batch's selections (always: the load diagnostics of a run without LBO are measured the
        same way), then, with LBO on, move the bias against the over-used entries. Without LBO b stays 0."""
        if not self.record_load() or not self.cfg.USE_LBO:
            return
        target = self.k / self.cfg.POOL_SIZE
        sign = -1.0 if self.cfg.LBO_SIGN == "corrected" else 1.0
        for l in self.indices:
            layer = self.layer(l)
            bias = layer.bias_new if use_new_bias else layer.bias
            bias.add_(sign * gamma * torch.sign(layer.load - target))
            if l in self.text_indices and not use_new_bias:
                layer.text_bias.add_(sign * gamma * torch.sign(layer.text_load - target))

    def reset_load(self):
        self.epoch_steps.zero_()
        for layer in self.layers.values():
            layer.load.zero_()
            layer.text_load.zero_()

    def gamma(self, total_steps):
        g0 = self.cfg.GAMMA0
        if self.cfg.GAMMA_SCHEDULE == "constant" or total_steps <= 0:
            return g0
        return g0 * 0.5 * (1 + math.cos(math.pi * float(self.global_step) / total_steps))

    def load_diagnostics(self, use_new_bias=False):
        """Per layer: the per-entry selection frequencies of this epoch or test pass (sum 1), their min / max /
        entropy and coefficient of variation ``cv`` (population std / mean over the M entries: 0 = perfectly
        balanced; None before any selection was recorded), and the range of the bias in use (``bias_new`` with
        ``use_new_bias``)."""
        out = {}
        for l in self.layer_ids:
            layer = self.layer(l)
            p = layer.load / layer.load.sum().clamp_min(1e-12)
            entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
            recorded = float(layer.load.sum()) > 0
            bias = layer.bias_new if use_new_bias else layer.bias
            out[str(l)] = {"freq": [round(float(v), 6) for v in p], "min": float(p.min()), "max": float(p.max()),
                           "entropy": entropy,
                           "cv": float(p.std(unbiased=False) / p.mean()) if recorded else None,
                           "max_entropy": math.log(self.cfg.POOL_SIZE),
                           "bias_min": float(bias.min()), "bias_max": float(bias.max())}
        return out


class _LampHooks(TowerHooks):
    """Acts only before the LAMP blocks; everything before the first one is prompt-free."""

    def __init__(self, owner):
        self.owner = owner
        self.start_layer = owner.layer_ids[0]

    def before_block(self, l, x, state):
        if str(l) not in self.owner.layers:
            return x
        return self.prompt(self.owner, self.owner.layer(l), l == self.owner.layer_ids[0], l, x, state)


class _VisionHooks(_LampHooks):
    def replaced_after(self, l):
        """Every LAMP layer after the first replaces the prompt positions the blocks before it produced."""
        o = self.owner
        return o.tokens_per_layer() if l >= o.layer_ids[0] and str(l + 1) in o.layers else 0

    def prompt(self, o, layer, first, l, x, state):
        idx = None
        if o.cfg.USE_POOL:
            query = o.frozen_queries[l] if o.frozen_queries is not None else x[:, 0]
            idx, sim = o.retrieve(layer, query.float(), layer.vision_keys())
            o.indices[l] = idx
            o.sim_losses.append(sim)
        prompts = layer.prompts(layer.pool_v, layer.proj_v, idx, x.shape[0])
        return insert_after_first(x, prompts, state) if first else replace_after_first(x, prompts, state)


class _TextHooks(_LampHooks):
    """Paired: class sequences are repeated per image (image-major) and get that image's text prompts.
    EOT class-wise: each class sequence retrieves its own entries with its EOT state (C sequences)."""

    def prompt(self, o, layer, first, l, x, state):
        idx = None
        if o.cfg.USE_POOL and o.cfg.TEXT_SELECTION == "paired":
            idx = o.indices[l]                                   # (B, K) from the vision pass
            if first:
                x = repeat_batch(x, state, idx.shape[0])         # row b*C + c: class c for image b
            prompts = layer.prompts(layer.pool_t, layer.proj_t, idx, idx.shape[0])  # one set per image
        elif o.cfg.USE_POOL:
            x = as_tensor(x)                                     # class-wise prompts: nothing to share
            eot_state = x[torch.arange(x.shape[0], device=x.device), state.eot].float()
            idx, sim = o.retrieve(layer, eot_state, layer.text_keys(), text=True)
            o.text_indices[l] = idx
            o.sim_losses.append(sim)
            prompts = layer.prompts(layer.pool_t, layer.proj_t, idx, x.shape[0])
        else:
            prompts = layer.prompts(layer.pool_t, layer.proj_t, None, 1)  # shared prompts only
        return insert_after_first(x, prompts, state) if first else replace_after_first(x, prompts, state)


METHOD = MethodInfo(
    configs={"b2n": "vit_b16_lt_b2n", "fewshot": "vit_b16_fewshot", "xd": "vit_b16_xd"},
    run_neutral=("TRAINER.LAMP.TEXT_CHUNK", "TRAINER.LAMP.MAX_TEXT_SEQS_WITH_GRAD",
                 "TRAINER.LAMP.TEXT_LENGTH_BUCKETS"),
    bench_images_per_backward=lambda trainer, batch, classes: trainer.images_per_micro_batch(batch, classes))


@TRAINER_REGISTRY.register("LAMP", info=METHOD)
class LAMP(TrainerX):
    def build_model(self):
        c = self.cfg.TRAINER.LAMP
        if not self.clip.is_vit:
            raise ConfigError("LAMP needs a ViT backbone (it prompts the image transformer)")
        self.lamp = LampPrompts(c, self.clip).to(self.device)
        self.register_model("lamp", self.lamp, *self.build_optim_sched(self.lamp))
        train_names = self.classnames
        if c.TRAIN_CLASSNAMES == "all" and self.cfg.DATASET.SUBSAMPLE_CLASSES == "base":
            if self.cfg.TRAINER.LOSS == "la":
                raise ConfigError("TRAINER.LOSS la needs base-only training names (TRAIN_CLASSNAMES base)")
            train_names = list(self.dataset.all_classnames)      # base first, then new (labels unchanged)
        template = self.dataset.template
        self.train_tokens = self.clip.tokenize(template_prompts(template, train_names)).to(self.device)
        self.eval_tokens = self.clip.tokenize(template_prompts(template, self.classnames)).to(self.device)
        self.total_steps = self.max_epoch * max(1, len(self.dm.train_loader_x))
        self.load_history = []
        self.record_test_load = False   # count selections during a test pass (new-class diagnostics)
        self.eval_diagnostics = {}
        self.adaptation_info = None

    # ---- forward
    def encode_images(self, images):
        o = self.lamp
        o.indices, o.text_indices, o.sim_losses, o.frozen_queries = {}, {}, [], None
        if o.cfg.USE_POOL and o.cfg.QUERY_SOURCE == "frozen_cls":
            # the blocks before the first LAMP layer are prompt-free in both passes: run them once
            first = o.layer_ids[0]
            with torch.no_grad():
                shared = self.clip.encode_image(images, upto=first - 1)
            o.frozen_queries = self.frozen_cls_states(shared, first)
            return self.clip.encode_image(images, o.vision_hooks, start=(shared, first))
        return self.clip.encode_image(images, o.vision_hooks)

    def similarity_loss(self):
        """Σ over LAMP layers of the query-key term of the retrievals made since ``encode_images``."""
        losses = self.lamp.sim_losses
        return torch.stack(losses).sum() if losses else torch.zeros((), device=self.device)

    @torch.no_grad()
    def frozen_cls_states(self, x, first):
        """The cls state entering each block first..last LAMP layer of the prompt-free pass, from ``x``, the
        sequence entering block ``first`` (nothing after the last LAMP layer is read, so the pass stops there)."""
        states = {}

        class Recorder(TowerHooks):
            start_layer = first

            def before_block(self, l, x, state):
                states[l] = x[:, 0].clone()
                return x

        last = self.lamp.layer_ids[-1]
        states[last] = self.clip.encode_image(None, Recorder(), upto=last - 1, start=(x, first))[:, 0].clone()
        return states

    def encode_texts(self, tokens, batch):
        """(B, C, D) for paired selection, (C, D) otherwise; classes in chunks, and with TEXT_LENGTH_BUCKETS in
        groups of similar length (each truncated at its own longest EOT; not with eot_classwise selection,
        whose retrievals are recorded per call)."""
        c = self.lamp.cfg
        paired = c.USE_POOL and c.TEXT_SELECTION == "paired"
        per_call = max(1, c.TEXT_CHUNK // batch) if paired else len(tokens)
        calls = length_buckets(tokens, self.lamp.tokens_per_layer(), per_call) if c.TEXT_LENGTH_BUCKETS else None
        parts = tokens.split(per_call) if calls is None else [tokens[idx] for idx in calls]
        feats = [self.clip.encode_text(part, self.lamp.text_hooks) for part in parts]
        feats = torch.cat([f.view(batch, -1, f.shape[-1]) for f in feats], dim=1) if paired else torch.cat(feats)
        if calls is not None:
            order = torch.cat(calls)
            restore = torch.empty_like(order)
            restore[order] = torch.arange(len(order), device=order.device)
            feats = feats[:, restore] if paired else feats[restore]
        return feats

    def logits(self, images, tokens):
        image_features = self.encode_images(images)
        text_features = self.encode_texts(tokens, images.shape[0])
        logits = cosine_logits(image_features, text_features, self.clip.logit_scale)
        return logits, self.similarity_loss()

    def images_per_micro_batch(self, batch, num_classes=None):
        """Images per backward pass so that at most MAX_TEXT_SEQS_WITH_GRAD text sequences keep activations."""
        c = self.lamp.cfg
        num_classes = len(self.train_tokens) if num_classes is None else num_classes
        per_image = num_classes if c.USE_POOL and c.TEXT_SELECTION == "paired" else 0
        if per_image == 0:
            return batch
        return max(1, min(batch, c.MAX_TEXT_SEQS_WITH_GRAD // per_image))

    def forward_backward(self, batch):
        """One optimizer step over the batch, in micro-batches of images when the per-image text pass would
        keep too many sequences for backward (``engine.steps.micro_batched_step``: the accumulated gradient
        equals the whole batch's); LBO then sees the whole batch's selections once."""
        images, labels = self.parse_batch_train(batch)
        indices, text_indices = {}, {}

        def part_loss(part):
            nonlocal text_indices
            logits, sim = self.logits(images[part], self.train_tokens)
            ce = self.compute_loss(logits, labels[part])
            for l, idx in self.lamp.indices.items():
                indices.setdefault(l, []).append(idx)
            text_indices = self.lamp.text_indices  # class-wise selections do not depend on the image
            acc = (logits.argmax(1) == labels[part]).float().mean() * 100
            loss = ce + self.lamp.cfg.BETA * sim
            return loss, {"loss": loss, "ce": ce, "sim": sim, "acc": acc}

        out = micro_batched_step(self, images.shape[0], self.images_per_micro_batch(images.shape[0]), part_loss)
        self.lamp.indices = {l: torch.cat(parts) for l, parts in indices.items()}
        self.lamp.text_indices = text_indices
        self.lamp.lbo_update(self.lamp.gamma(self.total_steps))
        self.lamp.global_step += 1
        return out

    def model_inference(self, images):
        logits = self.logits(images, self.eval_tokens)[0]
        if self.record_test_load:
            self.lamp.record_load()
        return logits

    # ---- epochs, diagnostics
    def before_epoch(self):
        super().before_epoch()
        self.lamp.reset_load()

    def after_epoch(self):
        diag = self.lamp.load_diagnostics()
        self.load_history.append(diag)
        self.log("load per layer (min/max/entropy of selection freq.): " + "; ".join(
            f"L{l} {d['min']:.3f}/{d['max']:.3f}/{d['entropy']:.2f}" for l, d in diag.items()))
        super().after_epoch()

    def epoch_scalars(self):
        """The epoch's selection load per LAMP layer: coefficient of variation, entropy, min / max frequency
        and the bias range (the figures of ``load_diagnostics``)."""
        out = {}
        for l, d in (self.load_history[-1] if self.load_history else {}).items():
            for key in ("cv", "entropy", "min", "max", "bias_min", "bias_max"):
                out[f"lamp_load/L{l}/{key}"] = d[key]
        return out

    def extra_results(self):
        out = {"load_diagnostics": self.load_history[-1] if self.load_history else self.lamp.load_diagnostics()}
        if self.eval_diagnostics:  # new-class run: selections on the test images under each number's bias
            out["load_diagnostics_by_eval"] = self.eval_diagnostics
        if self.adaptation_info:
            out["new_bias_adaptation"] = self.adaptation_info
        return out

    # ---- new-class bias adaptation (§2.5) and evaluation
    def new_bias_gamma(self):
        c = self.lamp.cfg
        return c.NEW_BIAS_GAMMA if c.NEW_BIAS_GAMMA >= 0 else c.GAMMA0

    def adaptation_images(self):
        """The unlabeled new-class training images in a seeded random order (§2.5: the 100-cap and the same
        down-sampling unless NEW_BIAS_LONG_TAILED is off), so sign updates do not follow the class order."""
        c = self.lamp.cfg
        items = list(self.dataset.train_x if c.NEW_BIAS_LONG_TAILED else self.dataset.train_x_before_lt)
        random.Random(f"lamp-new-bias-{self.seed}").shuffle(items)
        return items

    @torch.no_grad()
    def adapt_new_bias(self):
        c = self.lamp.cfg
        for layer in self.lamp.layers.values():
            layer.bias_new.copy_(layer.bias)
        items = self.adaptation_images()
        loader = self.dm.build_loader(items, c.NEW_BIAS_BATCH, is_train=False, shuffle=False)
        gamma = self.new_bias_gamma()
        self.lamp.use_new_bias = True
        self.set_model_mode("eval")
        steps = 0
        for _ in range(c.NEW_BIAS_EPOCHS):
            self.lamp.reset_load()
            for batch in loader:
                with self.autocast():
                    self.encode_images(batch["img"].to(self.device))
                self.lamp.lbo_update(gamma, use_new_bias=True)
                steps += 1
        self.lamp.use_new_bias = False
        per_class = [0] * self.num_classes
        for item in items:
            per_class[item.label] += 1
        self.adaptation_info = {"images": len(items), "updates": steps, "epochs": c.NEW_BIAS_EPOCHS,
                                "batch": c.NEW_BIAS_BATCH, "gamma": gamma, "long_tailed": bool(c.NEW_BIAS_LONG_TAILED),
                                "images_per_class": dict(zip(self.classnames, per_class))}
        self.log(f"new-class bias adapted on {len(items)} unlabeled new-class training images "
                 f"({steps} updates, gamma {gamma:g}, {'long-tailed' if c.NEW_BIAS_LONG_TAILED else 'capped'} split)")

    def new_bias_applies(self):
        c = self.lamp.cfg
        return (c.NEW_BIAS_ADAPT and c.USE_LBO and c.USE_POOL
                and self.cfg.DATASET.SUBSAMPLE_CLASSES == "new" and len(self.dataset.train_x) > 0)

    def test_with_load(self, desc, use_new_bias=False):
        """A test pass that also records which entries the test images select under the bias in use."""
        self.lamp.reset_load()
        self.lamp.use_new_bias, self.record_test_load = use_new_bias, True
        try:
            metrics = self.test(desc=desc)
        finally:
            self.lamp.use_new_bias, self.record_test_load = False, False
        return metrics, self.lamp.load_diagnostics(use_new_bias)

    def evaluate_all(self):
        if not self.new_bias_applies():
            return {"test": self.test()}
        self.adapt_new_bias()
        inductive, diag_inductive = self.test_with_load("test (inductive, training bias)")
        adapted, diag_adapted = self.test_with_load("test (transductive, adapted bias)", use_new_bias=True)
        self.eval_diagnostics = {"test": diag_adapted, "test_inductive": diag_inductive}
        return {"test": adapted, "test_inductive": inductive}