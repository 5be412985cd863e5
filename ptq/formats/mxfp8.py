"""MXFP8 (registry name ``"mxfp8"``; ComfyUI's per-layer format ``mxfp8``): FP8 E4M3 elements with one E8M0
(power-of-two) scale per 32 consecutive inputs; activations quantized the same way at run time (W8A8 on Blackwell).

Value of element ``(r, c)``: ``x[r, c] ~= fp8(code[r, c]) * 2**(e[r, c // 32] - 127)``, ``e`` the uint8 E8M0 code
(``e = 0`` decodes to 0, as comfy-kitchen's ``e8m0_to_f32`` does; 255 is never written). What comfy-kitchen 0.2.40
computes (``backends/eager/quantization.py`` ``quantize_mxfp8`` / ``dequantize_mxfp8``, ``tensor/mxfp8.py``
``TensorCoreMXFP8Layout``; its CUDA kernel ``quantize_mxfp8.cu`` read from the source):

* block scale: the smallest power of two ``>= amax / 448`` (E8M0 range ``2**-127 .. 2**127``), codes
  ``fp8(clamp(x / scale, +-448))`` (round to nearest even); an all-zero block gets ``e = 0`` and zero codes.
* dequantization ``(code.float() * scale).to(dtype)``; scales stored as ``float8_e8m0fnu`` in the cuBLAS 128x4
  tiled ("swizzled") layout, padded to ``[roundup(out, 128), roundup(in/32, 4)]`` (:func:`ptq.formats.nvfp4.to_tiled`).
* the linear (``torch.ops.aten.linear`` on Blackwell): the activation ``[m, in]`` quantized with its own block
  scales (ComfyUI passes no static scale to this layout), ``scaled_mm`` with 1x32 block scaling, fp32
  accumulation, bias added in the epilogue, one rounding to the output dtype.

Arithmetic variants (``mode``): ``"ck_eager"`` takes the exponent as ``ceil(log2(amax / 448))`` in float32 (the eager
backend; for ``amax / 448`` a few ulps above a power of two ``log2`` rounds down and the block max is clamped to
448); ``"float32"`` / ``"divide"`` the exact power-of-two ceiling (the CUDA kernel's round-toward-+inf E8M0
conversion). Blocks whose ``amax <= 448 * 2**-127`` (about 2.6e-36, never in real weights) are divided by
``2**-127``, where the eager backend divides by 0; both dequantize to 0.

In memory (``QuantizedWeight``): ``weight`` float8_e4m3fn ``[out, in]``, ``scale`` uint8 E8M0 codes ``[out, in/32]``
row-major, no ``scale_2``.
"""

from __future__ import annotations

import torch

from .base import DynamicActivationFormat, QuantizedWeight
from .checks import FormatError, UnsupportedShapeError, check_rank
from .fp8 import FP8_DTYPE, FP8_E4M3_MAX, divide_exact, map_row_chunks

__all__ = [
    "E8M0_BIAS",
    "MXFP8",
    "MXFP8_BLOCK",
    "MXFP8Format",
    "dequantize_mxfp8",
    "e8m0_from_amax",
    "e8m0_to_float",
    "mxfp8_linear",
    "quantize_mxfp8",
]

MXFP8_BLOCK = 32
E8M0_BIAS = 127
_MODES = ("ck_eager", "float32", "divide")
_MIN_RATIO = 2.0**-127


def _check_mode(mode: str) -> str:
    if mode not in _MODES:
        raise ValueError(f"unknown mxfp8 arithmetic mode {mode!r}; expected one of {', '.join(_MODES)}")
    return mode


def e8m0_to_float(codes: torch.Tensor) -> torch.Tensor:
    """float32 ``2**(code - 127)`` of uint8 E8M0 codes, code 0 -> 0 (comfy-kitchen's ``e8m0_to_f32``)."""
    c = codes.view(torch.uint8).to(torch.int32)
    return torch.where(c == 0, 0, c << 23).view(torch.float32)


