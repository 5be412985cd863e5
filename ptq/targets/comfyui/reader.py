"""Independent decoders of ComfyUI's layout, per ptq format: ``(get tensor by key, layer key, expected state) ->
(float32 weight [out, in], keys read)``, built on :mod:`ptq.targets.decoders` (no quantizer code)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ptq.algorithms.qlinear import QuantizedLinearState
from ptq.formats import INT8_CONVROT
from ptq.formats.nvfp4 import NibbleOrder
from ptq.targets.comfyui.layout import NIBBLE_ORDER
from ptq.targets.decoders import (
    reference_decode_int8,
    reference_decode_mxfp8,
    reference_decode_nvfp4,
    reference_unrotate,
    reference_untile,
)

Get = Callable[[str], torch.Tensor]


def read_int8(get: Get, layer: str, state: QuantizedLinearState) -> tuple[torch.Tensor, set[str]]:
    w = reference_decode_int8(get(f"{layer}.weight"), get(f"{layer}.weight_scale"))
    if state.format == "int8_convrot":
        w = reference_unrotate(w, INT8_CONVROT.group_size)
    return w, {f"{layer}.weight", f"{layer}.weight_scale"}


def read_mxfp8(get: Get, layer: str, state: QuantizedLinearState) -> tuple[torch.Tensor, set[str]]:
    scales = reference_untile(get(f"{layer}.weight_scale"), state.out_features, state.in_features // 32)
    return reference_decode_mxfp8(get(f"{layer}.weight"), scales), {f"{layer}.weight", f"{layer}.weight_scale"}


def read_nvfp4(get: Get, layer: str, state: QuantizedLinearState) -> tuple[torch.Tensor, set[str]]:
    keys = {f"{layer}.weight", f"{layer}.weight_scale", f"{layer}.weight_scale_2"}
    scales = reference_untile(get(f"{layer}.weight_scale"), state.out_features, state.in_features // 16)
    w = reference_decode_nvfp4(get(f"{layer}.weight"), scales, get(f"{layer}.weight_scale_2"),
                               high_first=NIBBLE_ORDER == NibbleOrder.HIGH_FIRST)
    return w, keys


def read_fp8(get: Get, layer: str, state: QuantizedLinearState) -> tuple[torch.Tensor, set[str]]:
    w, ws = get(f"{layer}.weight"), get(f"{layer}.weight_scale")
    return w.float() * ws.float(), {f"{layer}.weight", f"{layer}.weight_scale"}


READERS = {"nvfp4": read_nvfp4, "fp8": read_fp8, "int8": read_int8, "int8_convrot": read_int8, "mxfp8": read_mxfp8}
