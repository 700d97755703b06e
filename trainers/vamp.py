"""VaMP (Cheng & Han, NeurIPS 2025; docs/methods/vamp.md): variational, sample-specific text prompts on MMRL.

The MMRL base (trainers/mmrl.py, settings under TRAINER.MMRL) is unchanged on the vision side. On the text
side, for each prompted layer i a small posterior net phi_i maps the frozen CLIP image feature f_x (a
separate prompt-free pass, L2-normalised) to q(z_i | x) = N(mu_i, diag sigma_i^2) over z_i in MMRL's
representation space (d_r); the layer's text tokens are then P_i^t(R + z_i), i.e. the sample-specific
latent shifts MMRL's shared tokens before MMRL's own projection, so every class sequence of an image
carries that image's tokens (class sequences repeated per image, ``repeat_batch``, image-major).
Training draws one reparameterised sample per image and step; the loss is MMRL's full loss (the
likelihood) + KL_WEIGHT * sum_i KL(q(z_i | x) || p_psi(z_i | .)), KL summed over dims and layers and
averaged over the batch. The class-aware prior p_psi_i(z_i | f_x, o_y) takes the offline class prototype
o_y (mean L2-normalised frozen image feature of class y over the training images, computed once before
training and stored in the checkpoint). Test: S posterior samples per image, all B*S text groups in one
batched call, softmax probabilities averaged (MMRL's branch rule per sample); the prior is not used.

Everything marked inferred in docs/methods/vamp.md is the default here and its alternatives are switches:
prompted layers = MMRL's (6-12) with M = MMRL's 5 tokens; log sigma^2 predicted; one training sample;
PRIOR class_aware (concat(f_x, o_y)) | prototype (o_y) | standard (N(0, I)); TEST_MODE probs | logits |
mean (z = mu). Sizes: the paper's total is 5.132M with the MMRL base (+~0.14M), which rules out
full-width heads; posterior Linear(E, h) ReLU Linear(h, 2 d_r) and prior Linear(2E, h) ReLU Linear(h, 2 d_r)
per layer with h = HIDDEN = 5 give 139,846 (total 5,132,102) [inferred; the width is chosen to match the
reported count]. The output layers start at zero weight with sigma = INIT_STD (the scale of R's init), so
training starts from MMRL plus small noise and KL(q || p) = 0 under the learned priors.
Ablation chain (Table "MMRL -> + sample-specific -> + variational -> + class-aware prior"): SAMPLE_SPECIFIC
False = MMRL; VARIATIONAL False = the deterministic generator z = phi(f_x) (no prior, no KL).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from engine.config import ConfigError, register_config
from engine.config import Block, Blocks, Bool, Choice, Float, Int, PerDataset, PRECISIONS, Str, declare_keys  # noqa: F401
from engine.registry import TRAINER_REGISTRY, MethodInfo
from trainers.mmrl import MMRL, scaled_cos

PRIORS = ("class_aware", "prototype", "standard")
TEST_MODES = ("probs", "logits", "mean")
TEST_SEED_STRIDE = 1_000_003  # a prime above any run seed in use


@register_config
def add_vamp_config(cfg):
    c = cfg.TRAINER.VAMP = CN()
    c.SAMPLE_SPECIFIC = True   # off: plain MMRL
    c.VARIATIONAL = True       # off: deterministic z = phi(f_x), no prior, no KL
    c.PRIOR = "class_aware"    # class_aware (f_x, o_y) | prototype (o_y) | standard (N(0, I))
    c.LAYERS = []              # text layers with sample-specific tokens ([] = all of TRAINER.MMRL.REP_LAYERS)
    c.HIDDEN = 5               # bottleneck width of the posterior / prior nets
    c.INIT_STD = 0.02          # initial sigma of posterior and learned prior (means start at 0)
    c.KL_WEIGHT = 1.0          # beta (the ELBO as written: 1)
    c.N_SAMPLES = 10           # S posterior samples per test image
    c.TEST_MODE = "probs"      # probs: mean softmax over S | logits: mean logits | mean: z = mu (S unused)
    c.TEST_SEED = 0            # test-time sampling seed: the generator starts at SEED + TEST_SEED * TEST_SEED_STRIDE
    c.PROTOTYPE_BATCH = 64
    c.MAX_TEXT_BATCH = 20000   # max text sequences (images x samples x classes) per text-encoder call
    c.MAX_TEXT_SEQS_WITH_GRAD = 8192  # training: images are split into micro-batches (gradients accumulated,
    # one optimizer step per batch) so that at most this many text sequences keep activations for backward
    c.PREC = "amp"
    declare_keys(cfg, "TRAINER.VAMP", SAMPLE_SPECIFIC=Bool(), VARIATIONAL=Bool(), PRIOR=Choice(*PRIORS),
                 LAYERS=Blocks("both", empty_ok=True), HIDDEN=Int(1), INIT_STD=Float(0, open_low=True),
                 KL_WEIGHT=Float(0), N_SAMPLES=Int(1), TEST_MODE=Choice(*TEST_MODES), TEST_SEED=Int(0),
                 PROTOTYPE_BATCH=Int(1), MAX_TEXT_BATCH=Int(1), MAX_TEXT_SEQS_WITH_GRAD=Int(1),
                 PREC=Choice(*PRECISIONS),
                 relations=[lambda c, cfg: None if set(c.LAYERS) <= set(cfg.TRAINER.MMRL.REP_LAYERS) else
                            f"LAYERS {list(c.LAYERS)} must be among TRAINER.MMRL.REP_LAYERS "
                            f"{list(cfg.TRAINER.MMRL.REP_LAYERS)}"])


def _head(d_in, hidden, d_out, logvar_bias=None):
    """Linear ReLU Linear; zero output weights; the log-variance half of the bias at ``logvar_bias``."""
    net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d_out))
    nn.init.zeros_(net[2].weight)
    nn.init.zeros_(net[2].bias)
    if logvar_bias is not None:
        nn.init.constant_(net[2].bias[d_out // 2:], logvar_bias)
    return net


def gaussian_kl(mu_q, logvar_q, mu_p, logvar_p):
    """KL(N(mu_q, e^logvar_q) || N(mu_p, e^logvar_p)) summed over the last dim."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p) ** 2) / logvar_p.exp() - 1).sum(-1)


