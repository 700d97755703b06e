from engine.registry import DATASET_REGISTRY

from .base import DatasetBase


@DATASET_REGISTRY.register()
class OxfordFlowers(DatasetBase):
    """Oxford Flowers102 (102 species; CoOp split)."""

    dataset_dir = "oxford_flowers"
    image_dir = "jpg"
    split_file = "split_zhou_OxfordFlowers.json"
    template = "a photo of a {}, a type of flower."
