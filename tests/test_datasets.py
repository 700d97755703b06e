"""Datasets: split reading, the long-tailed base-to-new protocol, caching, errors, loaders, tools."""
import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

import datasets  # noqa: F401  (registers the datasets)
from datasets.base import DatasetBase, DatasetNotFoundError, Datum
from datasets.synthetic import class_list, generate_synthetic_shapes
from engine.data import DataManager, DatasetWrapper, build_transform
from engine.registry import DATASET_REGISTRY
from helpers_data import REAL_SPLIT, make_cfg, needs_shared
from lt_sampling import exp_profile, manifest_hash

REPO = Path(__file__).resolve().parents[1]
needs_split = needs_shared(REAL_SPLIT)  # skips locally, fails in CI (LTPL_REQUIRE_SHARED=1) without ../shared


@pytest.fixture
def caltech_root(tmp_path):
    """A DATASET.ROOT holding only caltech-101/split_zhou_Caltech101.json (no images)."""
    from helpers_data import require_shared

    require_shared(REAL_SPLIT)
    root = tmp_path / "data"
    (root / "caltech-101").mkdir(parents=True)
    shutil.copy(REAL_SPLIT, root / "caltech-101" / REAL_SPLIT.name)
    return root


def caltech(root, tmp_path, **kw):
    kw.setdefault("DATASET__NAME", "Caltech101")
    return DATASET_REGISTRY.get("Caltech101")(make_cfg(root, tmp_path / "out", **kw))


def lt(root, tmp_path, subsample="base", imb=10.0, seed=1, **kw):
    return caltech(root, tmp_path, SEED=seed, DATASET__NUM_SHOTS=100, DATASET__SUBSAMPLE_CLASSES=subsample,
                   DATASET__IMB_FACTOR=imb, **kw)


def raw_split():
    from helpers_data import require_shared

    require_shared(REAL_SPLIT)
    with open(REAL_SPLIT) as f:
        return json.load(f)


def sizes(items):
    return Counter(x.label for x in items)


# ------------------------------------------------------------------------------ the real split

@needs_split
def test_real_split_reading(caltech_root, tmp_path):
    ds = caltech(caltech_root, tmp_path)
    assert (len(ds.train_x), len(ds.val), len(ds.test)) == (4128, 1649, 2465)
    assert ds.num_classes == 100 and len(ds.all_classnames) == 100 and ds.classnames == ds.all_classnames
    first = raw_split()["train"][0]
    assert ds.train_x[0] == Datum(str(caltech_root / "caltech-101" / "101_ObjectCategories" / first[0]),
                                  first[1], first[2].replace("_", " "))
    assert "car side" in ds.classnames and not any("_" in c for c in ds.classnames)
    assert all(ds.lab2cname[x.label] == x.classname for x in ds.train_x + ds.test)
    assert ds.template == "a photo of a {}." and ds.dataset_dir == str(caltech_root / "caltech-101")
    assert ds.head_labels == sorted(ds.head_labels) and len(ds.head_labels) == 20


@needs_split
def test_base_new_split(caltech_root, tmp_path):
    base = caltech(caltech_root, tmp_path, DATASET__SUBSAMPLE_CLASSES="base")
    new = caltech(caltech_root, tmp_path, DATASET__SUBSAMPLE_CLASSES="new")
    assert base.num_classes == new.num_classes == 50
    for ds in (base, new):
        for split in (ds.train_x, ds.val, ds.test):
            assert set(x.label for x in split) == set(range(50))
    assert len(base.test) + len(new.test) == 2465
    assert len(base.train_x) + len(new.train_x) == 4128
    assert base.classnames == base.base_classnames == base.all_classnames[:50]
    assert new.classnames == new.new_classnames == new.all_classnames[50:]
    assert base.all_classnames == new.all_classnames
    raw_test = Counter(label for _, label, _ in raw_split()["test"])
    assert sizes(new.test) == Counter({y - 50: n for y, n in raw_test.items() if y >= 50})


