from engine.registry import DATASET_REGISTRY

from .base import DatasetBase


@DATASET_REGISTRY.register()
class Caltech101(DatasetBase):
    """Caltech101 (100 object classes; CoOp split)."""

    dataset_dir = "caltech-101"
    image_dir = "101_ObjectCategories"
    split_file = "split_zhou_Caltech101.json"
    template = "a photo of a {}."
