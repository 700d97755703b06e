"""Precision of a run (TRAINER.<NAME>.PREC): the autocast context, and the fp16 loss scale with its steps."""
import contextlib

import torch

from engine.config import PRECISIONS, ConfigError


def resolve_precision(requested, device, key):
    """The mode a run uses: bf16 autocast anywhere; fp16/amp autocast with loss scaling on CUDA only (the
    CPU runs fp32 then); fp32 otherwise. ``key`` names the config key in the error."""
    if requested not in PRECISIONS:
        raise ConfigError(f"{key} must be one of {PRECISIONS}, got '{requested}'")
    if requested == "bf16":
        return "bf16"  # fp32 master weights, no loss scaling
    if device.type != "cuda":
        return "fp32"
    return "amp" if requested in ("amp", "fp16") else "fp32"


class Precision:
    """Autocast and, for fp16 (``amp``), the GradScaler around backward and the optimizer steps."""

    def __init__(self, mode, device):
        self.mode, self.device = mode, device
        self.scaler = torch.amp.GradScaler("cuda") if mode == "amp" else None

    def autocast(self):
        if self.mode == "amp":
            return torch.autocast("cuda", dtype=torch.float16)
        if self.mode == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optims):
        if self.scaler is None:
            for o in optims:
                o.step()
            return
        for o in optims:
            self.scaler.step(o)
        self.scaler.update()
