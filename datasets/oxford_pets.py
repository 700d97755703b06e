from engine.registry import DATASET_REGISTRY

from .base import DatasetBase


@DATASET_REGISTRY.register()
class OxfordPets(DatasetBase):
    """Oxford-IIIT Pets (37 breeds; CoOp split)."""

    dataset_dir = "oxford_pets"
    image_dir = "images"
    split_file = "split_zhou_OxfordPets.json"
    template = "a photo of a {}, a type of pet."
