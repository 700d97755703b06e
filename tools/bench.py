"""Benchmark one training step of a trainer on random data: trainable parameters, ms/step, peak memory.
(A trainer with no trainable parameters, e.g. ZeroshotCLIP, gets its inference step timed instead.)

    python -m tools.bench --trainer CoOp --backbone ViT-B/16-random --batch 4 --classes 50
    python -m tools.bench --trainer LAMP --params-only
    python -m tools.bench --trainer LAMP MODEL.TEXT_PREFIX_CACHE False MODEL.TRUNCATE_TEXT False

Without --config-file the trainer's default config (its ``default_config`` in configs/trainers/<NAME>/)
is used. Images and labels are random tensors; class names are "class 0".."class C-1".
A benchmark, not a test: numbers depend on the machine.
"""
import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from engine.cli import run_cli  # noqa: E402
from engine.clip_loader import RANDOM_ARCHS  # noqa: E402
from engine.config import build_cfg  # noqa: E402
from engine.registry import TRAINER_REGISTRY  # noqa: E402


class BenchDataset:
    """In-memory stand-in with the attributes trainers read (no images on disk)."""

    def __init__(self, num_classes, num_new=None):
        from datasets.base import Datum
        num_new = num_classes if num_new is None else num_new
        self.classnames = [f"class {i}" for i in range(num_classes)]
        self.new_classnames = [f"new class {i}" for i in range(num_new)]
        self.base_classnames = list(self.classnames)
        self.all_classnames = self.classnames + self.new_classnames
        self.num_classes = num_classes
        self.lab2cname = dict(enumerate(self.classnames))
        self.template = "a photo of a {}."
        self.train_counts = [max(1, int(100 * 10 ** (-i / max(1, num_classes - 1)))) for i in range(num_classes)]
        self.head_labels = list(range(max(1, num_classes // 5)))
        self.tail_labels = list(range(len(self.head_labels), num_classes))
        self.train_x = [Datum(impath=f"class{i}.png", label=i, classname=n) for i, n in enumerate(self.classnames)]
        self.val = list(self.train_x)
        self.test = list(self.train_x)
        self.manifest = {}


def default_config_file(trainer_name):
    cls = TRAINER_REGISTRY.get(trainer_name)
    name = getattr(cls, "default_config", "")
    return str(REPO_ROOT / "configs" / "trainers" / trainer_name / name) if name else ""


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainer", required=True)
    p.add_argument("--backbone", default="ViT-B/16-random")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--classes", type=int, default=50)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--config-file", default="")
    p.add_argument("--params-only", action="store_true", help="print only the trainable parameter count")
    p.add_argument("opts", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)

    import trainers  # noqa: F401
    TRAINER_REGISTRY.get(args.trainer)  # an unknown trainer: one line naming the registered ones
    if args.batch < 1 or args.classes < 1 or args.steps < 1 or args.warmup < 0:
        raise ValueError(f"--batch, --classes and --steps must be >= 1 and --warmup >= 0, got {args.batch}, "
                         f"{args.classes}, {args.steps}, {args.warmup}")
    config_file = args.config_file or default_config_file(args.trainer)
    size_opts = []
    if args.backbone in RANDOM_ARCHS:  # random archs have their own input resolution (tiny: 32 px)
        res = RANDOM_ARCHS[args.backbone]["image_resolution"]
        size_opts = ["INPUT.SIZE", f"({res}, {res})"]
    with tempfile.TemporaryDirectory() as out:
        ns = argparse.Namespace(root="", seed=1, trainer=args.trainer, config_file=config_file,
                                dataset_config_file="", output_dir=out,
                                opts=["MODEL.BACKBONE.NAME", args.backbone, "DATALOADER.TRAIN_X.BATCH_SIZE",
                                      str(args.batch), "DATALOADER.NUM_WORKERS", "0"] + size_opts
                                + list(args.opts or []))
        cfg = build_cfg(ns)
        trainer = TRAINER_REGISTRY.get(args.trainer)(cfg, dataset=BenchDataset(args.classes))
        n_params = trainer.count_trainable_parameters()
        if args.params_only:
            print(n_params)
            return 0
        res = trainer.clip.clip.visual.input_resolution
        gen = torch.Generator().manual_seed(0)
        batch = {"img": torch.randn(args.batch, 3, res, res, generator=gen),
                 "label": torch.randint(0, args.classes, (args.batch,), generator=gen),
                 "index": torch.arange(args.batch)}
        trainer.set_model_mode("train")
        if hasattr(trainer, "prepare_benchmark"):
            trainer.prepare_benchmark(batch)
        # A method with nothing to train (zero-shot CLIP) has no training step: time its inference instead.
        step_kind = "training" if n_params else "inference"
        if n_params:
            step_fn = lambda: trainer.forward_backward(batch)  # noqa: E731
        else:
            trainer.set_model_mode("eval")
            trainer.before_test()
            step_fn = torch.no_grad()(lambda: trainer.model_inference(batch["img"].to(trainer.device)))
        times = []
        for step in range(args.warmup + args.steps):
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            tic = time.perf_counter()
            step_fn()
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            if step >= args.warmup:
                times.append((time.perf_counter() - tic) * 1000)
        print(f"trainer            {args.trainer} ({os.path.basename(config_file) or 'registered defaults'})")
        print(f"backbone           {args.backbone} on {trainer.device} ({trainer.precision})")
        print(f"batch / classes    {args.batch} / {args.classes}")
        print(f"trainable params   {n_params:,}")
        print(f"ms / {step_kind} step {statistics.median(times):.1f} (median of {len(times)}, "
              f"min {min(times):.1f}, max {max(times):.1f}; {args.warmup} warm-up)")
        print(f"peak memory        {peak_memory_mb(trainer.device):.0f} MiB "
              f"({'CUDA allocated' if trainer.device.type == 'cuda' else 'process max RSS'})")
    return 0


if __name__ == "__main__":
    run_cli(main)
