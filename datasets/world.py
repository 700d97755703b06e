"""The demo world: generated images of objects and textures with several attributes, with captions.

One renderer serves two uses:

- **Pretraining** (``tools/pretrain_clip.py``): ``sample_specs`` draws random attribute tuples from the
  whole world, ``render`` draws them and ``caption`` describes each with one of many templates that
  mention a random subset of the attributes ("a photo of a small red striped circle.", "a red circle.",
  "a circle that is red on a cluttered background.", "a photo of a blue dotted texture.", ...).
- **Demo datasets** (``generate_world_dataset``): fixed class lists that are compositions of those
  attributes, written in the CoOp split-file layout and read through ``DatasetBase`` like every real
  dataset. Classes are listed in a fixed shuffled order, so the new half holds compositions never seen in
  the downstream training set (the pretraining world holds them all, as the web holds CLIP's classes).

Attributes: colour (8), shape (6), size (small / large), pattern (plain, striped, dotted, checkered) and
background (plain / cluttered); a "texture" is a full-frame pattern with no object. Images are 32 px RGB,
drawn at 2x and averaged down (anti-aliased), with colour, position, rotation and noise jitter.
"""
import json
import os

import numpy as np
from PIL import Image

from engine.checkpoint import atomic_write_text
from engine.registry import DATASET_REGISTRY

from .base import DatasetBase

WORLD_VERSION = 1
IMAGE_SIZE = 32
COLOURS = {"red": (215, 35, 35), "orange": (240, 135, 20), "yellow": (235, 215, 35), "green": (35, 165, 55),
           "blue": (40, 75, 225), "purple": (135, 45, 185), "pink": (245, 125, 190), "brown": (125, 75, 35)}
SHAPES = ("circle", "square", "triangle", "cross", "star", "ring")
SIZES = ("small", "large")
PATTERNS = ("plain", "striped", "dotted", "checkered")
BACKGROUNDS = ("plain", "cluttered")
SIZE_RANGES = {"small": (0.2, 0.27), "large": (0.34, 0.45)}  # object radius / image size
MAX_OFFSET = 0.12  # largest shift of an object's centre from the image centre / image size

OBJECT_TEMPLATES = ("a photo of a {}.", "a {}.", "an image of a {}.", "a picture of the {}.", "a drawing of a {}.",
                    "this is a {}.", "a rendering of a {}.", "a photo of the {}.")
TEXTURE_TEMPLATES = ("a photo of a {} texture.", "a {} texture.", "a {} pattern.", "a photo of a {} pattern.",
                     "an image of a {} texture.")


# ------------------------------------------------------------------------------------------------
# attribute tuples and captions

def sample_specs(rng, n, texture_fraction=0.25, plain_fraction=0.25, clutter_fraction=0.5):
    """``n`` random attribute dicts from the whole world: a texture with probability ``texture_fraction``,
    else an object, plain with probability ``plain_fraction`` (else striped, dotted or checkered, equally
    likely), on a cluttered background with probability ``clutter_fraction``. The defaults draw every
    attribute uniformly."""
    specs = []
    colours = list(COLOURS)
    for _ in range(n):
        if rng.random() < texture_fraction:
            specs.append({"kind": "texture", "colour": colours[rng.integers(8)],
                          "pattern": PATTERNS[1 + rng.integers(3)]})
        else:
            pattern = PATTERNS[0] if rng.random() < plain_fraction else PATTERNS[1 + rng.integers(3)]
            specs.append({"kind": "object", "colour": colours[rng.integers(8)], "shape": SHAPES[rng.integers(6)],
                          "size": SIZES[rng.integers(2)], "pattern": pattern,
                          "background": BACKGROUNDS[int(rng.random() < clutter_fraction)]})
    return specs


