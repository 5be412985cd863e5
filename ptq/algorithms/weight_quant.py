"""Weight quantizers: ``Tensor [out, in] -> (weight, weight_scale, weight_scale_2)`` per format and method.

"max" is plain round-to-nearest with scales from the absolute maximum. Further methods ("mse",
"four_over_six", "gptq") register in ``WEIGHT_METHODS``; every method returns tensors in the same layout, so the
exported file format never changes with the method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ptq.formats import fp8 as fp8_fmt
from ptq.formats import nvfp4 as nvfp4_fmt
from ptq.formats.nvfp4 import NibbleOrder


@dataclass
class QuantizedWeight:
    """fp8: weight float8_e4m3fn ``[out, in]``, scale float32 ``[]``/``[out, 1]``, scale_2 None.
    nvfp4: weight uint8 ``[out, in/2]`` (``order``), scale float8_e4m3fn ``[out, in/16]``, scale_2 float32 ``[]``."""

    weight: torch.Tensor
    scale: torch.Tensor
    scale_2: torch.Tensor | None


@dataclass
class WeightContext:
    """What a weight method may use besides the weight: the layer name (for errors), the recipe knobs and, for
    GPTQ, the input Hessian ``H = X^T X`` float32 ``[in, in]`` from calibration."""

    name: str
    fp8_per_channel: bool = False
    order: NibbleOrder = NibbleOrder.HIGH_FIRST
    hessian: torch.Tensor | None = None
    gptq_damp: float = 0.01


WeightMethod = Callable[[torch.Tensor, str, WeightContext], QuantizedWeight]
WEIGHT_METHODS: dict[str, WeightMethod] = {}


def register_weight_method(name: str) -> Callable[[WeightMethod], WeightMethod]:
    def deco(fn: WeightMethod) -> WeightMethod:
        WEIGHT_METHODS[name] = fn
        return fn

    return deco


@register_weight_method("max")
def quantize_weight_max(w: torch.Tensor, fmt: str, ctx: WeightContext) -> QuantizedWeight:
    """Round-to-nearest with amax scales (per tensor / per channel for fp8; global + per-16 blocks for nvfp4)."""
    if fmt == "fp8":
        q, scale = fp8_fmt.quantize_fp8_weight(w, per_channel=ctx.fp8_per_channel, name=f"{ctx.name}.weight")
        return QuantizedWeight(q, scale, None)
    if fmt == "nvfp4":
        w32 = w.float()
        global_scale = nvfp4_fmt.nvfp4_global_scale(w32.abs().amax())
        packed, block_scales = nvfp4_fmt.quantize_nvfp4(w32, global_scale, order=ctx.order, name=f"{ctx.name}.weight")
        return QuantizedWeight(packed, block_scales, global_scale)
    raise ValueError(f"unknown format {fmt!r}")


def quantize_weight(w: torch.Tensor, fmt: str, method: str, ctx: WeightContext) -> QuantizedWeight:
    """Dispatch to the registered weight method ``method``."""
    try:
        fn = WEIGHT_METHODS[method]
    except KeyError:
        raise ValueError(f"unknown weight method {method!r}; known: {sorted(WEIGHT_METHODS)}") from None
    return fn(w, fmt, ctx)


# --------------------------------------------------------------------------------------------------
# Error-minimising methods (ptq.algorithms.weight_search / ptq.algorithms.gptq); same output layout as "max".
# --------------------------------------------------------------------------------------------------


def _nvfp4_result(w: torch.Tensor, codes: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor,
                  ctx: WeightContext) -> QuantizedWeight:
    """Pack unpacked E2M1 codes ``[out, in]`` in ``ctx.order``; checks that the scales are finite."""
    g = global_scale.float().reshape(())
    if not (bool(torch.isfinite(g)) and float(g) > 0):
        raise ValueError(f"{ctx.name}: weight global scale {float(g)} is not finite and > 0")
    if not bool(torch.isfinite(block_scales.float()).all()):
        raise ValueError(f"{ctx.name}: non-finite NVFP4 block scale")
    return QuantizedWeight(nvfp4_fmt.pack_e2m1(codes, ctx.order), block_scales, g)


def _fp8_result(w: torch.Tensor, scale: torch.Tensor, ctx: WeightContext) -> QuantizedWeight:
    q = fp8_fmt.quantize_fp8(w, scale.to(w.device), name=f"{ctx.name}.weight")
    return QuantizedWeight(q, scale.to(torch.float32), None)


@register_weight_method("mse")
def quantize_weight_mse(w: torch.Tensor, fmt: str, ctx: WeightContext) -> QuantizedWeight:
    """NVFP4: global scale (8 candidates per octave) and per-block float8 scale (11 neighbours of the amax scale)
    minimising the squared weight error, weighted by ``diag(H)`` when a Hessian is given. FP8: the weight scale
    (per tensor or per channel) clipped to minimise the squared error."""
    from ptq.algorithms import weight_search as ws

    if fmt == "fp8":
        return _fp8_result(w, ws.fp8_mse_scale(w, ctx.fp8_per_channel), ctx)
    if fmt == "nvfp4":
        fmt_checks(w, ctx, nvfp4=True)
        w32 = w.float()
        cw = None if ctx.hessian is None else torch.diagonal(ctx.hessian).float().to(w.device)
        g, s, _ = ws.search_global_and_blocks(w32, col_weight=cw)
        return _nvfp4_result(w, ws.nvfp4_codes(w32, g, s), s, g, ctx)
    raise ValueError(f"unknown format {fmt!r}")


@register_weight_method("four_over_six")
def quantize_weight_four_over_six(w: torch.Tensor, fmt: str, ctx: WeightContext) -> QuantizedWeight:
    """Four-over-Six (arXiv 2512.02010): global scale ``amax / (6 * 256)``; per block the float8 scale mapping the
    block max to 6 or to 4, whichever has the smaller squared error. FP8 layers (per-layer overrides) get "mse"."""
    from ptq.algorithms import weight_search as ws

    if fmt == "fp8":  # a layer set to fp8 by quant.layer_formats / mixed precision: the FP8 analogue
        return quantize_weight_mse(w, fmt, ctx)
    if fmt != "nvfp4":
        raise ValueError(f"unknown format {fmt!r}")
    fmt_checks(w, ctx, nvfp4=True)
    w32 = w.float()
    g, s = ws.nvfp4_four_over_six_scales(w32)
    return _nvfp4_result(w, ws.nvfp4_codes(w32, g, s), s, g, ctx)


def _gptq(w: torch.Tensor, fmt: str, ctx: WeightContext, scales: str) -> QuantizedWeight:
    from ptq.algorithms import gptq

    if ctx.hessian is None:
        raise ValueError(f"{ctx.name}: weight method 'gptq' needs the layer's input Hessian (calibrate with "
                         "LinearInputObserver(hessian=True) and pass hessians= to quantize_)")
    fmt_checks(w, ctx, nvfp4=fmt == "nvfp4")
    if fmt == "nvfp4":
        codes, s, g = gptq.gptq_nvfp4(w, ctx.hessian, damp=ctx.gptq_damp, scales=scales)
        return _nvfp4_result(w, codes, s, g, ctx)
    if fmt == "fp8":
        codes, scale = gptq.gptq_fp8(w, ctx.hessian, damp=ctx.gptq_damp, scales=scales,
                                     per_channel=ctx.fp8_per_channel)
        return QuantizedWeight(codes, scale, None)
    raise ValueError(f"unknown format {fmt!r}")


@register_weight_method("gptq")
def quantize_weight_gptq(w: torch.Tensor, fmt: str, ctx: WeightContext) -> QuantizedWeight:
    """GPTQ (Hessian error feedback, lazy batches of 128 columns, dampening ``ctx.gptq_damp``) on top of the "mse"
    scales: NVFP4 block scales chosen per 16-column group from the error-updated weights, FP8 MSE-clipped scale."""
    return _gptq(w, fmt, ctx, "mse")


@register_weight_method("gptq_max")
def quantize_weight_gptq_max(w: torch.Tensor, fmt: str, ctx: WeightContext) -> QuantizedWeight:
    """GPTQ with round-to-nearest amax scales (the classic variant: scales as "max", only the rounding changes)."""
    return _gptq(w, fmt, ctx, "max")


@register_weight_method("gptq_four_over_six")
def quantize_weight_gptq_four_over_six(w: torch.Tensor, fmt: str, ctx: WeightContext) -> QuantizedWeight:
    """GPTQ on Four-over-Six scales (NVFP4: per 16-column group the x6 or x4 block scale with the smaller
    diag(H)-weighted error, chosen from the error-updated weights; FP8: the amax scale)."""
    return _gptq(w, fmt, ctx, "four_over_six")


def fmt_checks(w: torch.Tensor, ctx: WeightContext, nvfp4: bool = False) -> None:
    """The input checks of the "max" quantizers (float dtype, 2-D, finite; NVFP4: in % 16 == 0) with the same
    FormatError messages, so every method falls back the same way."""
    from ptq.formats.checks import check_finite, check_float, check_rank

    name = f"{ctx.name}.weight"
    if nvfp4:
        nvfp4_fmt.check_nvfp4_matrix(w, name)
        return
    check_float(w, name)
    check_rank(w, 2, name)
    check_finite(w, name)
