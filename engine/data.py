"""Transforms, the image dataset wrapper and the ``DataManager`` (Dassl's data pipeline, trimmed).

``DataManager(cfg)`` builds ``DATASET_REGISTRY.get(cfg.DATASET.NAME)(cfg)`` and its loaders:
``train_loader_x`` (shuffled with a generator seeded from ``cfg.SEED``), ``val_loader`` (None when the
dataset has no val split) and ``test_loader``. Images are decoded with PIL.
"""
import os

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .cli import UserError
from .compat import import_torchvision
from .config import KNOWN_TRANSFORMS
from .registry import DATASET_REGISTRY

T = import_torchvision().transforms
InterpolationMode = T.InterpolationMode

INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                  "nearest": InterpolationMode.NEAREST}
# INPUT.TRANSFORMS understood here (checked with the config). Test time only uses resize + center crop
# (+ normalize).


def _size(cfg):
    size = tuple(int(s) for s in cfg.INPUT.SIZE)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"INPUT.SIZE must be (height, width), got {cfg.INPUT.SIZE!r}")
    return size


def build_transform(cfg, is_train):
    """Dassl-style transform from ``cfg.INPUT``.

    Train: random_resized_crop(INPUT.SIZE, scale=INPUT.RRCROP_SCALE, interpolation) [or random_crop with
    INPUT.CROP_PADDING, or a plain resize when neither crop is listed], random_flip, to tensor,
    normalize (INPUT.PIXEL_MEAN / PIXEL_STD). Test: resize the short side to INPUT.SIZE, center crop,
    to tensor, normalize. ``INPUT.NO_TRANSFORM``: only resize to INPUT.SIZE and to tensor.
    """
    inp = cfg.INPUT
    size = _size(cfg)
    if inp.INTERPOLATION not in INTERPOLATIONS:
        raise ValueError(f"INPUT.INTERPOLATION must be one of {sorted(INTERPOLATIONS)}, got {inp.INTERPOLATION!r}")
    interp = INTERPOLATIONS[inp.INTERPOLATION]
    if inp.NO_TRANSFORM:
        return T.Compose([T.Resize(size, interpolation=interp), T.ToTensor()])
    choices = list(inp.TRANSFORMS)
    unknown = [c for c in choices if c not in KNOWN_TRANSFORMS]
    if unknown:
        raise ValueError(f"unknown INPUT.TRANSFORMS {unknown}; supported: {list(KNOWN_TRANSFORMS)}")
    normalize = [T.Normalize(mean=list(inp.PIXEL_MEAN), std=list(inp.PIXEL_STD))] if "normalize" in choices else []
    if not is_train:
        return T.Compose([T.Resize(max(size), interpolation=interp), T.CenterCrop(size), T.ToTensor()] + normalize)

    tfms = []
    if "random_resized_crop" in choices:
        tfms.append(T.RandomResizedCrop(size, scale=tuple(inp.RRCROP_SCALE), interpolation=interp))
    elif "random_crop" in choices:
        tfms += [T.Resize(size, interpolation=interp), T.RandomCrop(size, padding=inp.CROP_PADDING)]
    elif "center_crop" in choices:
        tfms += [T.Resize(max(size), interpolation=interp), T.CenterCrop(size)]
    else:
        tfms.append(T.Resize(size, interpolation=interp))
    if "random_flip" in choices:
        tfms.append(T.RandomHorizontalFlip())
    if "colorjitter" in choices:
        tfms.append(T.ColorJitter(brightness=inp.COLORJITTER_B, contrast=inp.COLORJITTER_C,
                                  saturation=inp.COLORJITTER_S, hue=inp.COLORJITTER_H))
    if "randomgrayscale" in choices:
        tfms.append(T.RandomGrayscale(p=inp.RGS_P))
    if "gaussian_blur" in choices:  # Dassl: GaussianBlur(INPUT.GB_K) with torchvision's default sigma (0.1, 2.0)
        tfms.append(T.RandomApply([T.GaussianBlur(kernel_size=inp.GB_K, sigma=(0.1, 2.0))], p=inp.GB_P))
    return T.Compose(tfms + [T.ToTensor()] + normalize)


class ImageReadError(UserError):
    """An image file that is missing, truncated or not an image (the message names its path)."""


class ImageNotFoundError(ImageReadError, FileNotFoundError):
    """An image file the split lists that is not there."""


