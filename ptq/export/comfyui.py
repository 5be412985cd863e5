"""ComfyUI export: one ``.safetensors`` that stock ComfyUI's "Load Diffusion Model" reads as quantized.

What ComfyUI reads (comfy/ops.py mixed-precision ops, comfy/utils.py convert_old_quants, comfy-kitchen layouts):
- original Wan key names, no ``model.diffusion_model.`` prefix;
- per quantized Linear ``<layer>.comfy_quant``: uint8 1-D tensor of the UTF-8 JSON ``{"format": ...}``
  (``"nvfp4"`` / ``"float8_e4m3fn"``, plus ``"full_precision_matrix_mult": true`` for weight-only), and the same
  per-layer JSON in the header entry ``_quantization_metadata`` = ``{"format_version": "1.0", "layers": {...}}``;
- NVFP4: ``weight`` uint8 ``[out, in/2]`` first element in the HIGH nibble; ``weight_scale`` float8_e4m3fn in the
  cuBLAS tiled layout ``[roundup(out,128), roundup(in/16,4)]``; ``weight_scale_2`` float32 ``[]``; ``input_scale``
  float32 ``[]``;
- FP8: ``weight`` float8_e4m3fn ``[out, in]``; ``weight_scale`` float32 ``[]`` (per tensor only: ComfyUI's FP8 layout
  is tensor-wise); ``input_scale`` float32 ``[]`` (without it ComfyUI quantizes activations with scale 1.0);
- unquantized tensors bf16 or float32.
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
    cast_unquantized,
    header_metadata,
)
from ptq.formats import nvfp4 as nvfp4_fmt
from ptq.formats.nvfp4 import NibbleOrder
from ptq.models.wan_names import diffusers_to_original

COMFY_FORMAT_NAMES = {"nvfp4": "nvfp4", "fp8": "float8_e4m3fn"}
TARGET_NIBBLE_ORDER = NibbleOrder.HIGH_FIRST


def comfy_layer_config(state: QuantizedLinearState) -> dict[str, Any]:
    """The per-layer JSON ComfyUI reads from ``comfy_quant`` / ``_quantization_metadata``."""
    conf: dict[str, Any] = {"format": COMFY_FORMAT_NAMES[state.format]}
    if state.input_scale is None:
        conf["full_precision_matrix_mult"] = True
    return conf


def encode_comfy_quant(conf: dict[str, Any]) -> torch.Tensor:
    """``comfy_quant`` tensor: uint8 1-D UTF-8 bytes of ``json.dumps(conf)`` (ComfyUI decodes with json.loads)."""
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def comfy_layer_tensors(layer: str, state: QuantizedLinearState, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tensors of one quantized Linear under its original-Wan name ``layer``."""
    out: dict[str, torch.Tensor] = {}
    if state.format == "nvfp4":
        packed = state.weight
        if CANONICAL_NIBBLE_ORDER != TARGET_NIBBLE_ORDER:
            packed = nvfp4_fmt.pack_e2m1(nvfp4_fmt.unpack_e2m1(packed, CANONICAL_NIBBLE_ORDER), TARGET_NIBBLE_ORDER)
        out[f"{layer}.weight"] = packed
        out[f"{layer}.weight_scale"] = nvfp4_fmt.to_tiled(state.weight_scale)
        out[f"{layer}.weight_scale_2"] = state.weight_scale_2.float().reshape(())
    elif state.format == "fp8":
        if state.weight_scale.numel() != 1:
            raise ValueError(f"{layer}: per-channel FP8 weight scales are not supported by ComfyUI's FP8 layout "
                             "(tensor-wise only); set quant.fp8_per_channel=false or export.targets=[diffusers]")
        out[f"{layer}.weight"] = state.weight
        out[f"{layer}.weight_scale"] = state.weight_scale.float().reshape(())
    else:
        raise ValueError(f"{layer}: format {state.format!r} has no ComfyUI export")
    if state.input_scale is not None:
        out[f"{layer}.input_scale"] = state.input_scale.float().reshape(())
    if state.bias is not None:
        out[f"{layer}.bias"] = cast_unquantized(state.bias, dtype)
    out[f"{layer}.comfy_quant"] = encode_comfy_quant(comfy_layer_config(state))
    return out


def build_comfyui_state(
    plain: dict[str, torch.Tensor], quant: dict[str, QuantizedLinearState], unquantized_dtype: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors by original-Wan key, per-layer quantization metadata)."""
    dtype = UNQUANTIZED_DTYPES[unquantized_dtype]
    tensors = {diffusers_to_original(k): cast_unquantized(v, dtype) for k, v in plain.items()}
    layers: dict[str, Any] = {}
    for name, state in quant.items():
        layer = diffusers_to_original(name)
        tensors.update(comfy_layer_tensors(layer, state, dtype))
        layers[layer] = comfy_layer_config(state)
    return tensors, {"format_version": "1.0", "layers": layers}


def export_comfyui(plain: dict[str, torch.Tensor], quant: dict[str, QuantizedLinearState], path: Path,
                   unquantized_dtype: str, extra_metadata: dict[str, Any]) -> ExportResult:
    """Write the ComfyUI file atomically."""
    tensors, qmeta = build_comfyui_state(plain, quant, unquantized_dtype)
    meta = header_metadata({"_quantization_metadata": qmeta, **extra_metadata})
    size = atomic_save_safetensors(tensors, path, meta)
    return ExportResult("comfyui", str(path), size, len(quant), len(tensors))
