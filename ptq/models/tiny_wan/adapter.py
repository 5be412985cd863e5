"""The tiny WAN adapter: the WAN adapter for folders written by :func:`ptq.models.tiny_wan.save_tiny_wan`, by
default the trained model shipped in the package."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import torch

from ptq.models.base import ModelLoadError
from ptq.models.tiny_wan.model import TINY_WAN_PATH
from ptq.models.wan.adapter import WanAdapter


class TinyWanAdapter(WanAdapter):
    """Same classes and loop as WAN; its UMT5 encoder was trained in float32 and runs in float32."""

    name: ClassVar[str] = "tiny_wan"

    @classmethod
    def resolve(cls, path: str | os.PathLike[str] | None) -> Path:
        if path is None or str(path) in ("", "tiny", "tiny_wan"):
            if not (TINY_WAN_PATH / "model_index.json").is_file():
                raise ModelLoadError(f"the packaged tiny WAN model is missing ({TINY_WAN_PATH})")
            return TINY_WAN_PATH
        return super().resolve(path)

    @property
    def display_name(self) -> str:
        return "tiny_wan" if self.root == TINY_WAN_PATH else super().display_name

    @property
    def text_encoder_dtype(self) -> torch.dtype:
        return torch.float32
