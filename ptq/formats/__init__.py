"""Bit-exact FP8 (E4M3) and NVFP4 number formats: pure tensor math, no model knowledge.

This package imports nothing else from ``ptq``. Its numerics are tested bit for bit against
comfy-kitchen 0.2.40 (ComfyUI's kernel library).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import (
    FormatError,
    UnsupportedShapeError,
    check_block_multiple,
    check_finite,
    check_float,
    check_rank,
)
from .fp8 import (
    FP8_DTYPE,
    FP8_E4M3_MAX,
    FP8_MODES,
    FP8_SCALE_FOR_ZERO,
    dequantize_fp8,
    fake_quantize_fp8,
    fp8_scale_from_amax,
    quantize_fp8,
    quantize_fp8_weight,
)
from .nvfp4 import (
    E2M1_MAX,
    E2M1_VALUES,
    NVFP4_BLOCK,
    NVFP4_DEFAULT_FALLBACK,
    NVFP4_DEQUANT_MODES,
    NibbleOrder,
    ScaleLayout,
    decode_e2m1,
    dequantize_nvfp4,
    encode_e2m1,
    fake_quantize_nvfp4,
    from_tiled,
    nvfp4_block_values,
    nvfp4_global_scale,
    pack_e2m1,
    quantize_nvfp4,
    quantize_nvfp4_activation,
    tiled_shape,
    to_tiled,
    unpack_e2m1,
)


@dataclass(frozen=True)
class FormatSpec:
    """Static description of a weight format.

    ``weight_bits``: effective storage bits per weight including scales (per-tensor scales ignored).
    ``block_size``: elements sharing one scale along in_features (None: per tensor/channel).
    ``storage_dtype``: dtype of the stored weight tensor.
    """

    name: str
    weight_bits: float
    block_size: int | None
    storage_dtype: torch.dtype


FORMATS: dict[str, FormatSpec] = {
    "fp8": FormatSpec(name="fp8", weight_bits=8.0, block_size=None, storage_dtype=FP8_DTYPE),
    # 4-bit code + one 8-bit E4M3 scale per 16 weights = 4.5 bits; packed two codes per uint8 byte.
    "nvfp4": FormatSpec(
        name="nvfp4", weight_bits=4.0 + 8.0 / NVFP4_BLOCK, block_size=NVFP4_BLOCK, storage_dtype=torch.uint8
    ),
}


def get_format(name: str) -> FormatSpec:
    """The :class:`FormatSpec` called ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown format {name!r}; known formats: {', '.join(sorted(FORMATS))}") from None


__all__ = [
    "E2M1_MAX",
    "E2M1_VALUES",
    "FORMATS",
    "FP8_DTYPE",
    "FP8_E4M3_MAX",
    "FP8_MODES",
    "FP8_SCALE_FOR_ZERO",
    "NVFP4_BLOCK",
    "NVFP4_DEFAULT_FALLBACK",
    "NVFP4_DEQUANT_MODES",
    "FormatError",
    "FormatSpec",
    "NibbleOrder",
    "ScaleLayout",
    "UnsupportedShapeError",
    "check_block_multiple",
    "check_finite",
    "check_float",
    "check_rank",
    "decode_e2m1",
    "dequantize_fp8",
    "dequantize_nvfp4",
    "encode_e2m1",
    "fake_quantize_fp8",
    "fake_quantize_nvfp4",
    "fp8_scale_from_amax",
    "from_tiled",
    "get_format",
    "nvfp4_block_values",
    "nvfp4_global_scale",
    "pack_e2m1",
    "quantize_fp8",
    "quantize_fp8_weight",
    "quantize_nvfp4",
    "quantize_nvfp4_activation",
    "tiled_shape",
    "to_tiled",
    "unpack_e2m1",
]
