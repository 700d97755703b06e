"""TrainerX: the Dassl-style training/evaluation loop shared by every method.

A method subclasses ``TrainerX`` and implements ``build_model`` (create modules, call ``register_model``),
``forward_backward(batch)`` (returns a dict of scalars, uses ``model_backward_and_update``) and
``model_inference(images)`` (logits over the dataset's active classes). The engine owns the epoch loop,
the LR schedule (stepped once per epoch), logging, atomic trainable-only checkpoints, resume,
evaluation and ``results.json``.
"""
import contextlib
import datetime
import logging
import os
import random
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.cli import UserError
from engine.checkpoint import (atomic_torch_save, atomic_write_json, atomic_write_text, load_checkpoint,
                               numpy_rng_state_from_plain, numpy_rng_state_to_plain)
from engine.clip_loader import load_clip
from engine.config import PRECISIONS, ConfigError, dump_cfg  # noqa: F401  (PRECISIONS: re-exported)
from engine.data import DataManager
from engine.losses import logit_adjusted_ce
from engine.metrics import compute_metrics
from engine.optim import build_lr_scheduler, build_optimizer
from engine.prompted_clip import PromptedCLIP

CKPT_PREFIX = "model.pth.tar-"
BEST_CKPT = "model-best.pth.tar"  # TEST.FINAL_MODEL best_val: the trainable state of the best val epoch (Dassl's name)
REPO_ROOT = Path(__file__).resolve().parents[1]


class RunError(UserError, RuntimeError):
    """A run cannot start as requested (finished run present, no checkpoint for --eval-only, ...)."""


def set_random_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def code_version():
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def setup_logger(output_dir):
    logger = logging.getLogger("lt_prompt")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        fh = logging.FileHandler(os.path.join(output_dir, "log.txt"))
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


def trainer_node(cfg):
    """The TRAINER.<NAME> node of the active trainer (CoOp's upper-case convention), or None."""
    key = cfg.TRAINER.NAME.upper()
    return cfg.TRAINER.get(key, None)


