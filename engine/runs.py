"""The run API: what a run is, where it lives, which steps each regime takes, and running one step.

Layout (CoOp / MaPLe / Candle style)::

    <output>/<experiment>/<split>/<dataset>/<TRAINER>/<config folder>/seed<S>/

- experiment: ``base2new_imb<IMB>`` (long-tailed base-to-new), ``fewshot_<K>shots``, ``xd_imb<IMB>`` /
  ``dg_imb<IMB>`` (cross-dataset / domain generalisation); ``experiment_name``.
- split: ``train_base`` / ``test_new`` (base-to-new), ``train_all`` / ``test_all`` (transfer).
- config folder: the trainer config's name, ``_la`` for "+LA" runs, then the variant tag of the extra opts
  (``config_folder``; engine/run_identity.py names variants and checks a folder's identity).

Regimes (``b2n_steps``, ``transfer_steps``): base-to-new trains on the base classes (tested on base) and
evaluates that model on the new classes; cross-dataset and domain generalisation train once on the long-tailed
source (``xd_imb<IMB>/train_all/<source>``, shared by both) and evaluate it on each target.

Rules (``check_output_dir``, ``execute_step``): a folder holding a finished run of the same config is skipped
(``skip_finished``) or refused; a folder holding a run of another config is refused naming the keys; an
unfinished run resumes from its last checkpoint; a folder another process is running (``LOCK_NAME``, flock)
is not started twice (the table launcher).

``run(argv)`` is one step in this process (train.py's command line; ``main`` returns its exit code). The
trainers and datasets must be registered first (``import trainers, datasets``: train.py, the table launcher
and ``python -m tools.runs`` do).
"""
import argparse
import errno
import fcntl
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

from engine.cli import UserError, call_cli
from engine.config import ConfigError, build_cfg, load_yaml
from engine.registry import TRAINER_REGISTRY
from engine.clip_loader import backbone_identity
from engine.run_identity import (RunIdentityError, check_backbone, check_manifest, check_run_folder, read_run_config,
                                 run_tag, variant_tag)
from engine.trainer import RunError

REPO = Path(__file__).resolve().parents[1]
TRAINER_CONFIGS = REPO / "configs" / "trainers"
DATASET_CONFIGS = REPO / "configs" / "datasets"
LOCK_NAME = ".table.lock"
REGIMES = ("lt_b2n", "fewshot", "xd", "dg")
CONFIG_ROLE = {"lt_b2n": "b2n", "fewshot": "fewshot", "xd": "xd", "dg": "xd"}  # MethodInfo.configs role per regime
SPLITS = ("train_base", "test_new", "train_all", "test_all")


# ------------------------------------------------------------------------------------------------- layout

def experiment_name(regime, setting):
    """``lt_b2n`` 10 -> ``base2new_imb10``; ``fewshot`` 16 -> ``fewshot_16shots``; ``xd`` / ``dg`` 100 -> ``xd_imb100``."""
    if regime == "lt_b2n":
        return f"base2new_imb{setting}"
    if regime == "fewshot":
        return f"fewshot_{setting}shots"
    if regime in ("xd", "dg"):
        return f"{regime}_imb{setting}"
    raise ValueError(f"unknown regime {regime!r} (known: {', '.join(REGIMES)})")


def config_folder(config, loss="ce", opts=(), tag="", neutral_in_tag=False):
    """The config folder name: ``config`` (+ ``_la``) + the variant tag of ``opts``, or ``_<tag>`` when ``tag``
    names the variant. The run-neutral opts (worker count, paths, ...) are left out of the tag unless
    ``neutral_in_tag`` (the table specs name every opt they set, as they always have)."""
    name = config + ("_la" if loss == "la" else "")
    if tag:
        return f"{name}_{tag}"
    return name + (variant_tag(opts) if neutral_in_tag else run_tag(opts))


def run_folder(output, experiment, split, dataset, trainer, folder_name, seed):
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLITS)})")
    return os.path.join(output, experiment, split, dataset, trainer, folder_name, f"seed{seed}")


def trainer_config_file(trainer, config):
    return str(TRAINER_CONFIGS / trainer / f"{config}.yaml")


def dataset_config_file(config):
    return str(DATASET_CONFIGS / f"{config}.yaml")


# -------------------------------------------------------------------------------------------------- steps

@dataclass(frozen=True)
class RunConfig:
    """What a run trains, independent of the data: trainer, config name, loss, extra ``KEY VALUE`` opts and
    the config folder name (``config_folder``)."""
    trainer: str
    config: str
    folder_name: str
    loss: str = "ce"
    opts: tuple = ()

    def __post_init__(self):
        """+LA for a method without a cross-entropy to adjust (``MethodInfo.la == "refused"``) is refused here,
        before a script or a table launches anything."""
        if self.loss not in ("ce", "la"):
            raise ConfigError(f"loss must be ce or la, got {self.loss!r}")
        if self.loss == "la" and TRAINER_REGISTRY.info(self.trainer).la == "refused":
            raise ConfigError(f"{self.trainer} has no cross-entropy to logit-adjust (its registry entry refuses "
                              f"+LA): run it with loss ce")


