"""diffusers export: a single file that ``WanTransformer3DModel.from_single_file(..., quantization_config=
BFLQuantizationConfig())`` loads (diffusers >= 0.42, ``diffusers/quantizers/bfl``), plus the transformer config.

diffusers' BFL layout (= TensorRT Model Optimizer's): original Wan key names (from_single_file converts them);
NVFP4 ``weight`` uint8 ``[out, in/2]`` first element in the LOW nibble, ``weight_scale`` float8_e4m3fn
``[out, in/16]`` row-major, ``weight_scale_2`` and ``input_scale`` float32 ``[]``; FP8 ("fp8r") ``weight``
float8_e4m3fn ``[out, in]`` with a per-row float32 ``weight_scale`` ``[out]`` (a per-tensor scale is repeated).
Load with ``load_diffusers_export(folder)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ptq.algorithms.qlinear import CANONICAL_NIBBLE_ORDER, QuantizedLinearState
from ptq.export.base import (
    UNQUANTIZED_DTYPES,
    ExportResult,
    atomic_save_safetensors,
    atomic_write_text,
    cast_unquantized,
    header_metadata,
)
from ptq.formats import nvfp4 as nvfp4_fmt
from ptq.formats.nvfp4 import NibbleOrder
from ptq.models.wan_names import diffusers_to_original

TARGET_NIBBLE_ORDER = NibbleOrder.LOW_FIRST
WEIGHTS_NAME = "diffusion_pytorch_model_bfl.safetensors"


def bfl_layer_tensors(layer: str, state: QuantizedLinearState, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors of one quantized Linear in diffusers' BFL layout under the original-Wan name ``layer``."""
    out: dict[str, torch.Tensor] = {}
    if state.format == "nvfp4":
        if state.input_scale is None:
            raise ValueError(f"{layer}: diffusers' BFL loader requires input_scale for nvfp4 (weight-only NVFP4 "
                             "cannot be exported to this target)")
        codes = nvfp4_fmt.unpack_e2m1(state.weight, CANONICAL_NIBBLE_ORDER)
        out[f"{layer}.weight"] = nvfp4_fmt.pack_e2m1(codes, TARGET_NIBBLE_ORDER)
        out[f"{layer}.weight_scale"] = state.weight_scale
        out[f"{layer}.weight_scale_2"] = state.weight_scale_2.float().reshape(())
        out[f"{layer}.input_scale"] = state.input_scale.float().reshape(())
    elif state.format == "fp8":
        out[f"{layer}.weight"] = state.weight
        out[f"{layer}.weight_scale"] = state.weight_scale.float().reshape(-1).expand(state.out_features).clone()
        if state.input_scale is not None:
            out[f"{layer}.input_scale"] = state.input_scale.float().reshape(())
    else:
        raise ValueError(f"{layer}: format {state.format!r} has no diffusers export")
    if state.bias is not None:
        out[f"{layer}.bias"] = cast_unquantized(state.bias, dtype)
    return out


def export_diffusers(plain: dict[str, torch.Tensor], quant: dict[str, QuantizedLinearState], folder: Path,
                     unquantized_dtype: str, transformer_config: dict[str, Any],
                     extra_metadata: dict[str, Any]) -> ExportResult:
    """Write ``folder/transformer/config.json`` and ``folder/transformer/<WEIGHTS_NAME>`` atomically."""
    dtype = UNQUANTIZED_DTYPES[unquantized_dtype]
    tensors = {diffusers_to_original(k): cast_unquantized(v, dtype) for k, v in plain.items()}
    for name, state in quant.items():
        tensors.update(bfl_layer_tensors(diffusers_to_original(name), state, dtype))
    cfg = {k: v for k, v in transformer_config.items() if not k.startswith("_") or k == "_class_name"}
    atomic_write_text(folder / "transformer" / "config.json", json.dumps(cfg, indent=2, default=list) + "\n")
    path = folder / "transformer" / WEIGHTS_NAME
    size = atomic_save_safetensors(tensors, path, header_metadata(extra_metadata))
    return ExportResult("diffusers", str(path), size, len(quant), len(tensors))


def load_diffusers_export(folder: str | Path, compute_dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """Load an export of this module with diffusers' own BFL quantizer (no ptq code in the loading path)."""
    from diffusers import BFLQuantizationConfig, WanTransformer3DModel

    folder = Path(folder)
    return WanTransformer3DModel.from_single_file(
        str(folder / "transformer" / WEIGHTS_NAME), config=str(folder), subfolder="transformer",
        quantization_config=BFLQuantizationConfig(compute_dtype=compute_dtype), torch_dtype=compute_dtype,
    )