def sample_contrast_groups(rng, n, **mix):
    """Random attribute dicts from the whole world, ``n`` in all, drawn as contrast groups: one draw of every
    attribute, then the object in all six shapes (a texture in all three patterns), so that the members of
    a group differ only in what a caption has to tell apart hardest (``mix``: as in ``sample_specs``). Returns (specs, groups), ``groups`` a
    list of index lists into ``specs``."""
    specs, groups = [], []
    while len(specs) < n:
        base = sample_specs(rng, 1, **mix)[0]
        variants = ([dict(base, pattern=p) for p in PATTERNS[1:]] if base["kind"] == "texture"
                    else [dict(base, shape=s) for s in SHAPES])
        variants = variants[:n - len(specs)]
        groups.append(list(range(len(specs), len(specs) + len(variants))))
        specs += variants
    return specs, groups


def caption(spec, rng):
    """One caption for ``spec``; colour and shape (or pattern, for a texture) are always named, the other
    attributes with some probability, in one of several phrasings."""
    if spec["kind"] == "texture":
        words = f"{spec['colour']} {spec['pattern']}"
        return TEXTURE_TEMPLATES[rng.integers(len(TEXTURE_TEMPLATES))].format(words)
    words = [spec["colour"], spec["shape"]]
    if spec["pattern"] != "plain" and rng.random() < 0.7:
        words.insert(1, spec["pattern"])
    if rng.random() < 0.5:
        words.insert(0, spec["size"])
    if rng.random() < 0.2:  # "a circle that is red"
        phrase = f"{' '.join(w for w in words if w != spec['colour'])} that is {spec['colour']}"
    else:
        phrase = " ".join(words)
    if spec["background"] == "cluttered" and rng.random() < 0.4:
        phrase += " on a cluttered background"
    return OBJECT_TEMPLATES[rng.integers(len(OBJECT_TEMPLATES))].format(phrase)


# ------------------------------------------------------------------------------------------------
# rendering (vectorised over a batch, numpy only)

_SS = 2  # supersampling factor


def _grid(size):
    c = ((np.arange(size * _SS) + 0.5) / _SS).astype(np.float32)
    return np.meshgrid(c, c, indexing="xy")  # x, y in output-pixel units


def _pattern_mask(pattern, u, v, period):
    """1 where the pattern is dark, per pixel; ``u, v`` object/texture coordinates (B, S, S)."""
    p = period[:, None, None]
    if pattern == "striped":
        return (np.floor(u / p) % 2) == 1
    if pattern == "checkered":
        return ((np.floor(u / p) + np.floor(v / p)) % 2) == 1
    if pattern == "dotted":
        du, dv = (u % (1.6 * p)) - 0.8 * p, (v % (1.6 * p)) - 0.8 * p
        return du * du + dv * dv <= (0.45 * p) ** 2
    return np.zeros(u.shape, dtype=bool)


def _shape_mask(shape, u, v, r):
    r = r[:, None, None]
    d = np.hypot(u, v)
    if shape == "circle":
        return d <= r
    if shape == "ring":
        return (d <= r) & (d >= 0.55 * r)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
    if shape == "triangle":
        inside = np.ones(u.shape, dtype=bool)
        for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3):
            inside &= u * np.cos(a) + v * np.sin(a) <= 0.5 * r
        return inside
    if shape == "cross":
        w = 0.32 * r
        return ((np.abs(u) <= w) & (np.abs(v) <= r)) | ((np.abs(v) <= w) & (np.abs(u) <= r))
    if shape == "star":
        theta = np.arctan2(v, u)
        return d <= r * (0.38 + 0.62 * np.abs(np.cos(2.5 * theta)) ** 3)
    raise ValueError(f"unknown shape {shape!r}")