@dataclass(frozen=True)
class DataRef:
    """A dataset of a step: its folder name, its config (configs/datasets/<config>.yaml) and extra opts."""
    name: str
    config: str
    opts: tuple = ()


@dataclass
class Step:
    """One run: one ``run(argv)`` call writing ``folder``."""
    folder: str
    dataset: str            # the dataset's folder name
    argv: list              # train.py arguments
    eval_only: bool = False
    config: str = ""        # the config folder name (results.json "config")
    experiment: str = ""

    def expected(self):
        """What this run's results.json must record: trainer, dataset (DATASET.NAME of its dataset config or its
        DATASET.NAME opt), seed, config, and subsample_classes / imb_factor / num_shots / loss where the arguments
        set them (last value wins, as in yacs), and the sha256 of the backbone weights where they come from a file
        found here."""
        args = parse_args(self.argv)
        opts = dict(zip(args.opts[0::2], args.opts[1::2]))
        dataset = opts.get("DATASET.NAME") or dataset_name(args.dataset_config_file)
        out = {"trainer": args.trainer, "dataset": dataset, "seed": args.seed, "config": self.config}
        for key, field_name, cast in (("DATASET.SUBSAMPLE_CLASSES", "subsample_classes", str),
                                      ("DATASET.IMB_FACTOR", "imb_factor", float),
                                      ("DATASET.NUM_SHOTS", "num_shots", int), ("TRAINER.LOSS", "loss", str)):
            if key in opts:
                out[field_name] = cast(opts[key])
        sha = planned_backbone_sha256(tuple(self.argv))
        if sha:
            out["backbone_sha256"] = sha
        return out

    @property
    def done(self):
        return finished(self.folder)

    def state(self):
        return folder_state(self.folder)


@functools.lru_cache(maxsize=None)
def _planned_backbone(argv):
    args = parse_args(list(argv))
    if args.backbone:
        args.opts = ["MODEL.BACKBONE.NAME", args.backbone] + list(args.opts or [])
    cfg = build_cfg(args)
    return cfg.MODEL.BACKBONE.NAME, cfg.MODEL.BACKBONE.PATH


def planned_backbone_sha256(argv):
    """The sha256 of the backbone weights file a step's arguments load, or None: a random-weight architecture,
    or weights not found here (collecting on a machine without them checks everything but the weights)."""
    try:
        return backbone_identity(*_planned_backbone(tuple(argv)))["sha256"]
    except (FileNotFoundError, ConfigError):
        return None


@functools.lru_cache(maxsize=None)
def dataset_name(config_file):
    """DATASET.NAME of a dataset config file (its stem when it names none)."""
    data = load_yaml(config_file, "dataset config") or {}
    return (data.get("DATASET") or {}).get("NAME", Path(config_file).stem)


def step_argv(run, folder, dataset, seed, data_root, cache_dir, experiment, regime_opts, eval_from=None):
    """train.py arguments of one step: flags, the cache, the regime's data opts, the dataset's opts, the loss,
    then the run's opts (so they win)."""
    flags = ["--eval-only", "--model-dir", eval_from] if eval_from else []
    return (["--root", str(data_root), "--seed", str(seed), "--trainer", run.trainer,
             "--dataset-config-file", dataset_config_file(dataset.config),
             "--config-file", trainer_config_file(run.trainer, run.config), "--output-dir", folder,
             "--experiment", experiment, "--config-name", run.folder_name] + flags
            + ["DATASET.CACHE_DIR", str(cache_dir)] + list(regime_opts) + list(dataset.opts)
            + ["TRAINER.LOSS", run.loss] + list(run.opts))


def b2n_steps(run, output, data_root, regime, setting, dataset, seed, cache_dir=None):
    """Base-to-new (``lt_b2n``: cap 100 per class, imbalance factor ``setting``; ``fewshot``: ``setting`` shots):
    train on the base classes, then evaluate that model on the new classes."""
    exp = experiment_name(regime, setting)
    shots, imb = (100, setting) if regime == "lt_b2n" else (setting, 1)
    cache_dir = cache_dir or os.path.join(output, "cache")
    data = ["DATASET.NUM_SHOTS", str(shots), "DATASET.IMB_FACTOR", str(imb)]
    train_dir = run_folder(output, exp, "train_base", dataset.name, run.trainer, run.folder_name, seed)
    new_dir = run_folder(output, exp, "test_new", dataset.name, run.trainer, run.folder_name, seed)
    common = dict(dataset=dataset, seed=seed, data_root=data_root, cache_dir=cache_dir, experiment=exp)
    return [Step(train_dir, dataset.name, step_argv(run, train_dir, regime_opts=data + ["DATASET.SUBSAMPLE_CLASSES", "base"], **common),
                 False, run.folder_name, exp),
            Step(new_dir, dataset.name, step_argv(run, new_dir, regime_opts=data + ["DATASET.SUBSAMPLE_CLASSES", "new"],
                                                  eval_from=train_dir, **common), True, run.folder_name, exp)]


