"""Evaluation of a trainer's predictions on a loader, and the best-val record of TEST.FINAL_MODEL best_val."""
import sys

import torch
from tqdm import tqdm

from engine.metrics import compute_metrics


@torch.no_grad()
def evaluate(predict, loader, parse_batch, autocast, num_classes, head_labels=None, desc="test"):
    """Metrics of ``argmax predict(images)`` over ``loader`` (each split scored within its own classes)."""
    y_true, y_pred = [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not sys.stderr.isatty()):
        images, labels = parse_batch(batch)
        with autocast():
            logits = predict(images)
        y_pred.append(logits.argmax(dim=1).cpu())
        y_true.append(labels.cpu())
    y_true = torch.cat(y_true).numpy()
    y_pred = torch.cat(y_pred).numpy()
    return compute_metrics(y_true, y_pred, num_classes, head_labels=head_labels)


class BestVal:
    """Val accuracy after each epoch; the best epoch is the first of equals (Dassl's strict >)."""

    def __init__(self, history=None):
        self.history = list(history or [])

    def best(self):
        """(0-based epoch, val accuracy) of the best epoch so far, or (None, None)."""
        if not self.history:
            return None, None
        best = max(range(len(self.history)), key=lambda i: (self.history[i], -i))
        return best, self.history[best]

    def record(self, accuracy):
        """Append this epoch's accuracy; True when it beats every earlier epoch."""
        _, best = self.best()
        self.history.append(float(accuracy))
        return best is None or accuracy > best