class TrainerX:
    """Base trainer for a single labelled training set (Dassl's TrainerX)."""

    def __init__(self, cfg, dataset=None, run_info=None):
        self.cfg = cfg
        self.run_info = dict(run_info or {})
        self.output_dir = cfg.OUTPUT_DIR
        self.logger = setup_logger(self.output_dir)
        self.device = torch.device("cuda" if cfg.USE_CUDA and torch.cuda.is_available() else "cpu")
        self.precision = self._resolve_precision()
        self.seed = cfg.SEED if cfg.SEED >= 0 else 0
        set_random_seed(self.seed)
        self.max_epoch = cfg.OPTIM.MAX_EPOCH
        self.epoch = 0
        self.val_history, self.loaded_best = [], None  # TEST.FINAL_MODEL best_val
        self._models = OrderedDict()
        self._optims = OrderedDict()
        self._scheds = OrderedDict()
        self.dm = DataManager(cfg, dataset=dataset)
        self.dataset = self.dm.dataset
        self.classnames = list(self.dataset.classnames)
        self.num_classes = len(self.classnames)
        self.clip = self.build_clip()
        self.check_input_size()
        self.build_model()
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "amp" else None  # not for bf16
        self.log(f"Trainer {cfg.TRAINER.NAME} on {self.device} ({self.precision}); "
                 f"{self.num_classes} classes; {self.count_trainable_parameters():,} trainable parameters")

    # ---- construction helpers
    def _resolve_precision(self):
        node = trainer_node(self.cfg)
        prec = node.get("PREC", "fp32") if node is not None else "fp32"
        if prec not in PRECISIONS:
            raise ConfigError(f"TRAINER.{self.cfg.TRAINER.NAME.upper()}.PREC must be one of {PRECISIONS}, got '{prec}'")
        if prec == "bf16":
            return "bf16"  # autocast in bfloat16 on CPU and CUDA; fp32 master weights, no loss scaling
        if self.device.type != "cuda":
            return "fp32"  # fp16 autocast is a GPU mode; the CPU runs fp32
        return "amp" if prec in ("amp", "fp16") else "fp32"

    def build_clip(self):
        name = self.cfg.MODEL.BACKBONE.NAME
        model = load_clip(name, self.cfg.MODEL.BACKBONE.PATH)
        enc = PromptedCLIP(model, truncate_text=self.cfg.MODEL.TRUNCATE_TEXT,
                           cache_text_prefix=self.cfg.MODEL.TEXT_PREFIX_CACHE,
                           shared_text_prefix=self.cfg.MODEL.SHARED_TEXT_PREFIX,
                           cls_only_last_block=self.cfg.MODEL.CLS_ONLY_LAST_VISION_BLOCK)
        return enc.to(self.device)

    def check_input_size(self):
        res = self.clip.clip.visual.input_resolution
        if tuple(self.cfg.INPUT.SIZE) != (res, res):
            raise ConfigError(f"INPUT.SIZE {tuple(self.cfg.INPUT.SIZE)} does not match the input resolution {res} of "
                              f"backbone {self.cfg.MODEL.BACKBONE.NAME}; pass INPUT.SIZE \"({res}, {res})\"")

    def build_model(self):
        raise NotImplementedError

    def register_model(self, name, model, optim=None, sched=None):
        self._models[name] = model
        self._optims[name] = optim
        self._scheds[name] = sched

    def build_optim_sched(self, module):
        optim = build_optimizer(module, self.cfg.OPTIM)
        return optim, build_lr_scheduler(optim, self.cfg.OPTIM)

    def count_trainable_parameters(self):
        return sum(p.numel() for m in self._models.values() for p in m.parameters() if p.requires_grad)

    def log(self, msg):
        self.logger.info(msg)

    def autocast(self):
        if self.precision == "amp":
            return torch.autocast("cuda", dtype=torch.float16)
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- losses / updates
    def compute_loss(self, logits, labels):
        if self.cfg.TRAINER.LOSS == "la":
            return logit_adjusted_ce(logits, labels, self.dataset.train_counts, tau=self.cfg.TRAINER.LA_TAU)
        return F.cross_entropy(logits, labels)

    def _optims_of(self, names=None):
        names = list(self._optims) if names is None else names
        return [self._optims[n] for n in names if self._optims[n] is not None]

    def model_zero_grad(self, names=None):
        for o in self._optims_of(names):
            o.zero_grad(set_to_none=True)

    def model_backward(self, loss):
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at epoch {self.epoch + 1}; lower OPTIM.LR or check the data")
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def model_update(self, names=None):
        optims = self._optims_of(names)
        if self.scaler is not None:
            for o in optims:
                self.scaler.step(o)
            self.scaler.update()
        else:
            for o in optims:
                o.step()

    def model_backward_and_update(self, loss, names=None):
        self.model_zero_grad(names)
        self.model_backward(loss)
        self.model_update(names)

    def get_current_lr(self):
        for o in self._optims.values():
            if o is not None:
                return o.param_groups[0]["lr"]
        return 0.0

    def parse_batch_train(self, batch):
        return batch["img"].to(self.device), batch["label"].to(self.device)

    def parse_batch_test(self, batch):
        return batch["img"].to(self.device), batch["label"].to(self.device)

    def forward_backward(self, batch):
        """Default step: the (logit-adjusted) cross-entropy of ``self.logits(images)``. Methods with extra
        loss terms or other inputs override this."""
        images, labels = self.parse_batch_train(batch)
        with self.autocast():
            logits = self.logits(images)
            loss = self.compute_loss(logits, labels)
        self.model_backward_and_update(loss)
        return {"loss": loss.item(), "acc": (logits.argmax(1) == labels).float().mean().item() * 100}

    def logits(self, images):
        """Training logits over the trained classes (used by the default ``forward_backward``)."""
        raise NotImplementedError

    def model_inference(self, images):
        raise NotImplementedError

    def set_model_mode(self, mode):
        for m in self._models.values():
            m.train(mode == "train")

    # ---- checkpoints
    def _trainable_state(self, model):
        """Parameters that train plus persistent buffers (e.g. LAMP's load-balancing bias); the frozen
        CLIP weights are never part of a method module."""
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def checkpoint_dir(self, name, root=None):
        return os.path.join(root or self.output_dir, name)

    def save_checkpoint(self, epoch):
        for name, model in self._models.items():
            ckpt = {
                "state_dict": self._trainable_state(model),
                "epoch": epoch,
                "optimizer": self._optims[name].state_dict() if self._optims[name] is not None else None,
                "scheduler": self._scheds[name].state_dict() if self._scheds[name] is not None else None,
                "rng": {"torch": torch.get_rng_state(), "numpy": numpy_rng_state_to_plain(np.random.get_state()),
                        "python": random.getstate()},
                "extra": self.extra_checkpoint_state(),
                "history": self._history(),
            }
            if self.scaler is not None:  # fp16 loss scale and its growth counter: a resume continues with them
                ckpt["scaler"] = self.scaler.state_dict()
            folder = self.checkpoint_dir(name)
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{CKPT_PREFIX}{epoch}")
            atomic_torch_save(ckpt, path)
            atomic_write_text(f"{CKPT_PREFIX}{epoch}\n", os.path.join(folder, "checkpoint"))
            freq = self.cfg.TRAIN.CHECKPOINT_FREQ
            for old in Path(folder).glob(f"{CKPT_PREFIX}*"):
                old_epoch = int(old.name[len(CKPT_PREFIX):])
                if old_epoch < epoch and not (freq > 0 and old_epoch % freq == 0):
                    old.unlink()

    def _history(self):
        history = {"epoch_losses": list(getattr(self, "epoch_losses", [])), "train_time": getattr(self, "train_time", 0.0)}
        if self.uses_best_val():
            history["val_accuracy"] = list(self.val_history)
        return history

    def extra_checkpoint_state(self):
        """Trainer state outside the registered modules that a resume needs (override if any)."""
        return {}

    def load_extra_checkpoint_state(self, state):
        pass

    @staticmethod
    def latest_checkpoint(folder):
        marker = os.path.join(folder, "checkpoint")
        if os.path.isfile(marker):
            name = open(marker).read().strip()
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
        found = sorted(Path(folder).glob(f"{CKPT_PREFIX}*"), key=lambda p: int(p.name[len(CKPT_PREFIX):]))
        return str(found[-1]) if found else None

    def load_model(self, model_dir, epoch=None):
        """Load trainable state (weights only) for evaluation; raises RunError if nothing is there."""
        if not self._models:
            return
        for name, model in self._models.items():
            folder = self.checkpoint_dir(name, model_dir)
            if epoch is not None and epoch >= 0:
                path = os.path.join(folder, f"{CKPT_PREFIX}{epoch}")
            elif self.uses_best_val():  # Dassl: --eval-only with best_val deploys model-best.pth.tar
                path = os.path.join(folder, BEST_CKPT)
            else:
                path = self.latest_checkpoint(folder) if os.path.isdir(folder) else None
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
                raise RunError(self._mismatch_message(model_dir, path, err)) from err
            self.load_extra_checkpoint_state(ckpt.get("extra") or {})
            if os.path.basename(path) == BEST_CKPT:
                self.loaded_best = (ckpt["epoch"], ckpt.get("val_accuracy"))
            self.log(f"Loaded {name} from {path} (epoch {ckpt['epoch']})")

    def _mismatch_message(self, model_dir, path, err):
        from engine.run_identity import config_diff, format_diff, read_run_config

        stored = read_run_config(model_dir) or {}
        section = f"TRAINER.{self.cfg.TRAINER.NAME.upper()}"
        diff = [d for d in config_diff(stored, self.cfg) if d[0].startswith(section + ".")]
        detail = format_diff(diff) if diff else " ".join(str(err).split())[:200]
        return (f"the checkpoint {path} does not fit this {self.cfg.TRAINER.NAME} model: --model-dir holds a run "
                f"of another config ({detail}); pass the config of that run or another --model-dir")

    def resume_if_possible(self):
        """Continue an interrupted run from its last epoch checkpoint; return the epoch to start at."""
        start = 0
        for name, model in self._models.items():
            folder = self.checkpoint_dir(name)
            path = self.latest_checkpoint(folder) if os.path.isdir(folder) else None
            if path is None:
                return 0
            ckpt = load_checkpoint(path, map_location=self.device)
            try:
                model.load_state_dict(ckpt["state_dict"])
                if ckpt.get("optimizer") is not None and self._optims[name] is not None:
                    self._optims[name].load_state_dict(ckpt["optimizer"])
                if ckpt.get("scheduler") is not None and self._scheds[name] is not None:
                    self._scheds[name].load_state_dict(ckpt["scheduler"])
            except (RuntimeError, ValueError, KeyError, TypeError) as err:
                raise RunError(f"cannot resume from {path}: it does not fit this run's {name} "
                               f"({' '.join(str(err).split())[:200]}); delete it to resume from the previous "
                               f"epoch (or from scratch)") from err
            rng = ckpt.get("rng")
            if rng:
                torch.set_rng_state(rng["torch"])
                np.random.set_state(numpy_rng_state_from_plain(rng["numpy"]))
                random.setstate(rng["python"])
            if ckpt.get("scaler") and self.scaler is not None:
                self.scaler.load_state_dict(ckpt["scaler"])
            self.load_extra_checkpoint_state(ckpt.get("extra") or {})
            history = ckpt.get("history") or {}
            self.epoch_losses = list(history.get("epoch_losses", []))
            self.train_time = history.get("train_time", 0.0)
            self.val_history = list(history.get("val_accuracy", []))
            start = ckpt["epoch"] + 1
        if start:
            self.log(f"Resuming from {self.output_dir}: epoch {start} of {self.max_epoch} already done")
        return start

    # ---- training loop
    def results_path(self):
        return os.path.join(self.output_dir, "results.json")

    def train(self):
        if os.path.isfile(self.results_path()):
            raise RunError(f"{self.output_dir} already holds a finished run (results.json); "
                           f"choose another --output-dir or delete that folder yourself")
        self.write_run_files()
        self.epoch_losses, self.train_time, self.val_history = [], 0.0, []
        if self.uses_best_val() and self.dm.val_loader is None:
            raise ConfigError(f"TEST.FINAL_MODEL best_val needs a val split, and {self.cfg.DATASET.NAME} has none here; "
                              "use TEST.FINAL_MODEL last_step")
        start = self.resume_if_possible() if self.count_trainable_parameters() else self.max_epoch
        if start < self.max_epoch:
            self.before_train(resumed=start > 0)
        for self.epoch in range(start, self.max_epoch):
            self.before_epoch()
            self.run_epoch()
            self.after_epoch()
        self.after_train()

    def before_train(self, resumed):
        """Called once before the first epoch that runs (e.g. to compute class prototypes)."""

    def before_epoch(self):
        # Re-seed per epoch so an interrupted run that resumes draws the same batches and crops.
        epoch_seed = self.seed * 10007 + self.epoch
        torch.manual_seed(epoch_seed)
        self.dm.set_epoch_seed(epoch_seed)

    def run_epoch(self):
        self.set_model_mode("train")
        loader = self.dm.train_loader_x
        self.num_batches = len(loader)
        losses, t0 = [], time.time()
        bar = tqdm(loader, total=self.num_batches, desc=f"epoch {self.epoch + 1}/{self.max_epoch}",
                   leave=False, dynamic_ncols=True, disable=not sys.stderr.isatty())
        tic = time.time()
        for self.batch_idx, batch in enumerate(bar):
            out = self.forward_backward(batch)
            losses.append(out["loss"])
            step_time = time.time() - tic
            tic = time.time()
            if (self.batch_idx + 1) % self.cfg.TRAIN.PRINT_FREQ == 0 or self.batch_idx + 1 == self.num_batches:
                extra = " ".join(f"{k} {v:.4f}" for k, v in out.items() if k != "loss")
                self.log(f"epoch [{self.epoch + 1}/{self.max_epoch}] batch [{self.batch_idx + 1}/{self.num_batches}] "
                         f"time {step_time:.3f}s loss {out['loss']:.4f} {extra} lr {self.get_current_lr():.4e}".rstrip())
            bar.set_postfix(loss=f"{out['loss']:.3f}")
        self.epoch_losses.append(float(np.mean(losses)) if losses else float("nan"))
        self.train_time += time.time() - t0

    def after_epoch(self):
        for sched in self._scheds.values():
            if sched is not None:
                sched.step()
        self.log(f"epoch {self.epoch + 1} done: mean loss {self.epoch_losses[-1]:.4f}")
        if self.uses_best_val():
            self.track_best_val()
        self.save_checkpoint(self.epoch)

    def after_train(self):
        if self.uses_best_val():
            self.load_best_val()
        results = self.evaluate_all()
        self.write_results(results)

    # ---- TEST.FINAL_MODEL best_val (Dassl): val after each epoch, the best epoch's model is tested
    def uses_best_val(self):
        return self.cfg.TEST.FINAL_MODEL == "best_val"

    def val_accuracy(self):
        """Accuracy on the val split with the current weights (Dassl's ``test(split="val")``)."""
        return self.test(self.dm.val_loader, desc="val")["accuracy"]

    def best_val_epoch(self):
        """(0-based epoch, val accuracy) of the best epoch so far (the first of equals, as Dassl's strict >)."""
        if not self.val_history:
            return None, None
        best = max(range(len(self.val_history)), key=lambda i: (self.val_history[i], -i))
        return best, self.val_history[best]

    def track_best_val(self):
        accuracy = float(self.val_accuracy())
        previous, best = self.best_val_epoch()
        self.val_history.append(accuracy)
        if previous is None or accuracy > best:
            for name, model in self._models.items():
                folder = self.checkpoint_dir(name)
                os.makedirs(folder, exist_ok=True)
                atomic_torch_save({"state_dict": self._trainable_state(model), "epoch": self.epoch,
                                   "extra": self.extra_checkpoint_state(), "val_accuracy": accuracy},
                                  os.path.join(folder, BEST_CKPT))
            self.log(f"val accuracy {accuracy:.2f}: best so far (epoch {self.epoch + 1}), saved {BEST_CKPT}")
        else:
            self.log(f"val accuracy {accuracy:.2f} (best {best:.2f} at epoch {previous + 1})")

    def load_best_val(self):
        epoch, accuracy = self.best_val_epoch()
        if epoch is None:
            return
        for name, model in self._models.items():
            path = os.path.join(self.checkpoint_dir(name), BEST_CKPT)
            ckpt = load_checkpoint(path, map_location=self.device)
            if ckpt["epoch"] != epoch:
                raise RunError(f"{path} holds epoch {ckpt['epoch'] + 1}, but the val history names epoch {epoch + 1} "
                               f"as the best; delete {self.output_dir} and train again")
            model.load_state_dict(ckpt["state_dict"])
            self.load_extra_checkpoint_state(ckpt.get("extra") or {})
        self.log(f"TEST.FINAL_MODEL best_val: testing the model of epoch {epoch + 1} (val accuracy {accuracy:.2f})")

    def final_model_record(self):
        """results.json's ``final_model`` (only with TEST.FINAL_MODEL best_val; last_step runs keep their
        results.json as before)."""
        if not self.uses_best_val():
            return {}
        epoch, accuracy = self.best_val_epoch() if self.val_history else (self.loaded_best or (None, None))
        return {"final_model": {"mode": "best_val", "epoch": None if epoch is None else epoch + 1,
                                "val_accuracy": accuracy, "val_accuracy_per_epoch": list(self.val_history)}}

    # ---- evaluation
    def eval_head_labels(self):
        """Head classes are defined by the training counts; only meaningful when the evaluated classes
        are the trained ones (base or all), not for the new-class test."""
        if self.cfg.DATASET.SUBSAMPLE_CLASSES == "new":
            return None
        return getattr(self.dataset, "head_labels", None)

    def evaluate_all(self):
        """Return {eval_name: metrics}. Methods with several inference variants override this."""
        return {"test": self.test()}

    def before_test(self):
        pass

    @torch.no_grad()
    def test(self, loader=None, desc="test"):
        self.set_model_mode("eval")
        self.before_test()
        loader = loader or self.dm.test_loader
        y_true, y_pred = [], []
        for batch in tqdm(loader, desc=desc, leave=False, disable=not sys.stderr.isatty()):
            images, labels = self.parse_batch_test(batch)
            with self.autocast():
                logits = self.model_inference(images)
            y_pred.append(logits.argmax(dim=1).cpu())
            y_true.append(labels.cpu())
        y_true = torch.cat(y_true).numpy()
        y_pred = torch.cat(y_pred).numpy()
        metrics = compute_metrics(y_true, y_pred, self.num_classes, head_labels=self.eval_head_labels())
        self.log(f"[{desc}] {len(y_true)} images, {self.num_classes} classes: accuracy {metrics['accuracy']:.2f} "
                 f"macro-F1 {metrics['macro_f1']:.2f} mean-class {metrics['mean_class_acc']:.2f}")
        return metrics

    def write_run_files(self):
        os.makedirs(self.output_dir, exist_ok=True)
        dump_cfg(self.cfg, os.path.join(self.output_dir, "config.yaml"))
        manifest = getattr(self.dataset, "manifest", None)
        if manifest:
            atomic_write_json(manifest, os.path.join(self.output_dir, "manifest.json"))

    def write_results(self, results):
        cfg = self.cfg
        manifest = getattr(self.dataset, "manifest", None) or {}
        payload = {
            "trainer": cfg.TRAINER.NAME,
            "dataset": cfg.DATASET.NAME,
            "config": self.run_info.get("config", ""),
            "experiment": self.run_info.get("experiment", ""),
            "seed": cfg.SEED,
            "subsample_classes": cfg.DATASET.SUBSAMPLE_CLASSES,
            "imb_factor": float(cfg.DATASET.IMB_FACTOR),
            "num_shots": cfg.DATASET.NUM_SHOTS,
            "loss": cfg.TRAINER.LOSS,
            "backbone": cfg.MODEL.BACKBONE.NAME,
            "num_classes": self.num_classes,
            "trainable_parameters": self.count_trainable_parameters(),
            "epochs": self.max_epoch,
            "epoch_losses": getattr(self, "epoch_losses", []),
            "train_time_s": round(getattr(self, "train_time", 0.0), 2),
            "manifest_hash": manifest.get("hash", ""),
            "code_version": code_version(),
            "finished": datetime.datetime.now().isoformat(timespec="seconds"),
            "results": results,
        }
        payload.update(self.final_model_record())
        payload.update(self.extra_results())
        atomic_write_json(payload, self.results_path())
        self.log(f"Results written to {self.results_path()}")
        return payload

    def extra_results(self):
        """Method-specific top-level fields for results.json (e.g. LAMP's load diagnostics)."""
        return {}

    def eval_only(self, model_dir=None, load_epoch=None):
        """Evaluate a trained model; never trains. Methods without trainable state need no checkpoint."""
        if os.path.isfile(self.results_path()):
            raise RunError(f"{self.output_dir} already holds results.json; choose another --output-dir")
        if self.count_trainable_parameters():
            if not model_dir:
                raise RunError("--eval-only needs --model-dir pointing to a trained run of this method")
            self.load_model(model_dir, load_epoch)
        self.write_run_files()
        self.after_eval_only_load()
        results = self.evaluate_all()
        return self.write_results(results)

    def after_eval_only_load(self):
        """Hook between loading the checkpoint and evaluating (LAMP adapts its new-class bias later, in
        ``evaluate_all``, so that both of its new-class numbers come from one run)."""