def transfer_steps(run, output, data_root, regime, imb, source, targets, seed, cache_dir=None):
    """Cross-dataset (``xd``) / domain generalisation (``dg``): train once on the long-tailed source (all classes,
    cap 100, imbalance factor ``imb``; the folder ``xd_imb<IMB>/train_all/<source>`` serves both regimes), then
    evaluate it on each target (all classes)."""
    exp, source_exp = experiment_name(regime, imb), experiment_name("xd", imb)
    cache_dir = cache_dir or os.path.join(output, "cache")
    train_dir = run_folder(output, source_exp, "train_all", source.name, run.trainer, run.folder_name, seed)
    steps = [Step(train_dir, source.name, step_argv(
        run, train_dir, source, seed, data_root, cache_dir, source_exp,
        ["DATASET.NUM_SHOTS", "100", "DATASET.IMB_FACTOR", str(imb), "DATASET.SUBSAMPLE_CLASSES", "all"]),
        False, run.folder_name, source_exp)]
    for target in targets:
        folder = run_folder(output, exp, "test_all", target.name, run.trainer, run.folder_name, seed)
        steps.append(Step(folder, target.name, step_argv(run, folder, target, seed, data_root, cache_dir, exp,
                                                         ["DATASET.SUBSAMPLE_CLASSES", "all"], eval_from=train_dir),
                          True, run.folder_name, exp))
    return steps


# -------------------------------------------------------------------------------------- state and locks

def finished(folder):
    return os.path.isfile(os.path.join(folder, "results.json"))


def lock_held(folder):
    """True when a live process holds the lock of ``folder`` (never creates anything)."""
    try:
        fd = os.open(os.path.join(folder, LOCK_NAME), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(fd)
    return False


def try_lock(folder):
    """An open fd holding the exclusive lock of ``folder`` (created), or None when another process holds it;
    the kernel releases it when the process dies."""
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def release(fd):
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def folder_state(folder):
    """done | running | partial | missing of one run folder (read-only)."""
    if finished(folder):
        return "done"
    if lock_held(folder):
        return "running"
    return "partial" if os.path.isdir(folder) else "missing"


def check_output_dir(cfg, skip_finished=False):
    """The run folder must be a folder and hold no run of another config; return True when it holds a
    finished run of this config (an error unless ``skip_finished``)."""
    out = cfg.OUTPUT_DIR
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"--output-dir {out} is a file, not a folder")
    check_run_folder(out, cfg)
    check_weights(out, cfg)
    if finished(out):
        if skip_finished:
            return True
        raise RunError(f"{out} already holds a finished run (results.json); "
                       f"choose another --output-dir or delete that folder yourself")
    return False


def check_weights(folder, cfg, role="this folder"):
    """``check_backbone`` for a folder that holds a run (only then are the weights looked up and hashed: a fresh
    folder's first error stays the one the run itself raises)."""
    if read_run_config(folder) is not None:
        check_backbone(folder, backbone_identity(cfg.MODEL.BACKBONE.NAME, cfg.MODEL.BACKBONE.PATH), role)


def check_model_dir(model_dir, cfg):
    """``--eval-only --model-dir``: the folder must hold a run of the same trainer and backbone, trained on the same
    backbone weights."""
    if not os.path.isdir(model_dir):
        raise RunError(f"--model-dir {model_dir} is not a folder; pass the output folder of a training run")
    stored = read_run_config(model_dir)
    if stored is None:
        return
    trainer = (stored.get("TRAINER") or {}).get("NAME", "")
    backbone = ((stored.get("MODEL") or {}).get("BACKBONE") or {}).get("NAME", "")
    if (trainer, backbone) != (cfg.TRAINER.NAME, cfg.MODEL.BACKBONE.NAME):
        name = ""
        try:
            with open(os.path.join(model_dir, "results.json")) as f:
                name = json.load(f).get("config", "")
        except (OSError, ValueError, AttributeError):
            pass
        raise RunIdentityError(
            f"--model-dir {model_dir} holds a {trainer} run (config {name or Path(model_dir).parent.name}, "
            f"backbone {backbone}), but this evaluation is for {cfg.TRAINER.NAME} with backbone "
            f"{cfg.MODEL.BACKBONE.NAME}; pass the matching --trainer/--config-file or another --model-dir")
    check_weights(model_dir, cfg, "--model-dir")


