"""The long-tailed base-to-new protocol of docs/protocol.md, shared by ``datasets.DatasetBase``
and the ``python -m lt_sampling`` CLI so that both give the same split and manifest hash.

Order: per-class cap (``cap_splits``) -> record all class names -> base/new split -> long-tailed
down-sampling of the train split only -> head/tail groups from the final train counts.
"""
from dataclasses import dataclass, field

from .profiles import PROFILES, check_imb_factor
from .sampling import (
    cap_per_class,
    downsample_long_tailed,
    head_tail_groups,
    stage_seed,
    subsample_classes,
)

VAL_SHOTS = 4  # CoOp cuts val to min(NUM_SHOTS, 4) per class


def cap_splits(train, val, shots, seed):
    """Per-class cap: train keeps min(n_c, shots), val min(n_c, shots, 4) (``shots <= 0``: keep all)."""
    shots = int(shots)
    train = cap_per_class(train, shots, stage_seed(seed, "cap_train"))
    val = cap_per_class(val, min(shots, VAL_SHOTS) if shots > 0 else shots, stage_seed(seed, "cap_val"))
    return train, val


def get_classnames(*splits):
    """Class names indexed by label, from the items of all given splits (labels must be 0..C-1)."""
    mapping = {}
    for split in splits:
        for item in split:
            mapping.setdefault(item.label, item.classname)
    labels = sorted(mapping)
    if labels != list(range(len(labels))):
        missing = sorted(set(range(labels[-1] + 1)) - set(labels)) if labels else []
        raise ValueError(f"labels must be contiguous 0..C-1; missing labels {missing[:10]}")
    return [mapping[label] for label in labels]


def counts_per_label(items, num_classes):
    """Number of items per label as a list of length num_classes."""
    counts = [0] * num_classes
    for item in items:
        counts[item.label] += 1
    return counts


@dataclass
class ProtocolResult:
    train: list
    val: list
    test: list
    all_classnames: list
    classnames: list
    train_counts: list = field(default_factory=list)
    head_labels: list = field(default_factory=list)
    tail_labels: list = field(default_factory=list)
    train_before_lt: list = field(default_factory=list)  # the capped train split before down-sampling


def apply_protocol(train, val, test, *, seed, subsample="all", imb_factor=1.0, profile="exp",
                   step_head_fraction=0.5, head_fraction=0.2, long_tailed=True, require_train=True):
    """Steps 3-5 of docs/protocol.md on already capped splits (see ``cap_splits``).

    Down-sampling (if ``imb_factor > 1`` and ``long_tailed``) touches the train split only and applies
    to whichever class subset is active. Val and test are never down-sampled. The base/new split comes
    from the full class list (all splits); with ``require_train`` an active class without training images
    is an error naming it.
    """
    imb_factor = check_imb_factor(imb_factor)
    if profile not in PROFILES:
        raise ValueError(f"DATASET.IMB_PROFILE must be one of {PROFILES}, got {profile!r}")
    all_classnames = get_classnames(train, val, test)
    train, val, test = subsample_classes(train, val, test, subsample=subsample, num_classes=len(all_classnames))
    classnames = get_classnames(train, val, test)
    if require_train:
        empty = [f"{name!r}" for name, n in zip(classnames, counts_per_label(train, len(classnames))) if n == 0]
        if empty:
            raise ValueError(f"{len(empty)} class(es) of the {subsample} split have no training images: "
                             f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}; the split file "
                             f"lists none for them (restore their entries or images)")
    train_before_lt = list(train)
    if long_tailed and imb_factor > 1:
        rng = stage_seed(seed, "long_tailed")
        train = downsample_long_tailed(train, imb_factor, profile, rng, step_head_fraction)
    counts = counts_per_label(train, len(classnames))
    head, tail = head_tail_groups(counts, head_fraction)
    return ProtocolResult(train, val, test, all_classnames, classnames, counts, head, tail, train_before_lt)
