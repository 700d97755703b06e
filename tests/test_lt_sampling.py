"""Long-tailed sampling: profiles, samplers, head/tail groups, manifests and the CLI."""
import json
import math
import os
import pickle
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from datasets.base import Datum
from helpers_data import REAL_SPLIT, needs_shared
from lt_sampling import (
    build_manifest,
    cap_per_class,
    downsample_long_tailed,
    exp_profile,
    head_tail_groups,
    long_tailed_quotas,
    make_profile,
    manifest_hash,
    read_manifest,
    stage_seed,
    step_profile,
    subsample_classes,
    write_manifest,
)

REPO = Path(__file__).resolve().parents[1]


def make_items(sizes):
    """Items with ``sizes[label]`` images per class, classes interleaved."""
    items = []
    for i in range(max(sizes)):
        for label, n in enumerate(sizes):
            if i < n:
                items.append(Datum(f"c{label}/{i}.jpg", label, f"class {label}"))
    return items


def counts_of(items):
    return dict(sorted(Counter(x.label for x in items).items()))


# ------------------------------------------------------------------------------------- profiles

@pytest.mark.parametrize("C,n_max,imb", [(50, 100, 10), (50, 100, 50), (500, 100, 100), (199, 100, 20),
                                         (5, 100, 10), (24, 40, 10), (10, 100, 200), (3, 7, 2)])
def test_exp_profile_matches_formula(C, n_max, imb):
    quotas = exp_profile(n_max, C, imb)
    assert quotas == [int(max(n_max * imb ** (-i / (C - 1)), 1)) for i in range(C)]
    assert quotas[0] == n_max and all(a >= b for a, b in zip(quotas, quotas[1:]))
    assert quotas[-1] == max(int(n_max / imb + 1e-9), 1)
    if n_max / imb >= 1:  # imb = n_max / n_min up to the truncation of n_min
        assert n_max / quotas[-1] >= imb - 1e-9 and quotas[-1] > n_max / imb - 1


def test_exp_profile_totals_of_methods_md_examples():
    # methods.md section 1.1 (n_max = 100, every class holding at least its quota)
    expected = {500: (19315, 12307, 10536), 199: (7695, 4919, 4212), 50: (1945, 1254, 1080), 5: (214, 158, 145)}
    for C, totals in expected.items():
        assert tuple(sum(exp_profile(100, C, imb)) for imb in (10, 50, 100)) == totals


def test_profile_edge_cases():
    assert exp_profile(100, 1, 10) == [100]
    assert exp_profile(100, 4, 1) == [100] * 4
    assert exp_profile(3, 4, 1000) == [3, 1, 1, 1]  # never below 1
    with pytest.raises(ValueError, match="num_classes"):
        exp_profile(100, 0, 10)
    with pytest.raises(ValueError, match="n_max"):
        exp_profile(0, 5, 10)


@pytest.mark.parametrize("bad", [0.5, 0, -10, float("nan"), "ten"])
def test_imb_factor_below_one_is_rejected(bad):
    with pytest.raises(ValueError, match=r"DATASET\.IMB_FACTOR") as err:
        exp_profile(100, 10, bad)
    assert repr(bad) in str(err.value)
    with pytest.raises(ValueError, match=r"DATASET\.IMB_FACTOR"):
        downsample_long_tailed(make_items([5, 5]), bad, "exp", 0)


def test_step_profile():
    assert step_profile(100, 10, 10) == [100] * 5 + [10] * 5
    assert step_profile(100, 5, 10) == [100] * 2 + [10] * 3  # head = int(0.5 * C)
    assert step_profile(100, 10, 10, head_fraction=0.3) == [100] * 3 + [10] * 7
    assert step_profile(100, 4, 1000) == [100, 100, 1, 1]
    assert step_profile(100, 1, 10) == [100]
    with pytest.raises(ValueError, match="STEP_HEAD_FRACTION"):
        step_profile(100, 10, 10, head_fraction=0)
    with pytest.raises(ValueError, match="IMB_PROFILE"):
        make_profile("linear", 100, 10, 10)


# ------------------------------------------------------------------------------------- sampling

def test_cap_per_class_semantics():
    items = make_items([10, 3, 7, 0, 5])
    capped = cap_per_class(items, 5, 0)
    assert counts_of(capped) == {0: 5, 1: 3, 2: 5, 4: 5}
    assert len({x.impath for x in capped}) == len(capped)  # no repetition
    assert [x for x in items if x in capped] == capped  # a subset, input order kept
    assert cap_per_class(items, 0, 0) == items and cap_per_class(items, -1, 0) == items
    assert cap_per_class(items, 5, 1) == cap_per_class(items, 5, random.Random(1))
    assert cap_per_class(items, 5, 1) != cap_per_class(items, 5, 2)


