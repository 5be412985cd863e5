"""INT8 W8A8 (registry name ``"int8"``; ComfyUI's per-layer format ``int8_tensorwise``): symmetric int8 weight
codes with one float32 scale per tensor (or per output row), activations quantized per row at run time.

Value of a weight element: ``w[r, c] ~= code[r, c] * scale`` (``scale`` float32 ``[]``, or ``[out, 1]`` per row).
What comfy-kitchen 0.2.40 computes (``backends/eager/quantization.py``; its CUDA kernels ``int8_linear.cu``,
``cutlass_gemm_int8.cu`` read from the source):

* scale = ``max(amax / 127, 1e-30)`` (float32), codes = ``clamp(round(x / scale), -128, 127)``, the division and
  the round-half-to-even done in ``x.dtype`` (the scale cast to it; a zero cast scale replaced by the dtype's
  smallest normal). Dequantization: ``(code.float() * scale).to(dtype)``.
* The linear (``int8_linear``): each row of the activation gets its own scale ``amax(row) / 127``, the int8 GEMM
  accumulates in int32 (exact), and the epilogue scales by ``row_scale * weight_scale`` and adds the bias.

Runtime arithmetic variants (``mode``; the names of :data:`ptq.formats.fp8.FP8_MODES`):

* ``"ck_eager"``: the eager backend (ComfyUI on CPU, and on GPUs without comfy-kitchen's CUDA backend): row scale
  ``amax / 127`` (exact division), epilogue ``(acc * (row_scale * weight_scale)).to(dtype) + bias.to(dtype)``
  (two roundings, the bias added in ``dtype``).
* ``"float32"`` (and ``"divide"``, same here): the CUDA backend: row scale ``amax * fl(1/127)``, epilogue
  ``((acc * row_scale) * weight_scale + bias)`` in float32, rounded once.

ptq quantizes weights in float32 (``w.float()``): bit-identical to ``quantize_int8_tensorwise`` /
``quantize_int8_rowwise`` of the float32 weight.
"""

from __future__ import annotations

import torch

from .base import DynamicActivationFormat, QuantizedWeight
from .checks import FormatError, check_finite, check_float, check_rank
from .fp8 import divide_exact, map_row_chunks

__all__ = [
    "INT8",
    "INT8_MAX",
    "INT8_MIN_SCALE",
    "INT8Format",
    "dequantize_int8",
    "int8_gemm",
    "int8_linear",
    "int8_rowwise_activation",
    "int8_scale_from_amax",
    "quantize_int8",
    "quantize_int8_weight",
]

INT8_MAX = 127.0
#: Smallest scale comfy-kitchen writes (``clamp(min=1e-30)``): an all-zero tensor / row gets this scale.
INT8_MIN_SCALE = 1e-30
#: float32 ``1/127``: comfy-kitchen's CUDA quantizer multiplies by it instead of dividing.
_RECIP_127 = float(torch.tensor(1.0) / torch.tensor(127.0))
_DTYPE_FINITE_MAX = {torch.float16: 65504.0, torch.bfloat16: torch.finfo(torch.bfloat16).max,
                     torch.float32: torch.finfo(torch.float32).max}
_MODES = ("ck_eager", "float32", "divide")


def _check_mode(mode: str) -> str:
    if mode not in _MODES:
        raise ValueError(f"unknown int8 arithmetic mode {mode!r}; expected one of {', '.join(_MODES)}")
    return mode


def int8_scale_from_amax(amax: torch.Tensor, *, mode: str = "ck_eager") -> torch.Tensor:
    """float32 scale(s) ``max(amax / 127, 1e-30)``, same shape as ``amax``; ``mode="float32"`` multiplies by
    ``fl(1/127)`` after clamping ``amax`` to the finite range of ``amax.dtype`` (comfy-kitchen's CUDA kernel)."""
    if _check_mode(mode) == "ck_eager":
        scale = divide_exact(amax.float(), INT8_MAX)
    else:
        scale = torch.clamp(amax.float(), max=_DTYPE_FINITE_MAX.get(amax.dtype, float("inf"))) * _RECIP_127
    return torch.clamp(scale, min=INT8_MIN_SCALE)


def _codes(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor]:
    s = scale.to(device=x.device, dtype=x.dtype)
    s = torch.where(s == 0, torch.full_like(s, torch.finfo(x.dtype).tiny), s)
    return (torch.clamp(torch.round(x / s), -128.0, INT8_MAX).to(torch.int8),)


def quantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 codes ``clamp(round(x / scale), -128, 127)`` computed in ``x.dtype`` (``scale`` float32 ``[]`` or one
    per row ``[..., 1]``), as comfy-kitchen's ``_round_int8(x / _int8_scale_for_math(scale, x))``."""
    if scale.dim() == 0:
        flat = x.reshape(-1, x.shape[-1]) if x.dim() >= 2 else x.reshape(-1, 1)
        (q,) = map_row_chunks(_codes, flat, (), (scale,))
        return q.reshape(x.shape)
    x2, s2 = x.reshape(-1, x.shape[-1]), scale.reshape(-1, 1)
    (q,) = map_row_chunks(_codes, x2, (s2,))
    return q.reshape(x.shape)


