"""What names a run: the folder suffix a variant (extra ``KEY VALUE`` opts) gets.

A run is identified by its folder, and its folder by everything that changes its result. The scripts and
the table launcher put a variant of a config (an ablation, a sweep value, another backbone) into
``<config><variant_tag(opts)>`` so that two variants never share a folder (``run_tag`` leaves the
run-neutral opts out of the name).

``check_run_folder(folder, cfg)`` is the other half: a folder that already holds a run (its
``config.yaml``) with a different resolved config is an error naming the differing keys; the run-neutral keys
(``RUN_NEUTRAL_KEYS`` and each method's ``MethodInfo.run_neutral``) are exempt. ``check_manifest`` does the same for
the recorded training split, and ``check_backbone`` for the backbone weights (the sha256 of the weights file, which
a config cannot show: re-pretraining tiny-world or replacing a file keeps its name).
"""
import hashlib
import json
import os
import re

import yaml

from engine.checkpoint import atomic_write_json
from engine.cli import UserError
from engine.registry import TRAINER_REGISTRY

MAX_TAG_CHARS = 64


def _clean(value):
    text = re.sub(r"[^A-Za-z0-9.+-]+", "-", str(value)).strip("-")
    return text or "none"


def variant_tag(opts):
    """``['TRAINER.LAMP.BETA', '0.5', 'OPTIM.MAX_EPOCH', '5']`` -> ``'_max_epoch5_beta0.5'``; ``[]`` -> ``''``.

    Pairs are sorted by key; a key is shortened to its last component unless two keys share it. Tags
    longer than MAX_TAG_CHARS are cut and end in a hash of the whole opts list, so they stay unique.
    """
    opts = [str(o) for o in (opts or [])]
    if len(opts) % 2:
        raise ValueError(f"variant opts must be KEY VALUE pairs, got an odd list: {opts}")
    pairs = sorted(zip(opts[0::2], opts[1::2]))
    if not pairs:
        return ""
    last = [k.rsplit(".", 1)[-1] for k, _ in pairs]
    parts = []
    for (key, value), short in zip(pairs, last):
        name = short if last.count(short) == 1 else key.replace(".", "-")
        parts.append(f"{name.lower()}{_clean(value)}")
    tag = "_" + "_".join(parts)
    if len(tag) > MAX_TAG_CHARS:
        digest = hashlib.sha1(" ".join(f"{k}={v}" for k, v in pairs).encode()).hexdigest()[:8]
        tag = tag[:MAX_TAG_CHARS - 9] + "-" + digest
    return tag


# ----------------------------------------------------------------------------------------- identity
#
# A run folder holds one resolved config (``config.yaml``). Starting, resuming or re-evaluating into a
# folder whose config differs in any key that can change the result is an error naming those keys.
# Run-neutral keys are the ones that cannot change a result (or only by float round-off of an exact
# speed-up): where the data and outputs live, how many workers load the data, how often the log prints
# or checkpoints are kept, the evaluation batch size, and the exact text-encoder speed-ups. USE_CUDA is
# neutral too (the same run may be resumed on another machine); the precision a trainer uses is its
# TRAINER.<NAME>.PREC key, which is not neutral. The weights file's path is neutral too: what identifies the
# weights is their hash (BACKBONE_FILE, check_backbone), not where the file lies. These are the engine's keys; a method names its own
# (e.g. LAMP's text chunking) in its registry entry (MethodInfo.run_neutral).
RUN_NEUTRAL_KEYS = (
    "OUTPUT_DIR",
    "RESUME",
    "VERBOSE",
    "USE_CUDA",
    "MODEL.BACKBONE.PATH",
    "DATASET.ROOT",
    "DATASET.CACHE_DIR",
    "DATALOADER.NUM_WORKERS",
    "DATALOADER.TEST.BATCH_SIZE",
    "TRAIN.PRINT_FREQ",
    "TRAIN.CHECKPOINT_FREQ",
    "MODEL.TRUNCATE_TEXT",
    "MODEL.TEXT_PREFIX_CACHE",
    "MODEL.SHARED_TEXT_PREFIX",
    "MODEL.CLS_ONLY_LAST_VISION_BLOCK",
    "MODEL.SKIP_REPLACED_PROMPT_OUTPUTS",
    "MODEL.COMPILE_MLP",
)
CONFIG_FILE = "config.yaml"
BACKBONE_FILE = "backbone.json"


class RunIdentityError(UserError):
    """A run folder holds another run than the one requested."""


def run_neutral_keys():
    """The engine's run-neutral keys and those of every registered method."""
    return set(RUN_NEUTRAL_KEYS) | TRAINER_REGISTRY.run_neutral_keys()


def is_run_neutral(key):
    return key in RUN_NEUTRAL_KEYS or key in TRAINER_REGISTRY.run_neutral_keys()


def run_tag(opts):
    """``variant_tag`` of ``opts`` without the run-neutral pairs (worker count, paths, ...): the folder
    suffix the scripts give a run with extra opts."""
    opts = [str(o) for o in (opts or [])]
    if len(opts) % 2:
        raise ValueError(f"variant opts must be KEY VALUE pairs, got an odd list: {opts}")
    kept = [x for k, v in zip(opts[0::2], opts[1::2]) if not is_run_neutral(k) for x in (k, v)]
    return variant_tag(kept)