def test_downsample_counts_follow_the_formula():
    sizes = [100] * 20
    out = downsample_long_tailed(make_items(sizes), 10, "exp", 0)
    assert list(counts_of(out).values()) == exp_profile(100, 20, 10)
    assert len({x.impath for x in out}) == len(out)


def test_downsample_ranks_by_size_then_label_and_keeps_small_classes():
    # sizes by label: label 3 is largest; labels 0, 1, 4 tie at 50 -> ranks 1, 2, 3 in label order
    sizes = [50, 50, 8, 80, 50]
    quotas = exp_profile(80, 5, 10)  # [80, 44, 25, 14, 8]
    assert long_tailed_quotas(dict(enumerate(sizes)), 10) == {3: quotas[0], 0: quotas[1], 1: quotas[2],
                                                               4: quotas[3], 2: quotas[4]}
    out = counts_of(downsample_long_tailed(make_items(sizes), 10, "exp", 3))
    assert out == {0: quotas[1], 1: quotas[2], 2: 8, 3: 80, 4: quotas[3]}
    # a class smaller than its quota keeps all of its images
    sizes = [100, 100, 100, 2]
    out = counts_of(downsample_long_tailed(make_items(sizes), 2, "exp", 0))
    assert out[3] == 2 and out[0] == 100


def test_downsample_imb_one_keeps_everything():
    items = make_items([30, 12, 7, 30])
    assert downsample_long_tailed(items, 1, "exp", 5) == items
    assert downsample_long_tailed(items, 1.0, "step", 5) == items


def test_downsample_step_profile():
    out = downsample_long_tailed(make_items([60] * 6), 20, "step", 0)
    assert list(counts_of(out).values()) == [60, 60, 60, 3, 3, 3]


def test_downsample_is_seeded_and_independent_of_global_rng():
    items = make_items([100] * 10)
    random.seed(123)
    np.random.seed(123)
    a = downsample_long_tailed(items, 10, "exp", 7)
    np.random.rand(1000)
    random.random()
    b = downsample_long_tailed(items, 10, "exp", 7)
    np.random.seed(999)
    c = downsample_long_tailed(items, 10, "exp", np.random.RandomState(7))
    assert a == b == c
    assert a != downsample_long_tailed(items, 10, "exp", 8)
    assert counts_of(a) == counts_of(downsample_long_tailed(items, 10, "exp", 8))


def test_same_seed_gives_nested_subsets_for_growing_imbalance():
    items = make_items([100] * 10)
    kept = [set(x.impath for x in downsample_long_tailed(items, imb, "exp", 4)) for imb in (10, 20, 50, 100)]
    assert all(small <= large for small, large in zip(kept[1:], kept))


def test_stage_seed():
    assert stage_seed(-1, "x") == stage_seed(0, "x")
    assert stage_seed(1, "x") == stage_seed(1, "x") != stage_seed(1, "y") != stage_seed(2, "y")
    assert 0 <= stage_seed(10**9, "long_tailed") < 2**32


def test_head_tail_groups():
    counts = [100, 90, 80, 70, 60, 50, 40, 30, 20, 10]
    assert head_tail_groups(counts) == ([0, 1], [2, 3, 4, 5, 6, 7, 8, 9])
    head, tail = head_tail_groups([5] * 15)  # 0.2 * 15 = 3.0000000000000004 in floating point
    assert head == [0, 1, 2] and len(tail) == 12
    assert head_tail_groups({4: 9, 2: 9, 7: 1, 1: 3, 0: 1}) == ([2], [0, 1, 4, 7])  # ties by label
    assert head_tail_groups([3, 1]) == ([0], [1])  # ceil(0.4) = 1
    for C in (1, 5, 37, 50, 199, 500):
        head, tail = head_tail_groups(list(range(C)))
        assert len(head) == math.ceil(C / 5) and sorted(head + tail) == list(range(C))
        assert min(head) >= max(tail, default=-1)  # the largest classes (counts = label here)


