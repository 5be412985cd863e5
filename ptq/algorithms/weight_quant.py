"""Round-to-nearest weight quantization with a choice of scales: ``Tensor [out, in] -> QuantizedWeight``.

The scale method (``WeightMethod.scales``) is looked up per format in :data:`SCALE_METHODS`: "max" (the format
object's own amax quantizer) and "mse" (clip search) work for every format; NVFP4 and FP8 have their own "mse"
searches and "four_over_six" (``ptq.algorithms.weight_search`` holds them), int8 a per-row clip search, MXFP8 a
per-block choice between two power-of-two scales. Every method returns the format's ordinary in-memory layout,
so the exported file format never changes with the method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ptq.algorithms import weight_search as ws
from ptq.algorithms.recipe import WeightMethod
from ptq.formats import NumberFormat, QuantizedWeight


@dataclass
class WeightContext:
    """What a weight method may use besides the weight: the layer name (for errors) and, for Hessian-aware
    methods, the input Hessian ``H = E[x x^T]`` float32 ``[in, in]`` from calibration. ``fp8_per_channel`` and
    ``gptq_damp`` are read by :func:`ptq.algorithms.methods.quantize_weight` only (named-method shorthand)."""

    name: str
    hessian: torch.Tensor | None = None
    fp8_per_channel: bool = False
    gptq_damp: float = 0.01
    input_cross: torch.Tensor | None = None  # activation-aware GPTQ: E[x^T q(x)] [in, in] (hessian = E[q(x)^T q(x)])

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"


ScaleMethod = Callable[[torch.Tensor, NumberFormat, WeightMethod, WeightContext], QuantizedWeight]
#: (scale method, format name) -> implementation; format "*" = any format.
SCALE_METHODS: dict[tuple[str, str], ScaleMethod] = {}


def register_scale_method(scales: str, fmt: str = "*") -> Callable[[ScaleMethod], ScaleMethod]:
    def deco(fn: ScaleMethod) -> ScaleMethod:
        SCALE_METHODS[(scales, fmt)] = fn
        return fn

    return deco


@register_scale_method("max")
def _max_scales(w: torch.Tensor, fmt: NumberFormat, cfg: WeightMethod, ctx: WeightContext) -> QuantizedWeight:
    """The format's own round-to-nearest with amax scales."""
    return fmt.quantize_weight(w, ctx.weight_name, per_channel=cfg.fp8_per_channel)


@register_scale_method("mse")
def _clip_mse_scales(w: torch.Tensor, fmt: NumberFormat, cfg: WeightMethod, ctx: WeightContext,
                     grid: int = 40, lo: float = 0.5) -> QuantizedWeight:
    """Any format: round-to-nearest of ``clamp(w, +-a*amax)`` for the clip ratio ``a`` (``grid`` log-spaced values
    in [lo, 1], 1 first so ties keep the amax scales) with the smallest squared weight error. For a format with
    per-tensor scales this is MSE clipping of the scale; blocks whose max stays below the clip keep their scale."""
    fmt.check_weight(w, ctx.weight_name)
    w32 = w.float()
    amax = w32.abs().amax()
    best: tuple[float, QuantizedWeight] | None = None
    for a in torch.logspace(0.0, float(torch.log10(torch.tensor(lo))), grid).tolist():
        c = amax * a
        q = fmt.quantize_weight(torch.clamp(w32, -c, c), ctx.weight_name, per_channel=cfg.fp8_per_channel)
        err = float((fmt.dequantize_weight(q) - w32).pow(2).sum())
        if best is None or err < best[0]:
            best = (err, q)
    assert best is not None
    return best[1]


@register_scale_method("mse", "fp8")
@register_scale_method("four_over_six", "fp8")  # a layer set to fp8 in an NVFP4 Four-over-Six recipe: the FP8 analogue
def _fp8_mse_scales(w: torch.Tensor, fmt: NumberFormat, cfg: WeightMethod, ctx: WeightContext) -> QuantizedWeight:
    """FP8 weight scale (per tensor or per channel) clipped to minimise the squared weight error."""
    return fmt.quantize_with_scale(w, ws.fp8_mse_scale(w, cfg.fp8_per_channel), ctx.weight_name)


@register_scale_method("mse", "nvfp4")
def _nvfp4_mse_scales(w: torch.Tensor, fmt: NumberFormat, cfg: WeightMethod, ctx: WeightContext) -> QuantizedWeight:
    """Global scale (8 candidates per octave) and per-block float8 scale (11 neighbours of the amax scale)
    minimising the squared weight error, weighted by ``diag(H)`` when a Hessian is given."""
    fmt.check_weight(w, ctx.weight_name)
    w32 = w.float()
    cw = None if ctx.hessian is None else torch.diagonal(ctx.hessian).float().to(w.device)
    g, s, _ = ws.search_global_and_blocks(w32, col_weight=cw)
    return fmt.from_codes(ws.nvfp4_codes(w32, g, s), s, g, ctx.name)


