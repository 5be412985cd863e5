"""Independent decoders of diffusers' BFL layout (:mod:`ptq.targets.decoders`, no quantizer code)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ptq.algorithms.qlinear import QuantizedLinearState
from ptq.formats.nvfp4 import NibbleOrder
from ptq.targets.decoders import reference_decode_nvfp4
from ptq.targets.diffusers.layout import NIBBLE_ORDER


def read_nvfp4(get: Callable[[str], torch.Tensor], layer: str,
               state: QuantizedLinearState) -> tuple[torch.Tensor, set[str]]:
    keys = {f"{layer}.weight", f"{layer}.weight_scale", f"{layer}.weight_scale_2"}
    w = reference_decode_nvfp4(get(f"{layer}.weight"), get(f"{layer}.weight_scale"), get(f"{layer}.weight_scale_2"),
                               high_first=NIBBLE_ORDER == NibbleOrder.HIGH_FIRST)
    return w, keys


def read_fp8(get: Callable[[str], torch.Tensor], layer: str,
             state: QuantizedLinearState) -> tuple[torch.Tensor, set[str]]:
    w, ws = get(f"{layer}.weight"), get(f"{layer}.weight_scale")
    got = w.float() * ws.float().reshape(-1, 1) if ws.numel() > 1 else w.float() * ws.float()
    return got, {f"{layer}.weight", f"{layer}.weight_scale"}


READERS = {"nvfp4": read_nvfp4, "fp8": read_fp8}