# ---------------------------------------------------------------------------------------- one step here

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train or evaluate one method on one dataset split (train.py).",
                                prog="train.py")
    p.add_argument("--root", type=str, default="", help="path to the datasets folder")
    p.add_argument("--output-dir", type=str, default="", help="run folder")
    p.add_argument("--resume", type=str, default="", help="(Dassl compatibility) runs resume from --output-dir")
    p.add_argument("--seed", type=int, default=-1, help="only positive value enables a fixed seed")
    p.add_argument("--config-file", type=str, default="", help="trainer config file")
    p.add_argument("--dataset-config-file", type=str, default="", help="dataset config file")
    p.add_argument("--trainer", type=str, default="", help="name of trainer")
    p.add_argument("--backbone", type=str, default="", help="CLIP backbone name (MODEL.BACKBONE.NAME)")
    p.add_argument("--eval-only", action="store_true", help="evaluation only (never trains)")
    p.add_argument("--model-dir", type=str, default="", help="load the model from this run folder for evaluation")
    p.add_argument("--load-epoch", type=int, default=None, help="epoch of the checkpoint to load (default: last)")
    p.add_argument("--no-train", action="store_true", help="build everything, do not train")
    p.add_argument("--skip-finished", action="store_true",
                   help="exit 0 without running when --output-dir holds a finished run of this same config "
                        "(the scripts use it); a finished run of another config is still an error")
    p.add_argument("--experiment", type=str, default="",
                   help="experiment name recorded in results.json (the run API passes it, e.g. base2new_imb10)")
    p.add_argument("--config-name", type=str, default="",
                   help="config name recorded in results.json (the run API passes the config folder name; "
                        "default: the trainer yaml's stem, + _la for TRAINER.LOSS la)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (or LTPL_DEBUG=1)")
    p.add_argument("opts", default=None, nargs=argparse.REMAINDER, help="modify config options (KEY VALUE pairs)")
    return p.parse_args(argv)


def default_config_name(config_file, loss):
    """The config's name in results.json when the caller names none: the yaml's stem (+ "_la")."""
    return (Path(config_file).stem if config_file else "default") + ("_la" if loss == "la" else "")


def build_trainer(cfg, run_info=None, dataset=None):
    return TRAINER_REGISTRY.get(cfg.TRAINER.NAME)(cfg, dataset=dataset, run_info=run_info)


def run(argv=None):
    """One step (train.py's command line); expected errors are raised (``main`` turns them into one line and
    exit code 2)."""
    args = parse_args(argv)
    if args.backbone:
        args.opts = ["MODEL.BACKBONE.NAME", args.backbone] + list(args.opts or [])
    if not TRAINER_REGISTRY.names():
        raise UserError("no trainer is registered: import trainers (and datasets) before running a step")
    cfg = build_cfg(args)
    if not cfg.TRAINER.NAME:
        raise ConfigError("no trainer given: pass --trainer NAME (e.g. CoOp, LAMP)")
    if not cfg.OUTPUT_DIR:
        raise ConfigError("no output folder: pass --output-dir")
    if check_output_dir(cfg, skip_finished=args.skip_finished):
        print(f"[skip] {cfg.OUTPUT_DIR} (finished, same config)", flush=True)
        return 0
    if args.eval_only and args.model_dir:
        check_model_dir(args.model_dir, cfg)
    run_info = {"config": args.config_name or default_config_name(args.config_file, cfg.TRAINER.LOSS),
                "experiment": args.experiment}
    trainer = build_trainer(cfg, run_info)
    check_manifest(cfg.OUTPUT_DIR, getattr(trainer.dataset, "manifest", None))
    if args.eval_only:
        trainer.eval_only(args.model_dir, args.load_epoch)
    elif not args.no_train:
        trainer.train()
    return 0


def main(argv=None):
    """Exit code of one step: 0, or 2 with one ``error: ...`` line on stderr for an expected error."""
    return call_cli(run, argv)


def execute_step(step, skip_finished=False):
    """Run ``step`` (a Step) in this process; returns its exit code (expected errors: one line, 2)."""
    return main((["--skip-finished"] if skip_finished else []) + list(step.argv))


def execute_steps(steps, skip_finished=True):
    """Run ``steps`` in order (the scripts' loop): a finished step of the same config is skipped, the first
    failure stops the loop; returns 0 or that step's exit code."""
    for step in steps:
        print(f"[run] {step.folder}", flush=True)
        rc = execute_step(step, skip_finished)
        if rc:
            return rc
    return 0