class VaMPNets(nn.Module):
    """MMRL's representation learner plus the per-layer posterior (and prior) nets."""

    def __init__(self, rep, c, embed_dim):
        super().__init__()
        self.rep = rep
        layers = sorted(int(l) for l in c.LAYERS) or list(rep.layers)
        if not set(layers) <= set(rep.layers):
            raise ConfigError(f"TRAINER.VAMP.LAYERS {layers} must be among TRAINER.MMRL.REP_LAYERS {rep.layers}")
        if c.HIDDEN < 1 or c.INIT_STD <= 0:
            raise ConfigError(f"TRAINER.VAMP.HIDDEN must be >= 1 and INIT_STD > 0, got {c.HIDDEN}, {c.INIT_STD}")
        self.layers, self.variational, self.prior_kind = layers, c.VARIATIONAL, c.PRIOR
        d_r = rep.compound_rep_tokens.shape[1]
        logvar0 = 2 * math.log(c.INIT_STD)
        out = 2 * d_r if c.VARIATIONAL else d_r
        self.posterior = nn.ModuleDict({str(l): _head(embed_dim, c.HIDDEN, out, logvar0 if c.VARIATIONAL else None)
                                        for l in layers})
        self.prior = None
        if c.VARIATIONAL and c.PRIOR != "standard":
            d_in = 2 * embed_dim if c.PRIOR == "class_aware" else embed_dim
            self.prior = nn.ModuleDict({str(l): _head(d_in, c.HIDDEN, 2 * d_r, logvar0) for l in layers})

    def posterior_params(self, f_x):
        """{layer: (mu, logvar)} (logvar None when deterministic), each (B, d_r)."""
        out = {}
        for l in self.layers:
            h = self.posterior[str(l)](f_x)
            out[l] = h.chunk(2, dim=-1) if self.variational else (h, None)
        return out

    def prior_params(self, f_x, prototypes):
        if self.prior_kind == "standard":
            zero = f_x.new_zeros(f_x.shape[0], self.rep.compound_rep_tokens.shape[1])
            return {l: (zero, zero) for l in self.layers}
        cond = torch.cat([f_x, prototypes], dim=-1) if self.prior_kind == "class_aware" else prototypes
        return {l: self.prior[str(l)](cond).chunk(2, dim=-1) for l in self.layers}


METHOD = MethodInfo(
    configs={"b2n": "vit_b16_b2n", "fewshot": "vit_b16_b2n", "xd": "vit_b16_xd"},
    imagenet={"b2n": "vit_b16_b2n_imagenet", "fewshot": "vit_b16_b2n_imagenet"},
    run_neutral=("TRAINER.VAMP.MAX_TEXT_SEQS_WITH_GRAD",),
    bench_prepare=lambda trainer, batch: trainer.prepare_benchmark(batch),
    bench_images_per_backward=lambda trainer, batch, classes: trainer.images_per_micro_batch(batch, classes))


