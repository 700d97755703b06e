"""Long-tailed sampling: quota profiles, seeded per-class samplers, head/tail groups, split manifests."""
from .manifest import build_manifest, manifest_hash, read_manifest, write_manifest
from .profiles import check_imb_factor, exp_profile, make_profile, step_profile
from .protocol import ProtocolResult, apply_protocol, cap_splits, get_classnames
from .sampling import (
    cap_per_class,
    class_counts,
    downsample_long_tailed,
    head_tail_groups,
    long_tailed_quotas,
    stage_seed,
    subsample_classes,
)

__all__ = [
    "ProtocolResult", "apply_protocol", "build_manifest", "cap_per_class", "cap_splits",
    "check_imb_factor", "class_counts", "downsample_long_tailed", "exp_profile", "get_classnames",
    "head_tail_groups", "long_tailed_quotas", "make_profile", "manifest_hash", "read_manifest",
    "stage_seed", "step_profile", "subsample_classes", "write_manifest",
]
