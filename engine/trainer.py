"""TrainerX: the Dassl-style training loop shared by every method, kept short; its parts are components.

A method subclasses ``TrainerX`` and implements ``build_model`` (create modules, call ``register_model``),
``forward_backward(batch)`` (returns a dict of scalars, uses ``model_backward_and_update``, or
``engine.steps.micro_batched_step`` for a batch taken in parts) and ``model_inference(images)`` (logits over
the dataset's active classes). Hook points for what a method changes:

- the step: ``forward_backward``; ``images_per_micro_batch`` splits the default step into parts whose
  gradients accumulate into one optimizer step (``engine.steps.micro_batched_step``, also for custom steps);
- the batches: ``train_loader()`` (e.g. Candle's cached features);
- the schedule: ``self.schedule`` (``engine.steps.Schedule``; e.g. LFA's full-batch steps, the LR per step);
- the epoch: ``before_epoch`` / ``after_epoch``, ``epoch_scalars()`` (extra TensorBoard scalars per epoch);
- the run: ``before_train`` / ``after_eval_only_load``, ``evaluate_all``, ``extra_results``,
  ``extra_checkpoint_state`` / ``load_extra_checkpoint_state``.

The components: ``engine.precision`` (autocast, loss scale), ``engine.checkpointing`` (atomic trainable-only
checkpoints, resume, best-val files), ``engine.evaluation`` (metrics of a test pass, best-val record),
``engine.run_files`` (config, manifest, ``results.json``) and ``engine.tensorboard`` (scalars per step
and epoch in ``<run>/tensorboard/``).
"""
import logging
import os
import random
import sys
import time
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from engine.checkpointing import BEST_CKPT, CKPT_PREFIX, Checkpointer, RunError, latest_checkpoint  # noqa: F401
from engine.clip_loader import load_clip
from engine.config import PRECISIONS, ConfigError  # noqa: F401  (PRECISIONS: re-exported)
from engine.data import DataManager
from engine.evaluation import BestVal, evaluate
from engine.losses import logit_adjusted_ce
from engine.optim import build_lr_scheduler, build_optimizer
from engine.precision import Precision, resolve_precision
from engine.prompted_clip import PromptedCLIP
from engine.run_files import RunFiles, code_version  # noqa: F401  (code_version: re-exported)
from engine.steps import Schedule, micro_batched_step
from engine.tensorboard import ScalarLog


