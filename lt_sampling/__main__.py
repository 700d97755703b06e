"""Build a long-tailed split manifest from a CoOp split file, without images.

    python -m lt_sampling --split-file $DATA/caltech-101/split_zhou_Caltech101.json \
        --imb-factor 10 --seed 1 --shots 100 --subsample base --out manifest.json [--profile exp|step]

Runs the same protocol as ``datasets.DatasetBase`` (cap -> base/new split -> long-tailed down-sampling
of train), so the manifest (and its hash) equals the one a training run on that dataset records.
"""
import argparse
import os
import re

from engine.cli import run_cli

from .manifest import build_manifest, write_manifest
from .protocol import apply_protocol, cap_splits


def dataset_name(split_file):
    """``split_zhou_Caltech101.json`` -> ``Caltech101`` (else the file's stem)."""
    stem = os.path.splitext(os.path.basename(split_file))[0]
    match = re.fullmatch(r"split_zhou_(.+)", stem)
    return match.group(1) if match else stem


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lt_sampling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--split-file", required=True, help="CoOp split json (split_zhou_<Dataset>.json)")
    parser.add_argument("--imb-factor", type=float, default=1.0, help="n_max / n_min (1 = no down-sampling)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--shots", type=int, default=100, help="per-class cap before down-sampling (-1: none)")
    parser.add_argument("--subsample", choices=("all", "base", "new"), default="base")
    parser.add_argument("--profile", choices=("exp", "step"), default="exp")
    parser.add_argument("--step-head-fraction", type=float, default=0.5)
    parser.add_argument("--head-fraction", type=float, default=0.2)
    parser.add_argument("--dataset", default=None, help="dataset name (default: from the split file name)")
    parser.add_argument("--out", required=True, help="manifest json to write")
    args = parser.parse_args(argv)

    if not os.path.isfile(args.split_file):
        raise FileNotFoundError(f"split file not found: {os.path.abspath(args.split_file)}")
    if args.shots == 0 or args.shots < -1:
        raise ValueError(f"--shots must be >= 1 (the per-class cap) or -1 (all images), got {args.shots}")
    from datasets.base import DatasetBase  # reads the split exactly as training runs do

    train, val, test = DatasetBase.read_split(args.split_file, "")
    seed = max(args.seed, 0)
    if args.shots > 0:
        train, val = cap_splits(train, val, args.shots, seed)
    try:
        result = apply_protocol(train, val, test, seed=seed, subsample=args.subsample,
                                imb_factor=args.imb_factor, profile=args.profile,
                                step_head_fraction=args.step_head_fraction, head_fraction=args.head_fraction)
    except ValueError as err:
        raise ValueError(f"{args.split_file}: {err}") from err
    manifest = build_manifest(
        args.dataset or dataset_name(args.split_file), result.train, result.classnames, seed=seed,
        shots=args.shots, imb_factor=args.imb_factor, profile=args.profile, subsample=args.subsample,
        head_fraction=args.head_fraction, all_classnames=result.all_classnames,
        split_sizes={"train": len(result.train), "val": len(result.val), "test": len(result.test)},
    )
    write_manifest(manifest, args.out)
    print(f"{manifest['dataset']} {args.subsample}: {manifest['num_classes']} classes, {manifest['total']} "
          f"train images, n_max {manifest['n_max']}, n_min {manifest['n_min']}, hash {manifest['hash'][:16]} "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
