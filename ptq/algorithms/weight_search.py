"""Error-minimising weight scales that keep the file format unchanged: NVFP4 block-scale search ("mse"),
Four-over-Six ("four_over_six") and MSE clipping of FP8 weight scales.

Everything returns the same tensors as round-to-nearest with amax scales (``weight_quant.quantize_weight_max``):
NVFP4 packed E2M1 codes ``[out, in/2]`` + float8_e4m3fn block scales ``[out, in/16]`` + float32 global scale ``[]``,
FP8 codes ``[out, in]`` + float32 scale ``[]``/``[out, 1]``. Only the chosen values differ, so ComfyUI and the
diffusers loaders read the result with their stock kernels.

NVFP4 element value (as ComfyUI dequantizes it): ``e2m1(code) * (global * float(block_scale))``. Given the scales,
the codes are the round-to-nearest-even E2M1 codes of ``w / (global * block_scale)`` clamped to +-6 (exactly what
:func:`ptq.formats.nvfp4.quantize_nvfp4` does), so a method only chooses scales; :func:`nvfp4_codes` turns them into
codes. Positive float8_e4m3fn bit patterns ``0x00..0x7E`` are ordered like their values, so "the k-th neighbour of
a scale" is the bit pattern plus k.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ptq.formats import fp8 as fp8_fmt
from ptq.formats import nvfp4 as nvfp4_fmt
from ptq.formats.fp8 import FP8_DTYPE, FP8_E4M3_MAX, divide_exact
from ptq.formats.nvfp4 import E2M1_MAX, NVFP4_BLOCK

__all__ = [
    "DEFAULT_SCALE_OFFSETS",
    "FOUR_OVER_SIX_SCALE_MAX",
    "fp8_mse_scale",
    "fp8_weight_error",
    "nvfp4_block_sse",
    "nvfp4_codes",
    "nvfp4_dequant",
    "nvfp4_four_over_six_scales",
    "nvfp4_max_scales",
    "nvfp4_mse_scales",
    "nvfp4_weight_sse",
]

#: Neighbouring float8 block scales tried by the "mse" search, as bit-pattern offsets from the round-to-nearest
#: amax scale (one step is 1/8 to 1/16 of an octave): -4 clips the block maximum by up to ~30%, +5 reaches the
#: Four-over-Six scale (x1.5, max code 4) and slightly beyond.
DEFAULT_SCALE_OFFSETS: tuple[int, ...] = (0, -1, 1, -2, 2, -3, 3, -4, 4, 5, 6)
#: Four-over-Six's largest block scale: the global scale is ``amax / (6 * 256)`` so that the largest block can
#: still take the x1.5 ("max code 4") scale, 384 <= 448 (the paper's choice).
FOUR_OVER_SIX_SCALE_MAX = 256.0
_FP8_MAX_CODE = 0x7E  # bit pattern of 448; 0x7F is NaN
#: Rows processed per chunk are chosen so a chunk holds about this many elements per candidate (CPU cache / GPU
#: memory friendly; results do not depend on it).
_CHUNK_ELEMENTS = 1 << 18


def _row_chunks(rows: int, cols: int, device: torch.device) -> int:
    per = _CHUNK_ELEMENTS if device.type == "cpu" else _CHUNK_ELEMENTS * 64
    return max(1, per // max(cols, 1))


def _e2m1_round(y: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8) of float32 ``y`` (already divided by its scale): RNE, saturating at +-6."""
    return nvfp4_fmt._encode_unchecked(torch.clamp(y, -E2M1_MAX, E2M1_MAX))


