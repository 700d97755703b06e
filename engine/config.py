"""Dassl-compatible yacs configuration: defaults, trainer extensions, merging with clear errors.

Key names and defaults follow Dassl.pytorch (``dassl/config/defaults.py``) so that the config files
of CoOp, CoCoOp and MaPLe load unchanged. Trainer modules add their own section with
``@register_config`` (for example ``cfg.TRAINER.COOP = CN()``). The entry points import the ``trainers``
package (train.py, tools.bench, the tests' conftest) before ``build_cfg``, so every section exists before
files are merged; this module imports nothing above ``engine/``.
"""
import ast
import difflib
import os
import sys

import yaml
from yacs.config import CfgNode as CN

from engine.checkpoint import atomic_write_text
from engine.cli import UserError

# Choices shared with engine/optim.py (kept here so that this module does not need torch).
OPTIMIZERS = ("sgd", "adam", "adamw", "amsgrad", "rmsprop", "radam")
LR_SCHEDULERS = ("single_step", "multi_step", "cosine")
WARMUP_TYPES = ("constant", "linear")
SUBSAMPLE_CHOICES = ("all", "base", "new")
IMB_PROFILES = ("exp", "step")
LOSSES = ("ce", "la")
FINAL_MODELS = ("last_step", "best_val")  # TEST.FINAL_MODEL, Dassl's meaning (engine/trainer.py)
# Names of INPUT.TRANSFORMS understood by engine/data.py (the ones CoOp / CoCoOp / MaPLe configs use, plus a
# few common Dassl ones).
KNOWN_TRANSFORMS = ("random_resized_crop", "random_crop", "random_flip", "center_crop", "normalize",
                    "colorjitter", "randomgrayscale", "gaussian_blur")
INTERPOLATION_NAMES = ("bilinear", "bicubic", "nearest")
PRECISIONS = ("fp32", "fp16", "amp", "bf16")  # TRAINER.<NAME>.PREC (engine/trainer.py)
# (vision blocks, text blocks) of every backbone clip_loader knows, so that layer indices are checked at config
# time, before any weights load (tests/test_declared_keys.py checks this table against clip_loader's archs).
# ResNet backbones have no vision blocks: only text-side indices are checked for them.
BACKBONE_DEPTHS = {
    "ViT-B/32": (12, 12), "ViT-B/16": (12, 12), "ViT-L/14": (24, 12), "ViT-L/14@336px": (24, 12),
    "RN50": (None, 12), "RN101": (None, 12), "RN50x4": (None, 12), "RN50x16": (None, 12), "RN50x64": (None, 12),
    "tiny": (12, 12), "tiny-world": (12, 12), "ViT-B/16-random": (12, 12), "ViT-B/32-random": (12, 12),
}

# Dassl keys of the base config that no code here reads (other Dassl trainers, samplers, heads, evaluators).
# Kept so that Dassl configs load; a value other than the default is refused, naming the key (issue 18 §4).
INERT_KEYS = (
    "VERSION", "VERBOSE",
    "INPUT.CUTOUT_N", "INPUT.CUTOUT_LEN", "INPUT.GN_MEAN", "INPUT.GN_STD", "INPUT.RANDAUGMENT_N",
    "INPUT.RANDAUGMENT_M",
    "DATASET.SOURCE_DOMAINS", "DATASET.TARGET_DOMAINS", "DATASET.NUM_LABELED", "DATASET.VAL_PERCENT",
    "DATASET.STL10_FOLD", "DATASET.CIFAR_C_TYPE", "DATASET.CIFAR_C_LEVEL", "DATASET.ALL_AS_UNLABELED",
    "DATALOADER.K_TRANSFORMS", "DATALOADER.RETURN_IMG0", "DATALOADER.TRAIN_X.SAMPLER", "DATALOADER.TRAIN_X.N_DOMAIN",
    "DATALOADER.TRAIN_X.N_INS", "DATALOADER.TRAIN_U.SAME_AS_X", "DATALOADER.TRAIN_U.SAMPLER",
    "DATALOADER.TRAIN_U.BATCH_SIZE", "DATALOADER.TRAIN_U.N_DOMAIN", "DATALOADER.TRAIN_U.N_INS",
    "DATALOADER.TEST.SAMPLER",
    "MODEL.INIT_WEIGHTS", "MODEL.BACKBONE.PRETRAINED", "MODEL.HEAD.NAME", "MODEL.HEAD.HIDDEN_LAYERS",
    "MODEL.HEAD.ACTIVATION", "MODEL.HEAD.BN", "MODEL.HEAD.DROPOUT",
    "TRAIN.COUNT_ITER",
    "TEST.EVALUATOR", "TEST.PER_CLASS_RESULT", "TEST.COMPUTE_CMAT", "TEST.NO_TEST", "TEST.SPLIT",
)
# INPUT parameters that only act through one of INPUT.TRANSFORMS: set to another value than the default while
# that transform is not listed, they would change nothing, so they are refused.
TRANSFORM_PARAMS = {
    "COLORJITTER_B": "colorjitter", "COLORJITTER_C": "colorjitter", "COLORJITTER_S": "colorjitter",
    "COLORJITTER_H": "colorjitter", "RGS_P": "randomgrayscale", "GB_P": "gaussian_blur", "GB_K": "gaussian_blur",
    "CROP_PADDING": "random_crop", "RRCROP_SCALE": "random_resized_crop",
}

