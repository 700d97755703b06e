"""Build a frozen CLIP model: OpenAI weights from a local file, or a named random-weight architecture.

Nothing here downloads. A missing weights file is an error that lists every place looked in.
"""
import functools
import hashlib
import os
import warnings
from pathlib import Path

import torch

from engine.checkpoint import CheckpointError, safe_torch_load
from engine.compat import import_clip
from engine.config import ConfigError

WEIGHTS_ENV = "CLIP_WEIGHTS_DIR"

# Random-weight architectures for tests and the demo (arguments of clip.model.CLIP).
# `tiny` keeps CLIP's 12-layer depth so every method's default layer indices stay valid on it.
RANDOM_ARCHS = {
    "tiny": dict(embed_dim=64, image_resolution=32, vision_layers=12, vision_width=64,
                 vision_patch_size=8, context_length=77, vocab_size=49408,
                 transformer_width=64, transformer_heads=1, transformer_layers=12),
    "ViT-B/16-random": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                            vision_patch_size=16, context_length=77, vocab_size=49408,
                            transformer_width=512, transformer_heads=8, transformer_layers=12),
    "ViT-B/32-random": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                            vision_patch_size=32, context_length=77, vocab_size=49408,
                            transformer_width=512, transformer_heads=8, transformer_layers=12),
}
RANDOM_ARCH_SEED = 0

# CLIPs pretrained here on the generated demo world (datasets/world.py) by tools/pretrain_clip.py. They are
# OpenAI-format state-dict checkpoints, found and loaded exactly like real weights (same folders, same
# clip.load path); this module only reads them, it never builds one.
WORLD_MODELS = {
    "tiny-world": dict(file="tiny-world.pt", arch=dict(
        embed_dim=64, image_resolution=32, vision_layers=12, vision_width=64, vision_patch_size=8,
        context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1, transformer_layers=12)),
}


def default_weight_dirs():
    dirs = []
    if os.environ.get(WEIGHTS_ENV):
        dirs.append(Path(os.environ[WEIGHTS_ENV]).expanduser())
    dirs.append(Path("~/.cache/clip").expanduser())  # the clip package's own download folder
    return dirs


def resolve_weights_path(name, explicit_path=""):
    """Return the local checkpoint file for an OpenAI CLIP model name, or raise FileNotFoundError."""
    clip = import_clip()
    if name not in clip.clip._MODELS and name not in WORLD_MODELS:
        known = ", ".join(list(clip.clip._MODELS) + list(WORLD_MODELS) + list(RANDOM_ARCHS))
        raise ConfigError(f"unknown CLIP backbone '{name}' (MODEL.BACKBONE.NAME); known: {known}")
    if name in WORLD_MODELS:
        filename = WORLD_MODELS[name]["file"]
    else:
        filename = os.path.basename(clip.clip._MODELS[name])
    if explicit_path:
        candidates = [Path(explicit_path).expanduser()]
    else:
        candidates = [d / filename for d in default_weight_dirs()]
    for path in candidates:
        if path.is_file():
            return path
    looked = "\n  ".join(str(p) for p in candidates)
    if name in WORLD_MODELS:
        raise FileNotFoundError(
            f"CLIP weights for '{name}' not found. Looked in:\n  {looked}\n"
            f"'{name}' is pretrained here on the generated demo world: build it with "
            f"`python -m tools.pretrain_clip --name {name} --out {candidates[0]}` (bash scripts/demo.sh does "
            f"this), or point {WEIGHTS_ENV} / MODEL.BACKBONE.PATH at an existing '{filename}'.")
    raise FileNotFoundError(
        f"CLIP weights for '{name}' not found. Looked in:\n  {looked}\n"
        f"Provide the OpenAI checkpoint '{filename}' by copying it into one of these folders, by setting "
        f"{WEIGHTS_ENV}=/folder/with/checkpoints, or with MODEL.BACKBONE.PATH /path/to/{filename}. "
        f"Training never downloads weights; `bash scripts/prepare_data.sh --weights {name}` fetches them into "
        f"{default_weight_dirs()[0]}. "
        f"For a weight-free run use MODEL.BACKBONE.NAME tiny "
        f"(or ViT-B/16-random).")


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=16)
def _cached_sha256(path, size, mtime_ns):  # size and mtime in the key: a file rewritten in place is hashed again
    return sha256_file(path)


def backbone_identity(name, explicit_path=""):
    """What a run's backbone weights are: ``{"name", "path", "sha256"}``. ``sha256`` is the hash of the weights
    file the run loads (a file re-pretrained or replaced under the same name gets another one); None for a
    random-weight architecture, which is built from a fixed seed. A missing file raises as ``load_clip`` does."""
    if name in RANDOM_ARCHS:
        return {"name": name, "path": "", "sha256": None}
    path = resolve_weights_path(name, explicit_path)
    stat = path.stat()
    return {"name": name, "path": str(path), "sha256": _cached_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)}


def build_random_clip(name):
    clip = import_clip()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_ARCH_SEED)
        model = clip.model.CLIP(**RANDOM_ARCHS[name])
    return model.float()


def read_clip_state_dict(path):
    """The state dict of a CLIP weights file: an OpenAI TorchScript archive (its tensors only; none of its code is
    run) or a ``torch.save``d state dict read with ``weights_only=True``. A truncated, corrupt or untrusted file is a
    one-line ``ConfigError`` naming it."""
    fix = ("replace it with an intact copy (`bash scripts/prepare_data.sh --weights NAME` fetches OpenAI's files) "
           "or point MODEL.BACKBONE.PATH / " + WEIGHTS_ENV + " at one")
    try:
        # clip.load tries the TorchScript archive first too; an archive's code is TorchScript, never Python
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.load. is deprecated", category=DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu").state_dict()
    except (RuntimeError, ValueError):
        pass  # not a TorchScript archive: a plain state dict, or a broken file
    try:
        state = safe_torch_load(str(path), map_location="cpu", what="CLIP weights file")
    except CheckpointError as err:
        raise ConfigError(f"{err}; {fix}") from err.__cause__
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"CLIP weights file {path} does not hold a state dict of tensors; {fix}")
    return state


def build_clip_from_file(path):
    """``clip.load(path, device="cpu", jit=False)`` (float32) through ``read_clip_state_dict``."""
    state = read_clip_state_dict(path)
    try:
        model = import_clip().model.build_model(state)
    except (KeyError, IndexError, RuntimeError, ValueError, AttributeError) as err:
        detail = " ".join(str(err).split())[:160]
        raise ConfigError(f"CLIP weights file {path} does not hold a CLIP model's weights ({type(err).__name__}: "
                          f"{detail}); point MODEL.BACKBONE.PATH / {WEIGHTS_ENV} at OpenAI's file for "
                          f"the backbone") from err
    return model.to("cpu").float()


def load_clip(name, explicit_path=""):
    """Return a float32 CLIP model on the CPU with every parameter frozen."""
    if name in RANDOM_ARCHS:
        model = build_random_clip(name)
    else:
        path = resolve_weights_path(name, explicit_path)
        model = build_clip_from_file(path)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def uses_pretrained_weights(name):
    return name not in RANDOM_ARCHS
