from engine.registry import DATASET_REGISTRY

from .base import DatasetBase


@DATASET_REGISTRY.register()
class Food101(DatasetBase):
    """Food-101 (101 dishes; CoOp split)."""

    dataset_dir = "food-101"
    image_dir = "images"
    split_file = "split_zhou_Food101.json"
    template = "a photo of {}, a type of food."
