"""Generate the demo datasets of the generated world (datasets/world.py) in the CoOp split-file layout.

    python -m tools.make_world --root DATA_DIR [--datasets WorldShapes WorldClutter WorldTextures]

Writes ``<root>/<folder>/images/<class>/<i>.png`` and ``<root>/<folder>/split_zhou_<Name>.json`` for each
dataset; a dataset whose files exist with the same parameters is left as it is.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.world import DEMO_DATASETS, demo_classes, generate_world_dataset  # noqa: E402
from engine.cli import run_cli  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description="Generate the demo datasets of the generated world under --root.")
    p.add_argument("--root", required=True, help="DATASET.ROOT")
    p.add_argument("--datasets", nargs="+", default=list(DEMO_DATASETS), choices=list(DEMO_DATASETS))
    p.add_argument("--train-per-class", type=int, default=60)
    p.add_argument("--val-per-class", type=int, default=4)
    p.add_argument("--test-per-class", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for name in a.datasets:
        path = generate_world_dataset(name, a.root, a.train_per_class, a.val_per_class, a.test_per_class, a.seed)
        print(f"{name} ready at {path} ({len(demo_classes(name))} classes)")
    return 0


if __name__ == "__main__":
    run_cli(main)