@needs_split
def test_per_class_cap(caltech_root, tmp_path):
    ds = caltech(caltech_root, tmp_path, SEED=1, DATASET__NUM_SHOTS=100)
    raw = raw_split()
    for key, split, cap in (("train", ds.train_x, 100), ("val", ds.val, 4)):
        full = Counter(label for _, label, _ in raw[key])
        assert sizes(split) == Counter({y: min(n, cap) for y, n in full.items()})
        assert len({x.impath for x in split}) == len(split)
    assert len(ds.test) == 2465  # never capped
    assert max(ds.train_counts) == 100 and min(ds.train_counts) == min(Counter(r[1] for r in raw["train"]).values())


@needs_split
@pytest.mark.parametrize("subsample,imb", [("base", 10.0), ("base", 50.0), ("new", 20.0), ("all", 100.0)])
def test_long_tailed_counts_follow_the_formula(caltech_root, tmp_path, subsample, imb):
    capped = caltech(caltech_root, tmp_path, SEED=1, DATASET__NUM_SHOTS=100, DATASET__SUBSAMPLE_CLASSES=subsample)
    ds = lt(caltech_root, tmp_path, subsample, imb)
    before = dict(enumerate(capped.train_counts))
    ranked = sorted(before, key=lambda y: (-before[y], y))
    quotas = exp_profile(before[ranked[0]], len(ranked), imb)
    expected = [0] * len(ranked)
    for label, quota in zip(ranked, quotas):
        expected[label] = min(before[label], quota)
    assert ds.train_counts == expected == [ds.manifest["counts"][str(y)] for y in range(ds.num_classes)]
    assert len(ds.train_x) == ds.manifest["total"] == sum(expected)
    assert {x.impath for x in ds.train_x} <= {x.impath for x in capped.train_x}
    assert ds.manifest["n_max"] == 100
    # test and val are never down-sampled
    assert ds.test == capped.test and ds.val == capped.val


@needs_split
def test_test_split_is_never_downsampled(caltech_root, tmp_path):
    tests = [lt(caltech_root, tmp_path, "base", imb).test for imb in (1.0, 10.0, 200.0)]
    assert tests[0] == tests[1] == tests[2] and len(tests[0]) == sum(
        1 for _, y, _ in raw_split()["test"] if y < 50)


@needs_split
def test_imb_one_keeps_the_capped_split(caltech_root, tmp_path):
    a = lt(caltech_root, tmp_path, "base", 1.0)
    b = caltech(caltech_root, tmp_path, SEED=1, DATASET__NUM_SHOTS=100, DATASET__SUBSAMPLE_CLASSES="base")
    assert a.train_x == b.train_x


@needs_split
def test_invalid_settings_are_rejected(caltech_root, tmp_path):
    with pytest.raises(ValueError, match=r"DATASET\.IMB_FACTOR.*0\.5"):
        lt(caltech_root, tmp_path, "base", 0.5)
    with pytest.raises(ValueError, match=r"DATASET\.IMB_PROFILE"):
        lt(caltech_root, tmp_path, "base", 10.0, DATASET__IMB_PROFILE="linear")
    with pytest.raises(ValueError, match=r"DATASET\.SUBSAMPLE_CLASSES"):
        caltech(caltech_root, tmp_path, DATASET__SUBSAMPLE_CLASSES="half")


@needs_split
def test_step_profile_on_real_split(caltech_root, tmp_path):
    ds = lt(caltech_root, tmp_path, "base", 10.0, DATASET__IMB_PROFILE="step")
    capped = caltech(caltech_root, tmp_path, SEED=1, DATASET__NUM_SHOTS=100, DATASET__SUBSAMPLE_CLASSES="base")
    ranked = sorted(range(50), key=lambda y: (-capped.train_counts[y], y))
    for rank, label in enumerate(ranked):
        assert ds.train_counts[label] == min(capped.train_counts[label], 100 if rank < 25 else 10)


