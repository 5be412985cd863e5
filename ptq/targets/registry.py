"""The file targets by name (``export.targets``): one folder each under ``ptq/targets``, one entry here."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ptq.targets import checks  # noqa: F401 - registers the checks every loader shares
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


def target_of_file(metadata: Mapping[str, str], keys: Iterable[str], convention: str) -> FileTarget:
    """The first target (registry order) that claims a file: the loader it is meant for."""
    keys = list(keys)
    return next(t for t in TARGETS.values() if t.claims(metadata, keys, convention))


__all__ = ["TARGETS", "get_target", "target_of_file"]
