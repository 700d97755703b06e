"""Classification metrics of the long-tailed base-to-new protocol (docs/methods/README.md).

All percentages are in [0, 100]. Macro-F1 follows Candle's evaluator: sklearn ``f1_score`` with
``average="macro"`` over the labels present in ``y_true`` (``zero_division=0``).
"""
import numpy as np
from sklearn.metrics import f1_score


def harmonic_mean(a, b):
    """HM(a, b) = 2ab / (a + b); 0 when both are 0, None when either is None."""
    if a is None or b is None:
        return None
    if a + b == 0:
        return 0.0
    return 2.0 * a * b / (a + b)


def _group_acc(correct, mask):
    return float(correct[mask].mean() * 100) if mask.any() else None


def compute_metrics(y_true, y_pred, num_classes, head_labels=None):
    """Metrics of one test split.

    Returns ``accuracy`` (top-1 over all samples), ``macro_f1``, ``mean_class_acc`` (mean per-class
    recall over the classes present in ``y_true``), ``head_acc`` / ``tail_acc`` (accuracy over the
    samples whose true label is / is not in ``head_labels``; None without ``head_labels`` or when a
    group has no test sample), ``num_samples``, ``num_classes`` and ``per_class_acc`` (length
    ``num_classes``; None for a class without test samples).
    """
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} labels but y_pred has {y_pred.size}")
    if y_true.size == 0:
        raise ValueError("compute_metrics: no samples")
    for name, arr in (("y_true", y_true), ("y_pred", y_pred)):
        if arr.min() < 0 or arr.max() >= num_classes:
            raise ValueError(f"{name} holds labels outside [0, {num_classes}): min {arr.min()}, max {arr.max()}")

    correct = y_true == y_pred
    present = np.unique(y_true)
    per_class = [None] * num_classes
    for c in present:
        per_class[int(c)] = float(correct[y_true == c].mean() * 100)
    macro_f1 = f1_score(y_true, y_pred, average="macro", labels=present, zero_division=0) * 100

    head_acc = tail_acc = None
    if head_labels is not None:
        is_head = np.isin(y_true, np.asarray(list(head_labels), dtype=np.int64))
        head_acc = _group_acc(correct, is_head)
        tail_acc = _group_acc(correct, ~is_head)

    return {
        "accuracy": float(correct.mean() * 100),
        "macro_f1": float(macro_f1),
        "mean_class_acc": float(np.mean([per_class[int(c)] for c in present])),
        "head_acc": head_acc,
        "tail_acc": tail_acc,
        "num_samples": int(y_true.size),
        "num_classes": int(num_classes),
        "per_class_acc": per_class,
    }


class Evaluator:
    """Accumulates predictions batch by batch: ``reset()``, ``process(logits, labels)``, ``evaluate()``."""

    def __init__(self, num_classes, head_labels=None):
        self.num_classes = num_classes
        self.head_labels = head_labels
        self.reset()

    def reset(self):
        self._y_true, self._y_pred = [], []

    def process(self, logits, labels):
        """``logits``: (B, C) tensor; ``labels``: (B,) tensor. The prediction is the argmax."""
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"expected logits of shape (B, {self.num_classes}), got {tuple(logits.shape)}")
        self._y_pred.append(logits.detach().argmax(dim=1).cpu().numpy())
        self._y_true.append(labels.detach().cpu().numpy())

    def evaluate(self):
        if not self._y_true:
            raise RuntimeError("Evaluator.evaluate() called before any process()")
        return compute_metrics(
            np.concatenate(self._y_true), np.concatenate(self._y_pred), self.num_classes, self.head_labels
        )