_CONFIG_EXTENSIONS = []
_CONFIG_ALIASES = []  # (old key or section, new key or section, trainer name or None)


class ConfigError(UserError, ValueError):
    """A config file, command-line option or value that cannot be used."""


def register_config(fn):
    """Decorator: ``fn(cfg)`` adds trainer-specific nodes to every default config."""
    if fn not in _CONFIG_EXTENSIONS:
        _CONFIG_EXTENSIONS.append(fn)
    return fn


def register_config_alias(mapping, trainer=None):
    """Accept an official code's key names for ours: ``{"TRAINER.MMADAPTER": "TRAINER.MMA"}`` maps a section
    (every key under it), ``{"TRAINER.COOP.W": "TRAINER.TCP.KG_WEIGHT"}`` one key. With ``trainer`` the
    mapping applies only to runs of that trainer. Each mapped key is reported by a one-line notice."""
    for old, new in mapping.items():
        entry = (old, new, trainer)
        if entry not in _CONFIG_ALIASES:
            _CONFIG_ALIASES.append(entry)


def _aliased(full_key, source, trainer):
    for old, new, only in _CONFIG_ALIASES:
        if (only is None or only == trainer) and (full_key == old or full_key.startswith(old + ".")):
            mapped = new + full_key[len(old):]
            print(f"note: config key {full_key} (from {source}) is read as {mapped}", file=sys.stderr)
            return mapped
    return full_key


def _flatten(data, prefix=""):
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _apply_aliases(data, source, trainer):
    """The nested mapping ``data`` with aliased keys renamed (order kept)."""
    if not _CONFIG_ALIASES:
        return data
    out = {}
    for full_key, value in _flatten(data):
        node = out
        parts = _aliased(full_key, source, trainer).split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {full_key} (from {source}) clashes with a value at {part}")
        node[parts[-1]] = value
    return out


