"""Name -> class registries (Dassl style): ``@TRAINER_REGISTRY.register()`` on a class registers it under its name."""
from engine.cli import UserError


class RegistryError(UserError, KeyError):
    def __str__(self):
        return str(self.args[0]) if self.args else ""


class Registry:
    def __init__(self, kind):
        self.kind = kind
        self._items = {}
        self._aliases = {}   # another code's name -> ours (e.g. MMA's official trainer name)

    def alias(self, other, name):
        """Accept ``other`` (an official code's name) for the registered ``name``."""
        self._aliases[other] = name

    def canonical(self, name):
        """Our name for ``name`` (itself unless it is an alias)."""
        return self._aliases.get(name, name)

    def register(self, name=None):
        def deco(obj):
            key = name or obj.__name__
            if key in self._items and self._items[key] is not obj:
                raise KeyError(f"{self.kind} '{key}' is registered twice")
            self._items[key] = obj
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

    def __contains__(self, name):
        return self.canonical(name) in self._items


TRAINER_REGISTRY = Registry("trainer")
DATASET_REGISTRY = Registry("dataset")
