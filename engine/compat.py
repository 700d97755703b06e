"""Import torchvision / clip on machines whose torchvision wheel does not match the installed torch.

The PyPI torchvision wheel is built against CUDA torch. Paired with a CPU-only torch its compiled ops
fail to register, and ``import torchvision`` dies with ``operator torchvision::nms does not exist``
while registering fake kernels for them. Declaring the two op schemas first lets the pure-Python
parts (transforms, datasets, models) load; ``torchvision.ops`` and ``torchvision.io`` decoding stay
unavailable, which this project does not use (images are decoded with PIL).
The workaround is applied only when the plain import fails.
"""
import importlib
import sys
import warnings

_fragment = None


def _declare_missing_ops():
    global _fragment
    import torch

    if _fragment is None:
        _fragment = torch.library.Library("torchvision", "FRAGMENT")
        _fragment.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _fragment.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def import_torchvision():
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _declare_missing_ops()
    return importlib.import_module("torchvision")


def import_clip():
    """Return the ``clip`` package (clip-anytorch), importing torchvision safely first."""
    import_torchvision()
    with warnings.catch_warnings():
        # clip-anytorch imports pkg_resources (pinned setuptools<81 keeps it); its deprecation notice is noise
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        return importlib.import_module("clip")