def test_subsample_classes_relabels_and_copies():
    train, test = make_items([3, 3, 3, 3, 3]), make_items([2] * 5)
    base_train, base_test = subsample_classes(train, test, subsample="base")
    new_train, new_test = subsample_classes(train, test, subsample="new")
    assert counts_of(base_train) == {0: 3, 1: 3, 2: 3} and counts_of(new_test) == {0: 2, 1: 2}
    assert {x.classname for x in new_train} == {"class 3", "class 4"}
    assert [x.label for x in train] == [x.label for x in make_items([3] * 5)]  # originals untouched
    with pytest.raises(ValueError, match="SUBSAMPLE_CLASSES"):
        subsample_classes(train, subsample="half")


# ------------------------------------------------------------------------------------- manifests

def _manifest(items, **kw):
    args = dict(seed=1, shots=100, imb_factor=10.0, profile="exp", subsample="base")
    args.update(kw)
    return build_manifest("Toy", items, ["a", "b", "c"], image_dir="", **args)


def test_manifest_content_and_hash(tmp_path):
    items = downsample_long_tailed(make_items([20, 20, 20]), 10, "exp", 0)
    m = _manifest(items)
    assert m["counts"] == {"0": 20, "1": 6, "2": 2} and m["total"] == 28
    assert m["images"]["2"] == sorted(x.impath for x in items if x.label == 2)
    assert (m["n_max"], m["n_min"], m["head_labels"], m["tail_labels"]) == (20, 2, [0], [1, 2])
    assert m["hash"] == manifest_hash(m) == _manifest(list(reversed(items)))["hash"]  # order-free
    assert _manifest(items[1:])["hash"] != m["hash"]
    assert _manifest(items, seed=2)["hash"] != m["hash"]

    path = tmp_path / "sub" / "manifest.json"
    write_manifest(m, path)
    assert read_manifest(path) == m
    assert os.listdir(path.parent) == ["manifest.json"]  # no temp file left behind
    tampered = json.loads(path.read_text())
    tampered["counts"]["0"] = 1
    path.write_text(json.dumps(tampered))
    with pytest.raises(ValueError, match="hash"):
        read_manifest(path)


def test_datum_is_picklable():
    d = Datum("/x/a.jpg", 3, "cat")
    assert pickle.loads(pickle.dumps(d)) == d


# ------------------------------------------------------------------------------------- CLI

def _expected_lt_counts(split_file, shots, subsample, imb):
    """Per (relabelled) class: min(capped size, quota of its rank), computed independently."""
    with open(split_file) as f:
        sizes = Counter(label for _, label, _ in json.load(f)["train"])
    labels = sorted(sizes)
    m = math.ceil(len(labels) / 2)
    chosen = labels[:m] if subsample == "base" else labels[m:]
    capped = {new: min(sizes[old], shots) for new, old in enumerate(chosen)}
    ranked = sorted(capped, key=lambda y: (-capped[y], y))
    n_max, C = capped[ranked[0]], len(ranked)
    quota = {y: int(max(n_max * imb ** (-i / (C - 1)), 1)) for i, y in enumerate(ranked)}
    return {str(y): min(capped[y], quota[y]) for y in sorted(capped)}


@needs_shared(REAL_SPLIT)
def test_cli_end_to_end(tmp_path):
    out = tmp_path / "manifest.json"
    cmd = [sys.executable, "-m", "lt_sampling", "--split-file", str(REAL_SPLIT), "--imb-factor", "10",
           "--seed", "1", "--shots", "100", "--subsample", "base", "--out", str(out)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    m = json.loads(out.read_text())
    expected = _expected_lt_counts(REAL_SPLIT, 100, "base", 10)
    assert m["counts"] == expected and m["total"] == sum(expected.values())
    assert m["dataset"] == "Caltech101" and m["num_classes"] == 50 and m["n_max"] == 100
    assert m["n_min"] == min(expected.values())
    assert m["hash"] == manifest_hash(m) and m["hash"][:16] in res.stdout
    assert f"{m['total']} train images" in res.stdout
    # Caltech101 base classes hold fewer than 100 capped images for many ranks, so the total stays
    # below the all-classes-full formula value of methods.md (1,945 for 50 classes at imb 10).
    assert m["total"] <= sum(exp_profile(100, 50, 10)) == 1945

    res2 = subprocess.run(cmd[:-1] + [str(tmp_path / "again.json")], cwd=REPO, capture_output=True, text=True)
    assert res2.returncode == 0, res2.stderr
    assert json.loads((tmp_path / "again.json").read_text())["hash"] == m["hash"]


def test_cli_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope" / "split_zhou_X.json"
    res = subprocess.run([sys.executable, "-m", "lt_sampling", "--split-file", str(missing), "--out",
                          str(tmp_path / "m.json")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and str(missing) in res.stderr
    assert not (tmp_path / "m.json").exists()