def set_random_seed(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def step_seed(seed, index):
    """The torch seed of epoch (or, with ``Schedule.seed_each_step``, step) ``index``."""
    return seed * 10007 + index


class TrainerX:
    """Base trainer for a single labelled training set (Dassl's TrainerX)."""

    def __init__(self, cfg, dataset=None, run_info=None):
        self.cfg = cfg
        self.output_dir = cfg.OUTPUT_DIR
        self.run_files = RunFiles(cfg, run_info)
        self.logger = setup_logger(self.output_dir)
        self.device = torch.device("cuda" if cfg.USE_CUDA and torch.cuda.is_available() else "cpu")
        node = trainer_node(cfg)
        self.precision = resolve_precision(node.get("PREC", "fp32") if node is not None else "fp32", self.device,
                                           f"TRAINER.{cfg.TRAINER.NAME.upper()}.PREC")
        self.amp = Precision(self.precision, self.device)
        self.seed = cfg.SEED if cfg.SEED >= 0 else 0
        set_random_seed(self.seed)
        self.max_epoch = cfg.OPTIM.MAX_EPOCH
        self.schedule = None  # build_model may set one (engine.steps.Schedule); default: OPTIM.MAX_EPOCH epochs
        self.epoch, self.step_index = 0, 0
        self.epoch_losses, self.epoch_train_acc, self.train_time = [], None, 0.0
        self.best_val, self.loaded_best = BestVal(), None  # TEST.FINAL_MODEL best_val
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
        self.schedule = self.schedule or Schedule(self.max_epoch)
        self.max_epoch = self.schedule.epochs
        self.checkpointer = Checkpointer(self.output_dir, self._models, self._optims, self._scheds, self.amp,
                                         cfg.TRAIN.CHECKPOINT_FREQ, self.device, self.extra_checkpoint_state,
                                         self.load_extra_checkpoint_state, self.log)
        self.scalars = ScalarLog(self.output_dir)
        self.log(f"Trainer {cfg.TRAINER.NAME} on {self.device} ({self.precision}); "
                 f"{self.num_classes} classes; {self.count_trainable_parameters():,} trainable parameters")

    # ---- construction helpers
    def build_clip(self):
        name = self.cfg.MODEL.BACKBONE.NAME
        model = load_clip(name, self.cfg.MODEL.BACKBONE.PATH)
        enc = PromptedCLIP(model, truncate_text=self.cfg.MODEL.TRUNCATE_TEXT,
                           cache_text_prefix=self.cfg.MODEL.TEXT_PREFIX_CACHE,
                           shared_text_prefix=self.cfg.MODEL.SHARED_TEXT_PREFIX,
                           cls_only_last_block=self.cfg.MODEL.CLS_ONLY_LAST_VISION_BLOCK,
                           skip_replaced_outputs=self.cfg.MODEL.SKIP_REPLACED_PROMPT_OUTPUTS,
                           compile_mlp=self.cfg.MODEL.COMPILE_MLP)
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

    @property
    def run_info(self):
        return self.run_files.run_info

    # ---- precision (engine.precision)
    @property
    def scaler(self):
        return self.amp.scaler

    @scaler.setter
    def scaler(self, value):
        self.amp.scaler = value

    def autocast(self):
        return self.amp.autocast()

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
        self.amp.backward(loss)

    def model_update(self, names=None):
        self.amp.step(self._optims_of(names))

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
        """Default step: the (logit-adjusted) cross-entropy of ``self.logits(images)``, over parts of at most
        ``images_per_micro_batch`` images (one part unless a method bounds it). Methods with extra loss terms
        or other inputs override this."""
        images, labels = self.parse_batch_train(batch)

        def part_loss(part):
            logits = self.logits(images[part])
            loss = self.compute_loss(logits, labels[part])
            return loss, {"loss": loss, "acc": (logits.argmax(1) == labels[part]).float().mean().item() * 100}

        return micro_batched_step(self, images.shape[0], self.images_per_micro_batch(images.shape[0]), part_loss)

    def images_per_micro_batch(self, batch):
        """Images per backward pass of a training step (``engine.steps.micro_batched_step``): the whole batch
        unless a method bounds the memory a step holds (LAMP, CoCoOp)."""
        return batch

    def logits(self, images):
        """Training logits over the trained classes (used by the default ``forward_backward``)."""
        raise NotImplementedError

    def model_inference(self, images):
        raise NotImplementedError

    def set_model_mode(self, mode):
        for m in self._models.values():
            m.train(mode == "train")

    # ---- checkpoints (engine.checkpointing)
    def checkpoint_dir(self, name, root=None):
        return self.checkpointer.folder(name, root)

    def save_checkpoint(self, epoch):
        self.checkpointer.save(epoch, self._history())

    def _history(self):
        history = {"epoch_losses": list(self.epoch_losses), "train_time": self.train_time}
        if self.uses_best_val():
            history["val_accuracy"] = list(self.best_val.history)
        return history

    def extra_checkpoint_state(self):
        """Trainer state outside the registered modules that a resume needs (override if any)."""
        return {}

    def load_extra_checkpoint_state(self, state):
        pass

    latest_checkpoint = staticmethod(latest_checkpoint)

    def load_model(self, model_dir, epoch=None):
        """Load trainable state (weights only) for evaluation; raises RunError if nothing is there."""
        if self._models:
            self.loaded_best = self.checkpointer.load_weights(model_dir, epoch, best=self.uses_best_val(),
                                                              mismatch_message=self._mismatch_message)

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
        history, start = self.checkpointer.resume()
        if history is not None:
            self.epoch_losses = list(history.get("epoch_losses", []))
            self.train_time = history.get("train_time", 0.0)
            self.best_val = BestVal(history.get("val_accuracy", []))
        if start:
            self.log(f"Resuming from {self.output_dir}: epoch {start} of {self.max_epoch} already done")
        return start

    # ---- the training loop
    def results_path(self):
        return self.run_files.results_path

    def train(self):
        self.run_files.refuse_finished("a finished run (results.json); choose another --output-dir or delete that "
                                       "folder yourself")
        self.write_run_files()
        if self.uses_best_val() and self.dm.val_loader is None:
            raise ConfigError(f"TEST.FINAL_MODEL best_val needs a val split, and {self.cfg.DATASET.NAME} has none here; "
                              "use TEST.FINAL_MODEL last_step")
        self.epoch_losses, self.train_time, self.best_val = [], 0.0, BestVal()
        start = self.resume_if_possible() if self.count_trainable_parameters() else self.max_epoch
        try:
            if start < self.max_epoch:
                self.before_train(resumed=start > 0)
            for self.epoch in range(start, self.max_epoch):
                self.before_epoch()
                self.run_epoch()
                self.after_epoch()
            self.after_train()
        finally:
            self.scalars.close()

    def start_training(self):
        """Fresh training state and ``before_train``, without the loop (tools.tables.efficiency times one
        ``before_epoch`` + ``run_epoch`` after this)."""
        self.epoch, self.epoch_losses, self.train_time, self.best_val = 0, [], 0.0, BestVal()
        self.before_train(resumed=False)

    def before_train(self, resumed):
        """Called once before the first epoch that runs (e.g. to compute class prototypes)."""

    def train_loader(self):
        """The batches of a training epoch (a method may train on something else, e.g. cached features)."""
        return self.dm.train_loader_x

    def before_epoch(self):
        # Re-seed per epoch so an interrupted run that resumes draws the same batches and crops.
        seed = step_seed(self.seed, self.epoch)
        torch.manual_seed(seed)
        loader = self.train_loader()
        if getattr(loader, "generator", None) is not None:
            loader.generator.manual_seed(int(seed))

    def run_epoch(self):
        self.set_model_mode("train")
        batches = self.schedule.batches(self.train_loader())
        self.num_batches = len(batches)
        losses, accs, t0 = [], [], time.time()
        bar = tqdm(batches, total=self.num_batches, desc=f"epoch {self.epoch + 1}/{self.max_epoch}",
                   leave=False, dynamic_ncols=True, disable=not sys.stderr.isatty())
        tic = time.time()
        for self.batch_idx, batch in enumerate(bar):
            self.step_index = self.epoch * self.num_batches + self.batch_idx
            if self.schedule.seed_each_step:
                torch.manual_seed(step_seed(self.seed, self.step_index))
            lr = self.get_current_lr()
            out = self.forward_backward(batch)
            if self.schedule.lr_step == "step":
                self.step_schedulers()
            losses.append(out["loss"])
            if "acc" in out:
                accs.append(out["acc"])
            step_time = time.time() - tic
            tic = time.time()
            self.scalars.scalars({**{f"train/{k}": v for k, v in out.items()}, "train/lr": lr}, self.step_index)
            if (self.batch_idx + 1) % self.cfg.TRAIN.PRINT_FREQ == 0 or self.batch_idx + 1 == self.num_batches:
                extra = " ".join(f"{k} {v:.4f}" for k, v in out.items() if k != "loss")
                self.log(f"epoch [{self.epoch + 1}/{self.max_epoch}] batch [{self.batch_idx + 1}/{self.num_batches}] "
                         f"time {step_time:.3f}s loss {out['loss']:.4f} {extra} lr {lr:.4e}".rstrip())
            bar.set_postfix(loss=f"{out['loss']:.3f}")
        self.epoch_losses.append(float(np.mean(losses)) if losses else float("nan"))
        self.epoch_train_acc = float(np.mean(accs)) if accs else None
        self.train_time += time.time() - t0

    def step_schedulers(self):
        for sched in self._scheds.values():
            if sched is not None:
                sched.step()

    def after_epoch(self):
        lr = self.get_current_lr()
        if self.schedule.lr_step == "epoch":
            self.step_schedulers()
        self.log(f"epoch {self.epoch + 1} done: mean loss {self.epoch_losses[-1]:.4f}")
        scalars = {"epoch/loss": self.epoch_losses[-1], "epoch/train_acc": self.epoch_train_acc,
                   "epoch/lr": lr}
        if self.uses_best_val():
            scalars["epoch/val_accuracy"] = self.track_best_val()
        self.scalars.scalars({**scalars, **self.epoch_scalars()}, self.epoch + 1)
        self.save_checkpoint(self.epoch)

    def epoch_scalars(self):
        """Method-specific TensorBoard scalars of the epoch just trained ({tag: number})."""
        return {}

    def after_train(self):
        if self.uses_best_val():
            self.load_best_val()
        self.write_results(self.evaluate_all())

    # ---- TEST.FINAL_MODEL best_val (Dassl): val after each epoch, the best epoch's model is tested
    def uses_best_val(self):
        return self.cfg.TEST.FINAL_MODEL == "best_val"

    @property
    def val_history(self):
        return self.best_val.history

    def val_accuracy(self):
        """Accuracy on the val split with the current weights (Dassl's ``test(split="val")``)."""
        return self.test(self.dm.val_loader, desc="val")["accuracy"]

    def best_val_epoch(self):
        """(0-based epoch, val accuracy) of the best epoch so far (the first of equals, as Dassl's strict >)."""
        return self.best_val.best()

    def track_best_val(self):
        accuracy = float(self.val_accuracy())
        previous, best = self.best_val.best()
        if self.best_val.record(accuracy):
            self.checkpointer.save_best(self.epoch, accuracy)
            self.log(f"val accuracy {accuracy:.2f}: best so far (epoch {self.epoch + 1}), saved {BEST_CKPT}")
        else:
            self.log(f"val accuracy {accuracy:.2f} (best {best:.2f} at epoch {previous + 1})")
        return accuracy

    def load_best_val(self):
        epoch, accuracy = self.best_val.best()
        if epoch is None:
            return
        self.checkpointer.load_best(epoch)
        self.log(f"TEST.FINAL_MODEL best_val: testing the model of epoch {epoch + 1} (val accuracy {accuracy:.2f})")

    def final_model_record(self):
        """results.json's ``final_model`` (only with TEST.FINAL_MODEL best_val; last_step runs keep their
        results.json as before)."""
        if not self.uses_best_val():
            return {}
        epoch, accuracy = self.best_val.best() if self.best_val.history else (self.loaded_best or (None, None))
        return {"final_model": {"mode": "best_val", "epoch": None if epoch is None else epoch + 1,
                                "val_accuracy": accuracy, "val_accuracy_per_epoch": list(self.best_val.history)}}

    # ---- evaluation (engine.evaluation)
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
        metrics = evaluate(self.model_inference, loader or self.dm.test_loader, self.parse_batch_test,
                           self.autocast, self.num_classes, self.eval_head_labels(), desc)
        self.log(f"[{desc}] {metrics['num_samples']} images, {self.num_classes} classes: accuracy "
                 f"{metrics['accuracy']:.2f} macro-F1 {metrics['macro_f1']:.2f} mean-class {metrics['mean_class_acc']:.2f}")
        return metrics

    # ---- run files (engine.run_files)
    def write_run_files(self):
        self.run_files.write_run_files(getattr(self.dataset, "manifest", None))

    def write_results(self, results):
        fields = {"num_classes": self.num_classes, "trainable_parameters": self.count_trainable_parameters(),
                  "epochs": self.max_epoch, "epoch_losses": self.epoch_losses,
                  "train_time_s": round(self.train_time, 2)}
        payload = self.run_files.write_results(results, getattr(self.dataset, "manifest", None), fields,
                                               {**self.final_model_record(), **self.extra_results()})
        self.scalars.scalars({f"{split}/{key}": m.get(key) for split, m in results.items()
                              for key in ("accuracy", "macro_f1", "mean_class_acc", "head_acc", "tail_acc")},
                             self.max_epoch)  # on the epoch axis, after the last epoch
        self.log(f"Results written to {self.results_path()}")
        return payload

    def extra_results(self):
        """Method-specific top-level fields for results.json (e.g. LAMP's load diagnostics)."""
        return {}

    def eval_only(self, model_dir=None, load_epoch=None):
        """Evaluate a trained model; never trains. Methods without trainable state need no checkpoint."""
        self.run_files.refuse_finished("results.json; choose another --output-dir")
        if self.count_trainable_parameters():
            if not model_dir:
                raise RunError("--eval-only needs --model-dir pointing to a trained run of this method")
            self.load_model(model_dir, load_epoch)
        self.write_run_files()
        self.after_eval_only_load()
        try:
            return self.write_results(self.evaluate_all())
        finally:
            self.scalars.close()

    def after_eval_only_load(self):
        """Hook between loading the checkpoint and evaluating (LAMP adapts its new-class bias later, in
        ``evaluate_all``, so that both of its new-class numbers come from one run)."""
