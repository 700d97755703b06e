"""``Datum`` and ``DatasetBase``: split reading, caching and the long-tailed base-to-new protocol.

A dataset subclass only names its folders, split file and prompt template (and overrides
``read_data`` where the reading differs, e.g. folder scans). ``DatasetBase.__init__`` then runs
docs/protocol.md in order:

1. read the full train/val/test split (``read_data``; CoOp ``split_zhou_*.json`` by default);
2. per-class cap of train (``DATASET.NUM_SHOTS``) and val (min(NUM_SHOTS, 4)), cached as JSON under
   ``<cache_dir>/<dataset_dir>/`` (never inside the dataset root);
3. record ``all_classnames`` (original label order: base classes first);
4. base/new split (``DATASET.SUBSAMPLE_CLASSES``) with relabelling, on train, val and test;
5. long-tailed down-sampling of the train split only (``DATASET.IMB_FACTOR`` > 1);
6. head/tail groups from the final train counts and the split manifest (with its hash).
"""
import hashlib
import json
import math
import os
from dataclasses import dataclass

from engine.cli import UserError
from engine.config import ConfigError
from engine.checkpoint import atomic_write_text
from lt_sampling.manifest import build_manifest, canonical_json
from lt_sampling.protocol import apply_protocol, cap_splits
from lt_sampling.sampling import subsample_classes

