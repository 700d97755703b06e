"""Generate the SyntheticShapes dataset: python -m tools.make_synthetic --root DATA_DIR"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.synthetic import main  # noqa: E402
from engine.cli import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(main)
