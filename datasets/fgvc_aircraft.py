import os

from engine.registry import DATASET_REGISTRY

from .base import Datum, DatasetBase

SPLIT_FILES = ("images_variant_train.txt", "images_variant_val.txt", "images_variant_test.txt")


@DATASET_REGISTRY.register()
class FGVCAircraft(DatasetBase):
    """FGVC-Aircraft 2013b (100 variants), read as CoOp does: classes in ``variants.txt`` order, splits
    from ``images_variant_{train,val,test}.txt`` (lines "imageid variant name")."""

    dataset_dir = "fgvc_aircraft"
    image_dir = "images"
    template = "a photo of a {}, a type of aircraft."

    def required_paths(self):
        return [os.path.join(self.dataset_dir, name) for name in ("variants.txt",) + SPLIT_FILES]

    def read_data(self):
        with open(os.path.join(self.dataset_dir, "variants.txt"), encoding="utf-8") as f:
            classnames = [line.strip() for line in f if line.strip()]
        cname2lab = {c: i for i, c in enumerate(classnames)}
        return tuple(self._read_file(cname2lab, name) for name in SPLIT_FILES)

    def _read_file(self, cname2lab, split_file):
        items = []
        path = os.path.join(self.dataset_dir, split_file)
        with open(path, encoding="utf-8") as f:
            for line in f:
                parts = line.strip().split(" ")
                if not parts[0]:
                    continue
                classname = " ".join(parts[1:])
                if classname not in cname2lab:
                    raise ValueError(f"{path}: variant {classname!r} is not in variants.txt")
                items.append(Datum(os.path.join(self.image_dir, parts[0] + ".jpg"), cname2lab[classname], classname))
        return items