def _power_of_two(codes: torch.Tensor) -> torch.Tensor:
    """float32 ``2**(code - 127)`` including code 0 (``2**-127``, a float32 subnormal): the divisor of the codes."""
    c = codes.to(torch.int32)
    return torch.where(c == 0, 1 << 22, c << 23).view(torch.float32)


def e8m0_from_amax(amax: torch.Tensor, *, mode: str = "ck_eager") -> torch.Tensor:
    """uint8 E8M0 codes of the block scales for block maxima ``amax`` (any shape; see the module docstring)."""
    ratio = divide_exact(amax.float(), FP8_E4M3_MAX)
    if _check_mode(mode) == "ck_eager":
        e = torch.ceil(torch.log2(torch.clamp(ratio, min=_MIN_RATIO))).to(torch.int32) + E8M0_BIAS
    else:  # exact ceil(log2(ratio)): the float32 exponent, +1 unless the mantissa is zero
        bits = ratio.view(torch.int32)
        exp, mant = (bits >> 23) & 0xFF, bits & 0x7FFFFF
        e = torch.where(exp > 0, exp + (mant != 0).to(torch.int32) - 127, (bits > 1 << 22).to(torch.int32) - 127)
        e = e + E8M0_BIAS
    return torch.clamp(e, 0, 254).to(torch.uint8)


