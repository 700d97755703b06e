"""Optimizer and learning-rate scheduler builders with Dassl semantics.

The scheduler is stepped once per epoch by the engine. With ``WARMUP_EPOCH = W > 0`` and
``WARMUP_RECOUNT = True`` (Dassl's default) epoch ``e < W`` runs at the warmup lr and epoch
``e >= W`` at the successor schedule evaluated at ``e - W``; this reproduces Dassl's
``ConstantWarmupScheduler`` / ``LinearWarmupScheduler`` wrapped around torch's StepLR,
MultiStepLR or CosineAnnealingLR. With ``WARMUP_RECOUNT = False`` the successor is evaluated at the
absolute epoch ``e`` (its intended meaning; Dassl's chainable implementation only approximates
this, e.g. its cosine is off by a constant factor). Learning rates are computed in closed form, so the scheduler's
state is a few numbers and ``state_dict`` / ``load_state_dict`` round-trip exactly.
"""
import bisect
import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from engine.config import LR_SCHEDULERS, OPTIMIZERS, WARMUP_TYPES


def _param_groups(params_or_module, optim_cfg):
    """Trainable parameters as a list of param groups (Dassl STAGED_LR supported for modules)."""
    if isinstance(params_or_module, nn.Module):
        module = params_or_module
        if optim_cfg.STAGED_LR:
            new_layers = optim_cfg.NEW_LAYERS
            new_layers = [new_layers] if isinstance(new_layers, str) else list(new_layers)
            base, new = [], []
            for name, child in module.named_children():
                target = new if name in new_layers else base
                target += [p for p in child.parameters() if p.requires_grad]
            groups = [
                {"params": base, "lr": optim_cfg.LR * optim_cfg.BASE_LR_MULT},
                {"params": new},
            ]
            return [g for g in groups if g["params"]]
        return [{"params": [p for p in module.parameters() if p.requires_grad]}]

    items = list(params_or_module)
    if items and isinstance(items[0], dict):
        groups = []
        for g in items:
            g = dict(g)
            g["params"] = [p for p in _as_list(g["params"]) if p.requires_grad]
            groups.append(g)
        return [g for g in groups if g["params"]]
    return [{"params": [p for p in items if p.requires_grad]}]


def _as_list(params):
    return [params] if isinstance(params, torch.Tensor) else list(params)


def build_optimizer(params_or_module, optim_cfg):
    """Build the optimizer named by ``optim_cfg.NAME`` over the trainable parameters.

    ``params_or_module``: an ``nn.Module`` (its parameters with ``requires_grad``) or an iterable of
    parameters / param-group dicts.
    """
    name = optim_cfg.NAME
    if name not in OPTIMIZERS:
        raise ValueError(f"unsupported OPTIM.NAME {name!r}; choose one of {list(OPTIMIZERS)}")
    groups = _param_groups(params_or_module, optim_cfg)
    n_trainable = sum(p.numel() for g in groups for p in g["params"])
    if n_trainable == 0:
        raise ValueError(
            "build_optimizer: no trainable parameters (every parameter has requires_grad=False); "
            "check which parts of the model the trainer unfreezes"
        )
    lr, wd = optim_cfg.LR, optim_cfg.WEIGHT_DECAY
    betas = (optim_cfg.ADAM_BETA1, optim_cfg.ADAM_BETA2)
    if name == "sgd":
        return torch.optim.SGD(
            groups,
            lr=lr,
            momentum=optim_cfg.MOMENTUM,
            weight_decay=wd,
            dampening=optim_cfg.SGD_DAMPNING,
            nesterov=optim_cfg.SGD_NESTEROV,
        )
    if name in ("adam", "amsgrad"):
        return torch.optim.Adam(
            groups, lr=lr, weight_decay=wd, betas=betas, eps=optim_cfg.ADAM_EPS, amsgrad=name == "amsgrad"
        )
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=wd, betas=betas, eps=optim_cfg.ADAM_EPS)
    if name == "radam":
        return torch.optim.RAdam(groups, lr=lr, weight_decay=wd, betas=betas, eps=optim_cfg.ADAM_EPS)
    return torch.optim.RMSprop(
        groups, lr=lr, momentum=optim_cfg.MOMENTUM, weight_decay=wd, alpha=optim_cfg.RMSPROP_ALPHA
    )