CHECK_HINT = "`python -m tools.check_data --root DATA --dataset NAME` lists every broken image"


def read_image(path):
    """Open an image file as RGB (decoded in full, so a truncated file fails here, naming its path)."""
    if not os.path.isfile(path):
        raise ImageNotFoundError(f"image not found: {path} ({CHECK_HINT})")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageReadError(f"cannot read image {path} ({' '.join(str(err).split())}): the file is corrupt or "
                             f"truncated; replace it ({CHECK_HINT})") from err


class DatasetWrapper(Dataset):
    """Items (``Datum``) -> {"img", "label", "impath", "index", "domain"} via ``transform``."""

    def __init__(self, data_source, transform=None):
        self.data_source = data_source
        self.transform = transform

    def __len__(self):
        return len(self.data_source)

    def __getitem__(self, index):
        item = self.data_source[index]
        img = read_image(item.impath)
        if self.transform is not None:
            img = self.transform(img)
        return {"img": img, "label": item.label, "impath": item.impath, "index": index,
                "domain": getattr(item, "domain", 0)}


class DataManager:
    """Dataset + loaders. Attributes: ``dataset``, ``train_loader_x``, ``val_loader`` (None without a
    val split), ``test_loader``, ``num_classes``, ``lab2cname``, ``classnames``, ``tfm_train``,
    ``tfm_test``; ``build_loader`` makes further loaders over any list of items."""

    def __init__(self, cfg, dataset=None, custom_tfm_train=None, custom_tfm_test=None):
        self.cfg = cfg
        if dataset is None:  # datasets register when the ``datasets`` package is imported (train.py does)
            dataset = DATASET_REGISTRY.get(cfg.DATASET.NAME)(cfg)
        self.dataset = dataset
        self.tfm_train = custom_tfm_train or build_transform(cfg, is_train=True)
        self.tfm_test = custom_tfm_test or build_transform(cfg, is_train=False)
        self.train_loader_x = self.build_loader(dataset.train_x, is_train=True)
        self.val_loader = self.build_loader(dataset.val) if dataset.val else None
        self.test_loader = self.build_loader(dataset.test)
        self.train_loader_u = None
        self.num_source_domains = 1

    @property
    def num_classes(self):
        return self.dataset.num_classes

    @property
    def lab2cname(self):
        return self.dataset.lab2cname

    @property
    def classnames(self):
        return self.dataset.classnames

    def build_loader(self, data_source, batch_size=None, is_train=False, transform=None, shuffle=None,
                     drop_last=None):
        """A DataLoader over ``data_source``. Defaults by ``is_train``: train batch size, train
        transform, shuffling (generator seeded from cfg.SEED) and drop_last when there is at least one
        full batch; otherwise test batch size and transform, in order, keeping the last batch."""
        loader_cfg = self.cfg.DATALOADER
        if batch_size is None:
            batch_size = loader_cfg.TRAIN_X.BATCH_SIZE if is_train else loader_cfg.TEST.BATCH_SIZE
        if transform is None:
            transform = self.tfm_train if is_train else self.tfm_test
        shuffle = is_train if shuffle is None else shuffle
        if drop_last is None:
            drop_last = is_train and len(data_source) >= batch_size
        generator = torch.Generator().manual_seed(max(int(self.cfg.SEED), 0)) if shuffle else None
        return DataLoader(
            DatasetWrapper(data_source, transform), batch_size=batch_size, shuffle=shuffle,
            drop_last=drop_last, num_workers=int(loader_cfg.NUM_WORKERS), generator=generator,
            pin_memory=torch.cuda.is_available(),
        )

    def summary(self):
        """A short multi-line description of the dataset and the long-tailed split."""
        d, m = self.dataset, self.dataset.manifest
        return "\n".join([
            f"Dataset {type(d).__name__} ({self.cfg.DATASET.SUBSAMPLE_CLASSES} classes: {d.num_classes}, "
            f"all classes: {len(d.all_classnames)})",
            f"  train {len(d.train_x)} (n_max {m['n_max']}, n_min {m['n_min']}, imb {m['imb_factor']:g}, "
            f"profile {m['profile']})  val {len(d.val)}  test {len(d.test)}",
            f"  head classes {len(d.head_labels)} / tail {len(d.tail_labels)}  manifest {m['hash'][:12]}",
        ])
