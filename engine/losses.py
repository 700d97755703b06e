"""Logit-adjusted cross-entropy (Menon et al., ICLR 2021; docs/methods/README.md).

``CE(logits + tau * log(pi), labels)`` with ``pi`` the empirical training label frequency over the
classes in the softmax. Inference uses the raw logits. Candle's "compensating" variant adds 1 to
every class count first, which also admits classes without training images.
"""
import torch
import torch.nn.functional as F
from torch import nn


def _counts_tensor(class_counts):
    counts = torch.as_tensor(class_counts, dtype=torch.float64).flatten()
    if counts.numel() == 0:
        raise ValueError("class_counts is empty")
    if (counts < 0).any():
        raise ValueError(f"class_counts must be non-negative, got {counts.tolist()}")
    return counts


def log_prior(class_counts):
    """log(pi) with pi = counts / sum(counts), as a float32 tensor of shape (C,).

    Every class in the softmax needs a positive count: log(0) would be -inf. The harness trains on
    base classes only, so a zero count means the counts and the logits do not describe the same
    classes.
    """
    counts = _counts_tensor(class_counts)
    zero = (counts == 0).nonzero().flatten().tolist()
    if zero:
        raise ValueError(
            f"logit-adjusted loss: class count is 0 for class index(es) {zero}; every class in the "
            "training softmax needs training images (train on base classes only, or use "
            "compensating_la_ce, which adds 1 to every count)"
        )
    return torch.log(counts / counts.sum()).float()


def _adjusted_ce(logits, labels, lp, tau):
    if logits.dim() != 2 or logits.shape[1] != lp.numel():
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} do not match {lp.numel()} class counts "
            "(expected (B, C) with C = len(class_counts))"
        )
    return F.cross_entropy(logits + tau * lp.to(device=logits.device, dtype=logits.dtype), labels)


def logit_adjusted_ce(logits, labels, class_counts, tau=1.0):
    """Mean CE(logits + tau * log(pi), labels); ``tau = 0`` is plain cross-entropy."""
    return _adjusted_ce(logits, labels, log_prior(class_counts), tau)


def compensating_la_ce(logits, labels, class_counts, tau=1.0):
    """Candle's compensating LA: pi_c = (n_c + 1) / sum(n + 1), zero counts allowed."""
    return _adjusted_ce(logits, labels, log_prior(_counts_tensor(class_counts) + 1), tau)


class LogitAdjustedCE(nn.Module):
    """Module form holding log(pi) as a buffer (moves with ``.to(device)``)."""

    def __init__(self, class_counts, tau=1.0, compensating=False):
        super().__init__()
        counts = _counts_tensor(class_counts) + (1 if compensating else 0)
        self.register_buffer("log_prior", log_prior(counts))
        self.tau = tau

    def forward(self, logits, labels):
        return _adjusted_ce(logits, labels, self.log_prior, self.tau)
