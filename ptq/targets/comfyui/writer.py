"""The tensors of one quantized Linear in ComfyUI's layout (:mod:`ptq.targets.comfyui.layout`), per ptq format:
``(layer key, state, unquantized dtype) -> {key: tensor}``."""

from __future__ import annotations

import torch

from ptq.algorithms.qlinear import CANONICAL_NIBBLE_ORDER, QuantizedLinearState
from ptq.formats import nvfp4 as nvfp4_fmt
from ptq.targets.base import UnsupportedExport, cast_unquantized
from ptq.targets.comfyui.layout import (
    NIBBLE_ORDER,
    PRE_QUANT_SCALE_DTYPE,
    PRE_QUANT_SCALE_FORMATS,
    encode_comfy_quant,
    layer_config,
)


def common_tensors(layer: str, state: QuantizedLinearState, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``pre_quant_scale`` (formats that read it), ``input_scale``, ``bias`` and ``comfy_quant`` of a layer."""
    out: dict[str, torch.Tensor] = {}
    if state.pre_quant_scale is not None:
        if state.format not in PRE_QUANT_SCALE_FORMATS:
            raise UnsupportedExport(f"{layer}: ComfyUI reads pre_quant_scale only for "
                                    f"{', '.join(PRE_QUANT_SCALE_FORMATS)} layers, not {state.format}")
        out[f"{layer}.pre_quant_scale"] = state.pre_quant_scale.to(PRE_QUANT_SCALE_DTYPE).reshape(-1)
    if state.input_scale is not None:
        out[f"{layer}.input_scale"] = state.input_scale.float().reshape(())
    if state.bias is not None:
        out[f"{layer}.bias"] = cast_unquantized(state.bias, dtype)
    out[f"{layer}.comfy_quant"] = encode_comfy_quant(layer_config(state))
    return out


def write_nvfp4(layer: str, state: QuantizedLinearState, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    packed = state.weight
    if CANONICAL_NIBBLE_ORDER != NIBBLE_ORDER:
        packed = nvfp4_fmt.pack_e2m1(nvfp4_fmt.unpack_e2m1(packed, CANONICAL_NIBBLE_ORDER), NIBBLE_ORDER)
    return {f"{layer}.weight": packed, f"{layer}.weight_scale": nvfp4_fmt.to_tiled(state.weight_scale),
            f"{layer}.weight_scale_2": state.weight_scale_2.float().reshape(()), **common_tensors(layer, state, dtype)}


def write_fp8(layer: str, state: QuantizedLinearState, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    if state.weight_scale.numel() != 1:
        raise UnsupportedExport(f"{layer}: per-channel FP8 weight scales are not supported by ComfyUI's FP8 layout "
                                "(tensor-wise only); set quant.weight.fp8_per_channel=false or "
                                "export.targets=[diffusers]")
    return {f"{layer}.weight": state.weight, f"{layer}.weight_scale": state.weight_scale.float().reshape(()),
            **common_tensors(layer, state, dtype)}


def write_int8(layer: str, state: QuantizedLinearState, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """int8 and int8_convrot: codes as stored in memory, float32 scale ``[]`` or ``[out, 1]``. Weight-only int8 is
    refused: ComfyUI runs an int8_tensorwise layer as W8A8 even with ``full_precision_matrix_mult`` (the weight keeps
    its compute dtype, so comfy.ops never dequantizes it, and comfy-kitchen's int8 linear quantizes every input)."""
    if state.weight_only:
        raise UnsupportedExport(f"{layer}: ComfyUI runs int8_tensorwise layers as W8A8 (dynamic per-row activations) "
                                "even with full_precision_matrix_mult, so weight-only int8 cannot be exported for it; "
                                "use quant.activation=max (or dynamic)")
    scale = state.weight_scale.float()
    scale = scale.reshape(()) if scale.numel() == 1 and state.format == "int8" else scale.reshape(-1, 1)
    return {f"{layer}.weight": state.weight, f"{layer}.weight_scale": scale, **common_tensors(layer, state, dtype)}


def write_mxfp8(layer: str, state: QuantizedLinearState, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """float8 codes, E8M0 block scales tiled and stored as uint8 (every ComfyUI reader path reads U8)."""
    tiled = nvfp4_fmt.to_tiled(state.weight_scale.view(torch.uint8))
    return {f"{layer}.weight": state.weight, f"{layer}.weight_scale": tiled, **common_tensors(layer, state, dtype)}


def write_convrot_w4a4(layer: str, state: QuantizedLinearState, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Packed int4 codes as stored in memory (``[out, in/2]`` int8, even column low), float32 scale ``[out]``.
    Weight-only is refused as for int8: ComfyUI runs the layer through the format's linear whatever the flag."""
    if state.weight_only:
        raise UnsupportedExport(f"{layer}: ComfyUI runs convrot_w4a4 layers through their W4A4 / W4A8 linear even "
                                "with full_precision_matrix_mult; use quant.activation=dynamic")
    return {f"{layer}.weight": state.weight, f"{layer}.weight_scale": state.weight_scale.float().reshape(-1),
            **common_tensors(layer, state, dtype)}


WRITERS = {"nvfp4": write_nvfp4, "fp8": write_fp8, "int8": write_int8, "int8_convrot": write_int8,
           "mxfp8": write_mxfp8, "convrot_w4a4": write_convrot_w4a4, "convrot_w4a8": write_convrot_w4a4}
