"""LAMP: Long-tailed Multimodal Prompt learning (methods.md §2).

Per LAMP layer l: a Multimodal Prompt Pool of M image/text prompt pairs (L_p tokens of dim D each), S
Modality-Shared Prompts, and per-modality projectors D -> width. The image cls state entering block l
retrieves the top-K pool entries (cosine with the projected visual prompts + a load-balancing bias);
the retrieved visual prompts and the shared prompts go into the image sequence, the paired text prompts
of the same entries into every class sequence of that image (B x C text sequences). After each optimizer
step the Load Balancing Optimization moves the bias against over-used entries (corrected sign, §2.4).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from engine.config import ConfigError, register_config
from engine.prompted_clip import TowerHooks, as_tensor, insert_after_first, repeat_batch, replace_after_first
from engine.registry import TRAINER_REGISTRY
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
    c.TEXT_SELECTION = "paired"  # paired: text prompts of the image's entries; eot_classwise: per class by EOT
    c.TRAIN_CLASSNAMES = "base"  # base: softmax over base names; all: new names as extra negatives
    c.NEW_BIAS_ADAPT = True   # adapt a separate bias on unlabeled new-class training images (B2N new test)
    c.NEW_BIAS_BATCH = 4
    c.NEW_BIAS_EPOCHS = 1
    c.NEW_BIAS_GAMMA = 5e-4   # constant step for the adaptation pass
    c.TEXT_CHUNK = 4096       # max text sequences (images x classes) per text-encoder call
    c.PREC = "amp"


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
        self.sim_losses = []
        self.frozen_queries = None
        self.vision_hooks = _VisionHooks(self)
        self.text_hooks = _TextHooks(self)

    @property
    def k(self):
        return self.cfg.TOP_K

    def layer(self, l):
        return self.layers[str(l)]

    def current_bias(self, layer):
        if not self.cfg.USE_LBO:
            return torch.zeros_like(layer.bias)
        return layer.bias_new if self.use_new_bias else layer.bias

    def retrieve(self, layer, query, keys):
        """Biased top-K (descending by biased score) and the similarity term for the chosen keys."""
        sim = F.normalize(query.detach(), dim=-1) @ F.normalize(keys, dim=-1).t()  # (B, M); stop-grad on query
        idx = (sim.detach() + self.current_bias(layer)).topk(self.k, dim=1).indices
        return idx, (1 - sim.gather(1, idx).mean(dim=1)).mean()

    # ---- load balancing (§2.4)
    @torch.no_grad()
    def lbo_update(self, gamma, use_new_bias=False):
        if not (self.cfg.USE_LBO and self.cfg.USE_POOL) or not self.indices:
            return
        self.epoch_steps += 1
        g = float(self.epoch_steps)
        target = self.k / self.cfg.POOL_SIZE
        sign = -1.0 if self.cfg.LBO_SIGN == "corrected" else 1.0
        for l, idx in self.indices.items():
            layer = self.layer(l)
            frac = F.one_hot(idx, self.cfg.POOL_SIZE).sum(dim=1).float().mean(dim=0)  # sums to K
            layer.load.mul_((g - 1) / g).add_(frac / g)
            bias = layer.bias_new if use_new_bias else layer.bias
            bias.add_(sign * gamma * torch.sign(layer.load - target))

    def reset_load(self):
        self.epoch_steps.zero_()
        for layer in self.layers.values():
            layer.load.zero_()

    def gamma(self, total_steps):
        g0 = self.cfg.GAMMA0
        if self.cfg.GAMMA_SCHEDULE == "constant" or total_steps <= 0:
            return g0
        return g0 * 0.5 * (1 + math.cos(math.pi * float(self.global_step) / total_steps))

    def load_diagnostics(self):
        """Per layer: min / max / entropy of the selection frequencies of this epoch (sum 1), and bias range."""
        out = {}
        for l in self.layer_ids:
            layer = self.layer(l)
            p = layer.load / layer.load.sum().clamp_min(1e-12)
            entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
            out[str(l)] = {"min": float(p.min()), "max": float(p.max()), "entropy": entropy,
                           "max_entropy": math.log(self.cfg.POOL_SIZE),
                           "bias_min": float(layer.bias.min()), "bias_max": float(layer.bias.max())}
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
            idx, _ = o.retrieve(layer, eot_state, layer.text_keys())
            prompts = layer.prompts(layer.pool_t, layer.proj_t, idx, x.shape[0])
        else:
            prompts = layer.prompts(layer.pool_t, layer.proj_t, None, 1)  # shared prompts only
        return insert_after_first(x, prompts, state) if first else replace_after_first(x, prompts, state)


@TRAINER_REGISTRY.register("LAMP")
class LAMP(TrainerX):
    default_config = "vit_b16_lt_b2n.yaml"

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

    # ---- forward
    def encode_images(self, images):
        o = self.lamp
        o.indices, o.sim_losses, o.frozen_queries = {}, [], None
        if o.cfg.USE_POOL and o.cfg.QUERY_SOURCE == "frozen_cls":
            o.frozen_queries = self.frozen_cls_states(images)
        features = self.clip.encode_image(images, o.vision_hooks)
        sim = torch.stack(o.sim_losses).sum() if o.sim_losses else features.new_zeros(())
        return features, sim

    @torch.no_grad()
    def frozen_cls_states(self, images):
        states = {}

        class Recorder(TowerHooks):
            def before_block(self, l, x, state):
                states[l] = x[:, 0].clone()
                return x

        self.clip.encode_image(images, Recorder())
        return states

    def encode_texts(self, tokens, batch):
        """(B, C, D) for paired selection, (C, D) for class-wise selection; classes in chunks."""
        paired = self.lamp.cfg.USE_POOL and self.lamp.cfg.TEXT_SELECTION == "paired"
        per_call = max(1, self.lamp.cfg.TEXT_CHUNK // batch) if paired else len(tokens)
        feats = [self.clip.encode_text(chunk, self.lamp.text_hooks) for chunk in tokens.split(per_call)]
        if paired:
            return torch.cat([f.view(batch, -1, f.shape[-1]) for f in feats], dim=1)
        return torch.cat(feats)

    def logits(self, images, tokens):
        image_features, sim = self.encode_images(images)
        text_features = self.encode_texts(tokens, images.shape[0])
        return cosine_logits(image_features, text_features, self.clip.logit_scale), sim

    def forward_backward(self, batch):
        images, labels = self.parse_batch_train(batch)
        with self.autocast():
            logits, sim = self.logits(images, self.train_tokens)
            ce = self.compute_loss(logits, labels)
            loss = ce + self.lamp.cfg.BETA * sim
        self.model_backward_and_update(loss)
        self.lamp.lbo_update(self.lamp.gamma(self.total_steps))
        self.lamp.global_step += 1
        return {"loss": loss.item(), "ce": ce.item(), "sim": sim.item(),
                "acc": (logits.argmax(1) == labels).float().mean().item() * 100}

    def model_inference(self, images):
        return self.logits(images, self.eval_tokens)[0]

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

    def extra_results(self):
        return {"load_diagnostics": self.load_history[-1] if self.load_history else self.lamp.load_diagnostics()}

    # ---- new-class bias adaptation (§2.5) and evaluation
    @torch.no_grad()
    def adapt_new_bias(self):
        c = self.lamp.cfg
        for layer in self.lamp.layers.values():
            layer.bias_new.copy_(layer.bias)
        loader = self.dm.build_loader(self.dataset.train_x, c.NEW_BIAS_BATCH, is_train=False)
        self.lamp.use_new_bias = True
        self.set_model_mode("eval")
        steps = 0
        for _ in range(c.NEW_BIAS_EPOCHS):
            self.lamp.reset_load()
            for batch in loader:
                with self.autocast():
                    self.encode_images(batch["img"].to(self.device))
                self.lamp.lbo_update(c.NEW_BIAS_GAMMA, use_new_bias=True)
                steps += 1
        self.lamp.use_new_bias = False
        self.log(f"new-class bias adapted on {len(self.dataset.train_x)} unlabeled new-class training images "
                 f"({steps} updates)")

    def new_bias_applies(self):
        c = self.lamp.cfg
        return (c.NEW_BIAS_ADAPT and c.USE_LBO and c.USE_POOL
                and self.cfg.DATASET.SUBSAMPLE_CLASSES == "new" and len(self.dataset.train_x) > 0)

    def evaluate_all(self):
        if not self.new_bias_applies():
            return {"test": self.test()}
        self.adapt_new_bias()
        inductive = self.test(desc="test (inductive, training bias)")
        self.lamp.use_new_bias = True
        try:
            adapted = self.test(desc="test (transductive, adapted bias)")
        finally:
            self.lamp.use_new_bias = False
        return {"test": adapted, "test_inductive": inductive}
