"""``QuantLinear``: a Linear that holds its quantized weight and simulates the target kernels' numerics exactly.

NVFP4 W4A4 (Blackwell ``scaled_mm_nvfp4``): the activation is quantized with the static per-tensor ``input_scale``
and per-16 block scales computed at run time; ``y = (Xv @ Wv^T) * (input_scale * weight_scale_2) + bias`` where
Xv, Wv are the E2M1 codes times their float8 block scales. Those block values are exact in bf16, so the product is
computed with fp32 accumulation (an fp32 matmul on CPU, a bf16 GEMM with fp32 output on CUDA) and rounded once.
FP8 W8A8 (``torch._scaled_mm``): ``y = (Xq @ Wq^T) * (input_scale * weight_scale) + bias``,
``Xq = fp8(clamp(x.float() * (1/input_scale), +-448))`` (comfy-kitchen's CUDA quantizer; ``QuantLinear.fp8_act_mode``).
Formats whose activation scales are computed at run time (int8 per row, mxfp8 per 32-block; no input_scale) run
their own kernel's arithmetic, ``NumberFormat.dynamic_linear``.
Weight-only variants dequantize the weight to the activation dtype and run a plain linear (what loaders without
FP4/FP8 kernels do).

CUDA fast path (bf16 activations, W+A): one fused Triton kernel quantizes the activation
(:mod:`ptq.formats.triton_quant`, bit-exact with the torch reference), then one GEMM whose fp32 epilogue applies
the global scales and the bias with a single rounding to bf16: NVFP4 ``torch.addmm(bias, Xv, Wv^T, alpha=alpha)``
with ``alpha = input_scale * weight_scale_2`` fixed at construction; FP8 the same bf16 ``addmm`` on the exact bf16
values of the FP8 operands (``QuantLinear.fp8_gemm = "bf16"``, the default: the activation kernel writes those
values directly) or ``torch._scaled_mm`` on the real FP8 operands (``"scaled_mm"``). Sibling layers reading the
same input with the same input scale (attention q/k/v) reuse one quantized activation. The CPU path (fp32 matmul)
and non-bf16 inputs keep the reference arithmetic below.

The class-level options (``fast_path``, ``fp8_gemm``, ``fp8_act_mode``, ``fast_path_any_device``) are set for a block
of code with :func:`kernel_options`, which restores them afterwards.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ptq.formats import NumberFormat, QuantizedWeight, get_format, triton_quant
from ptq.formats.fp8 import FP8_MODES
from ptq.formats.nvfp4_format import MEMORY_NIBBLE_ORDER

# Order of the packed NVFP4 nibbles held in memory (exporters convert to their target's order).
CANONICAL_NIBBLE_ORDER = MEMORY_NIBBLE_ORDER


@dataclass
class QuantizedLinearState:
    """Quantized weight of one Linear, as exporters read it: ``format`` names a registered number format and
    ``weight`` / ``weight_scale`` / ``weight_scale_2`` are that format's in-memory layout (e.g. fp8: float8_e4m3fn
    ``[out, in]`` + float32 ``[]`` or ``[out, 1]``; nvfp4: uint8 ``[out, in/2]`` high nibble first + float8_e4m3fn
    ``[out, in/16]`` row-major + float32 ``[]``). input_scale: float32 ``[]`` (the calibrated activation scale) or
    None for weight-only. dynamic_activations: the activations are quantized with scales computed at run time
    (formats with ``NumberFormat.dynamic_activations``, e.g. int8, mxfp8); no input_scale, not weight-only.
    pre_quant_scale: ``[in]`` per-input-channel smoothing factor (AWQ/SmoothQuant-style, as
    ComfyUI runs it: the layer computes ``linear(x * pre_quant_scale, W_stored)`` with ``W_stored = W /
    pre_quant_scale`` column-wise; values exact in bf16 and fp16) or None.
    """

    format: str
    weight: torch.Tensor
    weight_scale: torch.Tensor
    weight_scale_2: torch.Tensor | None
    input_scale: torch.Tensor | None
    bias: torch.Tensor | None
    in_features: int
    out_features: int
    dynamic_activations: bool = False

    @property
    def weight_only(self) -> bool:
        """Activations stay in high precision (no input_scale and no run-time activation quantization)."""
        return self.input_scale is None and not self.dynamic_activations
    pre_quant_scale: torch.Tensor | None = None

    def to(self, device: str | torch.device) -> QuantizedLinearState:
        """A copy with every tensor on ``device``."""
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return QuantizedLinearState(self.format, mv(self.weight), mv(self.weight_scale), mv(self.weight_scale_2),
                                    mv(self.input_scale), mv(self.bias), self.in_features, self.out_features,
                                    self.dynamic_activations, mv(self.pre_quant_scale))

    @property
    def number_format(self) -> NumberFormat:
        return get_format(self.format)

    @property
    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.weight, self.weight_scale, self.weight_scale_2)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the file represents, ``[out, in]``, dequantized in ``dtype`` the way the loaders do it
        (the format's dequantization, e.g. comfy-kitchen's ``dequantize_nvfp4`` arithmetic)."""
        return self.number_format.dequantize_weight(self.quantized_weight, dtype)

    def effective_weight(self) -> torch.Tensor:
        """float32 ``[out, in]``: the weight the layer applies to its unsmoothed input (the stored weight times
        ``pre_quant_scale`` per input column; the stored weight when there is none)."""
        w = self.dequantized_weight()
        return w if self.pre_quant_scale is None else w * self.pre_quant_scale.float().reshape(1, -1)

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