CACHE_VERSION = 1
DATASETS_HINT = ("see the 'Datasets' section of README.md (docs/DATASETS.md) for where to get it "
                 "and the expected tree")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder or file that should exist under DATASET.ROOT is missing."""


class DatasetError(UserError, ValueError):
    """A dataset whose files are there but cannot be used as they are (malformed split, empty class)."""


@dataclass(slots=True)
class Datum:
    """One image: absolute path, label, class name (underscores already replaced by spaces) and domain
    (Dassl's ``Datum`` without its file check, so splits can be read without images)."""

    impath: str
    label: int
    classname: str = ""
    domain: int = 0


def hashlib_hex(text):
    """sha256 hex digest of a string."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def clean_classname(name):
    """CoOp writes some class names with underscores (``car_side``); prompts use spaces."""
    return name.replace("_", " ").strip()


def resolve_cache_dir(cfg):
    """``DATASET.CACHE_DIR``, or ``<OUTPUT_DIR>/cache`` when it is empty (absolute path)."""
    cache_dir = cfg.DATASET.CACHE_DIR or os.path.join(cfg.OUTPUT_DIR or ".", "cache")
    return os.path.abspath(os.path.expanduser(cache_dir))


def _is_within(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def _lexically_within(path, folder):
    """``path`` names a place inside ``folder`` once ``..`` and ``.`` are resolved (symlinks are not followed:
    a dataset folder may link its images from another disk)."""
    path, folder = os.path.normpath(os.path.abspath(path)), os.path.normpath(os.path.abspath(folder))
    return path == folder or path.startswith(os.path.join(folder, ""))


class DatasetBase:
    """Base of every dataset. Class attributes to set in a subclass:

    ``dataset_dir`` folder under DATASET.ROOT, ``image_dir`` image folder inside it (split-file paths
    are relative to it), ``split_file`` CoOp split json inside ``dataset_dir`` ("" if ``read_data`` is
    overridden), ``template`` hand-crafted prompt with "{}", ``test_only`` (evaluation-only datasets:
    no cap and no down-sampling; ``train_x`` is the test split, as in CoOp).
    """

    dataset_dir = ""
    image_dir = ""
    split_file = ""
    template = "a photo of a {}."
    test_only = False

    def __init__(self, cfg):
        d = cfg.DATASET
        self.locate(d.ROOT, resolve_cache_dir(cfg))
        seed = max(int(cfg.SEED), 0)
        shots = -1 if self.test_only else int(d.NUM_SHOTS)
        imb_factor = 1.0 if self.test_only else float(d.IMB_FACTOR)
        train, val, test = self.confined(self.read_data())
        if shots > 0:
            train, val = self.confined(self.cached_cap(train, val, shots, seed))
        try:
            result = apply_protocol(
                train, val, test, seed=seed, subsample=d.SUBSAMPLE_CLASSES, imb_factor=imb_factor,
                profile=d.IMB_PROFILE, step_head_fraction=d.STEP_HEAD_FRACTION, head_fraction=d.HEAD_FRACTION,
                require_train=not self.test_only,
            )
        except ValueError as err:
            raise DatasetError(f"{type(self).__name__} ({self.split_path or self.dataset_dir}): {err}") from err
        if self.test_only:
            result.train = result.test
        self.train_x, self.val, self.test = result.train, result.val, result.test
        self.train_x_before_lt = result.test if self.test_only else result.train_before_lt
        self.all_classnames = result.all_classnames
        m = math.ceil(len(self.all_classnames) / 2)
        self.base_classnames = self.all_classnames[:m]
        self.new_classnames = self.all_classnames[m:]
        self.classnames = result.classnames
        self.num_classes = len(self.classnames)
        self.lab2cname = dict(enumerate(self.classnames))
        self.manifest = build_manifest(
            type(self).__name__, self.train_x, self.classnames, seed=seed, shots=shots,
            imb_factor=imb_factor, profile=d.IMB_PROFILE, subsample=d.SUBSAMPLE_CLASSES,
            head_fraction=d.HEAD_FRACTION, all_classnames=self.all_classnames, image_dir=self.image_dir,
            split_sizes={"train": len(self.train_x), "val": len(self.val), "test": len(self.test)},
        )
        self.train_counts = [self.manifest["counts"][str(c)] for c in range(self.num_classes)]
        self.head_labels = self.manifest["head_labels"]
        self.tail_labels = self.manifest["tail_labels"]

    # ----------------------------------------------------------------------------------------------
    # paths and checks

    def locate(self, root, cache_dir):
        """Set ``root``, ``dataset_dir``, ``image_dir``, ``split_path``, ``cache_dir`` and check that the
        dataset folder and every file ``required_paths`` names exist."""
        if not str(root).strip():
            raise ConfigError(f"no datasets folder given for {type(self).__name__}: pass --root DATA (the folder "
                              f"holding all datasets; DATASET.ROOT in a config); {DATASETS_HINT}")
        self.root = os.path.abspath(os.path.expanduser(root))
        self.dataset_dir = os.path.join(self.root, type(self).dataset_dir)
        self.image_dir = os.path.normpath(os.path.join(self.dataset_dir, type(self).image_dir))
        self.split_path = os.path.join(self.dataset_dir, self.split_file) if self.split_file else ""
        if _is_within(cache_dir, self.root):
            raise ConfigError(f"the cache dir {cache_dir} lies inside DATASET.ROOT {self.root}; caches never "
                             "go into the dataset root: set DATASET.CACHE_DIR or OUTPUT_DIR elsewhere")
        self.cache_dir = os.path.join(cache_dir, type(self).dataset_dir)
        name = type(self).__name__
        if not os.path.isdir(self.dataset_dir):
            raise DatasetNotFoundError(
                f"{name}: dataset folder not found: {self.dataset_dir} (DATASET.ROOT={self.root}); {DATASETS_HINT}")
        for path in self.required_paths():
            if not os.path.exists(path):
                raise DatasetNotFoundError(f"{name}: required file or folder not found: {path}; {DATASETS_HINT}")

    def required_paths(self):
        """Files or folders that must exist for ``read_data`` (default: the split file)."""
        return [self.split_path] if self.split_path else []

    @classmethod
    def read_raw(cls, root, cache_dir):
        """The full (train, val, test) lists before any protocol step, without a cfg (tools.check_data)."""
        self = cls.__new__(cls)
        self.locate(root, cache_dir)
        return self.confined(self.read_data())

    def confined(self, splits):
        """``splits`` unchanged when every image path lies inside the dataset folder; an entry such as
        ``../../outside.png`` (or an absolute path elsewhere) is a ``DatasetError`` naming it."""
        for items in splits:
            for x in items:
                if not _lexically_within(x.impath, self.dataset_dir):
                    entry = os.path.relpath(os.path.normpath(x.impath), self.image_dir)
                    raise DatasetError(
                        f"{type(self).__name__}: split entry {entry!r} (class {x.classname!r}) resolves to "
                        f"{os.path.normpath(x.impath)}, outside the dataset folder {self.dataset_dir}; image paths "
                        f"must stay inside it: fix the split file {self.split_path or self.dataset_dir}")
        return splits

    # ----------------------------------------------------------------------------------------------
    # reading

    def read_data(self):
        """Return (train, val, test) lists of ``Datum`` with absolute image paths."""
        return self.read_split(self.split_path, self.image_dir)

    @staticmethod
    def read_split(filepath, path_prefix):
        """Read a CoOp split json {"train"|"val"|"test": [[rel_impath, label, classname], ...]}."""
        try:
            with open(filepath, encoding="utf-8") as f:
                split = json.load(f)
            splits = tuple(
                [Datum(os.path.join(path_prefix, impath), int(label), clean_classname(cname))
                 for impath, label, cname in split[key]]
                for key in ("train", "val", "test")
            )
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            what = f"missing key {err}" if isinstance(err, KeyError) else " ".join(str(err).split())
            raise DatasetError(f"malformed split file {filepath}: expected a JSON object with 'train', 'val' "
                               f"and 'test' lists of [impath, label, classname] ({what})") from err
        for key, items in zip(("train", "val", "test"), splits):
            for (impath, _, _), x in zip(split[key], items):
                if os.path.isabs(impath) or not _lexically_within(x.impath, path_prefix):
                    raise DatasetError(f"split file {filepath}: {key} entry {impath!r} leaves the image folder "
                                       f"{path_prefix} (absolute, or '..' past it); entries are paths inside it")
        return splits

    subsample_classes = staticmethod(subsample_classes)  # CoOp's name: base/new split with relabelling

    @staticmethod
    def read_classnames(text_file):
        """ImageNet ``classnames.txt``: lines "wnid class name" -> {wnid: class name} (file order)."""
        classnames = {}
        with open(text_file, encoding="utf-8") as f:
            for line in f:
                parts = line.strip().split(" ")
                if parts[0]:
                    classnames[parts[0]] = " ".join(parts[1:])
        return classnames

    @staticmethod
    def read_image_folders(image_dir, folders, classnames):
        """Scan ``image_dir/<folder>/*`` for each folder (label = position in ``folders``), image
        names sorted so the result never depends on the file system's listing order."""
        items = []
        for label, folder in enumerate(folders):
            class_dir = os.path.join(image_dir, folder)
            for name in sorted(os.listdir(class_dir)):
                if not name.startswith("."):
                    items.append(Datum(os.path.join(class_dir, name), label, clean_classname(classnames[folder])))
        return items

    @staticmethod
    def list_folders(path, ignored=()):
        """Sorted non-hidden sub-folder names of ``path``."""
        return sorted(e.name for e in os.scandir(path)
                      if e.is_dir() and not e.name.startswith(".") and e.name not in ignored)

    # ----------------------------------------------------------------------------------------------
    # caching (JSON, relative paths, under the cache dir)

    def _rel(self, impath):
        prefix = os.path.join(self.image_dir, "")
        return impath[len(prefix):] if impath.startswith(prefix) else os.path.relpath(impath, self.image_dir)

    def _to_rows(self, items):
        return [[self._rel(x.impath), x.label, x.classname] for x in items]

    def _from_rows(self, rows):
        return [Datum(os.path.join(self.image_dir, p), int(y), c) for p, y, c in rows]

    def _read_cache(self, path):
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _write_cache(self, path, data):
        atomic_write_text(json.dumps(data), path)

    def cached_cap(self, train, val, shots, seed):
        """The per-class cap, cached as ``capped_shots<S>_seed<seed>_split<sig>_v<V>.json`` where
        ``sig`` fingerprints the uncapped train/val lists (a changed split never reuses a cache)."""
        rows = {"train": self._to_rows(train), "val": self._to_rows(val)}
        sig = hashlib.sha256(canonical_json(rows).encode("utf-8")).hexdigest()[:12]
        path = os.path.join(self.cache_dir, f"capped_shots{shots}_seed{seed}_split{sig}_v{CACHE_VERSION}.json")
        cached = self._read_cache(path)
        if cached is not None:
            return self._from_rows(cached["train"]), self._from_rows(cached["val"])
        train, val = cap_splits(train, val, shots, seed)
        self._write_cache(path, {"train": self._to_rows(train), "val": self._to_rows(val)})
        return train, val

    def get_cls_num_list(self):
        """Training images per class (Candle's name for ``train_counts``)."""
        return list(self.train_counts)
