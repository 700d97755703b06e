"""Split manifests: the exact training images per class of one run, as JSON with a content hash.

Image paths are stored relative to the dataset's image folder (the convention of CoOp's split files),
so the same split gives the same hash wherever the data lives.
"""
import hashlib
import json
import os
from pathlib import PurePath

from engine.checkpoint import atomic_write_text

from .sampling import head_tail_groups

MANIFEST_FORMAT = "lt-manifest/1"


def canonical_json(obj):
    """Deterministic JSON text (sorted keys, no whitespace) used for hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def manifest_hash(manifest):
    """sha256 of the canonical JSON of everything but the ``hash`` key."""
    body = {k: v for k, v in manifest.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def _relative(impath, image_dir):
    if not image_dir:
        return PurePath(impath).as_posix()
    prefix = os.path.join(image_dir, "")
    rel = impath[len(prefix):] if impath.startswith(prefix) else os.path.relpath(impath, image_dir)
    return PurePath(rel).as_posix()


def build_manifest(dataset, train, classnames, *, seed, shots, imb_factor, profile, subsample,
                   head_fraction=0.2, all_classnames=None, image_dir="", split_sizes=None):
    """Describe a training split. ``train``: items with ``.label`` / ``.impath``; ``classnames``
    indexed by label. Keys: dataset, seed, shots, imb_factor, profile, subsample, num_classes,
    classnames, all_classnames, counts {"label": n}, images {"label": sorted relative paths},
    head_labels, tail_labels, head_fraction, total, n_max, n_min, split_sizes, hash."""
    images = {str(label): [] for label in range(len(classnames))}
    for item in train:
        images[str(item.label)].append(_relative(item.impath, image_dir))
    for paths in images.values():
        paths.sort()
    counts = {label: len(paths) for label, paths in images.items()}
    head, tail = head_tail_groups([counts[str(c)] for c in range(len(classnames))], head_fraction)
    manifest = {
        "format": MANIFEST_FORMAT,
        "dataset": dataset,
        "seed": max(int(seed), 0),
        "shots": int(shots),
        "imb_factor": float(imb_factor),
        "profile": profile,
        "subsample": subsample,
        "num_classes": len(classnames),
        "classnames": list(classnames),
        "all_classnames": list(all_classnames if all_classnames is not None else classnames),
        "counts": counts,
        "images": images,
        "head_fraction": float(head_fraction),
        "head_labels": head,
        "tail_labels": tail,
        "total": sum(counts.values()),
        "n_max": max(counts.values(), default=0),
        "n_min": min(counts.values(), default=0),
        "split_sizes": dict(split_sizes or {}),
    }
    manifest["hash"] = manifest_hash(manifest)
    return manifest


def write_manifest(manifest, path):
    """Write the manifest as indented JSON, atomically."""
    atomic_write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", path)


def read_manifest(path, verify=True):
    """Load a manifest; with ``verify`` check that its hash matches its content."""
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if verify and manifest.get("hash") != manifest_hash(manifest):
        raise ValueError(f"manifest {path} was modified: its hash does not match its content")
    return manifest
