"""engine/optim.py: Dassl-equivalent optimizers and per-epoch lr schedules (with warmup)."""
import math

import pytest
import torch
from torch import nn

from engine.config import get_cfg_default
from engine.optim import build_lr_scheduler, build_optimizer


def optim_cfg(**kw):
    cfg = get_cfg_default()
    for k, v in kw.items():
        cfg.OPTIM[k] = v
    return cfg.OPTIM


class TwoPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


def lr_sequence(opt_cfg, epochs=None, params=None):
    """The lr used in each epoch when the engine steps the scheduler once per epoch."""
    params = params or [nn.Parameter(torch.zeros(2))]
    opt = build_optimizer(params, opt_cfg)
    sched = build_lr_scheduler(opt, opt_cfg)
    lrs = []
    for _ in range(epochs or opt_cfg.MAX_EPOCH):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def cos_lr(base, t, T):
    return base * (1 + math.cos(math.pi * t / T)) / 2


def test_sgd_uses_only_trainable_params_and_dassl_settings():
    model = TwoPart()
    opt = build_optimizer(model, optim_cfg(NAME="sgd", LR=0.01, SGD_NESTEROV=True, SGD_DAMPNING=0))
    params = opt.param_groups[0]["params"]
    assert len(params) == 4 and all(p.requires_grad for p in params)
    g = opt.param_groups[0]
    assert isinstance(opt, torch.optim.SGD)
    assert (g["lr"], g["momentum"], g["weight_decay"], g["nesterov"], g["dampening"]) == (0.01, 0.9, 5e-4, True, 0)


def test_sgd_first_step_matches_formula():
    # With momentum, the first step is p - lr * (grad + wd * p).
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = build_optimizer([p], optim_cfg(NAME="sgd", LR=0.1, WEIGHT_DECAY=0.01))
    (p * torch.tensor([3.0, 4.0])).sum().backward()
    opt.step()
    expected = torch.tensor([1.0 - 0.1 * (3.0 + 0.01 * 1.0), -2.0 - 0.1 * (4.0 + 0.01 * -2.0)])
    assert torch.allclose(p.detach(), expected)


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_adam_family_betas_and_eps(name, cls):
    opt = build_optimizer(TwoPart(), optim_cfg(NAME=name, LR=0.002, ADAM_BETA1=0.8, ADAM_BETA2=0.95, ADAM_EPS=1e-6))
    g = opt.param_groups[0]
    assert isinstance(opt, cls)
    assert g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 and g["weight_decay"] == 5e-4 and g["lr"] == 0.002


def test_rmsprop_alpha_and_momentum():
    opt = build_optimizer(TwoPart(), optim_cfg(NAME="rmsprop", RMSPROP_ALPHA=0.9))
    g = opt.param_groups[0]
    assert isinstance(opt, torch.optim.RMSprop) and g["alpha"] == 0.9 and g["momentum"] == 0.9


def test_accepts_param_groups_and_drops_frozen():
    model = TwoPart()
    groups = [{"params": model.head.parameters(), "lr": 0.5}, {"params": model.frozen.parameters()}]
    opt = build_optimizer(groups, optim_cfg(NAME="sgd", LR=0.01))
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == 0.5
    assert len(opt.param_groups[0]["params"]) == 2


def test_staged_lr_gives_base_layers_a_smaller_lr():
    cfg = optim_cfg(NAME="sgd", LR=0.1, STAGED_LR=True, NEW_LAYERS=("head",), BASE_LR_MULT=0.1)
    opt = build_optimizer(TwoPart(), cfg)
    lrs = [g["lr"] for g in opt.param_groups]
    assert lrs == pytest.approx([0.01, 0.1])
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]


def test_nothing_trainable_is_an_error():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, optim_cfg())


def test_unknown_optimizer_is_an_error():
    with pytest.raises(ValueError, match="lbfgs"):
        build_optimizer(TwoPart(), optim_cfg(NAME="lbfgs"))


def test_coop_schedule_matches_dassl():
    # CoOp: sgd lr 0.002, cosine, warmup 1 epoch at constant 1e-5 (WARMUP_RECOUNT=True).
    # Dassl: epoch 0 at 1e-5, then CosineAnnealingLR(T_max=MAX_EPOCH) restarted at its step 0.
    cfg = optim_cfg(NAME="sgd", LR=0.002, MAX_EPOCH=5, LR_SCHEDULER="cosine", WARMUP_EPOCH=1,
                    WARMUP_TYPE="constant", WARMUP_CONS_LR=1e-5)
    expected = [1e-5, 0.002,
                0.001 * (1 + math.cos(math.pi / 5)),
                0.001 * (1 + math.cos(2 * math.pi / 5)),
                0.001 * (1 + math.cos(3 * math.pi / 5))]
    assert lr_sequence(cfg) == pytest.approx(expected, rel=1e-12)

    # Same values as torch's own CosineAnnealingLR started after the warmup epoch.
    p = nn.Parameter(torch.zeros(1))
    ref_opt = torch.optim.SGD([p], lr=0.002)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, 5.0)
    ref_lrs = []
    for _ in range(4):
        ref_lrs.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        ref.step()
    assert lr_sequence(cfg)[1:] == pytest.approx(ref_lrs, rel=1e-9)


