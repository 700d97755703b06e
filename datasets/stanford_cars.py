from engine.registry import DATASET_REGISTRY

from .base import DatasetBase


@DATASET_REGISTRY.register()
class StanfordCars(DatasetBase):
    """Stanford Cars (196 models; CoOp split, paths relative to the dataset folder)."""

    dataset_dir = "stanford_cars"
    image_dir = ""
    split_file = "split_zhou_StanfordCars.json"
    template = "a photo of a {}."
