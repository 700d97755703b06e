"""MMA, Multi-Modal Adapter (Yang et al., CVPR 2024; docs/methods/mma.md).

Blocks ADAPTER_START..ADAPTER_END (5..12) of both towers get an adapter branch computed from the block's
ln_1(x) and added to the block output (the encoder's ``adapter`` hook):

    y = up(shared(down(ln_1 x))) * alpha,   down = Linear(width, 32) + ReLU,  up = Linear(32, width),
    shared = Linear(32, 32) + ReLU (one module per block, used by both towers).

Gradient scaling (official ``clip/gsl.py``): an identity op with backward ``grad * s`` is applied twice,
s = alpha on the adapter input and s = 1/alpha on the (already alpha-scaled) adapter output:

    y = GS( up(shared(down( GS(ln_1 x, alpha) ))) * alpha , 1/alpha )

Forward: exactly ``alpha * adapter(ln_1 x)``. Backward, with g the upstream gradient of the block output:
- every adapter weight receives the gradient an *unscaled* adapter (y = adapter(ln_1 x)) would receive
  for the same g, i.e. 1/alpha times the true gradient of the loss (1000x for alpha = 0.001), so the
  adapters learn at a normal speed although their output is scaled down by alpha;
- the gradient flowing back into x through the adapter branch is alpha times that of an unscaled
  adapter, i.e. exactly the true gradient of the forward above, so the residual stream (and with it the
  adapters of earlier blocks) sees correct gradients. (ln_1 is frozen, so scaling after it, as here,
  equals scaling before it, as in the official code.)
ADAPTER_SCALE 0 makes the branch an exact no-op (zero output, zero adapter gradients).

Text input: frozen "a photo of a {class}." (TEXT_CTX_INIT + class name; "" uses the dataset template).
Text features are computed with the adapters on every training step and cached once per test.
"""
import torch
import torch.nn as nn
from yacs.config import CfgNode as CN

from engine.config import ConfigError, register_config, register_config_alias
from engine.config import Block, Blocks, Bool, Choice, Float, Int, PerDataset, PRECISIONS, Str, declare_keys  # noqa: F401
from engine.prompted_clip import TowerHooks
from engine.registry import TRAINER_REGISTRY, MethodInfo
from engine.trainer import TrainerX
from trainers.common import cosine_logits, template_prompts


# The official code (ZjjConan/Multi-Modal-Adapter) names the section TRAINER.MMADAPTER (same keys) and the
# trainer MultiModalAdapter (its scripts' --trainer).
register_config_alias({"TRAINER.MMADAPTER": "TRAINER.MMA"})
TRAINER_REGISTRY.alias("MultiModalAdapter", "MMA")


@register_config
def add_mma_config(cfg):
    c = cfg.TRAINER.MMA = CN()
    c.TEXT_CTX_INIT = "a photo of a"  # text = "<this> <class>."; "" = the dataset's hand-crafted template
    c.ADAPTER_START = 5  # first block (1-indexed) with adapters, both towers
    c.ADAPTER_END = 12  # last block with adapters
    c.ADAPTER_DIM = 32  # bottleneck width (also the shared layer's width)
    c.ADAPTER_SCALE = 0.001  # alpha
    c.PREC = "amp"  # fp16/amp -> autocast on GPU; CPU always runs fp32
    declare_keys(cfg, "TRAINER.MMA", TEXT_CTX_INIT=Str(), ADAPTER_START=Block("both"), ADAPTER_END=Block("both"),
                 ADAPTER_DIM=Int(1), ADAPTER_SCALE=Float(0), PREC=Choice(*PRECISIONS),
                 relations=[lambda c, cfg: None if c.ADAPTER_START <= c.ADAPTER_END else
                            f"ADAPTER_START ({c.ADAPTER_START}) must be <= ADAPTER_END ({c.ADAPTER_END})"])