def _backgrounds(rng, kinds, x, y):
    n, s = len(kinds), x.shape[0]
    grey = rng.uniform(70, 185, n).astype(np.float32)[:, None, None]
    bg = grey + 8 * rng.standard_normal((n, s, s), dtype=np.float32)  # one grey channel
    for i, kind in enumerate(kinds):
        if kind != "cluttered":
            continue
        for _ in range(7):  # grey rectangles, discs and bars of random tone
            cx, cy = rng.uniform(0, IMAGE_SIZE, 2)
            hw, hh = rng.uniform(1.5, 7, 2)
            tone = rng.uniform(20, 235)
            if rng.random() < 0.5:
                m = (np.abs(x - cx) <= hw) & (np.abs(y - cy) <= hh)
            else:
                m = (x - cx) ** 2 + (y - cy) ** 2 <= hw * hw
            bg[i][m] = tone + rng.normal(0, 6)
        bg[i] += 14 * rng.standard_normal((s, s), dtype=np.float32)
    return bg


def render(specs, rng, size=IMAGE_SIZE):
    """uint8 array (N, size, size, 3) of the images of ``specs`` (dicts as ``sample_specs`` makes)."""
    if size != IMAGE_SIZE:
        raise ValueError(f"the world renders {IMAGE_SIZE} px images, got size={size}")
    n = len(specs)
    x, y = _grid(size)
    is_texture = np.array([s["kind"] == "texture" for s in specs])
    radius = np.array([rng.uniform(*SIZE_RANGES[s.get("size", "large")]) for s in specs]) * size
    cx, cy = size / 2 + rng.uniform(-MAX_OFFSET, MAX_OFFSET, (2, n)) * size
    angle = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    period = rng.uniform(2.6, 3.6, n).astype(np.float32)
    offset = rng.uniform(0, 8, (n, 2)).astype(np.float32)
    dx = x[None] - cx.astype(np.float32)[:, None, None]
    dy = y[None] - cy.astype(np.float32)[:, None, None]
    ca, sa = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u, v = dx * ca + dy * sa, -dx * sa + dy * ca
    mask = np.zeros(u.shape, dtype=bool)
    dark = np.zeros(u.shape, dtype=bool)
    for shape in SHAPES:
        idx = np.array([s.get("shape") == shape and not t for s, t in zip(specs, is_texture)])
        if idx.any():
            mask[idx] = _shape_mask(shape, u[idx], v[idx], radius[idx])
    mask[is_texture] = True
    pu, pv = u + offset[:, :1, None], v + offset[:, 1:, None]
    for pattern in PATTERNS[1:]:
        idx = np.array([s["pattern"] == pattern for s in specs])
        if idx.any():
            dark[idx] = _pattern_mask(pattern, pu[idx], pv[idx], period[idx])
    colour = np.array([COLOURS[s["colour"]] for s in specs], dtype=np.float64)
    colour = np.clip(colour * rng.uniform(0.85, 1.12, (n, 1)) + rng.uniform(-18, 18, (n, 3)), 0, 255)
    colour = colour.astype(np.float32)[:, None, None]
    shade = np.where(dark, np.float32(0.3), np.float32(1.0))[..., None]
    bg = _backgrounds(rng, [s.get("background", "plain") for s in specs], x, y)
    img = np.where(mask[..., None], colour * shade, bg[..., None])
    img = img.reshape(n, size, _SS, size, _SS, 3).mean(axis=(2, 4), dtype=np.float32)
    img += 4 * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# demo datasets

def _objects(colours, shapes, sizes=(None,), background="plain"):
    out = []
    for size in sizes:
        for colour in colours:
            for shape in shapes:
                name = " ".join(w for w in (size, colour, shape) if w)
                spec = {"kind": "object", "colour": colour, "shape": shape, "pattern": "plain",
                        "background": background}
                if size:
                    spec["size"] = size
                out.append((name, spec))
    return out


def _textures(colours, patterns):
    return [(f"{c} {p}", {"kind": "texture", "colour": c, "pattern": p}) for p in patterns for c in colours]


