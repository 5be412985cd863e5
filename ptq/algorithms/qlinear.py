"""``QuantLinear``: a Linear that holds its quantized weight and simulates the target kernels' numerics exactly.

NVFP4 W4A4 (Blackwell ``scaled_mm_nvfp4``): the activation is quantized with the static per-tensor ``input_scale``
and per-16 block scales computed at run time; ``y = (Xv @ Wv^T) * (input_scale * weight_scale_2) + bias`` where
Xv, Wv are the E2M1 codes times their float8 block scales. Those block values are exact in bf16, so the product is
computed with fp32 accumulation (an fp32 matmul on CPU, a bf16 GEMM with fp32 output on CUDA) and rounded once.
FP8 W8A8 (``torch._scaled_mm``): ``y = (Xq @ Wq^T) * (input_scale * weight_scale) + bias``, Xq = fp8(x/input_scale).
Weight-only variants dequantize the weight to the activation dtype and run a plain linear (what loaders without
FP4/FP8 kernels do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ptq.formats import fp8 as fp8_fmt
from ptq.formats import nvfp4 as nvfp4_fmt
from ptq.formats.nvfp4 import NibbleOrder

# Order of the packed nibbles held in memory (exporters convert to their target's order).
CANONICAL_NIBBLE_ORDER = NibbleOrder.HIGH_FIRST


@dataclass
class QuantizedLinearState:
    """Format-neutral quantized weight of one Linear, as exporters read it.

    fp8:   weight float8_e4m3fn ``[out, in]``; weight_scale float32 ``[]`` or ``[out, 1]``.
    nvfp4: weight uint8 ``[out, in/2]`` (nibbles in CANONICAL_NIBBLE_ORDER); weight_scale float8_e4m3fn
           ``[out, in/16]`` row-major; weight_scale_2 float32 ``[]``.
    input_scale: float32 ``[]`` (the calibrated activation scale) or None for weight-only.
    """

    format: str
    weight: torch.Tensor
    weight_scale: torch.Tensor
    weight_scale_2: torch.Tensor | None
    input_scale: torch.Tensor | None
    bias: torch.Tensor | None
    in_features: int
    out_features: int

    def to(self, device: str | torch.device) -> QuantizedLinearState:
        """A copy with every tensor on ``device``."""
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return QuantizedLinearState(self.format, mv(self.weight), mv(self.weight_scale), mv(self.weight_scale_2),
                                    mv(self.input_scale), mv(self.bias), self.in_features, self.out_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the file represents, ``[out, in]``, dequantized in ``dtype`` the way the loaders do it
        (comfy-kitchen's ``dequantize_nvfp4`` / ``dequantize_per_tensor_fp8`` arithmetic)."""
        if self.format == "nvfp4":
            return nvfp4_fmt.dequantize_nvfp4(self.weight, self.weight_scale, self.weight_scale_2,
                                              order=CANONICAL_NIBBLE_ORDER, dtype=dtype)
        return fp8_fmt.dequantize_fp8(self.weight, self.weight_scale, dtype=dtype)

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per weight element including scales (bias excluded)."""
        n = self.in_features * self.out_features
        bits = self.weight.numel() * self.weight.element_size() * 8 + self.weight_scale.numel() * \
            self.weight_scale.element_size() * 8
        return bits / n


def _exact_matmul(xv: torch.Tensor, wv: torch.Tensor) -> torch.Tensor:
    """``xv [..., in] @ wv[out, in]^T`` with fp32 accumulation of bf16-exact operands; returns float32."""
    if xv.is_cuda:
        x2 = xv.reshape(-1, xv.shape[-1]).to(torch.bfloat16)
        try:
            y = torch.mm(x2, wv.to(torch.bfloat16).t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            y = torch.mm(x2.float(), wv.float().t())
        return y.reshape(*xv.shape[:-1], wv.shape[0])
    return torch.matmul(xv.float(), wv.float().t())


class QuantLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` running the simulated FP8 / NVFP4 kernel (see module docstring)."""

    def __init__(self, state: QuantizedLinearState, compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.in_features = state.in_features
        self.out_features = state.out_features
        self.format = state.format
        self.compute_dtype = compute_dtype
        self.register_buffer("weight_q", state.weight)
        self.register_buffer("weight_scale", state.weight_scale)
        self.register_buffer("weight_scale_2", state.weight_scale_2)
        self.register_buffer("input_scale", state.input_scale)
        self.bias = None if state.bias is None else nn.Parameter(state.bias, requires_grad=False)
        # bf16-exact operand of the simulated GEMM (block values / fp8 values), built once
        if self.format == "nvfp4":
            wv = nvfp4_fmt.nvfp4_block_values(state.weight, state.weight_scale, CANONICAL_NIBBLE_ORDER)
        else:
            wv = state.weight.float()
        self.register_buffer("weight_values", wv.to(torch.bfloat16))

    @property
    def weight_only(self) -> bool:
        return self.input_scale is None

    def state(self) -> QuantizedLinearState:
        """The quantized weight as exporters read it."""
        return QuantizedLinearState(self.format, self.weight_q, self.weight_scale, self.weight_scale_2,
                                    self.input_scale, None if self.bias is None else self.bias.data,
                                    self.in_features, self.out_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.state().dequantized_weight(dtype)

    def _weight_alpha(self) -> torch.Tensor:
        if self.format == "nvfp4":
            return self.weight_scale_2
        return self.weight_scale.reshape(-1) if self.weight_scale.dim() else self.weight_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = x.dtype
        if self.weight_only:
            w = self.dequantized_weight(out_dtype)
            return F.linear(x, w, None if self.bias is None else self.bias.to(out_dtype))
        if self.format == "nvfp4":
            xv = nvfp4_fmt.quantize_nvfp4_activation(x, self.input_scale)
        else:
            xv = fp8_fmt.quantize_fp8(x, self.input_scale).float()
        y = _exact_matmul(xv, self.weight_values) * (self.input_scale * self._weight_alpha())
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(out_dtype)

    def extra_repr(self) -> str:
        mode = "weight-only" if self.weight_only else "W+A"
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, {mode}"
