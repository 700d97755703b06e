"""Check that a dataset is installed as the loaders expect.

    python -m tools.check_data --root $DATA --dataset Caltech101 [--fast]

Verifies the dataset folder and split/annotation files, then every referenced image: that it exists and
(unless ``--fast``) that it decodes in full, so truncated or corrupt files are found before a run meets
them. Prints the entries and classes per split and the broken paths; exits 1 when anything is broken,
2 on bad input (unknown dataset, no folder).
"""
import argparse
import os
import sys
import tempfile

from tqdm import tqdm

from engine.cli import run_cli


def _decode_error(path):
    """None when ``path`` decodes as an image, else a short reason."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return " ".join(str(err).split()) or type(err).__name__
    return None


def check(root, name, max_missing=10, out=None, fast=False):
    """Return 0 when the dataset is complete, 1 otherwise (problems are printed to ``out``, default the
    current ``sys.stdout``). An unknown dataset raises (one line through ``run_cli``)."""
    out = out or sys.stdout
    import datasets  # noqa: F401  (registers the datasets)
    from engine.registry import DATASET_REGISTRY
    from lt_sampling.protocol import get_classnames

    cls = DATASET_REGISTRY.get(name)
    with tempfile.TemporaryDirectory() as cache_dir:  # scan caches of this check are thrown away
        try:
            splits = dict(zip(("train", "val", "test"), cls.read_raw(root, cache_dir)))
        except (ValueError, OSError) as err:
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
    if not fast:
        absent = set(missing)
        paths = [p for p in dict.fromkeys(x.impath for items in splits.values() for x in items) if p not in absent]
        broken = []
        for path in tqdm(paths, desc="decoding images", unit="img", disable=not sys.stderr.isatty()):
            reason = _decode_error(path)
            if reason:
                broken.append((path, reason))
        print(f"  decoded {len(paths)} images: {len(broken)} broken", file=out)
        if broken:
            print(f"ERROR: {len(broken)} images do not decode (corrupt or truncated); replace them:", file=out)
            for path, reason in broken:
                print(f"  {path}  ({reason})", file=out)
            status = 1
    print("OK" if status == 0 else "FAILED (see docs/DATASETS.md for the expected tree)", file=out)
    return status


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tools.check_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="DATASET.ROOT (the folder holding all datasets)")
    parser.add_argument("--dataset", required=True, help="registered dataset name, e.g. Caltech101")
    parser.add_argument("--max-missing", type=int, default=10, help="missing paths to print")
    parser.add_argument("--fast", action="store_true", help="only check that the images exist (no decoding)")
    args = parser.parse_args(argv)
    return check(args.root, args.dataset, args.max_missing, fast=args.fast)


if __name__ == "__main__":
    run_cli(main)