@needs_split
def test_determinism_and_seeds(caltech_root, tmp_path):
    a = lt(caltech_root, tmp_path / "a", seed=1)
    b = lt(caltech_root, tmp_path / "b", seed=1)  # separate cache dir: no cache shared
    c = lt(caltech_root, tmp_path / "c", seed=2)
    assert a.manifest["hash"] == b.manifest["hash"] == manifest_hash(a.manifest)
    assert a.train_x == b.train_x
    assert c.manifest["hash"] != a.manifest["hash"]
    assert {x.impath for x in c.train_x} != {x.impath for x in a.train_x}
    assert lt(caltech_root, tmp_path / "d", seed=-1).manifest["hash"] == lt(caltech_root, tmp_path / "e", seed=0).manifest["hash"]


@needs_split
def test_head_tail_groups_are_top_20_percent(caltech_root, tmp_path):
    ds = lt(caltech_root, tmp_path, "base", 10.0)
    ranked = sorted(range(50), key=lambda y: (-ds.train_counts[y], y))
    assert ds.head_labels == sorted(ranked[:math.ceil(0.2 * 50)]) and len(ds.head_labels) == 10
    assert ds.tail_labels == sorted(ranked[10:])
    assert min(ds.train_counts[y] for y in ds.head_labels) >= max(ds.train_counts[y] for y in ds.tail_labels)
    assert ds.manifest["head_labels"] == ds.head_labels and ds.get_cls_num_list() == ds.train_counts


@needs_split
def test_manifest_matches_the_cli(caltech_root, tmp_path):
    ds = lt(caltech_root, tmp_path, "base", 10.0)
    out = tmp_path / "cli.json"
    subprocess.run([sys.executable, "-m", "lt_sampling", "--split-file", str(REAL_SPLIT), "--imb-factor", "10",
                    "--seed", "1", "--shots", "100", "--subsample", "base", "--out", str(out)],
                   cwd=REPO, check=True, capture_output=True, timeout=60)
    cli = json.loads(out.read_text())
    assert cli == ds.manifest
    assert ds.manifest["images"]["0"][0].startswith("Faces/")  # relative to the image folder


# ------------------------------------------------------------------------------ caching

@needs_split
def test_cache_goes_to_the_cache_dir_not_the_dataset_root(caltech_root, tmp_path):
    before = sorted(p for p in caltech_root.rglob("*"))
    ds = lt(caltech_root, tmp_path, "base", 10.0)
    assert sorted(p for p in caltech_root.rglob("*")) == before
    files = list((tmp_path / "out" / "cache" / "caltech-101").iterdir())
    assert len(files) == 1 and all(s in files[0].name for s in ("shots100", "seed1", "_v1"))
    # the cached cap is reused: same split; another seed or shot count gets its own file
    assert lt(caltech_root, tmp_path, "base", 10.0).train_x == ds.train_x
    lt(caltech_root, tmp_path, "base", 10.0, seed=2)
    caltech(caltech_root, tmp_path, SEED=1, DATASET__NUM_SHOTS=50)
    assert len(list((tmp_path / "out" / "cache" / "caltech-101").iterdir())) == 3
    custom = tmp_path / "elsewhere"
    lt(caltech_root, tmp_path, "base", 10.0, DATASET__CACHE_DIR=str(custom))
    assert len(list((custom / "caltech-101").iterdir())) == 1
    with pytest.raises(ValueError, match="inside DATASET.ROOT"):
        lt(caltech_root, tmp_path, "base", 10.0, DATASET__CACHE_DIR=str(caltech_root / "cache"))


# ------------------------------------------------------------------------------ errors

def test_missing_dataset_folder_names_the_path(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        caltech(tmp_path / "nowhere", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "nowhere" / "caltech-101") in msg and "docs/DATASETS.md" in msg and "README.md" in msg
    assert isinstance(err.value, FileNotFoundError)


def test_missing_split_file_names_the_path(tmp_path):
    (tmp_path / "data" / "caltech-101").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="split_zhou_Caltech101.json") as err:
        caltech(tmp_path / "data", tmp_path)
    assert str(tmp_path / "data" / "caltech-101" / "split_zhou_Caltech101.json") in str(err.value)