def flatten_config(node, prefix=""):
    """A nested mapping (yacs CfgNode or the dict of a loaded config.yaml) -> {"A.B.C": value}; tuples
    become lists so that a config and its yaml dump compare equal."""
    flat = {}
    for key, value in node.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, full + "."))
        else:
            flat[full] = list(value) if isinstance(value, tuple) else value
    return flat


def config_diff(stored, requested, keys=None):
    """[(key, stored value, requested value)] for every key of both configs whose values differ,
    run-neutral keys excepted (``keys``: compare only these). A key that only one side has (a key a
    newer version of the code added or removed) is not a difference."""
    a, b = flatten_config(stored), flatten_config(requested)
    names = sorted(set(a) & set(b)) if keys is None else [k for k in keys if k in a and k in b]
    return [(k, a[k], b[k]) for k in names if not is_run_neutral(k) and a[k] != b[k]]


def format_diff(diff, limit=8):
    parts = [f"{k}: {old!r} in the folder, {new!r} requested" for k, old, new in diff[:limit]]
    if len(diff) > limit:
        parts.append(f"... and {len(diff) - limit} more")
    return "; ".join(parts)


def _read_mapping(path, load, what):
    """The mapping a run folder's file holds, or None when the file is missing; unreadable or not a mapping is an
    error naming the file (``what``: what then cannot be checked)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            data = load(f)
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise RunIdentityError(f"cannot read {path} ({' '.join(str(err).split())}); {what} cannot be "
                               "identified: choose another --output-dir") from err
    if not isinstance(data, dict):
        raise RunIdentityError(f"{path} does not hold a mapping; {what} cannot be identified: choose another "
                               "--output-dir")
    return data


def read_run_config(folder):
    """The resolved config a run folder holds (dict), or None when it holds none. A config.yaml that
    does not parse is an error naming it."""
    return _read_mapping(os.path.join(folder, CONFIG_FILE), yaml.safe_load, "this folder's run")


def check_run_folder(folder, cfg):
    """Raise RunIdentityError when ``folder`` holds a run (config.yaml) whose resolved config differs from
    ``cfg`` in a key that is not run-neutral; return the stored config (dict) or None."""
    stored = read_run_config(folder)
    if stored is None:
        return None
    diff = config_diff(stored, cfg)
    if diff:
        raise RunIdentityError(
            f"{folder} holds a run with another config ({format_diff(diff)}); a folder holds one run: "
            f"choose another --output-dir (the scripts add a variant tag for extra opts, or set TAG) or "
            f"rerun with the folder's settings")
    return stored


def check_manifest(folder, manifest):
    """Raise RunIdentityError when ``folder``'s manifest.json records another training split than
    ``manifest`` (same config, but the dataset's files or the sampling code changed)."""
    path = os.path.join(folder, "manifest.json")
    if not manifest or not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            old = json.load(f).get("hash", "")
    except (OSError, ValueError, AttributeError):
        raise RunIdentityError(f"cannot read {path}; choose another --output-dir") from None
    new = manifest.get("hash", "")
    if old and new and old != new:
        raise RunIdentityError(
            f"{path} records another training split (hash {old[:12]}) than this run draws ({new[:12]}): "
            f"the dataset files or the sampling changed since the folder's run started; choose another "
            f"--output-dir")


def write_backbone(folder, identity):
    """Record the backbone weights a run uses (``engine.clip_loader.backbone_identity``) in its folder."""
    atomic_write_json(dict(identity), os.path.join(folder, BACKBONE_FILE))


def recorded_backbone(folder):
    """The backbone identity a run folder recorded (dict), or None when it records none."""
    return _read_mapping(os.path.join(folder, BACKBONE_FILE), json.load, "this folder's backbone weights")


def check_backbone(folder, identity, role="this folder"):
    """Raise RunIdentityError when ``folder`` holds a run (its config.yaml) made with other backbone weights than
    ``identity`` (``backbone_identity``: the weights file's sha256), or one that recorded no weights although they
    come from a file. A run is never resumed, skipped as done or evaluated on other weights than it was trained on."""
    want = (identity or {}).get("sha256")
    if not want or not os.path.isfile(os.path.join(folder, CONFIG_FILE)):
        return
    stored = recorded_backbone(folder)
    advice = (f"point MODEL.BACKBONE.PATH / CLIP_WEIGHTS_DIR at the weights that run used, or choose another "
              f"--output-dir (a table: a fresh --output) for runs on {identity['path']}")
    if stored is None:
        raise RunIdentityError(f"{folder} holds a run that records no backbone weights ({BACKBONE_FILE}; written by an "
                               f"older version), so whether it used {identity['path']} (sha256 {want[:12]}) cannot be "
                               f"checked: choose another --output-dir")
    if stored.get("sha256") != want:
        raise RunIdentityError(f"{folder} ({role}) holds a run made with other {stored.get('name', '?')} weights "
                               f"(sha256 {str(stored.get('sha256'))[:12]}) than {identity['path']} (sha256 {want[:12]}): "
                               f"the weights file was re-pretrained or replaced since; {advice}")
