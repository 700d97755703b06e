import os

from engine.registry import DATASET_REGISTRY

from .base import CACHE_VERSION, DatasetBase, hashlib_hex


@DATASET_REGISTRY.register()
class ImageNet(DatasetBase):
    """ImageNet-1k: train = ``images/train/<wnid>/``, test = the official val set reorganised as
    ``images/val/<wnid>/`` (CoOp; val is the test set, capped to 4 per class as the unused val split).
    Labels follow the sorted wnid folders of train; names come from ``classnames.txt``. The folder scan
    is cached in the cache dir, keyed by the image folder's absolute path (delete it if the data change).
    """

    dataset_dir = "imagenet"
    image_dir = "images"
    template = "a photo of a {}."

    def required_paths(self):
        return [os.path.join(self.dataset_dir, "classnames.txt"),
                os.path.join(self.image_dir, "train"), os.path.join(self.image_dir, "val")]

    def read_data(self):
        key = hashlib_hex(os.path.realpath(self.image_dir))[:12]
        path = os.path.join(self.cache_dir, f"scan_{key}_v{CACHE_VERSION}.json")
        cached = self._read_cache(path)
        if cached is not None:
            train, test = self._from_rows(cached["train"]), self._from_rows(cached["test"])
            return train, test, test
        classnames = self.read_classnames(os.path.join(self.dataset_dir, "classnames.txt"))
        folders = self.list_folders(os.path.join(self.image_dir, "train"))
        missing = [f for f in folders if f not in classnames]
        if missing:
            raise ValueError(f"ImageNet: folders {missing[:5]} of {self.image_dir}/train are not in classnames.txt")
        val_folders = self.list_folders(os.path.join(self.image_dir, "val"))
        if val_folders != folders:
            raise ValueError(f"ImageNet: {self.image_dir}/val must hold the same <wnid> folders as train "
                             f"({len(val_folders)} vs {len(folders)} folders)")
        train = self.read_image_folders(os.path.join(self.image_dir, "train"), folders, classnames)
        test = self.read_image_folders(os.path.join(self.image_dir, "val"), folders, classnames)
        self._write_cache(path, {"train": self._to_rows(train), "test": self._to_rows(test)})
        return train, test, test


class ImageNetVariant(DatasetBase):
    """Base of the test-only ImageNet variants (CoOp): no cap, no down-sampling, and ``train_x`` is
    the test split, as in CoOp (these datasets are only ever evaluated). Each dataset folder holds a
    copy of ImageNet's ``classnames.txt``; labels = sorted class folders unless ``folders`` says otherwise."""

    template = "a photo of a {}."
    test_only = True

    def required_paths(self):
        return [os.path.join(self.dataset_dir, "classnames.txt"), self.image_dir]

    def folders(self, classnames):
        """[(folder name, wnid)] in label order (default: the sorted <wnid> folders of image_dir)."""
        folders = self.list_folders(self.image_dir)
        unknown = [f for f in folders if f not in classnames]
        if unknown:
            raise ValueError(f"{type(self).__name__}: folders {unknown[:5]} of {self.image_dir} are not in "
                             f"{self.dataset_dir}/classnames.txt")
        return [(f, f) for f in folders]

    def read_data(self):
        classnames = self.read_classnames(os.path.join(self.dataset_dir, "classnames.txt"))
        pairs = self.folders(classnames)
        names = {folder: classnames[wnid] for folder, wnid in pairs}
        test = self.read_image_folders(self.image_dir, [folder for folder, _ in pairs], names)
        return test, [], test
