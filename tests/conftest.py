import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets  # noqa: E402,F401  (registration happens here, as in train.py: engine/ imports neither)
import trainers  # noqa: E402,F401


@pytest.fixture(scope="module")
def tiny():
    """The tiny random-weight CLIP in the prompt-aware encoder (one per test module: tests may toggle
    its truncation / cache switches)."""
    from engine.clip_loader import load_clip
    from engine.prompted_clip import PromptedCLIP

    return PromptedCLIP(load_clip("tiny"))


@pytest.fixture(scope="session")
def root(tmp_path_factory):
    """The generated SyntheticShapes dataset (20 classes, 32 px), made once per session."""
    from tests.helpers_run import synthetic_root

    return synthetic_root(tmp_path_factory)
