"""Seeded per-class sampling: the per-class cap, the base/new split and long-tailed down-sampling.

Items are any objects with ``.label`` (and ``.impath`` for manifests), e.g. ``datasets.base.Datum``.
Every function takes its own random generator (or an int seed) and never touches global RNG state, so
the same seed always gives the same result whatever ran before. ``stage_seed(seed, stage)`` derives
independent, reproducible seeds for the protocol's stages from the run seed.
"""
import copy
import hashlib
import math
import random
from collections import Counter, defaultdict

import numpy as np

from .profiles import check_imb_factor, make_profile


def stage_seed(seed, stage):
    """A 32-bit seed derived from the run seed and a stage name (stable across runs and machines).
    Negative run seeds (Dassl's -1 = "no seed") are treated as 0."""
    seed = max(int(seed), 0)
    digest = hashlib.sha256(f"{seed}/{stage}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _py_rng(rng):
    return rng if isinstance(rng, random.Random) else random.Random(int(rng))


def _np_rng(rng):
    return rng if isinstance(rng, np.random.RandomState) else np.random.RandomState(int(rng))


def group_by_label(items):
    """{label: [indices into items]} in ascending label order."""
    groups = defaultdict(list)
    for idx, item in enumerate(items):
        groups[item.label].append(idx)
    return {label: groups[label] for label in sorted(groups)}


def class_counts(items):
    """{label: number of items} in ascending label order."""
    counts = Counter(item.label for item in items)
    return {label: counts[label] for label in sorted(counts)}


def cap_per_class(items, shots, rng):
    """Keep a random subset of min(n_c, shots) items of every class, without repetition (Dassl's
    ``generate_fewshot_dataset``). ``shots <= 0`` keeps everything. Classes are visited in ascending
    label order; the result keeps the input order. ``rng``: ``random.Random`` or an int seed."""
    if shots is None or int(shots) <= 0:
        return list(items)
    rng = _py_rng(rng)
    keep = set()
    for label, idxs in group_by_label(items).items():
        keep.update(rng.sample(idxs, shots) if len(idxs) > shots else idxs)
    return [item for idx, item in enumerate(items) if idx in keep]


def subsample_classes(*splits, subsample="all", num_classes=None):
    """CoOp's base/new split: base = the first ceil(C/2) labels of the dataset's full class list, new = the
    rest; keep only the selected classes in every split and relabel them to 0..C_sub-1 (items are
    shallow-copied, never modified). Returns a list with one list per split.

    The class list is ``range(num_classes)``, or the labels of all splits together when ``num_classes`` is
    None. (CoOp takes the labels of the first split; then a class that has lost its training images
    shifts the split and a new class is trained as base: here the split never depends on which labels
    survive in one split.)"""
    if subsample not in ("all", "base", "new"):
        raise ValueError(f"DATASET.SUBSAMPLE_CLASSES must be 'all', 'base' or 'new', got {subsample!r}")
    if subsample == "all":
        return [list(split) for split in splits]
    if num_classes is None:
        labels = sorted({item.label for split in splits for item in split})
    else:
        labels = list(range(int(num_classes)))
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabel = {y: y_new for y_new, y in enumerate(selected)}
    output = []
    for split in splits:
        new_split = []
        for item in split:
            if item.label in relabel:
                item = copy.copy(item)
                item.label = relabel[item.label]
                new_split.append(item)
        output.append(new_split)
    return output


def rank_classes(counts):
    """Labels ordered by class size, descending; ties by ascending label."""
    return sorted(counts, key=lambda label: (-counts[label], label))


def long_tailed_quotas(counts, imb_factor, profile="exp", step_head_fraction=0.5):
    """{label: quota}: rank classes by size (ties by label), n_max = largest class, quota by rank."""
    check_imb_factor(imb_factor)
    if not counts:
        return {}
    ranked = rank_classes(counts)
    quotas = make_profile(profile, counts[ranked[0]], len(ranked), imb_factor, step_head_fraction)
    return dict(zip(ranked, quotas))


def downsample_long_tailed(items, imb_factor, profile="exp", rng=0, step_head_fraction=0.5):
    """Long-tailed down-sampling (docs/protocol.md, step 5; Candle's ``gen_imbalanced_data``).

    Every class, in ascending label order, shuffles its item indices with ``rng``
    (``np.random.RandomState`` or an int seed) and keeps the first ``quota`` of them; a class smaller
    than its quota keeps all. The result keeps the input order. Because each class is shuffled
    whatever its quota, the same seed gives nested subsets for growing imbalance factors.
    """
    quotas = long_tailed_quotas(class_counts(items), imb_factor, profile, step_head_fraction)
    rng = _np_rng(rng)
    keep = set()
    for label, idxs in group_by_label(items).items():
        idxs = np.array(idxs, dtype=np.int64)
        rng.shuffle(idxs)
        keep.update(idxs[: quotas[label]].tolist())
    return [item for idx, item in enumerate(items) if idx in keep]


def head_tail_groups(counts, head_fraction=0.2):
    """(head_labels, tail_labels): head = the ceil(head_fraction * C) classes with the most training
    items (ties by ascending label), tail = the others; both returned sorted by label.
    ``counts``: {label: n} or a list indexed by label."""
    if not isinstance(counts, dict):
        counts = dict(enumerate(counts))
    if not 0 <= float(head_fraction) <= 1:
        raise ValueError(f"DATASET.HEAD_FRACTION must be in [0, 1], got {head_fraction!r}")
    n_head = math.ceil(head_fraction * len(counts) - 1e-9)
    ranked = rank_classes(counts)
    return sorted(ranked[:n_head]), sorted(ranked[n_head:])