def test_malformed_split_file_is_reported(tmp_path):
    (tmp_path / "data" / "caltech-101").mkdir(parents=True)
    (tmp_path / "data" / "caltech-101" / "split_zhou_Caltech101.json").write_text('{"train": []}')
    with pytest.raises(ValueError, match="malformed split file .*split_zhou_Caltech101.json"):
        caltech(tmp_path / "data", tmp_path)


# ------------------------------------------------------------------------------ other readers

def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_fgvc_aircraft_reads_variant_files(tmp_path):
    d = tmp_path / "data" / "fgvc_aircraft"
    d.mkdir(parents=True)
    (d / "variants.txt").write_text("707-320\nA300B4\nDC-10\n")
    (d / "images_variant_train.txt").write_text("0001 707-320\n0002 A300B4\n0003 DC-10\n0004 DC-10\n")
    (d / "images_variant_val.txt").write_text("0005 A300B4\n")
    (d / "images_variant_test.txt").write_text("0006 707-320\n0007 DC-10\n")
    ds = DATASET_REGISTRY.get("FGVCAircraft")(make_cfg(tmp_path / "data", tmp_path / "out"))
    assert ds.classnames == ["707-320", "A300B4", "DC-10"]
    assert [(os.path.basename(x.impath), x.label) for x in ds.train_x] == [
        ("0001.jpg", 0), ("0002.jpg", 1), ("0003.jpg", 2), ("0004.jpg", 2)]
    assert ds.train_x[0].impath == str(d / "images" / "0001.jpg") and len(ds.test) == 2
    assert ds.template == "a photo of a {}, a type of aircraft."


def test_imagenet_scan_is_cached_in_the_cache_dir(tmp_path):
    d = tmp_path / "data" / "imagenet"
    wnids = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}
    (d).mkdir(parents=True)
    (d / "classnames.txt").write_text("".join(f"{w} {c}\n" for w, c in wnids.items()))
    for split, n in (("train", 3), ("val", 2)):
        for w in wnids:
            for i in range(n):
                _touch(d / "images" / split / w / f"{w}_{i}.JPEG")
    cfg = make_cfg(tmp_path / "data", tmp_path / "out", DATASET__NAME="ImageNet", SEED=1, DATASET__NUM_SHOTS=2)
    ds = DATASET_REGISTRY.get("ImageNet")(cfg)
    assert ds.classnames == ["tench", "goldfish", "great white shark"]
    assert sizes(ds.train_x) == Counter({0: 2, 1: 2, 2: 2}) and len(ds.test) == 6
    cache = tmp_path / "out" / "cache" / "imagenet"
    assert any(p.name.startswith("scan_") for p in cache.iterdir())
    assert not any("cache" in p.name or p.suffix == ".json" for p in d.rglob("*"))
    shutil.rmtree(d / "images" / "val")
    (d / "images" / "val").mkdir()
    again = DATASET_REGISTRY.get("ImageNet")(cfg)  # served from the scan cache
    assert again.test == ds.test and again.train_x == ds.train_x


def test_imagenet_variants(tmp_path):
    root = tmp_path / "data"
    wnids = [f"n{i:08d}" for i in range(4)]
    names = "".join(f"{w} class_{i}\n" for i, w in enumerate(wnids))
    for folder in ("imagenetv2", "imagenet-adversarial"):
        (root / folder).mkdir(parents=True)
        (root / folder / "classnames.txt").write_text(names)
    for label in range(4):
        _touch(root / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / str(label) / "a.jpeg")
    for w in (wnids[3], wnids[1]):  # a 2-class subset, like ImageNet-A's 200
        _touch(root / "imagenet-adversarial" / "imagenet-a" / w / "x.jpg")
    _touch(root / "imagenet-adversarial" / "imagenet-a" / "README.txt")
    cfg = make_cfg(root, tmp_path / "out", DATASET__NUM_SHOTS=100, DATASET__IMB_FACTOR=100.0)
    v2 = DATASET_REGISTRY.get("ImageNetV2")(cfg)
    assert v2.classnames == ["class 0", "class 1", "class 2", "class 3"] and len(v2.test) == 4
    assert v2.train_x == v2.test and v2.val == []
    a = DATASET_REGISTRY.get("ImageNetA")(cfg)
    assert a.classnames == ["class 1", "class 3"] and [x.label for x in a.test] == [0, 1]
    with pytest.raises(DatasetNotFoundError, match="imagenet-rendition"):
        DATASET_REGISTRY.get("ImageNetR")(cfg)


