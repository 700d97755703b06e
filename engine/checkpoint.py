"""Atomic file writes: write a temp file in the target's directory, fsync, then ``os.replace``.

A crash mid-write leaves the previous file intact (never a truncated one); the temp file is
removed when writing fails.
"""
import json
import os
import tempfile

from engine.cli import UserError


class CheckpointError(UserError):
    """A checkpoint file that cannot be read (truncated, corrupt, not ours)."""


def _fsync_dir(directory):
    """Persist the rename itself (best effort; not supported on every platform)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_mode():
    """Mode a plain ``open(path, "w")`` would give (mkstemp creates files as 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_write(path, write_fn, binary):
    """Call ``write_fn(file_object)`` on a temp file next to ``path`` and rename it into place."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(directory)
    return path


def atomic_torch_save(obj, path):
    """``torch.save(obj, path)`` without ever leaving a partial file at ``path``."""
    import torch

    return _atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def atomic_write_json(obj, path, indent=2):
    """Write ``obj`` as JSON atomically (serialised before the file is touched)."""
    text = json.dumps(obj, indent=indent) + "\n"
    return _atomic_write(path, lambda f: f.write(text), binary=False)


def atomic_write_text(text, path):
    """Write a string atomically."""
    return _atomic_write(path, lambda f: f.write(text), binary=False)


def numpy_rng_state_to_plain(state):
    """``np.random.get_state()`` as plain types and a tensor (a checkpoint loads with ``weights_only=True``)."""
    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = state
    return (str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached))


def numpy_rng_state_from_plain(state):
    """Inverse of ``numpy_rng_state_to_plain``; a legacy state holding a numpy array passes unchanged."""
    import numpy as np

    name, keys, pos, has_gauss, cached = state
    keys = keys.numpy() if hasattr(keys, "numpy") else np.asarray(keys)
    return (name, keys.astype(np.uint32), pos, has_gauss, cached)


def _numpy_safe_globals():
    """Data-only numpy reconstructors, so that checkpoints written before the RNG state was stored as a tensor
    (a numpy array inside) still load with ``weights_only=True``."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    found = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    found += [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64)]
    return found


def _short(err):
    return " ".join(str(err).split()).split(". ")[0][:160]


def safe_torch_load(path, map_location="cpu", what="file"):
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and containers only; never runs a
    pickled payload. Anything else, and a truncated or corrupt file, is a ``CheckpointError`` naming ``path``."""
    import pickle
    import zipfile

    import torch

    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only load failed" in str(err).lower() or "weights_only" in str(err):
            raise CheckpointError(
                f"{what} {path} holds objects other than tensors and plain data (refused: loading it could run "
                f"code); use a file written by this harness") from err
        raise CheckpointError(f"{what} {path} is truncated or corrupt ({_short(err)})") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, AttributeError, ValueError, KeyError, IndexError,
            TypeError) as err:
        raise CheckpointError(f"{what} {path} is truncated or corrupt ({_short(err)})") from err


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint this harness wrote, loaded with ``weights_only=True`` (trainable state, optimizer and
    scheduler dicts, RNG states: tensors and plain data). A truncated, corrupt or foreign file is a
    ``CheckpointError`` naming it and saying what to do."""
    hint = ("delete it to resume from the previous epoch's checkpoint (or from scratch), or point --model-dir / "
            "--load-epoch at an intact one")
    try:
        ckpt = safe_torch_load(path, map_location=map_location, what="checkpoint")
    except CheckpointError as err:
        raise CheckpointError(f"{err}; {hint}") from err.__cause__
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a checkpoint of this harness (no 'state_dict'); delete it or "
                              f"point --model-dir at a run folder of train.py")
    for key in ("optimizer", "scheduler", "extra", "rng", "history", "scaler"):
        if ckpt.get(key) is not None and not isinstance(ckpt[key], dict):
            raise CheckpointError(f"{path} is not a checkpoint of this harness ('{key}' is a "
                                  f"{type(ckpt[key]).__name__}, not a mapping); {hint}")
    return ckpt
