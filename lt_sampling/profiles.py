"""Per-class quotas of the long-tailed training set (exponential and step profiles).

The exponential profile follows Candle's ``gen_imbalanced_data`` (docs/protocol.md):
``n_i = int(max(n_max * rho ** (i / (C - 1)), 1))`` with ``rho = 1 / imb_factor`` and i the rank of the
class by size. It is computed exactly as Candle does (``rho`` first, then the power) so that the
truncation to int gives the same quotas bit for bit.
"""
import math

PROFILES = ("exp", "step")


def check_imb_factor(imb_factor):
    """Return ``imb_factor`` as a float; raise ValueError unless it is a finite number >= 1."""
    try:
        value = float(imb_factor)
    except (TypeError, ValueError):
        raise ValueError(f"DATASET.IMB_FACTOR must be a number >= 1, got {imb_factor!r}") from None
    if not math.isfinite(value) or value < 1:
        raise ValueError(
            f"DATASET.IMB_FACTOR must be >= 1 (n_max / n_min; 1 = balanced, e.g. 10, 20, 50, 100), "
            f"got {imb_factor!r}. Note: it is the imbalance factor, not Candle's IMBALANCE_RATIO = 1/imb."
        )
    return value


def _check_sizes(n_max, num_classes):
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if int(n_max) != n_max or n_max < 1:
        raise ValueError(f"n_max (size of the largest class) must be an integer >= 1, got {n_max!r}")
    return int(n_max), int(num_classes)


def exp_profile(n_max, num_classes, imb_factor):
    """Quotas by rank: n_max decaying exponentially to n_max / imb_factor (never below 1)."""
    n_max, num_classes = _check_sizes(n_max, num_classes)
    rho = 1.0 / check_imb_factor(imb_factor)
    if num_classes == 1:
        return [n_max]
    return [int(max(n_max * rho ** (i / (num_classes - 1.0)), 1)) for i in range(num_classes)]


def step_profile(n_max, num_classes, imb_factor, head_fraction=0.5):
    """Quotas by rank: the first ``max(1, int(head_fraction * C))`` classes keep n_max, the rest
    ``int(max(n_max / imb_factor, 1))`` (Candle's step profile uses C // 2 head classes)."""
    n_max, num_classes = _check_sizes(n_max, num_classes)
    imb = check_imb_factor(imb_factor)
    if not 0 < float(head_fraction) <= 1:
        raise ValueError(f"DATASET.STEP_HEAD_FRACTION must be in (0, 1], got {head_fraction!r}")
    n_head = max(1, int(head_fraction * num_classes + 1e-9))
    n_tail = int(max(n_max * (1.0 / imb), 1))
    return [n_max] * n_head + [n_tail] * (num_classes - n_head)


def make_profile(profile, n_max, num_classes, imb_factor, step_head_fraction=0.5):
    """Dispatch on the profile name ("exp" or "step")."""
    if profile == "exp":
        return exp_profile(n_max, num_classes, imb_factor)
    if profile == "step":
        return step_profile(n_max, num_classes, imb_factor, step_head_fraction)
    raise ValueError(f"DATASET.IMB_PROFILE must be one of {PROFILES}, got {profile!r}")
