"""File targets: one folder per file ptq writes (``comfyui/``, ``diffusers/``), each with its layout facts, writer,
independent reader, ``ptq inspect`` checks and loader facts; :data:`TARGETS` is the registry (``export.targets``),
:func:`export_model` writes and verifies them."""

from ptq.targets.base import ExportResult, FileTarget, KeyMap, UnsupportedExport, split_model_state
from ptq.targets.export import export_model
from ptq.targets.registry import TARGETS, get_target

__all__ = ["TARGETS", "ExportResult", "FileTarget", "KeyMap", "UnsupportedExport", "export_model", "get_target",
           "split_model_state"]
