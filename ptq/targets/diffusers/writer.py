"""The tensors of one quantized Linear in diffusers' BFL layout (:mod:`ptq.targets.diffusers.layout`)."""

from __future__ import annotations

import torch

from ptq.algorithms.qlinear import CANONICAL_NIBBLE_ORDER, QuantizedLinearState
from ptq.formats import nvfp4 as nvfp4_fmt
from ptq.targets.base import UnsupportedExport, cast_unquantized
from ptq.targets.diffusers.layout import NIBBLE_ORDER


def _bias(layer: str, state: QuantizedLinearState, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {} if state.bias is None else {f"{layer}.bias": cast_unquantized(state.bias, dtype)}


def _check_unsmoothed(layer: str, state: QuantizedLinearState) -> None:
    if state.pre_quant_scale is not None:
        raise UnsupportedExport(f"{layer}: diffusers' BFL loader does not read pre_quant_scale (smoothing); "
                                "export smoothed recipes with export.targets=[comfyui]")


def write_nvfp4(layer: str, state: QuantizedLinearState, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    _check_unsmoothed(layer, state)
    if state.input_scale is None:
        raise UnsupportedExport(f"{layer}: diffusers' BFL loader requires input_scale for nvfp4 (weight-only NVFP4 "
                                "cannot be exported to this target)")
    codes = nvfp4_fmt.unpack_e2m1(state.weight, CANONICAL_NIBBLE_ORDER)
    return {f"{layer}.weight": nvfp4_fmt.pack_e2m1(codes, NIBBLE_ORDER),
            f"{layer}.weight_scale": state.weight_scale,
            f"{layer}.weight_scale_2": state.weight_scale_2.float().reshape(()),
            f"{layer}.input_scale": state.input_scale.float().reshape(()), **_bias(layer, state, dtype)}


def write_fp8(layer: str, state: QuantizedLinearState, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    _check_unsmoothed(layer, state)
    out = {f"{layer}.weight": state.weight,
           f"{layer}.weight_scale": state.weight_scale.float().reshape(-1).expand(state.out_features).clone()}
    if state.input_scale is not None:
        out[f"{layer}.input_scale"] = state.input_scale.float().reshape(())
    return {**out, **_bias(layer, state, dtype)}


WRITERS = {"nvfp4": write_nvfp4, "fp8": write_fp8}
