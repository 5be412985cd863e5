"""The FP8 E4M3 format object (registry name ``"fp8"``): W8A8 with a static per-tensor activation scale.

In-memory layout: ``weight`` float8_e4m3fn ``[out, in]``; ``scale`` float32 ``[]`` (per tensor) or ``[out, 1]``
(per output channel); no ``scale_2``. Math in :mod:`ptq.formats.fp8`, fused kernels in
:mod:`ptq.formats.triton_quant`.
"""

from __future__ import annotations

from typing import Any

import torch

from . import fp8, triton_quant
from .base import NumberFormat, QuantizedWeight


class FP8Format(NumberFormat):
    """float8_e4m3fn codes, float32 weight scale per tensor (or per output channel), static input scale."""

    name = "fp8"
    block_size = None
    storage_dtype = fp8.FP8_DTYPE
    weight_bits = 8.0
    activation_block = 1
    native_min_capability = (8, 9)  # ComfyUI's FP8 _scaled_mm (Ada, Hopper, Blackwell); elsewhere dequantized
    backend_arithmetic = True

    def storage_bits(self, out_features: int, in_features: int, *, per_channel: bool = False) -> float:
        """``n*8`` code bits + one float32 scale per tensor (per row with ``per_channel``)."""
        return out_features * in_features * 8.0 + 32.0 * (out_features if per_channel else 1)

    def quantize_weight(self, w: torch.Tensor, name: str = "weight", *, per_channel: bool = False) -> QuantizedWeight:
        q, scale = fp8.quantize_fp8_weight(w, per_channel=per_channel, name=name)
        return QuantizedWeight(q, scale, None)

    def quantize_with_scale(self, w: torch.Tensor, scale: torch.Tensor, name: str = "weight") -> QuantizedWeight:
        """Codes of ``w`` for a given float32 scale (``[]`` or ``[out, 1]``)."""
        q = fp8.quantize_fp8(w, scale.to(w.device), name=name)
        return QuantizedWeight(q, scale.to(torch.float32), None)

    def dequantize_weight(self, q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``q.to(dtype) * scale.to(dtype)``, computed in ``dtype`` as comfy-kitchen's eager
        ``dequantize_per_tensor_fp8`` does (for float32 the same as rounding once)."""
        return fp8.dequantize_fp8(q.weight, q.scale, dtype=dtype, mode="ck_eager")

    def gemm_operand(self, q: QuantizedWeight) -> torch.Tensor:
        return q.weight.float()

    def gemm_alpha(self, q: QuantizedWeight) -> torch.Tensor:
        return q.scale.reshape(-1) if q.scale.dim() else q.scale

    def input_scale_from_amax(self, amax: torch.Tensor) -> torch.Tensor:
        return fp8.fp8_scale_from_amax(amax)

    def activation_values(self, x: torch.Tensor, input_scale: torch.Tensor, *, mode: str) -> torch.Tensor:
        """``fp8(clamp(x * (1/input_scale), +-448))`` as float32; ``mode`` as in :func:`ptq.formats.fp8.quantize_fp8`."""
        return fp8.quantize_fp8(x, input_scale, mode=mode).float()

    def fake_quantize_activation(self, x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
        return fp8.fake_quantize_fp8(x, input_scale, mode="float32")

    def fast_prepare(self, input_scale: torch.Tensor, dtype: torch.dtype, mode: str) -> Any:
        if not input_scale.is_cuda:
            return None
        return triton_quant.fp8_multiplier(input_scale, dtype, mode)

    def fast_activation(self, x2: torch.Tensor, input_scale: torch.Tensor, *, mode: str, prepared: Any,
                        codes: bool = False) -> torch.Tensor:
        mult = prepared
        if mult is None or mult.device != x2.device:
            mult = triton_quant.fp8_multiplier(input_scale.to(x2.device), x2.dtype, mode)
        if codes:
            return triton_quant.fp8_activation_codes(x2, mode=mode, mult=mult)
        return triton_quant.fp8_activation_values(x2, mode=mode, mult=mult)

    def native_gemm(self, xq: torch.Tensor, q: QuantizedWeight, input_scale: torch.Tensor,
                    bias: torch.Tensor) -> torch.Tensor:
        """``torch._scaled_mm`` on the FP8 codes (the kernel ComfyUI runs on SM >= 8.9), bf16 output."""
        ws = q.scale.float()
        if ws.numel() == 1:
            sa, sb = input_scale.float().reshape(()), ws.reshape(())
        else:  # row-wise scaling: [m, 1] x [1, out]
            sa = input_scale.float().reshape(1, 1).expand(xq.shape[0], 1).contiguous()
            sb = ws.reshape(1, -1).contiguous()
        return torch._scaled_mm(xq, q.weight.t(), scale_a=sa, scale_b=sb, bias=bias, out_dtype=torch.bfloat16,
                                use_fast_accum=False)

    def gptq_round(self, col: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``fp8(clamp(col * (1/scale), +-448))`` in float32 and its value ``code * scale``."""
        c = torch.clamp(col * (1.0 / scale), -fp8.FP8_E4M3_MAX, fp8.FP8_E4M3_MAX).to(fp8.FP8_DTYPE)
        return c, c.float() * scale


FP8 = FP8Format()
