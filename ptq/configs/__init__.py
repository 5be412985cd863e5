"""Hydra config tree of ``ptq run`` (presets, models, recipes), read through ``pkg://ptq.configs``."""
