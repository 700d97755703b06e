"""Run train.py in-process on the generated SyntheticShapes dataset with the tiny random CLIP."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.losses import logit_adjusted_ce

from datasets.synthetic import generate_synthetic_shapes

REPO = Path(__file__).resolve().parents[1]
TINY = ["MODEL.BACKBONE.NAME", "tiny", "INPUT.SIZE", "(32, 32)", "DATALOADER.NUM_WORKERS", "0",
        "DATALOADER.TEST.BATCH_SIZE", "50"]


def synthetic_root(tmp_path_factory):
    """A session-wide generated dataset (20 classes, 32 px)."""
    root = tmp_path_factory.getbasetemp() / "synthetic_data"
    generate_synthetic_shapes(str(root))
    return root


def train_args(root, out, trainer, config, *opts, seed=1, subsample="base", imb=10, shots=100):
    return ["--root", str(root), "--seed", str(seed), "--trainer", trainer,
            "--dataset-config-file", str(REPO / "configs/datasets/synthetic_shapes.yaml"),
            "--config-file", str(REPO / "configs/trainers" / trainer / config),
            "--output-dir", str(out), *TINY, "DATASET.NUM_SHOTS", str(shots),
            "DATASET.SUBSAMPLE_CLASSES", subsample, "DATASET.IMB_FACTOR", str(imb), *opts]


def run_train(root, out, trainer, config, *opts, **kw):
    from tests import cli
    rc = cli.main(train_args(root, out, trainer, config, *opts, **kw))
    assert rc == 0, f"train.py exited {rc}"
    return json.loads((Path(out) / "results.json").read_text())


def run_eval(root, out, model_dir, trainer, config, *opts, subsample="new", **kw):
    from tests import cli
    args = train_args(root, out, trainer, config, *opts, subsample=subsample, **kw)
    rc = cli.main(["--eval-only", "--model-dir", str(model_dir)] + args)
    assert rc == 0, f"train.py --eval-only exited {rc}"
    return json.loads((Path(out) / "results.json").read_text())


METRIC_KEYS = {"accuracy", "macro_f1", "mean_class_acc", "head_acc", "tail_acc", "num_samples", "num_classes"}


def assert_metrics(metrics, num_classes, num_samples, with_head_tail=True):
    assert METRIC_KEYS <= set(metrics)
    assert metrics["num_classes"] == num_classes and metrics["num_samples"] == num_samples
    for key in ("accuracy", "macro_f1", "mean_class_acc"):
        assert 0.0 <= metrics[key] <= 100.0
    if with_head_tail:
        assert metrics["head_acc"] is not None and metrics["tail_acc"] is not None
    else:
        assert metrics["head_acc"] is None and metrics["tail_acc"] is None


def assert_step_uses_la_loss(trainer):
    """One training step of a trainer built with TRAINER.LOSS la: its loss is the LA loss of its logits."""
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 5, 9])
    with torch.no_grad():
        logits = trainer.logits(images)
    out = trainer.forward_backward({"img": images, "label": labels})
    expected = logit_adjusted_ce(logits, labels, trainer.dataset.train_counts)
    assert out["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert out["loss"] != pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-3)


def run_interrupted(monkeypatch, trainer_cls, crash_epoch, root, out, trainer, config, *opts, **kw):
    """Start a run that crashes at the start of epoch ``crash_epoch`` (0-indexed), as a killed job would;
    the caller then reruns the same command to resume."""
    original = trainer_cls.run_epoch

    def crash(self):
        if self.epoch == crash_epoch:
            raise KeyboardInterrupt("simulated crash")
        return original(self)

    monkeypatch.setattr(trainer_cls, "run_epoch", crash)
    with pytest.raises(KeyboardInterrupt):
        run_train(root, out, trainer, config, *opts, **kw)
    monkeypatch.setattr(trainer_cls, "run_epoch", original)
    assert not (Path(out) / "results.json").exists()


def tensorboard_scalars(run_dir):
    """{tag: [ScalarEvent(step, value, ...)]} read back from a run's ``tensorboard/`` folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"))
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}
