"""The adapter of the small two-expert WAN model (default: the trained one shipped in the package)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import torch

from ptq.models.base import ModelLoadError
from ptq.models.tiny_wan.moe import TINY_MOE_PATH
from ptq.models.wan.a14b import WanA14BAdapter


class TinyWanMoEAdapter(WanA14BAdapter):
    """WAN 2.2 A14B's two-expert loop on folders written by :func:`ptq.models.tiny_wan.moe.save_tiny_moe`; the
    UMT5 encoder runs in float32 as it was trained."""

    name: ClassVar[str] = "tiny_wan_moe"

    @classmethod
    def resolve(cls, path: str | os.PathLike[str] | None) -> Path:
        if path is None or str(path) in ("", "tiny_moe", "tiny_wan_moe"):
            if not (TINY_MOE_PATH / "model_index.json").is_file():
                raise ModelLoadError(
                    f"the packaged two-expert tiny WAN model is not there yet ({TINY_MOE_PATH}): train it on a GPU "
                    "(`python scripts/train_tiny_wan.py train-moe --out outputs/tiny_moe_train --install`), or make "
                    "a random one (`python scripts/train_tiny_wan.py random-moe --out /tmp/tiny_moe`) and pass "
                    "model.path=/tmp/tiny_moe")
            return TINY_MOE_PATH
        return super().resolve(path)

    @property
    def display_name(self) -> str:
        return "tiny_wan_moe" if self.root == TINY_MOE_PATH else super().display_name

    @property
    def text_encoder_dtype(self) -> torch.dtype:
        return torch.float32