def _base_defaults():
    _C = CN()
    _C.VERSION = 1
    _C.OUTPUT_DIR = "./output"
    _C.RESUME = ""
    _C.SEED = -1  # negative: not fixed
    _C.USE_CUDA = True
    _C.VERBOSE = True

    # ---------------- Input
    _C.INPUT = CN()
    _C.INPUT.SIZE = (224, 224)
    _C.INPUT.INTERPOLATION = "bilinear"
    _C.INPUT.TRANSFORMS = ()
    _C.INPUT.NO_TRANSFORM = False
    _C.INPUT.PIXEL_MEAN = [0.485, 0.456, 0.406]
    _C.INPUT.PIXEL_STD = [0.229, 0.224, 0.225]
    _C.INPUT.CROP_PADDING = 4
    _C.INPUT.RRCROP_SCALE = (0.08, 1.0)
    _C.INPUT.CUTOUT_N = 1
    _C.INPUT.CUTOUT_LEN = 16
    _C.INPUT.GN_MEAN = 0.0
    _C.INPUT.GN_STD = 0.15
    _C.INPUT.RANDAUGMENT_N = 2
    _C.INPUT.RANDAUGMENT_M = 10
    _C.INPUT.COLORJITTER_B = 0.4
    _C.INPUT.COLORJITTER_C = 0.4
    _C.INPUT.COLORJITTER_S = 0.4
    _C.INPUT.COLORJITTER_H = 0.1
    _C.INPUT.RGS_P = 0.2
    _C.INPUT.GB_P = 0.5
    _C.INPUT.GB_K = 21

    # ---------------- Dataset
    _C.DATASET = CN()
    _C.DATASET.ROOT = ""
    _C.DATASET.NAME = ""
    _C.DATASET.SOURCE_DOMAINS = ()
    _C.DATASET.TARGET_DOMAINS = ()
    _C.DATASET.NUM_LABELED = -1
    _C.DATASET.NUM_SHOTS = -1  # per-class cap; -1 keeps every image
    _C.DATASET.VAL_PERCENT = 0.1
    _C.DATASET.STL10_FOLD = -1
    _C.DATASET.CIFAR_C_TYPE = ""
    _C.DATASET.CIFAR_C_LEVEL = 1
    _C.DATASET.ALL_AS_UNLABELED = False
    _C.DATASET.SUBSAMPLE_CLASSES = "all"  # all | base | new (CoOp's base-to-new split)
    # This project: long-tailed training sets.
    _C.DATASET.IMB_FACTOR = 1.0  # n_max / n_min; 1 = balanced, 10 = the paper's "imb 10"
    _C.DATASET.IMB_PROFILE = "exp"  # exp | step
    _C.DATASET.STEP_HEAD_FRACTION = 0.5  # step profile: fraction of classes kept at n_max
    _C.DATASET.HEAD_FRACTION = 0.2  # evaluation: top fraction of classes reported as "head"
    _C.DATASET.CACHE_DIR = ""  # "" = under the run's output dir

    # ---------------- Dataloader
    _C.DATALOADER = CN()
    _C.DATALOADER.NUM_WORKERS = 4
    _C.DATALOADER.K_TRANSFORMS = 1
    _C.DATALOADER.RETURN_IMG0 = False
    _C.DATALOADER.TRAIN_X = CN()
    _C.DATALOADER.TRAIN_X.SAMPLER = "RandomSampler"
    _C.DATALOADER.TRAIN_X.BATCH_SIZE = 32
    _C.DATALOADER.TRAIN_X.N_DOMAIN = 0
    _C.DATALOADER.TRAIN_X.N_INS = 16
    _C.DATALOADER.TRAIN_U = CN()
    _C.DATALOADER.TRAIN_U.SAME_AS_X = True
    _C.DATALOADER.TRAIN_U.SAMPLER = "RandomSampler"
    _C.DATALOADER.TRAIN_U.BATCH_SIZE = 32
    _C.DATALOADER.TRAIN_U.N_DOMAIN = 0
    _C.DATALOADER.TRAIN_U.N_INS = 16
    _C.DATALOADER.TEST = CN()
    _C.DATALOADER.TEST.SAMPLER = "SequentialSampler"
    _C.DATALOADER.TEST.BATCH_SIZE = 32

    # ---------------- Model
    _C.MODEL = CN()
    _C.MODEL.INIT_WEIGHTS = ""
    _C.MODEL.BACKBONE = CN()
    _C.MODEL.BACKBONE.NAME = ""
    _C.MODEL.BACKBONE.PRETRAINED = True
    _C.MODEL.BACKBONE.PATH = ""  # this project: explicit CLIP weights file
    _C.MODEL.HEAD = CN()
    _C.MODEL.HEAD.NAME = ""
    _C.MODEL.HEAD.HIDDEN_LAYERS = ()
    _C.MODEL.HEAD.ACTIVATION = "relu"
    _C.MODEL.HEAD.BN = True
    _C.MODEL.HEAD.DROPOUT = 0.0
    # This project: exact speed-ups of the prompt-aware CLIP encoder (engine/prompted_clip.py).
    _C.MODEL.TRUNCATE_TEXT = True  # drop text tokens after the last EOT (exact under the causal mask)
    _C.MODEL.TEXT_PREFIX_CACHE = True  # cache text layers that no prompt touches
    # BOT, prompts and shared template words computed once per image (or once), class tokens per sequence;
    # last text block at EOT only (exact; False = every position of every sequence, for comparison)
    _C.MODEL.SHARED_TEXT_PREFIX = True
    # the last vision block at the cls position only when nothing else of it is read: exact in arithmetic, not in
    # round-off (other GEMM shapes), so opt-in: every method's default numerics stay those of the official code
    _C.MODEL.CLS_ONLY_LAST_VISION_BLOCK = False
    # likewise opt-in: a vision block whose prompt outputs the method replaces before the next block computes
    # only their keys and values (LAMP's prompts at every LAMP layer but the last)
    _C.MODEL.SKIP_REPLACED_PROMPT_OUTPUTS = False
    # torch.compile every block's MLP branch (one compiled function shared by all blocks of both towers):
    # elementwise work fused, round-off differs slightly, the first steps pay the compile; opt-in
    _C.MODEL.COMPILE_MLP = False

    # ---------------- Optimization
    _C.OPTIM = CN()
    _C.OPTIM.NAME = "adam"
    _C.OPTIM.LR = 0.0003
    _C.OPTIM.WEIGHT_DECAY = 5e-4
    _C.OPTIM.MOMENTUM = 0.9
    _C.OPTIM.SGD_DAMPNING = 0
    _C.OPTIM.SGD_NESTEROV = False
    _C.OPTIM.RMSPROP_ALPHA = 0.99
    _C.OPTIM.ADAM_BETA1 = 0.9
    _C.OPTIM.ADAM_BETA2 = 0.999
    _C.OPTIM.ADAM_EPS = 1e-8  # this project
    _C.OPTIM.STAGED_LR = False
    _C.OPTIM.NEW_LAYERS = ()
    _C.OPTIM.BASE_LR_MULT = 0.1
    _C.OPTIM.LR_SCHEDULER = "single_step"
    _C.OPTIM.STEPSIZE = (-1,)  # -1 or 0: step size = MAX_EPOCH
    _C.OPTIM.GAMMA = 0.1
    _C.OPTIM.MAX_EPOCH = 10
    _C.OPTIM.WARMUP_EPOCH = -1  # > 0 activates warmup
    _C.OPTIM.WARMUP_TYPE = "linear"  # linear | constant
    _C.OPTIM.WARMUP_CONS_LR = 1e-5
    _C.OPTIM.WARMUP_MIN_LR = 1e-5
    _C.OPTIM.WARMUP_RECOUNT = True

    # ---------------- Train / test
    _C.TRAIN = CN()
    _C.TRAIN.CHECKPOINT_FREQ = 0
    _C.TRAIN.PRINT_FREQ = 10
    _C.TRAIN.COUNT_ITER = "train_x"
    _C.TEST = CN()
    _C.TEST.EVALUATOR = "Classification"
    _C.TEST.PER_CLASS_RESULT = False
    _C.TEST.COMPUTE_CMAT = False
    _C.TEST.NO_TEST = False
    _C.TEST.SPLIT = "test"
    _C.TEST.FINAL_MODEL = "last_step"

    # ---------------- Trainer
    _C.TRAINER = CN()
    _C.TRAINER.NAME = ""
    _C.TRAINER.LOSS = "ce"  # ce | la (logit-adjusted; docs/methods/README.md)
    _C.TRAINER.LA_TAU = 1.0
    return _C