def test_cosine_without_warmup():
    cfg = optim_cfg(LR=0.01, MAX_EPOCH=4, LR_SCHEDULER="cosine")
    assert lr_sequence(cfg) == pytest.approx([cos_lr(0.01, t, 4) for t in range(4)])


def test_linear_warmup():
    # Dassl LinearWarmupScheduler: epoch 0 at WARMUP_MIN_LR, epoch e < W at lr * e / W.
    cfg = optim_cfg(LR=0.01, MAX_EPOCH=6, LR_SCHEDULER="cosine", WARMUP_EPOCH=2, WARMUP_TYPE="linear",
                    WARMUP_MIN_LR=1e-5)
    expected = [1e-5, 0.005] + [cos_lr(0.01, t, 6) for t in range(4)]
    assert lr_sequence(cfg) == pytest.approx(expected)


def test_warmup_without_recount_uses_absolute_epoch():
    cfg = optim_cfg(LR=0.01, MAX_EPOCH=5, LR_SCHEDULER="cosine", WARMUP_EPOCH=1, WARMUP_TYPE="constant",
                    WARMUP_RECOUNT=False)
    expected = [1e-5] + [cos_lr(0.01, t, 5) for t in range(1, 5)]
    assert lr_sequence(cfg) == pytest.approx(expected)


def test_single_step_and_multi_step():
    # STEPSIZE (-1,) means step size = MAX_EPOCH: constant within training.
    assert lr_sequence(optim_cfg(LR=1.0, MAX_EPOCH=4)) == pytest.approx([1.0] * 4)
    assert lr_sequence(optim_cfg(LR=1.0, MAX_EPOCH=5, STEPSIZE=(2,), GAMMA=0.1)) == pytest.approx(
        [1.0, 1.0, 0.1, 0.1, 0.01])
    cfg = optim_cfg(LR=1.0, MAX_EPOCH=5, LR_SCHEDULER="multi_step", STEPSIZE=(1, 3), GAMMA=0.5)
    assert lr_sequence(cfg) == pytest.approx([1.0, 0.5, 0.5, 0.25, 0.25])


def test_warmup_applies_to_every_param_group():
    cfg = optim_cfg(NAME="sgd", LR=0.1, STAGED_LR=True, NEW_LAYERS=("head",), LR_SCHEDULER="cosine",
                    MAX_EPOCH=3, WARMUP_EPOCH=1, WARMUP_TYPE="constant", WARMUP_CONS_LR=1e-5)
    opt = build_optimizer(TwoPart(), cfg)
    sched = build_lr_scheduler(opt, cfg)
    assert [g["lr"] for g in opt.param_groups] == [1e-5, 1e-5]
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.1])


def test_bad_stepsize_is_an_error():
    opt = build_optimizer(TwoPart(), optim_cfg())
    with pytest.raises(ValueError, match="STEPSIZE"):
        build_lr_scheduler(opt, optim_cfg(LR_SCHEDULER="multi_step", STEPSIZE=(1.5,)))


def test_scheduler_checkpoint_round_trip():
    cfg = optim_cfg(NAME="sgd", LR=0.002, MAX_EPOCH=6, LR_SCHEDULER="cosine", WARMUP_EPOCH=1,
                    WARMUP_TYPE="constant")
    full = lr_sequence(cfg)

    p = nn.Parameter(torch.zeros(2))
    opt = build_optimizer([p], cfg)
    sched = build_lr_scheduler(opt, cfg)
    for _ in range(3):
        opt.step()
        sched.step()
    state = {"optim": opt.state_dict(), "sched": sched.state_dict()}
    assert all(isinstance(v, (int, float, str, bool, list, tuple, type(None))) for v in state["sched"].values())

    q = nn.Parameter(torch.zeros(2))
    opt2 = build_optimizer([q], cfg)
    sched2 = build_lr_scheduler(opt2, cfg)
    opt2.load_state_dict(state["optim"])
    sched2.load_state_dict(state["sched"])
    resumed = []
    for _ in range(3):
        resumed.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert resumed == pytest.approx(full[3:], rel=1e-12)
    assert sched2.last_epoch == 6
