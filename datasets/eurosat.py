from engine.registry import DATASET_REGISTRY

from .base import DatasetBase


@DATASET_REGISTRY.register()
class EuroSAT(DatasetBase):
    """EuroSAT RGB (10 land-use classes; CoOp split)."""

    dataset_dir = "eurosat"
    image_dir = "2750"
    split_file = "split_zhou_EuroSAT.json"
    template = "a centered satellite photo of {}."
