from engine.registry import DATASET_REGISTRY

from .base import DatasetBase


@DATASET_REGISTRY.register()
class UCF101(DatasetBase):
    """UCF101 middle frames (101 actions; CoOp split)."""

    dataset_dir = "ucf101"
    image_dir = "UCF-101-midframes"
    split_file = "split_zhou_UCF101.json"
    template = "a photo of a person doing {}."
