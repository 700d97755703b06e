"""Name -> class registries (Dassl style): ``@TRAINER_REGISTRY.register()`` on a class registers it under its name.

A trainer registers with its ``MethodInfo``: everything the run API, the tables and the benchmark need to know
about the method (its configs, what "+LA" means for it, whether it trains, its run-neutral keys, how its
training steps are counted, its benchmark hooks). No tool special-cases a method by name.
"""
from dataclasses import dataclass, field
from typing import Callable, Optional

from engine.cli import UserError

REGIMES = ("b2n", "fewshot", "xd")   # config roles: base-to-new (LT), few-shot base-to-new, transfer (xd and dg)
LA_MODES = ("loss", "own", "refused")


def epochs_times_batches(value, images, classes, dataset):
    """Optimizer steps of an epoch-based training run: OPTIM.MAX_EPOCH x batches per epoch (engine/data.py
    drops the last partial batch when there is at least one full batch). ``value(key, default)`` reads the run's
    resolved config key."""
    batch = int(value("DATALOADER.TRAIN_X.BATCH_SIZE"))
    per_epoch = images // batch if images >= batch else 1
    return int(value("OPTIM.MAX_EPOCH")) * per_epoch


@dataclass(frozen=True)
class MethodInfo:
    """What a method says about itself.

    configs        config name (in configs/trainers/<NAME>/, without .yaml) per regime role in REGIMES; a
                   missing role: the method has no such benchmark (the scripts refuse it)
    imagenet       per regime role, the config used instead when the dataset (b2n / fewshot) is ImageNet
    la             what TRAINER.LOSS la ("+LA") does: "loss" (the logit-adjusted CE replaces its CE), "own"
                   (its loss is already logit-adjusted: la adds nothing) or "refused" (no CE to adjust: an error)
    trains         False for a method with nothing to train (its "training" run only evaluates)
    run_neutral    its config keys that cannot change a result (exact speed-ups): exempt from run identity
    train_steps    ``f(value, images, classes, dataset) -> steps`` for cost estimates (``value(key, default)``
                   reads the resolved config; ``dataset`` is DATASET.NAME)
    bench_prepare  ``f(trainer, batch)`` run once before tools.bench times a step (e.g. to build the features
                   a feature-cache method trains on)
    bench_images_per_backward  ``f(trainer, batch, classes) -> images`` held in one backward pass (a method
                   that micro-batches its step); default: the whole batch
    """
    configs: dict = field(default_factory=dict)
    imagenet: dict = field(default_factory=dict)
    la: str = "loss"
    trains: bool = True
    run_neutral: tuple = ()
    train_steps: Callable = epochs_times_batches
    bench_prepare: Optional[Callable] = None
    bench_images_per_backward: Optional[Callable] = None

    def __post_init__(self):
        unknown = set(self.configs) - set(REGIMES) or set(self.imagenet) - set(REGIMES)
        if unknown:
            raise ValueError(f"MethodInfo: unknown regime role(s) {sorted(unknown)} (known: {REGIMES})")
        if self.la not in LA_MODES:
            raise ValueError(f"MethodInfo.la must be one of {LA_MODES}, got {self.la!r}")

    def config(self, role, dataset=""):
        """The config name for regime role ``role`` on ``dataset`` (its ImageNet variant where it has one);
        None when the method has no config for that role."""
        if dataset == "imagenet" and role in self.imagenet:
            return self.imagenet[role]
        return self.configs.get(role)

    @property
    def default_config(self):
        return self.configs.get("b2n") or next(iter(self.configs.values()), "")


class RegistryError(UserError, KeyError):
    def __str__(self):
        return str(self.args[0]) if self.args else ""


class Registry:
    def __init__(self, kind):
        self.kind = kind
        self._items = {}
        self._aliases = {}   # another code's name -> ours (e.g. MMA's official trainer name)
        self._info = {}

    def alias(self, other, name):
        """Accept ``other`` (an official code's name) for the registered ``name``."""
        self._aliases[other] = name

    def canonical(self, name):
        """Our name for ``name`` (itself unless it is an alias)."""
        return self._aliases.get(name, name)

    def register(self, name=None, info=None):
        """``info``: the entry's ``MethodInfo`` (trainers); a class registered with one gets its
        ``default_config`` file name (tools.bench, tests) from it."""
        def deco(obj):
            key = name or obj.__name__
            if key in self._items and self._items[key] is not obj:
                raise KeyError(f"{self.kind} '{key}' is registered twice")
            self._items[key] = obj
            if info is not None:
                self._info[key] = info
                if info.default_config:
                    obj.default_config = f"{info.default_config}.yaml"
            return obj

        return deco

    def get(self, name):
        name = self.canonical(name)
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise RegistryError(f"unknown {self.kind} '{name}'; registered: {known}")
        return self._items[name]

    def names(self):
        return sorted(self._items)

    def info(self, name):
        """The ``MethodInfo`` of ``name`` (an unknown name is the one-line error of ``get``)."""
        self.get(name)
        return self._info.get(self.canonical(name), MethodInfo())

    def run_neutral_keys(self):
        return {k for info in self._info.values() for k in info.run_neutral}

    def __contains__(self, name):
        return self.canonical(name) in self._items


TRAINER_REGISTRY = Registry("trainer")
DATASET_REGISTRY = Registry("dataset")
