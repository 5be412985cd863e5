"""Bit-exact number formats: pure tensor math, no model knowledge.

Each format is an object (:class:`~ptq.formats.base.NumberFormat`) registered in :data:`FORMATS` below; algorithms,
``QuantLinear``, the mixed-precision planner and the report look formats up by name with :func:`get_format`.
This package imports nothing else from ``ptq``. Its numerics are tested bit for bit against comfy-kitchen 0.2.40
(ComfyUI's kernel library).
"""

from __future__ import annotations

from .base import (
    FORMATS,
    SCALE_SCHEMES,
    DynamicActivationFormat,
    NumberFormat,
    QuantizedWeight,
    get_format,
    register_format,
)
from .checks import (
    FormatError,
    UnsupportedShapeError,
    check_block_multiple,
    check_finite,
    check_float,
    check_rank,
)
from .convrot_w4a4 import CONVROT_W4A4, CONVROT_W4A8
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
from .fp8_format import FP8
from .int8 import INT8
from .int8_convrot import INT8_CONVROT
from .mxfp8 import MXFP8
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
from .nvfp4_format import NVFP4

# The registry of number formats: one line per format (its object lives in its own module).
register_format(FP8)
register_format(NVFP4)
register_format(INT8)
register_format(INT8_CONVROT)
register_format(CONVROT_W4A4)
register_format(CONVROT_W4A8)
register_format(MXFP8)


__all__ = [
    "E2M1_MAX",
    "E2M1_VALUES",
    "FORMATS",
    "SCALE_SCHEMES",
    "DynamicActivationFormat",
    "FP8_DTYPE",
    "FP8_E4M3_MAX",
    "FP8_MODES",
    "FP8_SCALE_FOR_ZERO",
    "INT8",
    "INT8_CONVROT",
    "CONVROT_W4A4",
    "CONVROT_W4A8",
    "MXFP8",
    "NVFP4_BLOCK",
    "NVFP4_DEFAULT_FALLBACK",
    "NVFP4_DEQUANT_MODES",
    "FormatError",
    "NumberFormat",
    "QuantizedWeight",
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
    "register_format",
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