@register_scale_method("four_over_six", "nvfp4")
def _nvfp4_four_over_six_scales(w: torch.Tensor, fmt: NumberFormat, cfg: WeightMethod,
                                ctx: WeightContext) -> QuantizedWeight:
    """Four-over-Six (arXiv 2512.02010): global scale ``amax / (6 * 256)``; per block the float8 scale mapping the
    block max to 6 or to 4, whichever has the smaller squared error."""
    fmt.check_weight(w, ctx.weight_name)
    w32 = w.float()
    g, s = ws.nvfp4_four_over_six_scales(w32)
    return fmt.from_codes(ws.nvfp4_codes(w32, g, s), s, g, ctx.name)


@register_scale_method("mse", "int8")
@register_scale_method("mse", "int8_convrot")
@register_scale_method("mse", "convrot_w4a4")
def _fixed_scale_mse(w: torch.Tensor, fmt: NumberFormat, cfg: WeightMethod, ctx: WeightContext,
                     grid: int = 40, lo: float = 0.5) -> QuantizedWeight:
    """Formats with one scale per tensor or per row: the amax scale times the clip ratio ``a`` (``grid`` log-spaced
    values in [lo, 1], 1 first so ties keep it) with the smallest squared weight error, chosen per row when the
    format's round-to-nearest scales are per row; measured in the basis the codes are stored in (for an orthogonal
    rotation, the same error as in the original basis)."""
    base = fmt.quantize_weight(w, ctx.weight_name, per_channel=cfg.fp8_per_channel)
    w_c, _ = fmt.code_domain(w, None)
    per_row = base.scale.dim() > 0
    best_s, best_e = base.scale, None
    for a in torch.logspace(0.0, float(torch.log10(torch.tensor(lo))), grid).tolist():
        s = base.scale * a
        _, q = fmt.gptq_round(w_c, s)
        e = (q - w_c).pow(2).sum(dim=1, keepdim=True) if per_row else (q - w_c).pow(2).sum()
        if best_e is None:
            best_e = e
        else:
            better = e < best_e
            best_s, best_e = torch.where(better, s, best_s), torch.minimum(e, best_e)
    codes, _ = fmt.gptq_round(w_c, best_s)
    return fmt.from_codes(codes, best_s, None, ctx.name)


@register_scale_method("mse", "mxfp8")
def _block_candidate_mse(w: torch.Tensor, fmt: NumberFormat, cfg: WeightMethod, ctx: WeightContext
                         ) -> QuantizedWeight:
    """Block formats with per-block scale candidates (:meth:`~ptq.formats.NumberFormat.block_scale_candidates`): per
    block the candidate with the smallest squared error, weighted by ``diag(H)`` when a Hessian is given."""
    fmt.check_weight(w, ctx.weight_name)
    bs = fmt.block_size
    assert bs is not None
    out_f, in_f = w.shape
    blocks = w.float().reshape(out_f, in_f // bs, bs)
    cw = (torch.ones(in_f, device=w.device) if ctx.hessian is None
          else torch.diagonal(ctx.hessian).float().to(w.device)).reshape(1, in_f // bs, bs)
    best_s = best_v = best_e = None
    for s, v in fmt.block_scale_candidates(blocks):
        _, q = fmt.gptq_round(blocks, v.unsqueeze(-1))
        e = ((q - blocks).pow(2) * cw).sum(-1)
        if best_e is None:
            best_s, best_v, best_e = s, v, e
        else:
            better = e < best_e
            best_s, best_v = torch.where(better, s, best_s), torch.where(better, v, best_v)
            best_e = torch.minimum(e, best_e)
    assert best_v is not None and best_s is not None
    codes, _ = fmt.gptq_round(blocks, best_v.unsqueeze(-1))
    return fmt.from_codes(codes.reshape(out_f, in_f), best_s, None, ctx.name)


def scale_method(scales: str, fmt: NumberFormat) -> ScaleMethod:
    """The implementation of ``scales`` for ``fmt``; ValueError naming what exists otherwise."""
    fn = SCALE_METHODS.get((scales, fmt.name)) or SCALE_METHODS.get((scales, "*"))
    if fn is None:
        have = sorted({s for s, f in SCALE_METHODS if f in ("*", fmt.name)})
        raise ValueError(f"weight scales {scales!r} are not implemented for format {fmt.name!r} "
                         f"(available: {', '.join(have)})")
    return fn


def quantize_rtn(w: torch.Tensor, fmt: NumberFormat, cfg: WeightMethod, ctx: WeightContext) -> QuantizedWeight:
    """Round-to-nearest on the scales ``cfg.scales`` chooses."""
    return scale_method(cfg.scales, fmt)(w, fmt, cfg, ctx)
