"""Checkpoints of a run: per registered module, its trainable state, optimizer, scheduler, RNG, loss scale,
the trainer's extra state and the loop's history, written atomically into ``<run>/<module>/``.

Files keep Dassl's names: ``model.pth.tar-<epoch>`` (the last one named in ``checkpoint``; older ones are
deleted unless their epoch is a multiple of TRAIN.CHECKPOINT_FREQ) and ``model-best.pth.tar`` (the best val
epoch, TEST.FINAL_MODEL best_val). The frozen CLIP weights are never part of a method module.
"""
import os
import random
from pathlib import Path

import numpy as np
import torch

from engine.checkpoint import (atomic_torch_save, atomic_write_text, load_checkpoint, numpy_rng_state_from_plain,
                               numpy_rng_state_to_plain)
from engine.cli import UserError

CKPT_PREFIX = "model.pth.tar-"
BEST_CKPT = "model-best.pth.tar"


class RunError(UserError, RuntimeError):
    """A run cannot start as requested (finished run present, no checkpoint for --eval-only, ...)."""


def trainable_state(model):
    """Parameters that train plus persistent buffers (e.g. LAMP's load-balancing bias)."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def latest_checkpoint(folder):
    marker = os.path.join(folder, "checkpoint")
    if os.path.isfile(marker):
        name = open(marker).read().strip()
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    found = sorted(Path(folder).glob(f"{CKPT_PREFIX}*"), key=lambda p: int(p.name[len(CKPT_PREFIX):]))
    return str(found[-1]) if found else None


def capture_rng():
    return {"torch": torch.get_rng_state(), "numpy": numpy_rng_state_to_plain(np.random.get_state()),
            "python": random.getstate()}


def restore_rng(rng):
    torch.set_rng_state(rng["torch"])
    np.random.set_state(numpy_rng_state_from_plain(rng["numpy"]))
    random.setstate(rng["python"])


class Checkpointer:
    """Saves, resumes and loads the modules a trainer registered. ``extra_state`` / ``load_extra_state``
    carry trainer state outside the modules; ``precision`` brings the loss scale along."""

    def __init__(self, output_dir, models, optims, scheds, precision, keep_every, device,
                 extra_state, load_extra_state, log):
        self.output_dir = output_dir
        self.models, self.optims, self.scheds = models, optims, scheds
        self.precision, self.keep_every, self.device = precision, keep_every, device
        self.extra_state, self.load_extra_state, self.log = extra_state, load_extra_state, log

    def folder(self, name, root=None):
        return os.path.join(root or self.output_dir, name)

    def save(self, epoch, history):
        for name, model in self.models.items():
            ckpt = {
                "state_dict": trainable_state(model),
                "epoch": epoch,
                "optimizer": self.optims[name].state_dict() if self.optims[name] is not None else None,
                "scheduler": self.scheds[name].state_dict() if self.scheds[name] is not None else None,
                "rng": capture_rng(),
                "extra": self.extra_state(),
                "history": history,
            }
            if self.precision.scaler is not None:  # fp16 loss scale and its growth counter
                ckpt["scaler"] = self.precision.scaler.state_dict()
            folder = self.folder(name)
            os.makedirs(folder, exist_ok=True)
            atomic_torch_save(ckpt, os.path.join(folder, f"{CKPT_PREFIX}{epoch}"))
            atomic_write_text(f"{CKPT_PREFIX}{epoch}\n", os.path.join(folder, "checkpoint"))
            for old in Path(folder).glob(f"{CKPT_PREFIX}*"):
                old_epoch = int(old.name[len(CKPT_PREFIX):])
                if old_epoch < epoch and not (self.keep_every > 0 and old_epoch % self.keep_every == 0):
                    old.unlink()

    def resume(self):
        """Load the last checkpoint of every module (weights, optimizer, scheduler, RNG, loss scale, extra
        state); return its history and the epoch to start at, or (None, 0) when there is none."""
        start, history = 0, None
        for name, model in self.models.items():
            folder = self.folder(name)
            path = latest_checkpoint(folder) if os.path.isdir(folder) else None
            if path is None:
                return None, 0
            ckpt = load_checkpoint(path, map_location=self.device)
            try:
                model.load_state_dict(ckpt["state_dict"])
                if ckpt.get("optimizer") is not None and self.optims[name] is not None:
                    self.optims[name].load_state_dict(ckpt["optimizer"])
                if ckpt.get("scheduler") is not None and self.scheds[name] is not None:
                    self.scheds[name].load_state_dict(ckpt["scheduler"])
            except (RuntimeError, ValueError, KeyError, TypeError) as err:
                raise RunError(f"cannot resume from {path}: it does not fit this run's {name} "
                               f"({' '.join(str(err).split())[:200]}); delete it to resume from the previous "
                               f"epoch (or from scratch)") from err
            if ckpt.get("rng"):
                restore_rng(ckpt["rng"])
            if ckpt.get("scaler") and self.precision.scaler is not None:
                self.precision.scaler.load_state_dict(ckpt["scaler"])
            self.load_extra_state(ckpt.get("extra") or {})
            history = ckpt.get("history") or {}
            start = ckpt["epoch"] + 1
        return history, start

    def load_weights(self, model_dir, epoch=None, best=False, mismatch_message=None):
        """Load the trainable state (weights only) for evaluation; raises RunError if nothing is there.
        Returns (epoch, val accuracy) of a loaded best-val checkpoint, else None."""
        loaded_best = None
        for name, model in self.models.items():
            folder = self.folder(name, model_dir)
            if epoch is not None and epoch >= 0:
                path = os.path.join(folder, f"{CKPT_PREFIX}{epoch}")
            elif best:  # Dassl: --eval-only with best_val deploys model-best.pth.tar
                path = os.path.join(folder, BEST_CKPT)
            else:
                path = latest_checkpoint(folder) if os.path.isdir(folder) else None
            if path and os.path.basename(path) == BEST_CKPT and not os.path.isfile(path) and os.path.isdir(folder):
                raise RunError(f"TEST.FINAL_MODEL best_val deploys {path}, which is not there (was {model_dir} "
                               f"trained with best_val?); pass --load-epoch N or TEST.FINAL_MODEL last_step")
            if not path or not os.path.isfile(path):
                raise RunError(f"no checkpoint for '{name}' at {path or folder}: train first "
                               f"(--eval-only never trains) or pass the right --model-dir / --load-epoch")
            ckpt = load_checkpoint(path, map_location=self.device)
            try:
                model.load_state_dict(ckpt["state_dict"])
            except RuntimeError as err:  # size mismatch / missing keys: a run of another config
                detail = mismatch_message(model_dir, path, err) if mismatch_message else str(err)
                raise RunError(detail) from err
            self.load_extra_state(ckpt.get("extra") or {})
            if os.path.basename(path) == BEST_CKPT:
                loaded_best = (ckpt["epoch"], ckpt.get("val_accuracy"))
            self.log(f"Loaded {name} from {path} (epoch {ckpt['epoch']})")
        return loaded_best

    def save_best(self, epoch, accuracy):
        for name, model in self.models.items():
            folder = self.folder(name)
            os.makedirs(folder, exist_ok=True)
            atomic_torch_save({"state_dict": trainable_state(model), "epoch": epoch, "extra": self.extra_state(),
                               "val_accuracy": accuracy}, os.path.join(folder, BEST_CKPT))

    def load_best(self, epoch):
        """Load ``model-best.pth.tar``, which must hold ``epoch`` (the val history's best)."""
        for name, model in self.models.items():
            path = os.path.join(self.folder(name), BEST_CKPT)
            ckpt = load_checkpoint(path, map_location=self.device)
            if ckpt["epoch"] != epoch:
                raise RunError(f"{path} holds epoch {ckpt['epoch'] + 1}, but the val history names epoch {epoch + 1} "
                               f"as the best; delete {self.output_dir} and train again")
            model.load_state_dict(ckpt["state_dict"])
            self.load_extra_state(ckpt.get("extra") or {})
