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


def load_checkpoint(path, map_location="cpu"):
    """``torch.load`` of a checkpoint this harness wrote; a truncated or corrupt file is a
    ``CheckpointError`` naming it and saying what to do."""
    import pickle
    import zipfile

    import torch

    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, AttributeError) as err:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({' '.join(str(err).split()).split('. ')[0][:160]}); delete it to "
            f"resume from the previous epoch's checkpoint (or from scratch), or point --model-dir / "
            f"--load-epoch at an intact one") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of this harness (no 'state_dict'); delete it or "
                              f"point --model-dir at a run folder of train.py")
    return ckpt
