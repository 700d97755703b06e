"""engine/metrics.py against hand-computed numbers."""
import numpy as np
import pytest
import torch

from engine.metrics import Evaluator, compute_metrics, harmonic_mean

Y_TRUE = [0, 0, 1, 1, 2, 2]
Y_PRED = [0, 1, 1, 1, 0, 2]


def f1(p, r):
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def test_hand_computed_example():
    m = compute_metrics(Y_TRUE, Y_PRED, num_classes=3)
    # 4 of 6 correct.
    assert m["accuracy"] == pytest.approx(400 / 6)
    # Class 0: TP 1, FP 1 (sample 4), FN 1 (sample 1) -> P 1/2, R 1/2.
    # Class 1: TP 2, FP 1 (sample 1), FN 0 -> P 2/3, R 1.
    # Class 2: TP 1, FP 0, FN 1 (sample 4) -> P 1, R 1/2.
    f1s = [f1(1 / 2, 1 / 2), f1(2 / 3, 1.0), f1(1.0, 1 / 2)]
    assert f1s == pytest.approx([0.5, 0.8, 2 / 3])
    assert m["macro_f1"] == pytest.approx(100 * sum(f1s) / 3)
    assert m["macro_f1"] == pytest.approx(65.5555555)
    assert m["per_class_acc"] == pytest.approx([50.0, 100.0, 50.0])
    assert m["mean_class_acc"] == pytest.approx(200 / 3)
    assert m["head_acc"] is None and m["tail_acc"] is None
    assert m["num_samples"] == 6 and m["num_classes"] == 3


def test_head_and_tail_accuracy():
    m = compute_metrics(Y_TRUE, Y_PRED, num_classes=3, head_labels=[1])
    assert m["head_acc"] == pytest.approx(100.0)  # samples 2, 3: both right
    assert m["tail_acc"] == pytest.approx(50.0)  # samples 0, 1, 4, 5: right, wrong, wrong, right
    m = compute_metrics(Y_TRUE, Y_PRED, num_classes=3, head_labels={0})
    assert m["head_acc"] == pytest.approx(50.0)
    assert m["tail_acc"] == pytest.approx(75.0)


def test_imbalanced_test_set_accuracy_differs_from_mean_class_acc():
    y_true = [0] * 8 + [1] * 2
    y_pred = [0] * 8 + [0, 1]
    m = compute_metrics(y_true, y_pred, num_classes=2)
    assert m["accuracy"] == pytest.approx(90.0)
    assert m["mean_class_acc"] == pytest.approx(75.0)  # (100 + 50) / 2
    # Class 0: P 8/9, R 1; class 1: P 1, R 1/2.
    assert m["macro_f1"] == pytest.approx(50 * (f1(8 / 9, 1.0) + f1(1.0, 0.5)))


def test_classes_absent_from_y_true_are_not_averaged():
    # Class 3 never appears in y_true; predicting it only costs recall of class 0.
    m = compute_metrics([0, 0, 1, 1], [3, 0, 1, 1], num_classes=4)
    assert m["accuracy"] == pytest.approx(75.0)
    assert m["macro_f1"] == pytest.approx(50 * (f1(1.0, 0.5) + 1.0))
    assert m["per_class_acc"][2] is None and m["per_class_acc"][3] is None
    assert m["mean_class_acc"] == pytest.approx(75.0)


def test_bad_labels_are_rejected():
    with pytest.raises(ValueError, match="outside"):
        compute_metrics([0, 5], [0, 1], num_classes=3)
    with pytest.raises(ValueError, match="labels but"):
        compute_metrics([0, 1], [0], num_classes=3)


def test_evaluator_accumulates_batches():
    logits = torch.tensor([[5.0, 0, 0], [0, 5, 0], [0, 5, 0], [0, 5, 0], [5, 0, 0], [0, 0, 5]])
    labels = torch.tensor(Y_TRUE)
    ev = Evaluator(num_classes=3, head_labels=[1])
    with pytest.raises(RuntimeError):
        ev.evaluate()
    ev.process(logits[:4], labels[:4])
    ev.process(logits[4:], labels[4:])
    assert ev.evaluate() == compute_metrics(Y_TRUE, Y_PRED, 3, head_labels=[1])
    ev.reset()
    ev.process(logits[:2], labels[:2])
    assert ev.evaluate()["num_samples"] == 2
    with pytest.raises(ValueError, match="logits"):
        ev.process(torch.zeros(2, 4), labels[:2])


def test_harmonic_mean():
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(None, 50.0) is None
    assert harmonic_mean(np.float64(50), 50) == pytest.approx(50.0)
