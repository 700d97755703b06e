"""The per-method scripts' entry point: one benchmark of one method, its steps from the run API (engine/runs.py).

    python -m tools.runs base2new --trainer LAMP -- imagenet 10 1 2 3     # DATASET IMB [SEED ...]
    python -m tools.runs fewshot --trainer CoOp -- caltech101 16           # DATASET SHOTS [SEED ...]
    python -m tools.runs xd --trainer MaPLe -- 1 2 3                       # [SEED ...] (source --xd-source)
    python -m tools.runs dg --trainer MaPLe                                # [SEED ...]
    python -m tools.runs config-folder --trainer CoOp --config vit_b16_ep50_ctxv1 --extra "OPTIM.MAX_EPOCH 5"

scripts/<method>/*.sh call it through scripts/lib.sh (which maps DATA, OUTPUT, LOSS, CFG, EXTRA, TAG, XD_SOURCE,
XD_IMB, XD_TARGETS, DG_TARGETS onto the options). Without --config the method's own config for the regime (its
registry entry, with its ImageNet variant) is used. Steps run in this process, in order; a finished step of
the same config is skipped, one of another config stops the benchmark with exit code 2, an unfinished one
resumes from its checkpoint. Default seeds: 1 2 3 4 5.
"""
import argparse
import os
import re

from engine.cli import UserError, run_cli
from engine.runs import (CONFIG_ROLE, DATASET_CONFIGS, TRAINER_CONFIGS, DataRef, RunConfig, b2n_steps,
                         config_folder, execute_steps, experiment_name, transfer_steps)

DEFAULT_SEEDS = [1, 2, 3, 4, 5]
XD_SOURCE, XD_IMB = "imagenet", 100
XD_TARGETS = ("caltech101 oxford_pets stanford_cars oxford_flowers food101 fgvc_aircraft sun397 dtd eurosat "
              "ucf101")
DG_TARGETS = "imagenetv2 imagenet_sketch imagenet_a imagenet_r"
COMMANDS = {"base2new": "lt_b2n", "fewshot": "fewshot", "xd": "xd", "dg": "dg"}
USAGE = {"base2new": ("DATASET IMB [SEED ...]", "caltech101 10 1 2 3"),
         "fewshot": ("DATASET SHOTS [SEED ...]", "caltech101 16 1 2 3"),
         "xd": ("[SEED ...]", "1 2 3"), "dg": ("[SEED ...]", "1 2 3")}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=sorted(COMMANDS) + ["config-folder"])
    p.add_argument("--trainer", default="", help="the method (registered trainer name); config-folder: optional")
    p.add_argument("--config", default="", help="config name in configs/trainers/<TRAINER>/ (default: the method's)")
    p.add_argument("--loss", default="ce", help="ce | la (+LA runs: the config folder gets _la)")
    p.add_argument("--extra", default="", help="extra KEY VALUE opts for every run, one string (EXTRA)")
    p.add_argument("--tag", default="", help="name the variant folder <config>_<tag> instead (TAG)")
    p.add_argument("--data", default="data")
    p.add_argument("--output", default="output")
    p.add_argument("--xd-source", default=XD_SOURCE)
    p.add_argument("--xd-imb", default=str(XD_IMB))
    p.add_argument("--xd-targets", default=XD_TARGETS)
    p.add_argument("--dg-targets", default=DG_TARGETS)
    p.add_argument("--prog", default="", help="the script's name in usage lines")
    p.add_argument("--dry-run", action="store_true", help="print each step's folder and arguments; run nothing")
    p.add_argument("args", nargs="*")
    return p.parse_intermixed_args(argv)


def positive_int(name, value):
    if not re.fullmatch(r"[0-9]+", str(value)):
        raise UserError(f"{name} must be a positive integer, got '{value}'")
    return int(value)


def extra_opts(text):
    words = text.split()
    if len(words) % 2:
        raise UserError(f"EXTRA must be KEY VALUE pairs, got an odd number of words ({len(words)}): '{text}'")
    return words