def _quantize_rows(x: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = x.shape
    xb = x.reshape(rows, cols // MXFP8_BLOCK, MXFP8_BLOCK)
    codes = e8m0_from_amax(xb.abs().amax(dim=-1), mode=mode)
    scaled = xb.float() / _power_of_two(codes).unsqueeze(-1)
    q = torch.clamp(scaled, -FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE).reshape(rows, cols)
    return q, codes


def quantize_mxfp8(x: torch.Tensor, *, mode: str = "ck_eager", name: str = "tensor"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [rows, cols]`` (cols a multiple of 32) -> ``(codes float8_e4m3fn [rows, cols], E8M0 codes uint8
    [rows, cols/32] row-major)``; bit-identical to comfy-kitchen's eager ``quantize_mxfp8`` with the scales untiled
    (``mode="ck_eager"``)."""
    _check_mode(mode)
    check_rank(x, 2, name)
    if x.shape[1] % MXFP8_BLOCK:
        raise UnsupportedShapeError(f"{name}: {x.shape[1]} columns are not a multiple of {MXFP8_BLOCK} (MXFP8 blocks)")
    q, codes = map_row_chunks(_quantize_rows, x, (), (mode,))
    return q, codes


def dequantize_mxfp8(q: torch.Tensor, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q.float() * scale).to(dtype)`` per block: comfy-kitchen's ``dequantize_mxfp8`` on row-major scales."""
    if q.dtype != FP8_DTYPE:
        raise FormatError(f"dequantize_mxfp8: expected a {FP8_DTYPE} tensor, got {q.dtype}")
    rows, cols = q.shape
    if tuple(codes.shape) != (rows, cols // MXFP8_BLOCK):
        raise FormatError(f"dequantize_mxfp8: scales {tuple(codes.shape)} do not fit codes {tuple(q.shape)} "
                          f"(expected [{rows}, {cols // MXFP8_BLOCK}])")
    v = q.float().reshape(rows, -1, MXFP8_BLOCK) * e8m0_to_float(codes.to(q.device)).unsqueeze(-1)
    return v.reshape(rows, cols).to(dtype)


def _fp32_matmul(xv: torch.Tensor, wv: torch.Tensor) -> torch.Tensor:
    """``xv [m, in] @ wv [out, in]^T`` of bf16-exact float32 operands with float32 accumulation."""
    if xv.is_cuda:
        try:
            return torch.mm(xv.to(torch.bfloat16), wv.to(torch.bfloat16).t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass
    return xv @ wv.t()


def mxfp8_linear(x: torch.Tensor, q: torch.Tensor, codes: torch.Tensor, bias: torch.Tensor | None, *,
                 mode: str = "float32") -> torch.Tensor:
    """The W8A8 MXFP8 linear of ``x [..., in]``: activation blocks quantized at run time, exact block values
    multiplied with float32 accumulation, bias added in float32, one rounding to ``x.dtype``."""
    x2 = x.reshape(-1, x.shape[-1])
    xq, xc = quantize_mxfp8(x2, mode=mode, name="activation")
    y = _fp32_matmul(dequantize_mxfp8(xq, xc), dequantize_mxfp8(q, codes).to(x.device))
    if bias is not None:
        y = y + bias.to(device=y.device, dtype=x.dtype).float()
    return y.to(x.dtype).reshape(*x.shape[:-1], q.shape[0])


class MXFP8Format(DynamicActivationFormat):
    """float8_e4m3fn codes with one E8M0 scale per 32 inputs, weights and (at run time) activations."""

    name = "mxfp8"
    block_size = MXFP8_BLOCK
    storage_dtype = FP8_DTYPE
    weight_bits = 8.0 + 8.0 / MXFP8_BLOCK
    activation_block = MXFP8_BLOCK
    activation_sample_block = MXFP8_BLOCK
    activation_scaling = "computes its activation block scales"
    # ComfyUI runs mxfp8 natively on compute capability >= 10 (Blackwell) with torch >= 2.10; elsewhere it
    # dequantizes the weight
    native_min_capability = (10, 0)
    backend_arithmetic = True
    portable_kernel = False

    def unsupported(self, in_features: int, out_features: int) -> str | None:
        if in_features % MXFP8_BLOCK or out_features % MXFP8_BLOCK:
            return (f"[{out_features}, {in_features}] is not a multiple of {MXFP8_BLOCK} in both dimensions "
                    "(ComfyUI's MXFP8 layout pads weights to 32x32)")
        return None

    def storage_bits(self, out_features: int, in_features: int, *, per_channel: bool = False) -> float:
        """``n*8`` code bits + one 8-bit E8M0 scale per 32 weights."""
        n = out_features * in_features
        return n * 8.0 + (n // MXFP8_BLOCK) * 8.0

    def quantize_weight(self, w: torch.Tensor, name: str = "weight", *, per_channel: bool = False) -> QuantizedWeight:
        self.check_weight(w, name)
        q, codes = quantize_mxfp8(w.float(), mode="ck_eager", name=name)
        return QuantizedWeight(q, codes, None)

    def from_codes(self, codes: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor | None = None,
                   name: str = "weight") -> QuantizedWeight:
        """float8 codes ``[out, in]`` with their uint8 E8M0 block scales ``[out, in/32]``."""
        return QuantizedWeight(codes, scale.to(torch.uint8), None)

    def dequantize_weight(self, q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_mxfp8(q.weight, q.scale, dtype)

    def gemm_operand(self, q: QuantizedWeight) -> torch.Tensor:
        return dequantize_mxfp8(q.weight, q.scale)

    def gemm_alpha(self, q: QuantizedWeight) -> torch.Tensor:
        return torch.ones((), dtype=torch.float32, device=q.weight.device)

    def dynamic_linear(self, x: torch.Tensor, q: QuantizedWeight, bias: torch.Tensor | None, *,
                       mode: str, variant: str = "") -> torch.Tensor:
        return mxfp8_linear(x, q.weight, q.scale, bias, mode=mode)

    def gptq_round(self, col: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``fp8(clamp(col / scale, +-448))`` (``scale`` a power of two, so the division is exact) and its value."""
        c = torch.clamp(col / scale, -FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)
        return c, c.float() * scale

    def block_scale_candidates(self, blocks: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The round-to-nearest E8M0 scale of each block and the next smaller power of two (which clips the block
        max but halves the step of everything else); code 0 blocks keep code 0."""
        e = e8m0_from_amax(torch.as_tensor(blocks, dtype=torch.float32).abs().amax(dim=-1), mode="ck_eager")
        lower = torch.where(e > 1, e - 1, e).to(torch.uint8)
        return [(e, _power_of_two(e)), (lower, _power_of_two(lower))]


MXFP8 = MXFP8Format()