def test_registry_configs_and_templates():
    expected = {"imagenet": "ImageNet", "caltech101": "Caltech101", "oxford_pets": "OxfordPets",
                "stanford_cars": "StanfordCars", "oxford_flowers": "OxfordFlowers", "food101": "Food101",
                "fgvc_aircraft": "FGVCAircraft", "sun397": "SUN397", "dtd": "DescribableTextures",
                "eurosat": "EuroSAT", "ucf101": "UCF101", "imagenetv2": "ImageNetV2",
                "imagenet_sketch": "ImageNetSketch", "imagenet_a": "ImageNetA", "imagenet_r": "ImageNetR",
                "synthetic_shapes": "SyntheticShapes"}
    for stem, name in expected.items():
        text = (REPO / "configs" / "datasets" / f"{stem}.yaml").read_text()
        assert f'NAME: "{name}"' in text
        cls = DATASET_REGISTRY.get(name)
        assert issubclass(cls, DatasetBase) and cls.template.count("{}") == 1
    assert DATASET_REGISTRY.get("DescribableTextures").template == "{} texture."
    assert DATASET_REGISTRY.get("Food101").template == "a photo of {}, a type of food."
    assert DATASET_REGISTRY.get("EuroSAT").template == "a centered satellite photo of {}."


# ------------------------------------------------------------------------------ synthetic + loaders

@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_shapes(root, image_size=32, train_per_class=12, val_per_class=2, test_per_class=3)
    return root


def test_synthetic_generation(synthetic_root):
    d = synthetic_root / "synthetic_shapes"
    split = json.loads((d / "split_zhou_SyntheticShapes.json").read_text())
    assert [len(split[k]) for k in ("train", "val", "test")] == [240, 40, 60]
    assert len(class_list()) == 20 and split["train"][0][2] == class_list()[0][1] == "red circle"
    img = Image.open(d / "images" / split["test"][0][0])
    assert img.size == (32, 32) and img.mode == "RGB"
    stamp = (d / "split_zhou_SyntheticShapes.json").stat().st_mtime_ns
    generate_synthetic_shapes(synthetic_root, image_size=32, train_per_class=12, val_per_class=2, test_per_class=3)
    assert (d / "split_zhou_SyntheticShapes.json").stat().st_mtime_ns == stamp  # idempotent


def test_synthetic_regenerates_on_new_parameters(tmp_path):
    generate_synthetic_shapes(tmp_path, train_per_class=2, val_per_class=1, test_per_class=1)
    generate_synthetic_shapes(tmp_path, train_per_class=3, val_per_class=1, test_per_class=1)
    split = json.loads((tmp_path / "synthetic_shapes" / "split_zhou_SyntheticShapes.json").read_text())
    assert len(split["train"]) == 60


def _syn_cfg(root, tmp_path, **kw):
    args = dict(DATASET__NAME="SyntheticShapes", SEED=1, DATASET__NUM_SHOTS=100, DATASET__SUBSAMPLE_CLASSES="base",
                DATASET__IMB_FACTOR=4.0, INPUT__SIZE=(32, 32), DATALOADER__TRAIN_X__BATCH_SIZE=8,
                DATALOADER__TEST__BATCH_SIZE=16)
    args.update(kw)
    return make_cfg(root, tmp_path / "out", **args)


