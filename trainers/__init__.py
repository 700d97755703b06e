"""Importing this package registers every trainer and its TRAINER.<NAME> config node."""
from trainers import cocoop, coop, lamp, zsclip  # noqa: F401