def _drop_act_cache(ref: weakref.ref) -> None:
    """weakref callback: the input tensor of the cached quantized activation was freed, free the activation too."""
    cache = QuantLinear._act_cache
    if cache is not None and cache[0] is ref:
        QuantLinear._act_cache = None


class QuantLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` running the simulated FP8 / NVFP4 kernel (see module docstring)."""

    def __init__(self, state: QuantizedLinearState, compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.in_features = state.in_features
        self.out_features = state.out_features
        self.format = state.format
        self.fmt = get_format(state.format)
        self.compute_dtype = compute_dtype
        if state.dynamic_activations and not self.fmt.dynamic_activations:
            raise ValueError(f"format {state.format!r} has static activation scales; dynamic_activations needs a "
                             "format that computes them at run time")
        self.dynamic_activations = state.dynamic_activations
        self.register_buffer("weight_q", state.weight)
        self.register_buffer("weight_scale", state.weight_scale)
        self.register_buffer("weight_scale_2", state.weight_scale_2)
        self.register_buffer("input_scale", state.input_scale)
        self.register_buffer("pre_quant_scale", state.pre_quant_scale)
        self.bias = None if state.bias is None else nn.Parameter(state.bias, requires_grad=False)
        # bf16-exact operand of the simulated GEMM (block values / fp8 values), built once
        wv = self.fmt.gemm_operand(state.quantized_weight)
        self.register_buffer("weight_values", wv.to(torch.bfloat16))
        self._init_fast_path()

    # -- CUDA fast path --------------------------------------------------------------------------------------
    #: GEMM of formats that have a native low-precision one (FP8: ``torch._scaled_mm``) on CUDA: "bf16" (default:
    #: addmm on the exact bf16 values of the operands, fp32 accumulation: equal to the reference path's numerics,
    #: measured bit-identical on the whole 5B) or "scaled_mm" (the native kernel ComfyUI runs, faster at large
    #: token counts, but cuBLASLt's FP8 accumulation differs from an fp32 GEMM: ~30% of bf16 outputs one step
    #: apart on an H100).
    fp8_gemm: ClassVar[str] = "bf16"
    #: Activation quantization arithmetic passed to the format (FP8 modes of ``ptq.formats.fp8``): "float32" =
    #: ``fp8(clamp(x.float() * (1/input_scale)))``, what comfy-kitchen's CUDA backend (ComfyUI's FP8 runtime on
    #: NVIDIA GPUs) computes; "ck_eager" = its CPU/eager fallback (the reciprocal rounded to the activation dtype,
    #: product in bf16). NVFP4 has one arithmetic. int8 / mxfp8 (dynamic activation scales) read the same names:
    #: "float32" = comfy-kitchen's CUDA kernels, "ck_eager" = its eager backend (ptq.formats.int8 / mxfp8).
    fp8_act_mode: ClassVar[str] = "float32"
    #: Use the fused CUDA path for bf16 activations (False: the reference path on CUDA too, for debugging).
    fast_path: ClassVar[bool] = True
    #: Run the fused path on any device Triton runs on, not only CUDA (CPU under ``TRITON_INTERPRET=1``: debugging
    #: the fused path without a GPU).
    fast_path_any_device: ClassVar[bool] = False
    #: Runtime overrides, per instance (``ptq.eval.runtimes`` sets them to simulate one GPU's ComfyUI):
    #: ``run_dequantized`` computes as a loader without the format's kernel does (dequantized weight, matmul in the
    #: input dtype, ``input_scale`` unused); ``dequant_float32`` dequantizes in float32 and rounds once to the input
    #: dtype (comfy-kitchen's CUDA backend) instead of computing in the input dtype (its eager backend).
    run_dequantized: bool = False
    dequant_float32: bool = False
    #: the format's kernel on the simulated GPU (``NumberFormat.runtime_variant``; "" = the format's nominal one)
    kernel_variant: str = ""
    #: The last activation quantized on CUDA: (weakref to input, input version, key, quantized), shared by siblings.
    _act_cache: ClassVar[tuple | None] = None

    def _init_fast_path(self) -> None:
        """Host-side constants of the fast path, read once (one device sync per layer at construction).

        ``_alpha`` = float32 ``input_scale * weight_scale_2`` (NVFP4) / ``input_scale * weight_scale`` (per-tensor
        FP8) as a Python float (exact), the GEMM epilogue's scale; ``_act_key`` identifies the activation
        quantization (format + input scale bits) for sibling reuse. Call again after changing the buffers in place.
        """
        self._alpha: float | None = None
        self._act_key: tuple | None = None
        self._prepared: object = None
        if self.weight_only or self.dynamic_activations:
            return
        scale = self.input_scale.float().reshape(())
        self._act_key = (self.format, scale.view(torch.int32).item())
        walpha = self.fmt.gemm_alpha(self._qweight())
        if walpha.numel() == 1:
            self._alpha = float(scale * walpha.float().reshape(()))
        self._prepared = self.fmt.fast_prepare(scale, torch.bfloat16, self.fp8_act_mode)

    def refresh_cache(self) -> None:
        """Recompute the fast path's constants after the quantization buffers were changed in place."""
        self.__dict__.pop("_loader_weight_cache", None)
        self._init_fast_path()

    def _loader_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight a loader without the format's kernel computes, ``[out, in]`` in ``dtype``: dequantized in
        float32 and rounded once (``dequant_float32``) or in ``dtype``. Kept between calls for a layer on the CPU
        (each call would decode it again: the slow part of the dequantized runtimes' CPU simulation)."""
        key = (dtype, self.dequant_float32, self.weight_q._version, self.weight_scale._version)
        cached = self.__dict__.get("_loader_weight_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        w = self.dequantized_weight(torch.float32).to(dtype) if self.dequant_float32 else \
            self.dequantized_weight(dtype)
        if self.weight_q.device.type == "cpu":
            self.__dict__["_loader_weight_cache"] = (key, w)
        return w

    def _qweight(self) -> QuantizedWeight:
        return QuantizedWeight(self.weight_q, self.weight_scale, self.weight_scale_2)

    def _use_fast_path(self, x: torch.Tensor) -> bool:
        return (self.fast_path and (x.is_cuda or self.fast_path_any_device) and x.dtype == torch.bfloat16
                and not self.weight_only and not self.run_dequantized and self._act_key is not None
                and triton_quant.triton_available(x.device))

    def _native_gemm(self) -> bool:
        return QuantLinear.fp8_gemm == "scaled_mm" and hasattr(self.fmt, "native_gemm") and not self.native_gemm_failed

    def _quantized_input(self, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Quantized activation of ``x2`` = ``x`` as ``[m, in]`` (bf16 block values for NVFP4; FP8 codes for
        ``torch._scaled_mm``, else their exact bf16 values), reusing the one computed by the previous layer when it
        saw the same tensor object ``x`` (same version) with the same input scale and representation. The cache
        entry dies with ``x``, so it never extends the lifetime of memory much."""
        codes = self._native_gemm()
        key = (self._act_key, codes)
        cache = QuantLinear._act_cache
        if cache is not None and cache[0]() is x and cache[1] == x._version and cache[2] == key:
            return cache[3]
        q = self.fmt.fast_activation(x2, self.input_scale, mode=self.fp8_act_mode, prepared=self._prepared,
                                     codes=codes)
        QuantLinear._act_cache = (weakref.ref(x, _drop_act_cache), x._version, key, q)
        return q

    def _bias_for(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        b = getattr(self, "_bias_cache", None)
        if b is None or b.dtype != dtype or b.device != device:
            b = (torch.zeros(self.out_features, dtype=dtype, device=device) if self.bias is None
                 else self.bias.detach().to(device=device, dtype=dtype))
            self._bias_cache = b
        return b

    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if x2.stride(-1) != 1 or x2.stride(0) != x2.shape[-1]:
            x2 = x2.contiguous()
        q = self._quantized_input(x, x2)
        bias = self._bias_for(torch.bfloat16, x.device)
        if self._native_gemm():
            try:
                y = self.fmt.native_gemm(q, self._qweight(), self.input_scale, bias)
            except RuntimeError:  # no native GEMM for this GPU / scaling mode: the bf16-value GEMM below instead
                self._no_scaled_mm = True
                return self._forward_fast(x)
        elif self._alpha is not None:
            y = torch.addmm(bias, q, self.gemm_operand().t(), beta=1, alpha=self._alpha)
        else:  # per-channel weight scale: per-column epilogue in fp32
            acc = _exact_matmul(q, self.gemm_operand())
            y = (acc * (self.input_scale * self.weight_alpha().reshape(1, -1)) + bias.float()).to(torch.bfloat16)
        return y.reshape(*x.shape[:-1], self.out_features)

    @property
    def weight_only(self) -> bool:
        return self.input_scale is None and not self.dynamic_activations

    @property
    def epilogue_scale(self) -> float | None:
        """The fast path's GEMM epilogue scale, ``input_scale * weight_scale_2`` (NVFP4) / ``input_scale *
        weight_scale`` (per-tensor FP8) in float32, as a Python float; None for weight-only, dynamic or per-channel
        layers."""
        return self._alpha

    @property
    def native_gemm_failed(self) -> bool:
        """True once the native low-precision GEMM (``fp8_gemm="scaled_mm"``) raised on this layer: it then runs the
        bf16-value GEMM instead."""
        return getattr(self, "_no_scaled_mm", False)

    def gemm_operand(self) -> torch.Tensor:
        """The bf16-exact weight operand of the simulated GEMM, ``[out, in]``: the resident ``weight_values``
        buffer, or rebuilt from the codes where the layer runs after :meth:`release_gemm_operand`."""
        wv = self._buffers.get("weight_values")
        return wv if wv is not None else self.fmt.gemm_operand(self._qweight()).to(torch.bfloat16)

    def release_gemm_operand(self) -> None:
        """Drop the resident GEMM operand (2 bytes per weight; the codes and scales stay): each forward rebuilds
        it, bit-identical. For weights offloaded to host memory, which then hold and stream ~4x fewer bytes."""
        self._buffers.pop("weight_values", None)

    def state(self) -> QuantizedLinearState:
        """The quantized weight as exporters read it."""
        return QuantizedLinearState(self.format, self.weight_q, self.weight_scale, self.weight_scale_2,
                                    self.input_scale, None if self.bias is None else self.bias.data,
                                    self.in_features, self.out_features, self.dynamic_activations,
                                    self.pre_quant_scale)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.state().dequantized_weight(dtype)

    def weight_alpha(self) -> torch.Tensor:
        """The weight's factor of the simulated GEMM's epilogue (float32 ``[]`` or ``[out]``)."""
        return self.fmt.gemm_alpha(self._qweight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:  # ComfyUI: input * pre_quant_scale cast to the input dtype, first
            x = x * self.pre_quant_scale.to(x.dtype)
        if self._use_fast_path(x):
            return self._forward_fast(x)
        out_dtype = x.dtype
        if self.weight_only or self.run_dequantized:
            w = self._loader_weight(out_dtype)
            return F.linear(x, w, None if self.bias is None else self.bias.to(out_dtype))
        if self.dynamic_activations:  # the format's runtime kernel: activation scales from x itself
            return self.fmt.dynamic_linear(x, self._qweight(), self.bias, mode=self.fp8_act_mode,
                                           variant=self.kernel_variant)
        xv = self.fmt.activation_values(x, self.input_scale, mode=self.fp8_act_mode)
        y = _exact_matmul(xv, self.gemm_operand()) * (self.input_scale * self.weight_alpha())
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(out_dtype)

    def extra_repr(self) -> str:
        mode = "weight-only" if self.weight_only else "W+A dynamic" if self.dynamic_activations else "W+A"
        smooth = ", pre_quant_scale" if self.pre_quant_scale is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
                f"{mode}{smooth}")


def clear_activation_cache() -> None:
    """Forget the quantized activation sibling layers share, so the next fast-path layer quantizes its input afresh
    (after changing kernel options, or to time / compare one layer on its own)."""
    QuantLinear._act_cache = None


#: ``fp8_gemm`` values: the bf16-value GEMM, or the native low-precision one.
FP8_GEMMS = ("bf16", "scaled_mm")


@contextlib.contextmanager
def kernel_options(*, fast_path: bool | None = None, fp8_gemm: str | None = None, fp8_act_mode: str | None = None,
                   fast_path_any_device: bool | None = None) -> Iterator[None]:
    """Set :class:`QuantLinear`'s class-level kernel options (the attributes of the same names) inside the block
    and restore the previous values on exit; None leaves an option as it is. The shared activation cache is cleared
    on entry and on exit. ``fp8_act_mode`` is read when a layer is built (its fast-path constants) and by every
    reference-path forward: build the layers inside the block for the fast path to use it too."""
    if fp8_gemm is not None and fp8_gemm not in FP8_GEMMS:
        raise ValueError(f"fp8_gemm={fp8_gemm!r}; expected one of {', '.join(FP8_GEMMS)}")
    if fp8_act_mode is not None and fp8_act_mode not in FP8_MODES:
        raise ValueError(f"fp8_act_mode={fp8_act_mode!r}; expected one of {', '.join(FP8_MODES)}")
    new = {k: v for k, v in (("fast_path", fast_path), ("fp8_gemm", fp8_gemm), ("fp8_act_mode", fp8_act_mode),
                             ("fast_path_any_device", fast_path_any_device)) if v is not None}
    old = {k: QuantLinear.__dict__[k] for k in new}
    clear_activation_cache()
    for k, v in new.items():
        setattr(QuantLinear, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(QuantLinear, k, v)
        clear_activation_cache()