# ------------------------------------------------------------------------------- declared trainer keys

_DECLARED = {}  # "TRAINER.MMLOP" -> (rules {key: Rule}, relations [fn(section, cfg) -> message or None], module)


class Rule:
    """The valid values of one declared key. ``problem(value, cfg)`` returns what is wrong (a phrase such as
    "must be >= 1") or None; ``bad_examples(cfg)`` gives values outside the range (for the tests)."""

    def problem(self, value, cfg):
        return None

    def bad_examples(self, cfg):
        return []


class Int(Rule):
    """An integer in [low, high] (either end may be None)."""

    def __init__(self, low=None, high=None, also=()):
        self.low, self.high, self.also = low, high, tuple(also)

    def problem(self, value, cfg):
        if isinstance(value, bool) or not isinstance(value, int):
            return "must be an integer"
        if value in self.also:
            return None
        if self.low is not None and value < self.low:
            return f"must be >= {self.low}" + (f" (or {' / '.join(map(str, self.also))})" if self.also else "")
        if self.high is not None and value > self.high:
            return f"must be <= {self.high}"
        return None

    def bad_examples(self, cfg):
        out = [] if self.low is None else [v for v in (self.low - 1, self.low - 25) if v not in self.also][:1]
        return out + ([] if self.high is None else [self.high + 1])


class Float(Rule):
    """A number in [low, high]; ``open_low`` / ``open_high`` exclude the ends."""

    def __init__(self, low=None, high=None, open_low=False, open_high=False, also=()):
        self.low, self.high, self.open_low, self.open_high, self.also = low, high, open_low, open_high, tuple(also)

    def problem(self, value, cfg):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number"
        if value != value:
            return "must be a number (got nan)"
        if value in self.also:
            return None
        low_ok = self.low is None or (value > self.low if self.open_low else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.open_high else value <= self.high)
        if low_ok and high_ok:
            return None
        lo = "" if self.low is None else ("(" if self.open_low else "[") + f"{self.low}, "
        hi = "" if self.high is None else f"{self.high}" + (")" if self.open_high else "]")
        if self.high is None:
            text = f"must be {'>' if self.open_low else '>='} {self.low}"
        elif self.low is None:
            text = f"must be {'<' if self.open_high else '<='} {self.high}"
        else:
            text = f"must be in {lo}{hi}"
        return text + (f" (or {' / '.join(map(str, self.also))})" if self.also else "")

    def bad_examples(self, cfg):
        out = []
        if self.low is not None:
            out.append(self.low if self.open_low else self.low - 1.0)
            out.append(self.low - 25.0)
        if self.high is not None:
            out.append(self.high if self.open_high else self.high + 0.5)
        return [v for v in out if v not in self.also]


class Bool(Rule):
    def problem(self, value, cfg):
        return None if isinstance(value, bool) else "must be True or False"


class Str(Rule):
    """Free text (a prompt phrase, for example)."""

    def problem(self, value, cfg):
        return None if isinstance(value, str) else "must be a string"


class Choice(Rule):
    def __init__(self, *choices):
        self.choices = tuple(choices)

    def problem(self, value, cfg):
        return None if value in self.choices else f"must be one of {list(self.choices)}"

    def bad_examples(self, cfg):
        return ["no_such_choice"]


def _depth(cfg, tower):
    """Number of blocks of the configured backbone on ``tower`` ("vision", "text" or "both": the smaller), or
    None when the backbone is not in BACKBONE_DEPTHS (it is then checked once the model is built)."""
    vision, text = BACKBONE_DEPTHS.get(cfg.MODEL.BACKBONE.NAME, (None, None))
    if tower == "text":
        return text
    if tower == "vision":
        return vision
    return None if vision is None or text is None else min(vision, text)


class Block(Rule):
    """A block index (1-indexed) of the backbone's ``tower``; ``depth`` True: a number of blocks (same range)."""

    def __init__(self, tower="both"):
        self.tower = tower

    def problem(self, value, cfg):
        if isinstance(value, bool) or not isinstance(value, int):
            return "must be an integer block index"
        n = _depth(cfg, self.tower)
        if value < 1 or (n is not None and value > n):
            return f"must be in 1..{n if n is not None else 'depth'} (blocks of backbone {cfg.MODEL.BACKBONE.NAME})"
        return None

    def bad_examples(self, cfg):
        return [0, (_depth(cfg, self.tower) or 12) + 1]


