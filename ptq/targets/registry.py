"""The file targets by name (``export.targets``): one folder each under ``ptq/targets``, one entry here."""

from __future__ import annotations

from ptq.targets.base import FileTarget
from ptq.targets.comfyui import COMFYUI
from ptq.targets.diffusers import DIFFUSERS

TARGETS: dict[str, FileTarget] = {t.name: t for t in (COMFYUI, DIFFUSERS)}


def get_target(name: str) -> FileTarget:
    """The target registered as ``name``; ValueError listing the known names otherwise."""
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown file target {name!r}; expected one of {', '.join(TARGETS)}") from None


__all__ = ["TARGETS", "get_target"]
