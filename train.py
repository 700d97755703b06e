"""Train or evaluate one method on one dataset split (CoOp / Dassl command line).

    python train.py --root DATA --seed 1 --trainer CoOp \
        --dataset-config-file configs/datasets/caltech101.yaml \
        --config-file configs/trainers/CoOp/vit_b16_ep50_ctxv1.yaml \
        --output-dir output/base2new_imb10/train_base/caltech101/CoOp/vit_b16_ep50_ctxv1/seed1 \
        DATASET.NUM_SHOTS 100 DATASET.SUBSAMPLE_CLASSES base DATASET.IMB_FACTOR 10
"""
import argparse
import json
import os
import re
from pathlib import Path

import datasets  # noqa: F401  (registers every dataset)
import trainers  # noqa: F401  (registers every trainer and its config section)
from engine.cli import call_cli, run_cli
from engine.config import ConfigError, build_cfg
from engine.registry import TRAINER_REGISTRY
from engine.run_identity import RunIdentityError, check_manifest, check_run_folder, read_run_config
from engine.trainer import RunError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (or LTPL_DEBUG=1)")
    p.add_argument("opts", default=None, nargs=argparse.REMAINDER, help="modify config options (KEY VALUE pairs)")
    return p.parse_args(argv)


def experiment_name(output_dir):
    """'base2new_imb10' for output/base2new_imb10/train_base/<dataset>/<trainer>/<config>/seed1."""
    parts = Path(output_dir).parts
    for marker in ("train_base", "test_new", "train_all", "test_all"):
        if marker in parts and parts.index(marker) > 0:
            return parts[parts.index(marker) - 1]
    return ""


def config_name(args, cfg):
    """The config's name in results.json and tables: the trainer yaml's stem (+ "_la"), or the run's config
    folder when it extends that name (a variant folder of the scripts, e.g. ``vit_b16_ep50_max_epoch5``)."""
    name = Path(args.config_file).stem if args.config_file else "default"
    if cfg.TRAINER.LOSS == "la":
        name += "_la"  # "+LA" runs are their own method in tables (same suffix as scripts/lib.sh)
    out = Path(cfg.OUTPUT_DIR)
    if re.fullmatch(r"seed-?\d+", out.name) and out.parent.name.startswith(name):
        name = out.parent.name
    return name


def check_output_dir(cfg, skip_finished=False):
    """The run folder must be a folder and hold no run of another config; return True when it holds a
    finished run of this config (an error unless ``skip_finished``)."""
    out = cfg.OUTPUT_DIR
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"--output-dir {out} is a file, not a folder")
    check_run_folder(out, cfg)
    if os.path.isfile(os.path.join(out, "results.json")):
        if skip_finished:
            return True
        raise RunError(f"{out} already holds a finished run (results.json); "
                       f"choose another --output-dir or delete that folder yourself")
    return False


def check_model_dir(model_dir, cfg):
    """``--eval-only --model-dir``: the folder must hold a run of the same trainer and backbone."""
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


def build_trainer(cfg, run_info=None, dataset=None):
    return TRAINER_REGISTRY.get(cfg.TRAINER.NAME)(cfg, dataset=dataset, run_info=run_info)


def run(argv=None):
    """The command; expected errors are raised (``main`` turns them into one line and exit code 2)."""
    args = parse_args(argv)
    if args.backbone:
        args.opts = ["MODEL.BACKBONE.NAME", args.backbone] + list(args.opts or [])
    cfg = build_cfg(args)
    if not cfg.TRAINER.NAME:
        raise ConfigError("no trainer given: pass --trainer NAME (e.g. CoOp, LAMP)")
    if not cfg.OUTPUT_DIR:
        raise ConfigError("no output folder: pass --output-dir")
    if check_output_dir(cfg, skip_finished=args.skip_finished):
        print(f"[skip] {cfg.OUTPUT_DIR} (finished, same config)")
        return 0
    if args.eval_only and args.model_dir:
        check_model_dir(args.model_dir, cfg)
    run_info = {"config": config_name(args, cfg), "experiment": experiment_name(cfg.OUTPUT_DIR)}
    trainer = build_trainer(cfg, run_info)
    check_manifest(cfg.OUTPUT_DIR, getattr(trainer.dataset, "manifest", None))
    if args.eval_only:
        trainer.eval_only(args.model_dir, args.load_epoch)
    elif not args.no_train:
        trainer.train()
    return 0


def main(argv=None):
    """Exit code of the command: 0, or 2 with one ``error: ...`` line on stderr for an expected error."""
    return call_cli(run, argv)


if __name__ == "__main__":
    run_cli(run)