class Blocks(Rule):
    """A list of distinct block indices (1-indexed) of the backbone's ``tower``; ``empty_ok``: [] allowed."""

    def __init__(self, tower="both", empty_ok=False):
        self.tower, self.empty_ok = tower, empty_ok

    def problem(self, value, cfg):
        if not isinstance(value, (list, tuple)):
            return "must be a list of block indices"
        if not value:
            return None if self.empty_ok else "must name at least one block"
        n = _depth(cfg, self.tower)
        if any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            return "must be a list of integer block indices"
        if len(set(value)) != len(value):
            return "must not repeat a block"
        if min(value) < 1 or (n is not None and max(value) > n):
            return f"must be distinct block indices in 1..{n if n is not None else 'depth'} (backbone {cfg.MODEL.BACKBONE.NAME})"
        return None

    def bad_examples(self, cfg):
        n = _depth(cfg, self.tower) or 12
        return [[0], [1, n + 1], [2, 2]] + ([] if self.empty_ok else [[]])


class PerDataset(Rule):
    """A list of "DatasetName:value" entries whose values pass ``value_rule``."""

    def __init__(self, value_rule):
        self.value_rule = value_rule

    def problem(self, value, cfg):
        if not isinstance(value, (list, tuple)):
            return "must be a list of 'DatasetName:value' entries"
        for entry in value:
            name, sep, raw = str(entry).rpartition(":")
            if not sep or not name:
                return f"entries must look like 'DatasetName:value', got {entry!r}"
            try:
                number = ast.literal_eval(raw.strip())
            except (ValueError, SyntaxError):
                return f"entry {entry!r} has no number after ':'"
            why = self.value_rule.problem(number, cfg)
            if why:
                return f"entry {entry!r}: the value {why}"
        return None

    def bad_examples(self, cfg):
        return [["no colon"], ["*:"]] + [[f"*:{v}"] for v in self.value_rule.bad_examples(cfg)[:1]]


def declare_keys(cfg, section, relations=(), **rules):
    """Declare the valid values of every key of ``section`` (e.g. "TRAINER.MMLOP"), next to the defaults in the
    trainer's ``@register_config`` function; ``build_cfg`` checks them before CLIP loads, naming the key, the
    value and the trainer module. ``relations`` are checks across keys: ``fn(section_node, cfg)`` returning
    None or a message that starts with a key of the section (the section is prefixed). Every key of the section must be declared."""
    node = cfg
    for part in section.split("."):
        node = node[part]
    missing = [k for k in node if k not in rules and not isinstance(node[k], CN)]
    unknown = [k for k in rules if k not in node]
    if missing or unknown:
        raise RuntimeError(f"declare_keys({section}): undeclared keys {missing}, declared keys that do not exist "
                           f"{unknown}")
    module = sys._getframe(1).f_globals.get("__name__", "?")
    _DECLARED[section] = (dict(rules), list(relations), module)


def declared_sections():
    """{section: (rules, relations, module)} of every ``declare_keys`` call so far (for tests and docs)."""
    return dict(_DECLARED)


def check_declared(cfg):
    """Check every declared key against its rule, and each section's relations; the first failure is a
    ``ConfigError`` naming the key, the value and where the rule is declared."""
    for section, (rules, relations, module) in _DECLARED.items():
        node = cfg
        try:
            for part in section.split("."):
                node = node[part]
        except KeyError:
            continue
        where = module.replace(".", "/") + ".py"
        for key, rule in rules.items():
            if key not in node:
                continue
            why = rule.problem(node[key], cfg)
            if why:
                raise ConfigError(f"{section}.{key} {why}, got {node[key]!r} (declared in {where})")
        for relation in relations:
            why = relation(node, cfg)
            if why:
                raise ConfigError(f"{section}.{why} (declared in {where})")


def get_cfg_default():
    """A fresh default config, including every section registered with ``register_config``."""
    cfg = _base_defaults()
    for fn in _CONFIG_EXTENSIONS:
        fn(cfg)
    return cfg


# ------------------------------------------------------------------------------------- merging


def _decode(value):
    """Strings are parsed as Python literals when possible (yacs convention: '1e-5' -> 1e-05)."""
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def _coerce(value, default, key, source):
    """Match ``value`` to the type of ``default`` (list<->tuple and int->float are allowed)."""
    if default is None or type(value) is type(default):
        return value
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, str) and value is False:
        # Dassl configs write "no init phrase" as False (e.g. TCP's CTX_INIT: False); the code tests truthiness.
        print(f"note: config key {key} (from {source}) False is read as \"\" (empty)", file=sys.stderr)
        return ""
    raise ConfigError(
        f"type mismatch for config key {key} (from {source}): expected {type(default).__name__}, "
        f"got {value!r} ({type(value).__name__})"
    )


