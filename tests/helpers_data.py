"""Test helpers: a yacs config with exactly the data keys the data pipeline reads, and data paths."""
import os
from pathlib import Path

import pytest
from yacs.config import CfgNode as CN

# The shared folder next to the repository (real CoOp split, sources table, paper text, specs).
SHARED = Path(__file__).resolve().parents[2] / "shared"
# The real CoOp split file shipped in the shared folder next to the repository.
REAL_SPLIT = SHARED / "data/splits/split_zhou_Caltech101.json"
# Set (to 1) in CI (.ci/run): a test that needs a file of the shared folder then fails loudly when the file is
# missing, instead of skipping.
REQUIRE_SHARED_ENV = "LTPL_REQUIRE_SHARED"


def shared_required():
    return os.environ.get(REQUIRE_SHARED_ENV, "") not in ("", "0")


def require_shared(*paths):
    """Skip the calling test when a file of ../shared is missing, or fail it (one clear line) when
    LTPL_REQUIRE_SHARED=1, as in CI."""
    missing = [str(p) for p in paths if not Path(p).exists()]
    if not missing:
        return
    msg = (f"{', '.join(missing)} not found: this test needs the shared folder next to the repository "
           f"({SHARED})")
    if shared_required():
        pytest.fail(f"{msg}; {REQUIRE_SHARED_ENV}=1 (CI) requires it", pytrace=False)
    pytest.skip(msg)


def needs_shared(*paths):
    """Decorator form of ``require_shared`` (checked when the test runs, not when it is collected)."""
    def deco(fn):
        import functools

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            require_shared(*paths)
            return fn(*args, **kwargs)
        return wrapper
    return deco


def make_cfg(root, output_dir, **overrides):
    """A CfgNode with the data keys (defaults as in engine/config.py). ``overrides`` use flat dotted
    names with "__" for ".", e.g. ``DATASET__IMB_FACTOR=10``."""
    cfg = CN()
    cfg.SEED = -1
    cfg.OUTPUT_DIR = str(output_dir)
    cfg.DATASET = CN()
    cfg.DATASET.ROOT = str(root)
    cfg.DATASET.NAME = ""
    cfg.DATASET.NUM_SHOTS = -1
    cfg.DATASET.SUBSAMPLE_CLASSES = "all"
    cfg.DATASET.IMB_FACTOR = 1.0
    cfg.DATASET.IMB_PROFILE = "exp"
    cfg.DATASET.STEP_HEAD_FRACTION = 0.5
    cfg.DATASET.HEAD_FRACTION = 0.2
    cfg.DATASET.CACHE_DIR = ""
    cfg.INPUT = CN()
    cfg.INPUT.SIZE = (224, 224)
    cfg.INPUT.INTERPOLATION = "bicubic"
    cfg.INPUT.TRANSFORMS = ["random_resized_crop", "random_flip", "normalize"]
    cfg.INPUT.PIXEL_MEAN = [0.48145466, 0.4578275, 0.40821073]
    cfg.INPUT.PIXEL_STD = [0.26862954, 0.26130258, 0.27577711]
    cfg.INPUT.RRCROP_SCALE = (0.08, 1.0)
    cfg.INPUT.NO_TRANSFORM = False
    cfg.INPUT.CROP_PADDING = 4
    cfg.DATALOADER = CN()
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DATALOADER.TRAIN_X = CN()
    cfg.DATALOADER.TRAIN_X.BATCH_SIZE = 32
    cfg.DATALOADER.TEST = CN()
    cfg.DATALOADER.TEST.BATCH_SIZE = 100
    for key, value in overrides.items():
        *parents, name = key.split("__")
        target = cfg
        for part in parents:
            target = target[part]
        if name not in target:
            raise KeyError(f"unknown config key {key}")
        target[name] = value
    return cfg
