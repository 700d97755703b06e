"""Train or evaluate one method on one dataset split (CoOp / Dassl command line).

    python train.py --root DATA --seed 1 --trainer CoOp \
        --dataset-config-file configs/datasets/caltech101.yaml \
        --config-file configs/trainers/CoOp/vit_b16_ep50_ctxv1.yaml \
        --output-dir output/base2new_imb10/train_base/caltech101/CoOp/vit_b16_ep50_ctxv1/seed1 \
        DATASET.NUM_SHOTS 100 DATASET.SUBSAMPLE_CLASSES base DATASET.IMB_FACTOR 10
"""
import argparse
import os
import sys
from pathlib import Path

from engine.config import ConfigError, build_cfg
from engine.registry import TRAINER_REGISTRY, RegistryError
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
    p.add_argument("opts", default=None, nargs=argparse.REMAINDER, help="modify config options (KEY VALUE pairs)")
    return p.parse_args(argv)


def experiment_name(output_dir):
    """'base2new_imb10' for output/base2new_imb10/train_base/<dataset>/<trainer>/<config>/seed1."""
    parts = Path(output_dir).parts
    for marker in ("train_base", "test_new", "train_all", "test_all"):
        if marker in parts and parts.index(marker) > 0:
            return parts[parts.index(marker) - 1]
    return ""


def build_trainer(cfg, run_info=None, dataset=None):
    import trainers  # noqa: F401  (registers every trainer)

    return TRAINER_REGISTRY.get(cfg.TRAINER.NAME)(cfg, dataset=dataset, run_info=run_info)


def main(argv=None):
    args = parse_args(argv)
    if args.backbone:
        args.opts = ["MODEL.BACKBONE.NAME", args.backbone] + list(args.opts or [])
    try:
        cfg = build_cfg(args)
        if not cfg.TRAINER.NAME:
            raise ConfigError("no trainer given: pass --trainer NAME (e.g. CoOp, LAMP)")
        if not cfg.OUTPUT_DIR:
            raise ConfigError("no output folder: pass --output-dir")
        if os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "results.json")):
            raise RunError(f"{cfg.OUTPUT_DIR} already holds a finished run (results.json); "
                           f"choose another --output-dir or delete that folder yourself")
        config_name = Path(args.config_file).stem if args.config_file else "default"
        if cfg.TRAINER.LOSS == "la":
            config_name += "_la"  # "+LA" runs are their own method in tables (same suffix as scripts/lib.sh)
        run_info = {"config": config_name,
                    "experiment": experiment_name(cfg.OUTPUT_DIR)}
        trainer = build_trainer(cfg, run_info)
        if args.eval_only:
            trainer.eval_only(args.model_dir, args.load_epoch)
        elif not args.no_train:
            trainer.train()
    except (ConfigError, RunError, FileNotFoundError, RegistryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