def _unknown_key(node, key, full_key, source):
    msg = f"unknown config key {full_key} (from {source})"
    close = difflib.get_close_matches(key, list(node.keys()), n=1)
    if close:
        prefix = full_key[: len(full_key) - len(key)]
        msg += f"; did you mean {prefix}{close[0]}?"
    if full_key.startswith("TRAINER."):
        msg += (
            "; trainer-specific sections are added by the trainer module's @register_config "
            "(is that trainer implemented and imported?)"
        )
    return ConfigError(msg)


def _merge_dict(node, data, source, prefix=""):
    for key, value in data.items():
        full_key = prefix + str(key)
        if key not in node:
            raise _unknown_key(node, str(key), full_key, source)
        current = node[key]
        if isinstance(current, CN):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"config key {full_key} (from {source}) is a section; expected a mapping, "
                    f"got {value!r}"
                )
            _merge_dict(current, value, source, full_key + ".")
        else:
            if isinstance(value, dict):
                raise ConfigError(
                    f"config key {full_key} (from {source}) is a value, not a section; got a mapping"
                )
            node[key] = _coerce(_decode(value), current, full_key, source)


def yaml_error_parts(err):
    """(line, column, problem) of a ``yaml.YAMLError``: 1-based position (None when unknown) and the problem on
    one line."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or getattr(err, "context", None) or str(err)
    line, column = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
    return line, column, " ".join(str(problem).split())


def load_yaml(path, what="yaml file"):
    """``yaml.safe_load`` of a file (plain data only: no tag builds a Python object). A file that does not parse is
    a one-line ``ConfigError`` naming it (and the line); an empty file is None."""
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as err:
        line, _, problem = yaml_error_parts(err)
        where = f" line {line}" if line is not None else ""
        raise ConfigError(f"cannot parse {what} {path}{where}: {problem}") from err


BASE_KEY = "_BASE_"


def _deep_merge(base, over):
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_config_file(path, _chain=()):
    """The mapping a config file resolves to (detectron2-style inheritance): ``_BASE_: other.yaml`` (a path
    relative to this file, or a list of them, merged in order) is read first and this file's keys are merged
    over it, section by section. None for an empty file without a base."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}" + (f" (the {BASE_KEY} of {_chain[-1]})" if _chain else ""))
    if path in _chain:
        raise ConfigError(f"config file {path} inherits from itself: {' -> '.join(_chain + (path,))}")
    data = load_yaml(path, "config file")
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not bases or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"config file {path}: {BASE_KEY} must be a file name or a list of file names "
                          f"(relative to the file), got {bases!r}")
    merged = {}
    for base in bases:
        merged = _deep_merge(merged, read_config_file(os.path.join(os.path.dirname(path), base),
                                                      _chain + (path,)) or {})
    return _deep_merge(merged, data)


def merge_from_file(cfg, path, trainer=None):
    """Merge a yaml file (and the files it names as ``_BASE_``) into ``cfg``; errors name the file and the full
    dotted key. Keys of official configs registered with ``register_config_alias`` are renamed first
    (``trainer``: the run's trainer name)."""
    data = read_config_file(path)
    if data is None:
        return cfg
    if trainer is None and isinstance(data.get("TRAINER"), dict):
        trainer = data["TRAINER"].get("NAME")
    _merge_dict(cfg, _apply_aliases(data, path, trainer or cfg.TRAINER.NAME), path)
    return cfg


def merge_from_list(cfg, opts, source="command line opts", trainer=None):
    """Merge trailing ``KEY VALUE`` pairs (e.g. ``OPTIM.LR 0.01``)."""
    opts = list(opts or [])
    if len(opts) % 2 != 0:
        raise ConfigError(
            f"{source} must be KEY VALUE pairs, got an odd number of items ({len(opts)}): {opts}"
        )
    for full_key, value in zip(opts[0::2], opts[1::2]):
        full_key = _aliased(str(full_key), source, trainer or cfg.TRAINER.NAME)
        parts = str(full_key).split(".")
        node = cfg
        for i, part in enumerate(parts):
            if not isinstance(node, CN) or part not in node:
                parent = node if isinstance(node, CN) else CN()
                raise _unknown_key(parent, part, full_key, source)
            if i < len(parts) - 1:
                node = node[part]
        if isinstance(node[parts[-1]], CN):
            raise ConfigError(f"config key {full_key} (from {source}) is a section, not a value")
        node[parts[-1]] = _coerce(_decode(value), node[parts[-1]], full_key, source)
    return cfg


