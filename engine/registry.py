"""Name -> class registries (Dassl style): ``@TRAINER_REGISTRY.register()`` on a class registers it under its name."""
from engine.cli import UserError


class RegistryError(UserError, KeyError):
    def __str__(self):
        return str(self.args[0]) if self.args else ""


class Registry:
    def __init__(self, kind):
        self.kind = kind
        self._items = {}

    def register(self, name=None):
        def deco(obj):
            key = name or obj.__name__
            if key in self._items and self._items[key] is not obj:
                raise KeyError(f"{self.kind} '{key}' is registered twice")
            self._items[key] = obj
            return obj

        return deco

    def get(self, name):
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise RegistryError(f"unknown {self.kind} '{name}'; registered: {known}")
        return self._items[name]

    def names(self):
        return sorted(self._items)

    def __contains__(self, name):
        return name in self._items


TRAINER_REGISTRY = Registry("trainer")
DATASET_REGISTRY = Registry("dataset")