def _block_quant(xb: torch.Tensor, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes uint8 and dequantized float32 values of blocks ``xb [..., 16]`` with per-block ``total [...]``
    (= global * block_scale, float32); a zero total gives zero codes (as comfy-kitchen)."""
    zero = total == 0
    t = torch.where(zero, torch.ones_like(total), total).unsqueeze(-1)
    y = torch.where(zero.unsqueeze(-1), torch.zeros_like(xb), xb / t)
    codes = _e2m1_round(y)
    vals = nvfp4_fmt.e2m1_lut(xb.device)[codes.to(torch.int32)] * total.unsqueeze(-1)
    return codes, vals


def nvfp4_max_scales(w: torch.Tensor, global_scale: torch.Tensor, e2m1_max: float = E2M1_MAX) -> torch.Tensor:
    """Round-to-nearest amax block scales ``fp8(min(block_amax / e2m1_max / global, 448))`` [out, in/16]."""
    rows, cols = w.shape
    amax = w.float().reshape(rows, cols // NVFP4_BLOCK, NVFP4_BLOCK).abs().amax(-1)
    return torch.clamp(divide_exact(amax, e2m1_max) / global_scale, max=FP8_E4M3_MAX).to(FP8_DTYPE)


def nvfp4_codes(w: torch.Tensor, global_scale: torch.Tensor, block_scales: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8 ``[out, in]``, unpacked) of ``w`` for given scales; the codes the quantizer would write."""
    rows, cols = w.shape
    out = torch.empty(rows, cols, dtype=torch.uint8, device=w.device)
    step = _row_chunks(rows, cols, w.device)
    g = global_scale.float().reshape(())
    for r in range(0, rows, step):
        xb = w[r : r + step].float().reshape(-1, cols // NVFP4_BLOCK, NVFP4_BLOCK)
        codes, _ = _block_quant(xb, g * block_scales[r : r + step].float())
        out[r : r + step] = codes.reshape(-1, cols)
    return out


def nvfp4_dequant(w_shape: tuple[int, int], codes: torch.Tensor, global_scale: torch.Tensor,
                  block_scales: torch.Tensor) -> torch.Tensor:
    """float32 ``[out, in]`` value of unpacked codes: ``e2m1(code) * (global * block_scale)`` (loader arithmetic)."""
    rows, cols = w_shape
    vals = nvfp4_fmt.e2m1_lut(codes.device)[codes.to(torch.int32)].reshape(rows, cols // NVFP4_BLOCK, NVFP4_BLOCK)
    total = global_scale.float().reshape(()) * block_scales.float()
    return (vals * total.unsqueeze(-1)).reshape(rows, cols)


def nvfp4_block_sse(w: torch.Tensor, global_scale: torch.Tensor, block_scales: torch.Tensor,
                    col_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-block squared error ``sum_i c_i (w_i - deq_i)^2`` float32 ``[out, in/16]``; ``col_weight`` float32
    ``[in]`` (e.g. the Hessian diagonal ``E[x_i^2]``) weights the columns, None = plain SSE."""
    rows, cols = w.shape
    out = torch.empty(rows, cols // NVFP4_BLOCK, dtype=torch.float32, device=w.device)
    step = _row_chunks(rows, cols, w.device)
    g = global_scale.float().reshape(())
    cw = None if col_weight is None else col_weight.float().reshape(cols // NVFP4_BLOCK, NVFP4_BLOCK)
    for r in range(0, rows, step):
        xb = w[r : r + step].float().reshape(-1, cols // NVFP4_BLOCK, NVFP4_BLOCK)
        _, vals = _block_quant(xb, g * block_scales[r : r + step].float())
        e = (vals - xb).pow(2)
        out[r : r + step] = (e if cw is None else e * cw).sum(-1)
    return out


def nvfp4_weight_sse(w: torch.Tensor, global_scale: torch.Tensor, block_scales: torch.Tensor,
                     col_weight: torch.Tensor | None = None) -> float:
    """Total (weighted) squared error of the NVFP4 representation (float)."""
    return float(nvfp4_block_sse(w, global_scale, block_scales, col_weight).double().sum())


def _block_values(xb: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    return _block_quant(xb, total)[1]


def search_scale_offsets(xb: torch.Tensor, g: torch.Tensor, base: torch.Tensor, offsets: Sequence[int],
                         cw: torch.Tensor | None, max_code: int,
                         block_values: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _block_values
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Best float8 scale per block of ``xb [r, nb, 16]`` among ``base`` bit pattern + offsets; returns
    (scales float8 [r, nb], sse float32 [r, nb]). Ties keep the earlier offset (offset 0 = round-to-nearest).
    ``block_values(xb, total)``: the dequantized NVFP4 values of the blocks for per-block totals (default the
    format encoder's; the batched GPTQ passes its faster rounding of the same values)."""
    base_code = base.view(torch.uint8).to(torch.int32)
    best_s = best_e = None
    for k in offsets:
        code = torch.clamp(base_code + k, 0, max_code)
        if k != 0:  # an all-zero block keeps scale 0 (codes 0): nothing to gain
            code = torch.where(base_code == 0, base_code, code)
        s = code.to(torch.uint8).view(FP8_DTYPE)
        e = (block_values(xb, g * s.float()) - xb).pow(2)
        e = (e if cw is None else e * cw).sum(-1)
        if best_e is None:
            best_s, best_e = s, e
        else:
            better = e < best_e
            best_s = torch.where(better, s.view(torch.uint8), best_s.view(torch.uint8)).view(FP8_DTYPE)
            best_e = torch.where(better, e, best_e)
    return best_s, best_e


def nvfp4_mse_scales(
    w: torch.Tensor,
    global_scale: torch.Tensor,
    *,
    offsets: Sequence[int] | None = None,
    col_weight: torch.Tensor | None = None,
    scale_max: float = FP8_E4M3_MAX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block float8 scale minimising the block's (column-weighted) squared error, for a fixed global scale.

    Candidates: the round-to-nearest amax scale and its float8 neighbours ``offsets`` (bit-pattern steps), capped
    at ``scale_max``. Returns ``(block_scales float8_e4m3fn [out, in/16], block_sse float32 [out, in/16])``.
    Never worse than round-to-nearest (offset 0 is a candidate and wins ties).
    """
    offsets = DEFAULT_SCALE_OFFSETS if offsets is None else offsets
    rows, cols = w.shape
    nb = cols // NVFP4_BLOCK
    g = global_scale.float().reshape(())
    max_code = int(torch.tensor(scale_max).to(FP8_DTYPE).view(torch.uint8))
    max_code = min(max_code, _FP8_MAX_CODE)
    scales = torch.empty(rows, nb, dtype=FP8_DTYPE, device=w.device)
    sse = torch.empty(rows, nb, dtype=torch.float32, device=w.device)
    cw = None if col_weight is None else col_weight.float().to(w.device).reshape(nb, NVFP4_BLOCK)
    step = _row_chunks(rows, cols, w.device)
    for r in range(0, rows, step):
        xb = w[r : r + step].float().reshape(-1, nb, NVFP4_BLOCK)
        amax = xb.abs().amax(-1)
        base = torch.clamp(divide_exact(amax, E2M1_MAX) / g, max=scale_max).to(FP8_DTYPE)
        s, e = search_scale_offsets(xb, g, base, offsets, cw, max_code)
        scales[r : r + step], sse[r : r + step] = s, e
    return scales, sse


def global_scale_candidates(amax: torch.Tensor, num: int = 8) -> list[torch.Tensor]:
    """``amax / (6*448) * 2**(j/8)`` for j < num (float32 ``[]`` each): the float8 block-scale grid repeats every
    octave in 8 steps, so these shift every block scale's rounding position; j = 0 is the standard scale and
    j >= 5 (x1.54..) leaves the largest block room for the Four-over-Six x1.5 scale."""
    g0 = nvfp4_fmt.nvfp4_global_scale(amax.float())
    return [g0 * (2.0 ** (j / 8.0)) for j in range(num)]


def search_global_and_blocks(
    w: torch.Tensor,
    *,
    num_global: int = 8,
    offsets: Sequence[int] | None = None,
    col_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Joint search: for each global-scale candidate (:func:`global_scale_candidates`) the best block scales;
    returns ``(global float32 [], block_scales float8 [out, in/16], weighted SSE)`` of the best (ties: the
    standard global scale)."""
    amax = w.float().abs().amax()
    best: tuple[torch.Tensor, torch.Tensor, float] | None = None
    for g in global_scale_candidates(amax, max(1, num_global)):
        s, e = nvfp4_mse_scales(w, g, offsets=offsets, col_weight=col_weight)
        err = float(e.double().sum())
        if best is None or err < best[2]:
            best = (g, s, err)
    assert best is not None
    return best


def nvfp4_four_over_six_scales(
    w: torch.Tensor, *, col_weight: torch.Tensor | None = None, scale_max: float = FOUR_OVER_SIX_SCALE_MAX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Four-over-Six: global ``amax / (6 * scale_max)``; per block the scale mapping the block max to 6
    (``fp8(amax_b / 6 / g)``) or to 4 (``fp8(amax_b / 4 / g)``), whichever gives the smaller block squared
    error (ties: 6). Returns ``(global float32 [], block_scales float8 [out, in/16])``."""
    rows, cols = w.shape
    nb = cols // NVFP4_BLOCK
    amax = w.float().abs().amax()
    g = fp8_fmt._safe_scale(amax, E2M1_MAX * scale_max, "amax")
    cw = None if col_weight is None else col_weight.float().to(w.device).reshape(nb, NVFP4_BLOCK)
    scales = torch.empty(rows, nb, dtype=FP8_DTYPE, device=w.device)
    step = _row_chunks(rows, cols, w.device)
    for r in range(0, rows, step):
        xb = w[r : r + step].float().reshape(-1, nb, NVFP4_BLOCK)
        bmax = xb.abs().amax(-1)
        cands = [torch.clamp(divide_exact(bmax, m) / g, max=FP8_E4M3_MAX).to(FP8_DTYPE) for m in (6.0, 4.0)]
        errs = []
        for s in cands:
            _, vals = _block_quant(xb, g * s.float())
            e = (vals - xb).pow(2)
            errs.append((e if cw is None else e * cw).sum(-1))
        pick4 = errs[1] < errs[0]
        scales[r : r + step] = torch.where(pick4, cands[1].view(torch.uint8), cands[0].view(torch.uint8)).view(
            FP8_DTYPE)
    return g, scales


# --------------------------------------------------------------------------------------------------
# FP8
# --------------------------------------------------------------------------------------------------


def fp8_weight_error(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Squared error of FP8 round-to-nearest with ``scale`` (``[]`` -> float32 ``[]``; ``[out, 1]`` -> ``[out]``),
    using the exporter's quantizer arithmetic (``quantize_fp8``'s default mode) and loader dequantization."""
    deq = fp8_fmt.quantize_fp8(w, scale, validate=False).float() * scale.float()
    e = (deq - w.float()).pow(2)
    return e.sum() if scale.dim() == 0 else e.sum(dim=1)


def fp8_mse_scale(w: torch.Tensor, per_channel: bool = False, *, grid: int = 40, lo: float = 0.5) -> torch.Tensor:
    """FP8 weight scale minimising ``||w - deq(w)||^2``: ``amax * a / 448`` for ``a`` in ``lo..1`` (``grid`` log-spaced
    values, a = 1 first so ties keep the amax scale); per tensor ``[]`` or per output channel ``[out, 1]``."""
    w = w.detach()
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
    base = fp8_fmt.fp8_scale_from_amax(amax)
    alphas = torch.logspace(0.0, float(torch.log10(torch.tensor(lo))), grid).tolist()
    best_s = best_e = None
    for a in alphas:
        s = torch.where(amax > 0, base * a, base) if per_channel else (base * a if float(amax) > 0 else base)
        e = fp8_weight_error(w, s)
        if best_e is None:
            best_s, best_e = s, e
        elif per_channel:
            better = (e < best_e).unsqueeze(1)
            best_s = torch.where(better, s, best_s)
            best_e = torch.minimum(e, best_e)
        elif float(e) < float(best_e):
            best_s, best_e = s, e
    assert best_s is not None
    return best_s.to(torch.float32)
