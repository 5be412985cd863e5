"""The NVFP4 format object (registry name ``"nvfp4"``): W4A4 with E2M1 codes in blocks of 16.

In-memory layout: ``weight`` uint8 ``[out, in/2]`` packed in :data:`MEMORY_NIBBLE_ORDER` (first element in the
high nibble); ``scale`` float8_e4m3fn ``[out, in/16]`` row-major block scales; ``scale_2`` float32 ``[]`` global
scale. Math in :mod:`ptq.formats.nvfp4`, fused kernels in :mod:`ptq.formats.triton_quant`.
"""

from __future__ import annotations

from typing import Any

import torch

from . import nvfp4, triton_quant
from .base import NumberFormat, QuantizedWeight
from .nvfp4 import E2M1_MAX, NVFP4_BLOCK, NibbleOrder

#: Nibble order of packed NVFP4 codes held in memory (exporters convert to their target's order).
MEMORY_NIBBLE_ORDER = NibbleOrder.HIGH_FIRST


class NVFP4Format(NumberFormat):
    """E2M1 codes, one float8_e4m3fn scale per 16 inputs, one float32 global scale; static input scale."""

    name = "nvfp4"
    block_size = NVFP4_BLOCK
    storage_dtype = torch.uint8
    weight_bits = 4.0 + 8.0 / NVFP4_BLOCK
    codes_per_element = 2
    activation_block = NVFP4_BLOCK
    activation_sample_block = NVFP4_BLOCK
    four_over_six = True
    native_min_capability = (10, 0)  # ComfyUI's scaled_mm_nvfp4 (Blackwell); elsewhere dequantized (W4A16)

    @property
    def scale_scheme(self) -> str:
        """A float32 global scale times float8 E4M3 block scales relative to it."""
        return "global_block"

    def storage_bits(self, out_features: int, in_features: int, *, per_channel: bool = False) -> float:
        """``n*4`` code bits + one 8-bit block scale per 16 weights (the float32 global scale is not counted)."""
        n = out_features * in_features
        return n * 4.0 + (n // NVFP4_BLOCK) * 8.0

    def check_weight(self, w: torch.Tensor, name: str) -> None:
        nvfp4.check_nvfp4_matrix(w, name)

    def quantize_weight(self, w: torch.Tensor, name: str = "weight", *, per_channel: bool = False) -> QuantizedWeight:
        w32 = w.float()
        g = nvfp4.nvfp4_global_scale(w32.abs().amax())
        packed, block_scales = nvfp4.quantize_nvfp4(w32, g, order=MEMORY_NIBBLE_ORDER, name=name)
        return QuantizedWeight(packed, block_scales, g)

    def from_codes(self, codes: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
                   name: str = "weight") -> QuantizedWeight:
        """Pack unpacked E2M1 codes ``[out, in]`` with their scales; checks that the scales are finite."""
        g = global_scale.float().reshape(())
        if not (bool(torch.isfinite(g)) and float(g) > 0):
            raise ValueError(f"{name}: weight global scale {float(g)} is not finite and > 0")
        if not bool(torch.isfinite(block_scales.float()).all()):
            raise ValueError(f"{name}: non-finite NVFP4 block scale")
        return QuantizedWeight(nvfp4.pack_e2m1(codes, MEMORY_NIBBLE_ORDER), block_scales, g)

    def dequantize_weight(self, q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return nvfp4.dequantize_nvfp4(q.weight, q.scale, q.scale_2, order=MEMORY_NIBBLE_ORDER, dtype=dtype)

    def gemm_operand(self, q: QuantizedWeight) -> torch.Tensor:
        return nvfp4.nvfp4_block_values(q.weight, q.scale, MEMORY_NIBBLE_ORDER)

    def gemm_alpha(self, q: QuantizedWeight) -> torch.Tensor:
        return q.scale_2

    def input_scale_from_amax(self, amax: torch.Tensor) -> torch.Tensor:
        return nvfp4.nvfp4_global_scale(amax)

    def activation_values(self, x: torch.Tensor, input_scale: torch.Tensor, *, mode: str) -> torch.Tensor:
        """Block values ``e2m1(code) * block_scale`` with run-time block scales (one rounding mode only)."""
        return nvfp4.quantize_nvfp4_activation(x, input_scale)

    def fake_quantize_activation(self, x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
        return nvfp4.quantize_nvfp4_activation(x, input_scale) * input_scale

    def fast_activation(self, x2: torch.Tensor, input_scale: torch.Tensor, *, mode: str, prepared: Any,
                        codes: bool = False) -> torch.Tensor | None:
        if codes:
            return None
        return triton_quant.nvfp4_activation_values(x2, input_scale)

    def gptq_round(self, col: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """E2M1 code of ``col / scale`` (``scale`` = global * block scale; 0 gives code 0) and its value."""
        zero = scale == 0
        y = torch.where(zero, torch.zeros_like(col), col / torch.where(zero, torch.ones_like(scale), scale))
        c = nvfp4._encode_unchecked(torch.clamp(y, -E2M1_MAX, E2M1_MAX))
        return c, nvfp4.e2m1_lut(col.device)[c.to(torch.int32)] * scale


NVFP4 = NVFP4Format()