# name -> (dataset folder, prompt template, [(classname, spec)] in canonical order, order seed).
# A spec without "size" draws it at random per image.
DEMO_DATASETS = {
    "WorldShapes": ("world_shapes", "a photo of a {}.",
                    _objects(("red", "orange", "yellow", "green", "blue", "purple"),
                             ("circle", "square", "triangle", "cross", "star")), 11),
    "WorldClutter": ("world_clutter", "a photo of a {}.",
                     _objects(("red", "green", "blue", "pink"), ("circle", "square", "cross", "ring"),
                              sizes=SIZES, background="cluttered"), 12),
    "WorldTextures": ("world_textures", "a photo of a {} texture.",
                      _textures(tuple(COLOURS), ("striped", "dotted", "checkered")), 13),
}
SPLIT_NAME = "split_zhou_{}.json"
PARAMS_FILE = "world_params.json"


def demo_classes(name):
    """[(classname, spec)] of a demo dataset in label order: the canonical list in a fixed shuffled order
    (the first half are the base classes)."""
    _, _, classes, order_seed = DEMO_DATASETS[name]
    order = np.random.default_rng(order_seed).permutation(len(classes))
    return [classes[i] for i in order]


def generate_world_dataset(name, root, train_per_class=60, val_per_class=4, test_per_class=20, seed=0):
    """Write the demo dataset ``name`` under ``<root>/<folder>`` and return that folder. Idempotent: nothing
    is done when the split file exists and the stored parameters match."""
    if name not in DEMO_DATASETS:
        raise ValueError(f"unknown demo dataset {name!r}; known: {', '.join(DEMO_DATASETS)}")
    folder = DEMO_DATASETS[name][0]
    params = {"version": WORLD_VERSION, "dataset": name, "train_per_class": int(train_per_class),
              "val_per_class": int(val_per_class), "test_per_class": int(test_per_class), "seed": int(seed)}
    dataset_dir = os.path.join(os.path.abspath(os.path.expanduser(root)), folder)
    split_path = os.path.join(dataset_dir, SPLIT_NAME.format(name))
    params_path = os.path.join(dataset_dir, PARAMS_FILE)
    if os.path.exists(split_path) and os.path.exists(params_path):
        with open(params_path, encoding="utf-8") as f:
            if json.load(f) == params:
                return dataset_dir
    rng = np.random.default_rng([int(seed), sorted(DEMO_DATASETS).index(name)])
    sizes = {"train": params["train_per_class"], "val": params["val_per_class"], "test": params["test_per_class"]}
    per_class = sum(sizes.values())
    split = {key: [] for key in sizes}
    for label, (classname, spec) in enumerate(demo_classes(name)):
        class_folder = classname.replace(" ", "_")
        os.makedirs(os.path.join(dataset_dir, "images", class_folder), exist_ok=True)
        specs = [dict(spec, size=spec.get("size") or SIZES[rng.integers(2)]) for _ in range(per_class)]
        images = render(specs, rng)
        i = 0
        for key, n in sizes.items():
            for _ in range(n):
                rel = f"{class_folder}/{i}.png"
                Image.fromarray(images[i], "RGB").save(os.path.join(dataset_dir, "images", rel))
                split[key].append([rel, label, classname])
                i += 1
    atomic_write_text(json.dumps(split), split_path)
    atomic_write_text(json.dumps(params, indent=1), params_path)  # last: marks the set as complete
    return dataset_dir


class _WorldDataset(DatasetBase):
    image_dir = "images"

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        cls.dataset_dir, cls.template = DEMO_DATASETS[cls.__name__][:2]
        cls.split_file = SPLIT_NAME.format(cls.__name__)


@DATASET_REGISTRY.register()
class WorldShapes(_WorldDataset):
    """30 classes "<colour> <shape>" (6 colours x 5 shapes), plain background, any size."""


@DATASET_REGISTRY.register()
class WorldClutter(_WorldDataset):
    """32 classes "<size> <colour> <shape>" (2 x 4 x 4) on a cluttered background."""


@DATASET_REGISTRY.register()
class WorldTextures(_WorldDataset):
    """24 classes "<colour> <pattern>" (8 colours x striped / dotted / checkered), full-frame textures."""