def folder_name(args, config):
    if args.loss not in ("ce", "la"):
        raise UserError(f"LOSS must be ce or la, got '{args.loss}'")
    if args.tag and not re.fullmatch(r"[A-Za-z0-9._+-]+", args.tag):
        raise UserError(f"TAG may hold letters, digits and . _ + - only, got '{args.tag}'")
    return config_folder(config, args.loss, extra_opts(args.extra), tag=args.tag)


def method_config(args, regime, dataset):
    """--config, else the method's own config for the regime (its ImageNet variant on ImageNet)."""
    from engine.registry import TRAINER_REGISTRY
    config = args.config or TRAINER_REGISTRY.info(args.trainer).config(CONFIG_ROLE[regime], dataset)
    if not config:
        raise UserError(f"{args.trainer} has no {CONFIG_ROLE[regime]} config (its registry entry names none); "
                        f"pass CFG")
    if not (TRAINER_CONFIGS / args.trainer / f"{config}.yaml").is_file():
        raise UserError(f"no trainer config {TRAINER_CONFIGS / args.trainer / f'{config}.yaml'}")
    return config


def data_ref(name):
    if not (DATASET_CONFIGS / f"{name}.yaml").is_file():
        known = " ".join(sorted(p.stem for p in DATASET_CONFIGS.glob("*.yaml")))
        raise UserError(f"no dataset config {DATASET_CONFIGS / f'{name}.yaml'} (datasets: {known})")
    return DataRef(name, name)


def plan_steps(args, regime):
    """(steps, where the results go) of one benchmark of one method."""
    usage, example = USAGE[args.command]
    b2n = regime in ("lt_b2n", "fewshot")
    if b2n and len(args.args) < 2:
        raise UserError(f"usage: {args.prog or args.command} {usage}   (e.g. {example})")
    setting_name = {"lt_b2n": "IMB", "fewshot": "SHOTS"}.get(regime, "XD_IMB")
    setting = positive_int(setting_name, args.args[1] if b2n else args.xd_imb)
    seeds = [positive_int("SEED", s) for s in (args.args[2:] if b2n else args.args)] or DEFAULT_SEEDS
    dataset = args.args[0] if b2n else args.xd_source
    config = method_config(args, regime, dataset)
    run = RunConfig(args.trainer, config, folder_name(args, config), args.loss, tuple(extra_opts(args.extra)))
    exp = os.path.join(args.output, experiment_name(regime, setting))
    steps = []
    if b2n:
        ref = data_ref(dataset)
        for seed in seeds:
            steps += b2n_steps(run, args.output, args.data, regime, setting, ref, seed)
        where = f"{exp}/{{train_base,test_new}}/{dataset}/{args.trainer}/{run.folder_name}"
    else:
        source = data_ref(dataset)
        targets = [data_ref(t) for t in (args.xd_targets if regime == "xd" else args.dg_targets).split()]
        for seed in seeds:
            steps += transfer_steps(run, args.output, args.data, regime, setting, source, targets, seed)
        where = f"{exp}/test_all/<target>/{args.trainer}/{run.folder_name}"
    return steps, f"[{args.trainer}] results go to {where}/seed<S>/ (table: python -m tools.collect_results {exp})"


def main(argv=None):
    args = parse_args(argv)
    import datasets  # noqa: F401  (registers the datasets)
    import trainers  # noqa: F401  (registers the trainers: their configs and run-neutral keys)
    from engine.registry import TRAINER_REGISTRY
    if args.command == "config-folder" and not args.trainer:
        if not args.config:
            raise UserError("config-folder needs --config (CFG) or --trainer (its default config)")
        print(folder_name(args, args.config))
        return 0
    if not args.trainer:
        raise UserError("no trainer given: pass --trainer NAME (the scripts set TRAINER)")
    TRAINER_REGISTRY.get(args.trainer)
    if args.command == "config-folder":
        print(folder_name(args, args.config or TRAINER_REGISTRY.info(args.trainer).default_config))
        return 0
    steps, where = plan_steps(args, COMMANDS[args.command])
    print(where, flush=True)
    if args.dry_run:
        for step in steps:
            print(f"[step] {step.folder}\n  {' '.join(step.argv)}")
        return 0
    return execute_steps(steps, skip_finished=True)


if __name__ == "__main__":
    run_cli(main)
