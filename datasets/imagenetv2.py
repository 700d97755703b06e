from engine.registry import DATASET_REGISTRY

from .imagenet import ImageNetVariant


@DATASET_REGISTRY.register()
class ImageNetV2(ImageNetVariant):
    """ImageNetV2 matched-frequency (test only): folders ``0..999`` = ImageNet labels in
    ``classnames.txt`` order."""

    dataset_dir = "imagenetv2"
    image_dir = "imagenetv2-matched-frequency-format-val"

    def folders(self, classnames):
        return [(str(label), wnid) for label, wnid in enumerate(classnames)]
