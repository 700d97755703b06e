"""Issue 18 §6 / §7: resume is exact in every precision the machine runs, for every trainer.

Each trainer runs 3 epochs in bf16 uninterrupted, and again interrupted before its last epoch then resumed;
the final checkpoints (weights, optimizer and scheduler state, counters and buffers, history, RNG) and the
results must be identical. The fp16 loss scale travels with the checkpoint. (On CUDA the attention backward
is not bitwise deterministic, so there the bound is that of two uninterrupted runs: README, "Resume".)"""
import pytest
import torch

from engine.registry import TRAINER_REGISTRY
from engine.trainer import TrainerX
from tests.helpers_run import run_interrupted, run_train

FAST = ["DATALOADER.TRAIN_X.BATCH_SIZE", "16", "OPTIM.WARMUP_EPOCH", "0", "DATASET.NUM_SHOTS", "8"]
PER_TRAINER = {  # keep each run short; the schedules' structure (warm-up off, 3 epochs) is the same for all
    "LFA": ["TRAINER.LFA.ITERS", "3", "TRAINER.LFA.FIVE_CROP", "False"],
    "LAMP": ["TRAINER.LAMP.NEW_BIAS_ADAPT", "False"],
    "CoCoOp": ["DATALOADER.TRAIN_X.BATCH_SIZE", "4"],
}
TRAINERS = sorted(n for n in TRAINER_REGISTRY.names() if n != "ZeroshotCLIP")


def _final_checkpoints(out):
    found = {}
    for path in sorted(out.glob("*/model.pth.tar-*")):
        found[path.parent.name] = torch.load(path, weights_only=True)
    return found


def _same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for key in a:
            if key != "train_time":
                _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_bf16_resume_before_the_last_epoch_is_exact(trainer, root, tmp_path, monkeypatch):
    cls = TRAINER_REGISTRY.get(trainer)
    config = cls.default_config
    opts = ["OPTIM.MAX_EPOCH", "3", f"TRAINER.{trainer.upper()}.PREC", "bf16", *FAST, *PER_TRAINER.get(trainer, [])]
    full = run_train(root, tmp_path / "full", trainer, config, *opts)
    # The last epoch (0-indexed) of 3; LFA's 3 iterations are the steps of its one epoch (a step schedule,
    # checkpointed after the last step), so its rerun starts over instead of resuming.
    last = 0 if trainer == "LFA" else 2
    run_interrupted(monkeypatch, TrainerX, last, root, tmp_path / "cut", trainer, config, *opts)
    resumed = run_train(root, tmp_path / "cut", trainer, config, *opts)
    assert ("Resuming" in (tmp_path / "cut" / "log.txt").read_text()) == (last > 0)
    a, b = _final_checkpoints(tmp_path / "full"), _final_checkpoints(tmp_path / "cut")
    assert a and set(a) == set(b)
    for name in a:
        assert a[name]["epoch"] == last
        for part in ("state_dict", "optimizer", "scheduler", "rng", "extra", "history"):
            _same(a[name][part], b[name][part], f"{name}.{part}")
    for key in ("results", "epoch_losses"):
        _same(full[key], resumed[key], key)
    for key in set(full) - {"finished", "train_time_s", "results", "epoch_losses"}:
        _same(full[key], resumed[key], key)


def test_the_loss_scale_travels_with_the_checkpoint(root, tmp_path, monkeypatch):
    """An fp16 (amp) run's GradScaler state (scale, growth counter) is saved and restored by resume."""
    from tests.helpers_run import train_args
    from tests import cli

    made = []
    original_init = TrainerX.__init__

    def with_scaler(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
        made.append(self)

    monkeypatch.setattr(TrainerX, "__init__", with_scaler)
    opts = ("OPTIM.MAX_EPOCH", "2", "OPTIM.WARMUP_EPOCH", "0", "DATASET.NUM_SHOTS", "8")
    run_interrupted(monkeypatch, TrainerX, 1, root, tmp_path / "cut", "CoOp", "vit_b16_ep50_ctxv1.yaml", *opts)
    saved = torch.load(tmp_path / "cut" / "prompt_learner" / "model.pth.tar-0", weights_only=True)["scaler"]
    assert saved == made[-1].scaler.state_dict() and saved["_growth_tracker"] > 0 or saved["scale"] != 2.0 ** 10
    args = train_args(root, tmp_path / "cut", "CoOp", "vit_b16_ep50_ctxv1.yaml", *opts)
    resumed_states = []
    original_resume = TrainerX.resume_if_possible

    def record(self):
        start = original_resume(self)
        resumed_states.append(self.scaler.state_dict())
        return start

    monkeypatch.setattr(TrainerX, "resume_if_possible", record)
    assert cli.main(args) == 0
    assert resumed_states == [saved]


def test_the_text_prefix_cache_is_keyed_by_the_autocast_dtype(tiny):
    tokens = tiny.tokenize(["a photo of a red circle.", "a photo of a blue square."])
    tiny.clear_text_cache()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        tiny._text_prefix(tokens, 3, False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        after_bf16 = tiny._text_prefix(tokens, 3, False)
    tiny.clear_text_cache()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        fresh = tiny._text_prefix(tokens, 3, False)
    tiny.clear_text_cache()
    x, y = (t.materialize() if hasattr(t, "materialize") else t for t in (after_bf16, fresh))
    assert x.dtype == y.dtype and torch.equal(x, y)
