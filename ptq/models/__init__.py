"""Model adapters: one folder per model family, selected by the ``model.adapter`` key.

:data:`ADAPTERS` is the registry (name -> ``module:Class``, imported on first use so that file tools stay fast).
A new model family is one new folder with a :class:`~ptq.models.base.ModelAdapter` subclass plus one line here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from ptq.models.base import ModelAdapter
    from ptq.models.files import FileFamily

ADAPTERS: dict[str, str] = {
    "wan": "ptq.models.wan.adapter:WanAdapter",
    "tiny_wan": "ptq.models.tiny_wan.adapter:TinyWanAdapter",
    "wan22_a14b": "ptq.models.wan.a14b:WanA14BAdapter",
    "tiny_wan_moe": "ptq.models.tiny_wan.moe_adapter:TinyWanMoEAdapter",
}


def get_adapter(name: str) -> type[ModelAdapter]:
    """The adapter class registered as ``name``; ValueError listing the known names otherwise."""
    try:
        module, cls = ADAPTERS[name].split(":")
    except KeyError:
        raise ValueError(f"model.adapter={name!r}: expected one of {', '.join(ADAPTERS)}") from None
    return getattr(importlib.import_module(module), cls)


def file_families() -> list[FileFamily]:
    """The distinct checkpoint views of the registered families (:attr:`ModelAdapter.file_family`), in registry
    order; ``ptq inspect`` takes the first that recognises a file."""
    out: list[FileFamily] = []
    for key in ADAPTERS:
        family = get_adapter(key).file_family
        if all(family is not f for f in out):
            out.append(family)
    return out


def adapter_for_file(keys: list[str]) -> type[ModelAdapter]:
    """The first registered adapter whose family recognises a file's ``keys`` (its naming), else the first
    adapter (files of no known family are read as the first family's)."""
    first = None
    for key in ADAPTERS:
        cls = get_adapter(key)
        first = first or cls
        if cls.file_family.naming(keys).style != "unknown":
            return cls
    assert first is not None
    return first


def adapter_for_module(module: nn.Module) -> type[ModelAdapter] | None:
    """The first registered adapter whose ``module_classes`` names ``module``'s class (or a base class)."""
    names = {c.__name__ for c in type(module).__mro__}
    for key in ADAPTERS:
        cls = get_adapter(key)
        if names & set(cls.module_classes):
            return cls
    return None


__all__ = ["ADAPTERS", "adapter_for_file", "adapter_for_module", "file_families", "get_adapter"]