def build_cfg(args):
    """Defaults -> dataset yaml -> trainer yaml -> CLI flags -> opts; validated and frozen.

    ``args`` may be an argparse namespace with: root, seed, trainer, config_file,
    dataset_config_file, output_dir, opts (optionally resume, backbone, head, source_domains,
    target_domains, transforms as in CoOp's train.py). Missing or empty attributes are skipped;
    a negative seed means "not given" (CoOp's CLI default is -1).
    """
    cfg = get_cfg_default()

    def arg(name):
        return getattr(args, name, None)

    trainer = arg("trainer") or None
    if trainer:  # an official code's trainer name (e.g. MultiModalAdapter) is read as ours (MMA)
        from engine.registry import TRAINER_REGISTRY
        ours = TRAINER_REGISTRY.canonical(trainer)
        if ours != trainer:
            print(f"note: trainer {trainer} is read as {ours}", file=sys.stderr)
            trainer = ours
    if arg("dataset_config_file"):
        merge_from_file(cfg, arg("dataset_config_file"), trainer)
    if arg("config_file"):
        merge_from_file(cfg, arg("config_file"), trainer)

    if arg("root"):
        cfg.DATASET.ROOT = arg("root")
    if arg("output_dir"):
        cfg.OUTPUT_DIR = arg("output_dir")
    if arg("resume"):
        cfg.RESUME = arg("resume")
    if arg("seed") is not None and arg("seed") >= 0:
        cfg.SEED = int(arg("seed"))
    if trainer:
        cfg.TRAINER.NAME = trainer
    if arg("backbone"):
        cfg.MODEL.BACKBONE.NAME = arg("backbone")
    if arg("head"):
        cfg.MODEL.HEAD.NAME = arg("head")
    if arg("source_domains"):
        cfg.DATASET.SOURCE_DOMAINS = tuple(arg("source_domains"))
    if arg("target_domains"):
        cfg.DATASET.TARGET_DOMAINS = tuple(arg("target_domains"))
    if arg("transforms"):
        cfg.INPUT.TRANSFORMS = tuple(arg("transforms"))

    merge_from_list(cfg, arg("opts"), trainer=trainer)
    validate_cfg(cfg)
    cfg.freeze()
    return cfg


def _same(a, b):
    norm = (lambda v: list(v) if isinstance(v, (list, tuple)) else v)
    return norm(a) == norm(b)


def check_inert(cfg):
    """Refuse a value other than the default for the keys no code here reads (INERT_KEYS), for transform
    parameters whose transform is not listed, and for RESUME pointing elsewhere than OUTPUT_DIR."""
    defaults = _base_defaults()
    for full_key in INERT_KEYS:
        node, default = cfg, defaults
        for part in full_key.split("."):
            node, default = node[part], default[part]
        if not _same(node, default):
            raise ConfigError(f"{full_key} is a Dassl key that no method of this harness reads, so {node!r} would "
                              f"change nothing; remove it (or set its default {default!r})")
    inp = cfg.INPUT
    if not inp.NO_TRANSFORM:
        for key, transform in TRANSFORM_PARAMS.items():
            if not _same(inp[key], defaults.INPUT[key]) and transform not in inp.TRANSFORMS:
                raise ConfigError(f"INPUT.{key} {inp[key]!r} acts through the {transform} transform, which "
                                  f"INPUT.TRANSFORMS {list(inp.TRANSFORMS)} does not list; add it or remove INPUT.{key}")
    if cfg.RESUME and os.path.abspath(os.path.expanduser(cfg.RESUME)) != os.path.abspath(
            os.path.expanduser(cfg.OUTPUT_DIR)):
        raise ConfigError(f"RESUME / --resume {cfg.RESUME}: a run resumes from its own --output-dir "
                          f"({cfg.OUTPUT_DIR}); pass --output-dir {cfg.RESUME} to continue that run")


