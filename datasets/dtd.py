from engine.registry import DATASET_REGISTRY

from .base import DatasetBase


@DATASET_REGISTRY.register()
class DescribableTextures(DatasetBase):
    """Describable Textures (47 textures; CoOp split)."""

    dataset_dir = "dtd"
    image_dir = "images"
    split_file = "split_zhou_DescribableTextures.json"
    template = "{} texture."