def quantize_int8_weight(w: torch.Tensor, *, per_channel: bool = False, name: str = "weight"
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8 [out, in], scale float32 [] or [out, 1])`` of ``w.float()`` with amax scales (per tensor, or
    per output row with ``per_channel``)."""
    check_float(w, name)
    check_rank(w, 2, name)
    check_finite(w, name)
    w32 = w.float()
    amax = w32.abs().amax(dim=1, keepdim=True) if per_channel else w32.abs().amax()
    scale = int8_scale_from_amax(amax)
    return quantize_int8(w32, scale), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q.float() * scale).to(dtype)``: comfy-kitchen's ``dequantize_int8_simple_dtype``."""
    if q.dtype != torch.int8:
        raise FormatError(f"dequantize_int8: expected an int8 tensor, got {q.dtype}")
    return (q.float() * scale.float().to(q.device)).to(dtype)


def int8_rowwise_activation(x: torch.Tensor, *, mode: str = "ck_eager") -> tuple[torch.Tensor, torch.Tensor]:
    """Runtime activation quantization of ``x [..., in]``: ``(codes int8 [..., in], row scales float32 [..., 1])``
    with the row scale from each row's amax (see the module docstring for ``mode``)."""
    scale = int8_scale_from_amax(x.abs().amax(dim=-1, keepdim=True), mode=mode)
    return quantize_int8(x, scale), scale


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def int8_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``a [m, k] @ b [n, k]^T`` of int8 matrices (``torch._int_mm``; on CUDA padded as comfy-kitchen
    pads: m to a multiple of 32 (at least 32), k and n to multiples of 8)."""
    m, k = a.shape
    n = b.shape[0]
    bt = b.t()
    if a.is_cuda:
        pm, pk, pn = _round_up(max(m, 32), 32), _round_up(k, 8), _round_up(n, 8)
        a = torch.nn.functional.pad(a, (0, pk - k, 0, pm - m))
        bt = torch.nn.functional.pad(bt, (0, pn - n, 0, pk - k))
    try:
        out = torch._int_mm(a.contiguous(), bt.contiguous())
    except RuntimeError:  # no int8 GEMM on this device: float64 is exact for |sum| < 2**53
        out = (a.double() @ bt.double()).to(torch.int32)
    return out[:m, :n]


def int8_linear(x: torch.Tensor, q: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, *,
                mode: str = "ck_eager") -> torch.Tensor:
    """comfy-kitchen's ``int8_linear``: ``x [..., in]`` (float16 / bf16 / float32) times int8 codes ``q [out, in]``
    with a weight scale ``[]`` or ``[out, 1]``; dynamic per-row activation scales; returns ``[..., out]`` in
    ``x.dtype`` with the epilogue of ``mode`` (module docstring)."""
    dtype = x.dtype
    x2 = x.reshape(-1, x.shape[-1])
    xq, xs = int8_rowwise_activation(x2, mode=mode)
    acc = int8_gemm(xq, q.to(x.device)).float()
    ws = weight_scale.float().to(x.device).reshape(1, -1)
    if mode == "ck_eager":
        y = (acc * (xs * ws)).to(dtype)
        if bias is not None:
            y = y + bias.to(device=y.device, dtype=dtype).reshape(1, -1)
    else:
        y = acc * xs * ws
        if bias is not None:
            y = y + bias.to(device=y.device, dtype=dtype).float().reshape(1, -1)
        y = y.to(dtype)
    return y.reshape(*x.shape[:-1], q.shape[0])


class INT8Format(DynamicActivationFormat):
    """int8 codes, float32 weight scale per tensor (or per output row), dynamic per-row activation scales."""

    name = "int8"
    block_size = None
    storage_dtype = torch.int8
    weight_bits = 8.0
    activation_block = 1
    activation_scaling = "quantizes activations per row"
    # comfy-kitchen's INT8 tensor-core GEMM needs SM >= 7.5; ComfyUI never disables int8_tensorwise: elsewhere
    # (CPU) the eager int8_linear runs the same W8A8 arithmetic
    native_min_capability = (7, 5)
    backend_arithmetic = True
    portable_kernel = True

    def storage_bits(self, out_features: int, in_features: int, *, per_channel: bool = False) -> float:
        """``n*8`` code bits + one float32 scale per tensor (per row with ``per_channel``)."""
        return out_features * in_features * 8.0 + 32.0 * (out_features if per_channel else 1)

    def quantize_weight(self, w: torch.Tensor, name: str = "weight", *, per_channel: bool = False) -> QuantizedWeight:
        q, scale = quantize_int8_weight(w, per_channel=per_channel, name=name)
        return QuantizedWeight(q, scale, None)

    def quantize_with_scale(self, w: torch.Tensor, scale: torch.Tensor, name: str = "weight") -> QuantizedWeight:
        """Codes of ``w.float()`` for a given float32 scale (``[]`` or ``[out, 1]``)."""
        self.check_weight(w, name)
        scale = scale.to(device=w.device, dtype=torch.float32)
        return QuantizedWeight(quantize_int8(w.float(), scale), scale, None)

    def dequantize_weight(self, q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8(q.weight, q.scale, dtype)

    def gemm_operand(self, q: QuantizedWeight) -> torch.Tensor:
        return q.weight.float()

    def gemm_alpha(self, q: QuantizedWeight) -> torch.Tensor:
        return q.scale.reshape(-1) if q.scale.dim() else q.scale

    def dynamic_linear(self, x: torch.Tensor, q: QuantizedWeight, bias: torch.Tensor | None, *,
                       mode: str, variant: str = "") -> torch.Tensor:
        return int8_linear(x, q.weight, q.scale, bias, mode=mode)

    def gptq_round(self, col: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``clamp(round(col / scale), -128, 127)`` in float32 and its value ``code * scale``."""
        c = torch.clamp(torch.round(col / scale), -128.0, INT8_MAX)
        return c.to(torch.int8), c * scale


INT8 = INT8Format()
