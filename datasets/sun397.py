from engine.registry import DATASET_REGISTRY

from .base import DatasetBase


@DATASET_REGISTRY.register()
class SUN397(DatasetBase):
    """SUN397 (397 scene categories; CoOp split)."""

    dataset_dir = "sun397"
    image_dir = "SUN397"
    split_file = "split_zhou_SUN397.json"
    template = "a photo of a {}."