def validate_cfg(cfg):
    """Reject impossible settings with a message naming the key, the value and what is expected."""

    def choice(key, value, choices):
        if value not in choices:
            raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")

    def at_least(key, value, low):
        if value < low:
            raise ConfigError(f"{key} must be >= {low}, got {value}")

    def between(key, value, low, high, what):
        if not low <= value <= high:
            raise ConfigError(f"{key} must be {what}, got {value}")

    d, o, inp = cfg.DATASET, cfg.OPTIM, cfg.INPUT
    if d.NUM_SHOTS == 0 or d.NUM_SHOTS < -1:
        raise ConfigError(f"DATASET.NUM_SHOTS must be >= 1 (the per-class cap) or -1 (all images), got {d.NUM_SHOTS}")
    size = inp.SIZE
    if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        raise ConfigError(f"INPUT.SIZE must be two positive integers (height, width), e.g. \"(224, 224)\", "
                          f"got {tuple(size)!r}")
    choice("INPUT.INTERPOLATION", inp.INTERPOLATION, INTERPOLATION_NAMES)
    unknown = [t for t in inp.TRANSFORMS if t not in KNOWN_TRANSFORMS]
    if unknown:
        raise ConfigError(f"unknown INPUT.TRANSFORMS {unknown}; supported: {list(KNOWN_TRANSFORMS)}")
    scale = tuple(inp.RRCROP_SCALE)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"INPUT.RRCROP_SCALE must be (low, high) with 0 < low <= high <= 1, got {scale}")
    for key in ("PIXEL_MEAN", "PIXEL_STD"):
        if len(inp[key]) != 3:
            raise ConfigError(f"INPUT.{key} must have 3 values (R, G, B), got {list(inp[key])}")
    if min(inp.PIXEL_STD) <= 0:
        raise ConfigError(f"INPUT.PIXEL_STD must be > 0, got {list(inp.PIXEL_STD)}")
    if o.LR <= 0:
        raise ConfigError(f"OPTIM.LR must be > 0, got {o.LR}")
    at_least("OPTIM.WEIGHT_DECAY", o.WEIGHT_DECAY, 0)
    for key in ("MOMENTUM", "ADAM_BETA1", "ADAM_BETA2", "RMSPROP_ALPHA"):
        if not 0 <= o[key] < 1:
            raise ConfigError(f"OPTIM.{key} must be in [0, 1), got {o[key]}")
    if o.ADAM_EPS <= 0:
        raise ConfigError(f"OPTIM.ADAM_EPS must be > 0, got {o.ADAM_EPS}")
    if o.GAMMA <= 0:
        raise ConfigError(f"OPTIM.GAMMA must be > 0, got {o.GAMMA}")
    at_least("OPTIM.WARMUP_CONS_LR", o.WARMUP_CONS_LR, 0)
    at_least("OPTIM.WARMUP_MIN_LR", o.WARMUP_MIN_LR, 0)
    at_least("DATALOADER.NUM_WORKERS", cfg.DATALOADER.NUM_WORKERS, 0)
    at_least("TRAIN.PRINT_FREQ", cfg.TRAIN.PRINT_FREQ, 1)
    at_least("TRAIN.CHECKPOINT_FREQ", cfg.TRAIN.CHECKPOINT_FREQ, 0)
    between("DATASET.VAL_PERCENT", d.VAL_PERCENT, 0, 1, "in [0, 1]")
    if d.IMB_FACTOR < 1:
        raise ConfigError(
            f"DATASET.IMB_FACTOR must be >= 1, got {d.IMB_FACTOR}: it is the imbalance ratio "
            "n_max / n_min (1 = balanced, 10 = the paper's imb 10). Candle's IMBALANCE_RATIO 0.1 "
            "corresponds to IMB_FACTOR 10."
        )
    choice("DATASET.SUBSAMPLE_CLASSES", d.SUBSAMPLE_CLASSES, SUBSAMPLE_CHOICES)
    choice("DATASET.IMB_PROFILE", d.IMB_PROFILE, IMB_PROFILES)
    for key in ("STEP_HEAD_FRACTION", "HEAD_FRACTION"):
        if not 0 < d[key] < 1:
            raise ConfigError(f"DATASET.{key} must be strictly between 0 and 1, got {d[key]}")
    choice("TRAINER.LOSS", cfg.TRAINER.LOSS, LOSSES)
    choice("TEST.FINAL_MODEL", cfg.TEST.FINAL_MODEL, FINAL_MODELS)
    if cfg.TRAINER.LA_TAU < 0:
        raise ConfigError(f"TRAINER.LA_TAU must be >= 0, got {cfg.TRAINER.LA_TAU}")
    if o.MAX_EPOCH < 1:
        raise ConfigError(f"OPTIM.MAX_EPOCH must be >= 1, got {o.MAX_EPOCH}")
    for loader in ("TRAIN_X", "TRAIN_U", "TEST"):
        bs = cfg.DATALOADER[loader].BATCH_SIZE
        if bs < 1:
            raise ConfigError(f"DATALOADER.{loader}.BATCH_SIZE must be >= 1, got {bs}")
    choice("OPTIM.NAME", o.NAME, OPTIMIZERS)
    choice("OPTIM.LR_SCHEDULER", o.LR_SCHEDULER, LR_SCHEDULERS)
    choice("OPTIM.WARMUP_TYPE", o.WARMUP_TYPE, WARMUP_TYPES)
    check_declared(cfg)
    check_inert(cfg)
    if isinstance(inp.GB_K, bool) or not isinstance(inp.GB_K, int) or inp.GB_K < 1 or inp.GB_K % 2 == 0:
        raise ConfigError(f"INPUT.GB_K (the gaussian_blur kernel size) must be an odd integer >= 1, got {inp.GB_K!r}")
    for key in ("GB_P", "RGS_P"):
        between(f"INPUT.{key}", inp[key], 0, 1, "a probability in [0, 1]")
    for key in ("COLORJITTER_B", "COLORJITTER_C", "COLORJITTER_S"):
        at_least(f"INPUT.{key}", inp[key], 0)
    between("INPUT.COLORJITTER_H", inp.COLORJITTER_H, 0, 0.5, "in [0, 0.5]")
    at_least("INPUT.CROP_PADDING", inp.CROP_PADDING, 0)
    if o.WARMUP_EPOCH >= o.MAX_EPOCH:
        raise ConfigError(
            f"OPTIM.WARMUP_EPOCH ({o.WARMUP_EPOCH}) covers every epoch (OPTIM.MAX_EPOCH {o.MAX_EPOCH}): the run would "
            f"only see the warm-up lr and learn (almost) nothing; set OPTIM.WARMUP_EPOCH 0 or raise OPTIM.MAX_EPOCH")
    return cfg


def dump_cfg(cfg, path):
    """Write the fully resolved config as yaml, atomically."""
    atomic_write_text(cfg.dump(), path)