class _GradientScale(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradient by ``scale`` in the backward pass."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def gradient_scale(x, scale):
    return _GradientScale.apply(x, scale)


def scaled_adapter_branch(h, down, shared, up, alpha):
    """alpha * up(shared(down(h))) with MMA's gradient scaling (see the module docstring)."""
    if alpha == 0:
        return up(shared(down(h.detach()))) * 0.0
    y = up(shared(down(gradient_scale(h, alpha)))) * alpha
    return gradient_scale(y, 1.0 / alpha)


class _TowerAdapter(nn.Module):
    def __init__(self, width, dim):
        super().__init__()
        self.down = nn.Sequential(nn.Linear(width, dim), nn.ReLU())
        self.up = nn.Linear(dim, width)


class MMAdapters(nn.Module):
    """All adapters: ``text_adapter``, ``visual_adapter`` and ``shared_adapter``, keyed by block."""

    def __init__(self, encoder, start, end, dim, alpha):
        super().__init__()
        if not encoder.is_vit:
            raise ConfigError("MMA needs a ViT backbone (it adapts the image transformer's blocks)")
        n_layers = min(encoder.n_text_layers, encoder.n_vision_layers)
        if not 1 <= start <= end <= n_layers:
            raise ConfigError(f"TRAINER.MMA.ADAPTER_START/END must satisfy 1 <= START <= END <= {n_layers} "
                              f"(blocks, 1-indexed), got {start}/{end}")
        if dim < 1:
            raise ConfigError(f"TRAINER.MMA.ADAPTER_DIM must be >= 1, got {dim}")
        if alpha < 0:
            raise ConfigError(f"TRAINER.MMA.ADAPTER_SCALE must be >= 0, got {alpha}")
        self.layer_ids = list(range(start, end + 1))
        self.alpha = float(alpha)
        self.text_adapter = nn.ModuleDict({str(l): _TowerAdapter(encoder.text_width, dim) for l in self.layer_ids})
        self.visual_adapter = nn.ModuleDict({str(l): _TowerAdapter(encoder.vision_width, dim)
                                             for l in self.layer_ids})
        self.shared_adapter = nn.ModuleDict({str(l): nn.Sequential(nn.Linear(dim, dim), nn.ReLU())
                                             for l in self.layer_ids})
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        self.text_hooks = MMAHooks(self, "text")
        self.vision_hooks = MMAHooks(self, "vision")

    def branch(self, tower, layer, h):
        key = str(layer)
        if key not in self.shared_adapter:
            return None
        adapter = (self.text_adapter if tower == "text" else self.visual_adapter)[key]
        return scaled_adapter_branch(h, adapter.down, self.shared_adapter[key], adapter.up, self.alpha)


class MMAHooks(TowerHooks):
    """Adapter branches of one tower; blocks before ADAPTER_START are untouched (text: cached)."""

    def __init__(self, owner, tower):
        self.owner = owner
        self.tower = tower
        self.start_layer = owner.layer_ids[0]

    def adapter(self, layer, x_ln1):
        return self.owner.branch(self.tower, layer, x_ln1)


METHOD = MethodInfo(
    configs={"b2n": "vit_b16_ep5", "fewshot": "vit_b16_ep5_fewshot", "xd": "vit_b16_ep5"},
    imagenet={"fewshot": "vit_b16_ep5_fewshot_imagenet"})


@TRAINER_REGISTRY.register("MMA", info=METHOD)
class MMA(TrainerX):
    def build_model(self):
        c = self.cfg.TRAINER.MMA
        self.adapter_learner = MMAdapters(self.clip, c.ADAPTER_START, c.ADAPTER_END, c.ADAPTER_DIM,
                                          c.ADAPTER_SCALE).to(self.device)
        self.register_model("adapter_learner", self.adapter_learner, *self.build_optim_sched(self.adapter_learner))
        template = f"{c.TEXT_CTX_INIT} {{}}." if c.TEXT_CTX_INIT else self.dataset.template
        self.tokens = self.clip.tokenize(template_prompts(template, self.classnames)).to(self.device)
        self.eval_text_features = None

    def text_features(self):
        return self.clip.encode_text(self.tokens, self.adapter_learner.text_hooks)

    def image_features(self, images):
        return self.clip.encode_image(images, self.adapter_learner.vision_hooks)

    def logits(self, images):
        return cosine_logits(self.image_features(images), self.text_features(), self.clip.logit_scale)

    def before_test(self):
        # The text side does not depend on the image: one text pass for the whole test set.
        with torch.no_grad(), self.autocast():
            self.eval_text_features = self.text_features()

    def model_inference(self, images):
        return cosine_logits(self.image_features(images), self.eval_text_features, self.clip.logit_scale)
