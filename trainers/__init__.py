"""Importing this package registers every trainer (one module per method) and its TRAINER.<NAME> section."""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
