"""The ComfyUI file target (one folder: layout facts, writer, reader, the loader's feature table, ``ptq inspect``
checks, and what ComfyUI computes on each GPU)."""

from ptq.targets.comfyui import checks  # noqa: F401 - registers its ptq inspect checks
from ptq.targets.comfyui.target import ComfyUITarget

COMFYUI = ComfyUITarget()

__all__ = ["COMFYUI", "ComfyUITarget"]
