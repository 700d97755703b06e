"""engine/losses.py: logit-adjusted CE against the formula computed by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

from engine.losses import LogitAdjustedCE, compensating_la_ce, log_prior, logit_adjusted_ce

LOGITS = [[2.0, 0.0, 1.0], [0.5, 1.5, -1.0]]
LABELS = [0, 2]


def hand_la_ce(logits, labels, counts, tau):
    """mean_i -log softmax(z_i + tau * log pi)[y_i], with the log-softmax written out."""
    total = sum(counts)
    log_pi = [math.log(c / total) for c in counts]
    losses = []
    for row, y in zip(logits, labels):
        z = [f + tau * lp for f, lp in zip(row, log_pi)]
        log_norm = math.log(sum(math.exp(v) for v in z))
        losses.append(-(z[y] - log_norm))
    return sum(losses) / len(losses)


def test_log_prior():
    assert log_prior([1, 3]).tolist() == pytest.approx([math.log(0.25), math.log(0.75)])
    assert log_prior(torch.tensor([2, 2, 4])).dtype == torch.float32


@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
def test_la_ce_matches_hand_computation(tau):
    counts = [6, 3, 1]
    loss = logit_adjusted_ce(torch.tensor(LOGITS), torch.tensor(LABELS), counts, tau=tau)
    assert loss.item() == pytest.approx(hand_la_ce(LOGITS, LABELS, counts, tau), rel=1e-6)


def test_la_ce_first_value_by_hand():
    # counts [6, 3, 1] -> pi [.6, .3, .1]; sample 0: z = [2 + ln .6, ln .3, 1 + ln .1].
    z0 = [2 + math.log(0.6), math.log(0.3), 1 + math.log(0.1)]
    z1 = [0.5 + math.log(0.6), 1.5 + math.log(0.3), -1 + math.log(0.1)]
    l0 = math.log(sum(map(math.exp, z0))) - z0[0]
    l1 = math.log(sum(map(math.exp, z1))) - z1[2]
    loss = logit_adjusted_ce(torch.tensor(LOGITS), torch.tensor(LABELS), [6, 3, 1])
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)


def test_tau_zero_and_uniform_counts_equal_plain_ce():
    logits, labels = torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3, 1])
    ce = F.cross_entropy(logits, labels)
    assert torch.allclose(logit_adjusted_ce(logits, labels, [10, 1, 3, 7], tau=0.0), ce)
    assert torch.allclose(logit_adjusted_ce(logits, labels, [5, 5, 5, 5]), ce, atol=1e-6)


def test_la_pushes_toward_tail_classes():
    # Equal logits: LA loss for a tail label exceeds that of a head label (larger gradient for tail).
    logits = torch.zeros(1, 2)
    head = logit_adjusted_ce(logits, torch.tensor([0]), [9, 1])
    tail = logit_adjusted_ce(logits, torch.tensor([1]), [9, 1])
    assert head.item() == pytest.approx(-math.log(0.9)) and tail.item() == pytest.approx(-math.log(0.1))


def test_zero_count_is_a_clear_error():
    with pytest.raises(ValueError, match=r"class count is 0 for class index\(es\) \[1\]"):
        logit_adjusted_ce(torch.tensor(LOGITS), torch.tensor(LABELS), [6, 0, 1])
    with pytest.raises(ValueError, match="non-negative"):
        log_prior([3, -1])


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 class counts"):
        logit_adjusted_ce(torch.tensor(LOGITS), torch.tensor(LABELS), [6, 3])


def test_compensating_variant_adds_one():
    counts = [5, 0, 2]
    loss = compensating_la_ce(torch.tensor(LOGITS), torch.tensor(LABELS), counts)
    assert loss.item() == pytest.approx(hand_la_ce(LOGITS, LABELS, [6, 1, 3], 1.0), rel=1e-6)


def test_module_form_matches_functional_and_keeps_gradients():
    logits = torch.tensor(LOGITS, requires_grad=True)
    crit = LogitAdjustedCE([6, 3, 1], tau=1.0)
    loss = crit(logits, torch.tensor(LABELS))
    assert loss.item() == pytest.approx(logit_adjusted_ce(torch.tensor(LOGITS), torch.tensor(LABELS), [6, 3, 1]).item())
    loss.backward()
    # d/dz CE = softmax(z + log pi) - onehot, averaged over the batch: each row sums to 0.
    assert torch.allclose(logits.grad.sum(dim=1), torch.zeros(2), atol=1e-6)
    comp = LogitAdjustedCE([5, 0, 2], compensating=True)
    assert comp.log_prior.tolist() == pytest.approx([math.log(0.6), math.log(0.1), math.log(0.3)])
