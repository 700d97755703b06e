"""What names a run: the folder suffix a variant (extra ``KEY VALUE`` opts) gets.

A run is identified by its folder, and its folder by everything that changes its result. The scripts and
the table launcher put a variant of a config (an ablation, a sweep value, another backbone) into
``<config><variant_tag(opts)>`` so that two variants never share a folder.
"""
import hashlib
import re

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