class DasslLRScheduler(LRScheduler):
    """Per-epoch schedule: optional warmup, then single_step / multi_step / cosine (closed form)."""

    def __init__(
        self,
        optimizer,
        schedule,
        max_epoch,
        stepsize=None,
        milestones=(),
        gamma=0.1,
        warmup_epoch=0,
        warmup_type="constant",
        warmup_lr=1e-5,
        warmup_recount=True,
        last_epoch=-1,
    ):
        self.schedule = schedule
        self.max_epoch = float(max_epoch)
        self.stepsize = stepsize
        self.milestones = sorted(milestones)
        self.gamma = gamma
        self.warmup_epoch = max(int(warmup_epoch), 0)
        self.warmup_type = warmup_type
        self.warmup_lr = warmup_lr
        self.warmup_recount = warmup_recount
        super().__init__(optimizer, last_epoch)

    def _successor_lr(self, base_lr, t):
        if self.schedule == "cosine":  # CosineAnnealingLR(T_max=MAX_EPOCH, eta_min=0)
            return base_lr * (1 + math.cos(math.pi * t / self.max_epoch)) / 2
        if self.schedule == "single_step":  # StepLR
            return base_lr * self.gamma ** (t // self.stepsize)
        return base_lr * self.gamma ** bisect.bisect_right(self.milestones, t)  # MultiStepLR

    def lr_at(self, epoch):
        """Learning rates (one per param group) used during epoch ``epoch`` (0-based)."""
        w = self.warmup_epoch
        if epoch < w:
            if self.warmup_type == "constant":
                return [self.warmup_lr for _ in self.base_lrs]
            if epoch == 0:  # linear: min lr first, then base_lr * e / W
                return [self.warmup_lr for _ in self.base_lrs]
            return [base * epoch / w for base in self.base_lrs]
        t = epoch - w if self.warmup_recount else epoch
        return [self._successor_lr(base, t) for base in self.base_lrs]

    def get_lr(self):
        return self.lr_at(self.last_epoch)

    def _get_closed_form_lr(self):
        return self.lr_at(self.last_epoch)


def build_lr_scheduler(optimizer, optim_cfg):
    """Dassl's ``build_lr_scheduler``: stepped once per epoch; see the module docstring."""
    name = optim_cfg.LR_SCHEDULER
    if name not in LR_SCHEDULERS:
        raise ValueError(f"unsupported OPTIM.LR_SCHEDULER {name!r}; choose one of {list(LR_SCHEDULERS)}")
    stepsize, milestones = optim_cfg.STEPSIZE, ()
    if name == "single_step":
        if isinstance(stepsize, (list, tuple)):
            stepsize = stepsize[-1]
        if not isinstance(stepsize, int):
            raise ValueError(f"OPTIM.STEPSIZE for single_step must be an integer, got {stepsize!r}")
        if stepsize <= 0:
            stepsize = optim_cfg.MAX_EPOCH
    elif name == "multi_step":
        if not isinstance(stepsize, (list, tuple)) or not all(isinstance(s, int) for s in stepsize):
            raise ValueError(f"OPTIM.STEPSIZE for multi_step must be a list of integers, got {stepsize!r}")
        milestones, stepsize = tuple(stepsize), None

    warmup_epoch = optim_cfg.WARMUP_EPOCH
    warmup_type = optim_cfg.WARMUP_TYPE
    if warmup_epoch > 0 and warmup_type not in WARMUP_TYPES:
        raise ValueError(f"unsupported OPTIM.WARMUP_TYPE {warmup_type!r}; choose one of {list(WARMUP_TYPES)}")
    warmup_lr = optim_cfg.WARMUP_CONS_LR if warmup_type == "constant" else optim_cfg.WARMUP_MIN_LR
    return DasslLRScheduler(
        optimizer,
        name,
        optim_cfg.MAX_EPOCH,
        stepsize=stepsize,
        milestones=milestones,
        gamma=optim_cfg.GAMMA,
        warmup_epoch=max(warmup_epoch, 0),
        warmup_type=warmup_type,
        warmup_lr=warmup_lr,
        warmup_recount=optim_cfg.WARMUP_RECOUNT,
    )
