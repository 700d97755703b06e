"""Check that a dataset is installed as the loaders expect.

    python -m tools.check_data --root $DATA --dataset Caltech101

Verifies the dataset folder and split/annotation files, then that every referenced image exists.
Prints the entries and classes per split and the first missing paths; exits non-zero on any problem.
"""
import argparse
import os
import sys
import tempfile


def check(root, name, max_missing=10, out=sys.stdout):
    """Return 0 when the dataset is complete, 1 otherwise (problems are printed to ``out``)."""
    import datasets  # noqa: F401  (registers the datasets)
    from datasets.base import DatasetNotFoundError
    from engine.registry import DATASET_REGISTRY
    from lt_sampling.protocol import get_classnames

    if name not in DATASET_REGISTRY:
        print(f"unknown dataset {name!r}; registered: {', '.join(DATASET_REGISTRY.names())}", file=out)
        return 1
    cls = DATASET_REGISTRY.get(name)
    with tempfile.TemporaryDirectory() as cache_dir:  # scan caches of this check are thrown away
        try:
            splits = dict(zip(("train", "val", "test"), cls.read_raw(root, cache_dir)))
        except (DatasetNotFoundError, ValueError, OSError) as err:
            print(f"ERROR: {err}", file=out)
            return 1
    status = 0
    try:
        num_classes = len(get_classnames(*splits.values()))
    except ValueError as err:
        print(f"ERROR: {err}", file=out)
        num_classes, status = 0, 1
    print(f"{name} at {os.path.join(os.path.abspath(root), cls.dataset_dir)}: {num_classes} classes", file=out)
    missing = []
    for key, items in splits.items():
        absent = [x.impath for x in items if not os.path.isfile(x.impath)]
        missing += absent
        print(f"  {key:5s} {len(items):8d} entries  {len({x.label for x in items}):5d} classes  "
              f"{len(absent)} missing", file=out)
    if not splits["test"]:
        print("ERROR: the test split is empty", file=out)
        status = 1
    if missing:
        unique = list(dict.fromkeys(missing))
        print(f"ERROR: {len(unique)} referenced images are missing; first ones:", file=out)
        for path in unique[:max_missing]:
            print(f"  {path}", file=out)
        status = 1
    print("OK" if status == 0 else "FAILED (see docs/DATASETS.md for the expected tree)", file=out)
    return status


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.check_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="DATASET.ROOT (the folder holding all datasets)")
    parser.add_argument("--dataset", required=True, help="registered dataset name, e.g. Caltech101")
    parser.add_argument("--max-missing", type=int, default=10, help="missing paths to print")
    args = parser.parse_args(argv)
    return check(args.root, args.dataset, args.max_missing)


if __name__ == "__main__":
    sys.exit(main())