@TRAINER_REGISTRY.register("VaMP", info=METHOD)
class VaMP(MMRL):
    def build_extra_modules(self):
        c = self.cfg.TRAINER.VAMP
        for key, allowed in (("PRIOR", PRIORS), ("TEST_MODE", TEST_MODES)):
            if c[key] not in allowed:
                raise ConfigError(f"TRAINER.VAMP.{key} must be one of {allowed}, got '{c[key]}'")
        if c.N_SAMPLES < 1:
            raise ConfigError(f"TRAINER.VAMP.N_SAMPLES must be >= 1, got {c.N_SAMPLES}")
        self.vc = c
        self.nets = VaMPNets(self.rep, c, self.clip.embed_dim).to(self.device) if c.SAMPLE_SPECIFIC else None
        self.prototypes = None          # (C_train, E), computed before training, stored in checkpoints
        self.test_generator = None

    def trained_module(self):
        return self.nets if self.nets is not None else self.rep

    def uses_prototypes(self):
        return self.nets is not None and self.nets.prior is not None and self.vc.PRIOR != "standard"

    # ---- class prototypes (offline, frozen CLIP)
    @torch.no_grad()
    def class_prototypes(self, images_and_labels):
        """Mean L2-normalised frozen image feature per class, normalised again; classes without images: 0."""
        total = torch.zeros(self.num_classes, self.clip.embed_dim, device=self.device)
        for images, labels in images_and_labels:
            with self.autocast():
                f = self.image_zero_shot(images.to(self.device)).float()
            total.index_add_(0, labels.to(self.device), f)
        return F.normalize(total, dim=-1)

    def before_train(self, resumed):
        if self.uses_prototypes() and self.prototypes is None:
            loader = self.dm.build_loader(self.dataset.train_x, self.vc.PROTOTYPE_BATCH, is_train=False)
            self.prototypes = self.class_prototypes((b["img"], b["label"]) for b in loader)
            self.log(f"VaMP: class prototypes from {len(self.dataset.train_x)} training images (frozen CLIP)")

    def prepare_benchmark(self, batch):
        if self.uses_prototypes():
            self.prototypes = self.class_prototypes([(batch["img"], batch["label"])])

    def extra_checkpoint_state(self):
        state = super().extra_checkpoint_state()
        if self.prototypes is not None:
            state["prototypes"] = self.prototypes.detach().cpu()
        return state

    def load_extra_checkpoint_state(self, state):
        super().load_extra_checkpoint_state(state)
        if "prototypes" in state and state.get("trained_classnames") == list(self.classnames):  # a resume
            self.prototypes = state["prototypes"].to(self.device)

    # ---- training
    def kl_term(self, post, f_x, labels):
        if not self.nets.variational:
            return None
        proto = None
        if self.uses_prototypes():
            if self.prototypes is None:
                raise RuntimeError("VaMP: class prototypes are missing (computed in before_train)")
            proto = self.prototypes[labels].to(f_x.dtype)
        prior = self.nets.prior_params(f_x, proto)
        kl = sum(gaussian_kl(mu, logvar, *prior[l]) for l, (mu, logvar) in post.items())
        return kl.mean()

    def sample(self, post, times=1, generator=None, noise=None):
        """{layer: z} with ``times`` draws per image, image-major ((B * times, d_r)); ``noise``: {layer: eps}
        drawn beforehand (``draw_noise``) instead of now."""
        out = {}
        for l, (mu, logvar) in post.items():
            mu_r = mu.repeat_interleave(times, dim=0)
            if logvar is None:
                out[l] = mu_r
                continue
            std = (0.5 * logvar).exp().repeat_interleave(times, dim=0)
            eps = noise[l] if noise is not None else torch.randn(
                mu_r.shape, generator=generator, device=mu_r.device, dtype=mu_r.dtype)
            out[l] = mu_r + std * eps
        return out

    @torch.no_grad()
    def draw_noise(self, f_x):
        """The training step's eps for the whole batch, drawn as ``sample`` draws them (layer by layer, at the
        posterior's dtype), so that every micro-batch takes its images' rows of the same draw."""
        post = self.nets.posterior_params(f_x)
        return {l: torch.randn(mu.shape, device=mu.device, dtype=mu.dtype)
                for l, (mu, logvar) in post.items() if logvar is not None}

    def images_per_micro_batch(self, batch, num_classes=None):
        """Images per backward pass so that at most MAX_TEXT_SEQS_WITH_GRAD text sequences keep activations."""
        if self.nets is None:
            return batch
        num_classes = self.tokens.shape[0] if num_classes is None else num_classes
        return max(1, min(batch, self.vc.MAX_TEXT_SEQS_WITH_GRAD // num_classes))

    def forward_backward(self, batch):
        if self.nets is None:
            return super().forward_backward(batch)
        images, labels = self.parse_batch_train(batch)
        n = images.shape[0]
        step = self.images_per_micro_batch(n)
        with self.autocast():
            f_x = self.image_zero_shot(images)
            noise = self.draw_noise(f_x)
        self.model_zero_grad()
        totals, correct = {}, 0
        for start in range(0, n, step):
            # every term of the loss is a mean over images (CE, both regularisers, KL), so the parts' losses
            # weighted by their share of the batch sum to the whole batch's loss, and so do the gradients
            part = slice(start, start + step)
            share = images[part].shape[0] / n
            with self.autocast():
                loss, parts, fused = self.part_loss(images[part], labels[part], f_x[part],
                                                    {l: eps[part] for l, eps in noise.items()})
            self.model_backward(loss * share)
            for key, value in (("loss", loss.item()), *parts.items()):
                totals[key] = totals.get(key, 0.0) + value * share
            correct += int((fused.argmax(1) == labels[part]).sum())
        self.model_update()
        return {**totals, "acc": correct / n * 100}

    def part_loss(self, images, labels, f_x, noise):
        """(loss, its parts, fused logits) of the images of one micro-batch."""
        f_cls, f_rep = self.rep.image_features(self.clip, images)
        post = self.nets.posterior_params(f_x)
        w = self.text_features(self.sample(post, noise=noise))               # (B, C, D)
        z_cls, z_rep = scaled_cos(f_cls, w), scaled_cos(f_rep, w)
        loss, parts = self.mmrl_loss(z_cls, z_rep, f_cls, w, f_x, labels)
        kl = self.kl_term(post, f_x, labels)
        if kl is not None:
            loss = loss + self.vc.KL_WEIGHT * kl
            parts["kl"] = kl.item()
        return loss, parts, self.fuse(z_cls, z_rep)

    def logits(self, images):
        """Training-mode fused logits with one posterior draw (the default LA check uses it)."""
        if self.nets is None:
            return super().logits(images)
        f_cls, f_rep = self.rep.image_features(self.clip, images)
        w = self.text_features(self.sample(self.nets.posterior_params(self.image_zero_shot(images))))
        return self.fuse(scaled_cos(f_cls, w), scaled_cos(f_rep, w))

    # ---- inference
    def before_test(self):
        if self.nets is None:
            return super().before_test()
        self.log(f"VaMP inference: branch {self.active_branch()}, {self.vc.TEST_MODE} over "
                 f"{self.test_samples()} sample(s)")
        self.test_generator = torch.Generator(device=self.device)
        # TEST_SEED 0 keeps the run seed itself; the stride keeps (run seed, test seed) pairs apart (a plain sum
        # would give run 1 / test 1 the samples of run 2 / test 0)
        self.test_generator.manual_seed(max(self.cfg.SEED, 0) + self.vc.TEST_SEED * TEST_SEED_STRIDE)
        self.rep.set_vision_tokens()

    def test_samples(self):
        if self.vc.TEST_MODE == "mean" or not self.nets.variational:
            return 1
        return self.vc.N_SAMPLES

    def model_inference(self, images):
        if self.nets is None:
            return super().model_inference(images)
        s = self.test_samples()
        f_cls, f_rep = self.rep.image_features(self.clip, images)
        post = self.nets.posterior_params(self.image_zero_shot(images))
        if self.vc.TEST_MODE == "mean":
            post = {l: (mu, None) for l, (mu, _) in post.items()}
        shift = self.sample(post, s, self.test_generator)                  # {layer: (B * S, d_r)}, image-major
        per_call = max(1, self.vc.MAX_TEXT_BATCH // (s * self.num_classes)) * s
        w = torch.cat([self.text_features({l: z[i:i + per_call] for l, z in shift.items()})
                       for i in range(0, images.shape[0] * s, per_call)])  # (B * S, C, D)
        f_cls, f_rep = f_cls.repeat_interleave(s, dim=0), f_rep.repeat_interleave(s, dim=0)
        z = self.select(scaled_cos(f_cls, w), scaled_cos(f_rep, w)).view(images.shape[0], s, -1)
        if self.vc.TEST_MODE == "probs":
            return torch.log(F.softmax(z.float(), dim=-1).mean(dim=1))
        return z.mean(dim=1)