def test_datamanager_loads_batches(synthetic_root, tmp_path):
    dm = DataManager(_syn_cfg(synthetic_root, tmp_path))
    ds = dm.dataset
    assert dm.num_classes == 10 and dm.classnames == ds.all_classnames[:10] and dm.lab2cname[0] == "red circle"
    assert ds.train_counts == exp_profile(12, 10, 4)  # every class holds 12 images: ranks = labels
    batch = next(iter(dm.train_loader_x))
    assert batch["img"].shape == (8, 3, 32, 32) and batch["img"].dtype == torch.float32
    label_of = {x.impath: x.label for x in ds.train_x}
    assert batch["label"].tolist() == [label_of[p] for p in batch["impath"]]
    assert len(dm.train_loader_x) == len(ds.train_x) // 8  # drop_last
    test_batch = next(iter(dm.test_loader))
    assert test_batch["img"].shape == (16, 3, 32, 32)
    assert test_batch["impath"] == [x.impath for x in ds.test[:16]]  # test order kept
    assert sum(len(b["label"]) for b in dm.test_loader) == len(ds.test) == 30
    assert dm.val_loader is not None and f"train {sum(exp_profile(12, 10, 4))} " in dm.summary()
    # the shuffle order is seeded by cfg.SEED
    again = DataManager(_syn_cfg(synthetic_root, tmp_path))
    assert next(iter(again.train_loader_x))["impath"] == batch["impath"]
    extra = dm.build_loader(ds.train_x, batch_size=5)
    assert [p for b in extra for p in b["impath"]] == [x.impath for x in ds.train_x]


def test_datamanager_with_workers_and_small_train_set(synthetic_root, tmp_path):
    dm = DataManager(_syn_cfg(synthetic_root, tmp_path, DATALOADER__NUM_WORKERS=1,
                              DATALOADER__TRAIN_X__BATCH_SIZE=1000))
    batches = list(dm.train_loader_x)  # fewer items than the batch size: no drop_last
    assert len(batches) == 1 and len(batches[0]["label"]) == len(dm.dataset.train_x)


def test_transforms(tmp_path):
    cfg = make_cfg(tmp_path, tmp_path)
    img = Image.new("RGB", (300, 200), (255, 0, 0))
    train, test = build_transform(cfg, True), build_transform(cfg, False)
    assert train(img).shape == test(img).shape == (3, 224, 224)
    x = test(img)  # normalised with CLIP's mean / std
    assert torch.allclose(x[0], torch.full((224, 224), (1 - 0.48145466) / 0.26862954), atol=1e-3)
    names = [type(t).__name__ for t in train.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert train.transforms[0].interpolation.value == "bicubic"
    cfg.INPUT.TRANSFORMS = ["random_resized_crop", "mixup_everything"]
    with pytest.raises(ValueError, match="mixup_everything"):
        build_transform(cfg, True)
    cfg.INPUT.TRANSFORMS = ["random_crop", "random_flip"]
    assert build_transform(cfg, True)(img).shape == (3, 224, 224)
    cfg.INPUT.NO_TRANSFORM = True
    assert build_transform(cfg, True)(img).shape == (3, 224, 224)


def test_missing_image_names_the_path(tmp_path):
    missing = str(tmp_path / "gone.png")
    with pytest.raises(FileNotFoundError, match="gone.png"):
        DatasetWrapper([Datum(missing, 0, "x")], None)[0]


# ------------------------------------------------------------------------------ tools.check_data

def test_check_data(synthetic_root, tmp_path, capsys):
    from tools.check_data import check

    assert check(synthetic_root, "SyntheticShapes") == 0
    assert "OK" in capsys.readouterr().out
    assert check(tmp_path, "SyntheticShapes") == 1
    assert str(tmp_path / "synthetic_shapes") in capsys.readouterr().out
    from helpers_data import require_shared

    require_shared(REAL_SPLIT)
    if REAL_SPLIT.exists():
        (tmp_path / "caltech-101").mkdir()
        shutil.copy(REAL_SPLIT, tmp_path / "caltech-101")
        assert check(tmp_path, "Caltech101", max_missing=2) == 1
        out = capsys.readouterr().out
        assert "train     4128 entries" in out and "101_ObjectCategories/Faces/image_0" in out
