"""Datasets (CoOp layout). Importing this package registers every dataset in ``DATASET_REGISTRY``."""
from . import (  # noqa: F401  (imported for registration)
    caltech101,
    dtd,
    eurosat,
    fgvc_aircraft,
    food101,
    imagenet,
    imagenet_a,
    imagenet_r,
    imagenet_sketch,
    imagenetv2,
    oxford_flowers,
    oxford_pets,
    stanford_cars,
    sun397,
    synthetic,
    world,
    ucf101,
)
from .base import DatasetBase, DatasetNotFoundError, Datum

__all__ = ["DatasetBase", "DatasetNotFoundError", "Datum"]
