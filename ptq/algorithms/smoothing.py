"""Per-input-channel smoothing (``pre_quant_scale``) that stock ComfyUI runs, chosen by a per-layer search.

ComfyUI (>= 0.30.0, ``comfy/ops.py`` mixed-precision ``Linear.forward``, "ModelOpt AWQ-style smoothing") computes
``input = input * pre_quant_scale.to(input.dtype)`` before the layer quantizes (W4A4 kernel) or dequantizes
(W4A16 fallback), for ``nvfp4`` layers. With the stored weight ``W / p`` (each input column j divided by ``p_j``)
the layer computes ``(x * p) @ (W / p)^T = x @ W^T`` in exact arithmetic; quantization sees the smoothed operands.
SmoothQuant (Xiao et al. 2022) divides activations by ``s = amax_x^a / amax_w^(1-a)`` per input channel (moves
activation outliers into the weights); AWQ (Lin et al. 2023) scales salient channels by ``mean|x|^a``; here
``p = 1/s`` of each candidate family, normalised to a geometric mid-range of 1.

:func:`search_pre_quant_scale` tries every migration strength ``a`` of the recipe's grid for each family (and
``p = 1``) and keeps the ``p`` whose quantized layer output on the calibration input rows is closest to the
unquantized output: weights round-to-nearest on the recipe's scale method, activations (W4A4 recipes) quantized by
the format's runtime quantizer with a max-calibrated input scale of the smoothed input. ``p`` is rounded to bf16
and kept within [2^-14, 2^14], so it is exact in bf16, fp16 and float32 alike (the file's value is the value every
runtime multiplies with) and ``x * p`` cannot overflow fp16 where ``x`` does not come within 2^-14 of it.

The chosen ``p`` then feeds the recipe's own methods: the weight method quantizes ``W / p`` (GPTQ with the
smoothed input Hessian ``diag(p) H diag(p)``, exact), the activation method sees the smoothed input's statistics
(:func:`smoothed_stats`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ptq.algorithms.methods import quantize_weight_with
from ptq.algorithms.recipe import QuantRecipe, Smoothing, WeightMethod
from ptq.algorithms.weight_quant import WeightContext
from ptq.calibration.observers import LinearInputStats
from ptq.formats import NumberFormat

#: Range of ``pre_quant_scale`` values: powers of two within fp16's normal range, so bf16-rounded values are exact
#: in fp16 too.
P_MIN, P_MAX = 2.0 ** -14, 2.0 ** 14
#: Largest |x * p| (over the calibration maxima) a candidate may produce: fp16's max / 16 (headroom).
FP16_SAFE = 65504.0 / 16
#: At most this many calibration rows enter the search (evenly strided).
MAX_SEARCH_ROWS = 8192


@dataclass
class SmoothingChoice:
    """Result of the search for one layer. scale: float32 ``[in]`` (None: no smoothing won); statistic / alpha:
    the winning candidate ("" / None for none); error / error_unsmoothed: squared output error on the calibration
    rows with the chosen and with no smoothing."""

    scale: torch.Tensor | None
    statistic: str
    alpha: float | None
    error: float
    error_unsmoothed: float

    @property
    def gain(self) -> float:
        """error / error_unsmoothed (1.0 = no gain)."""
        return self.error / self.error_unsmoothed if self.error_unsmoothed > 0 else 1.0

    @property
    def label(self) -> str:
        return "none" if self.scale is None else f"{self.statistic} a={self.alpha:g}"


def exact_scale(p: torch.Tensor) -> torch.Tensor:
    """``p`` clamped to [P_MIN, P_MAX] and rounded to bf16 (exact in bf16, fp16 and float32), as float32."""
    return p.float().clamp(P_MIN, P_MAX).to(torch.bfloat16).float()


def channel_statistic(stats: LinearInputStats, statistic: str) -> torch.Tensor:
    """float32 ``[in]``: per-input-channel max |x| (``"max"``, over all calibration calls) or mean |x| (``"mean"``,
    over the recorded rows)."""
    if statistic == "max":
        return stats.channel_amax.float()
    if stats.rows is None:
        raise ValueError("smoothing statistic 'mean' needs calibration rows (CalibrationNeeds.rows)")
    return stats.rows.float().abs().mean(0).to(stats.channel_amax.device)


def candidate_scale(act: torch.Tensor, wmax: torch.Tensor, alpha: float, statistic: str) -> torch.Tensor:
    """``p`` (float32 ``[in]``, :func:`exact_scale`) of one candidate: ``1/s`` with ``s = act^a / wmax^(1-a)``
    (statistic "max", SmoothQuant) or ``s = act^a`` ("mean", AWQ), normalised so that ``sqrt(max(s) * min(s)) = 1``
    over the live channels; channels with no activation or no weight get ``p = 1``."""
    live = (act > 0) & (wmax > 0)
    s = torch.ones_like(act)
    if not bool(live.any()):
        return s
    a, w = act[live].double(), wmax[live].double()
    sl = a.pow(alpha) / w.pow(1.0 - alpha) if statistic == "max" else a.pow(alpha)
    sl = sl / (sl.max() * sl.min()).sqrt()
    s[live] = sl.float()
    return exact_scale(1.0 / s)


def _search_rows(stats: LinearInputStats, device: torch.device) -> torch.Tensor:
    rows = stats.rows
    stride = -(-rows.shape[0] // MAX_SEARCH_ROWS)
    return rows[::stride].to(device)


def output_error(w: torch.Tensor, x: torch.Tensor, y_ref: torch.Tensor, p: torch.Tensor | None, fmt: NumberFormat,
                 weight: WeightMethod, quantize_input: bool, name: str, amax: torch.Tensor) -> float:
    """Squared error of the quantized layer's output on rows ``x`` (model dtype) vs ``y_ref = x @ W^T``, the layer
    smoothed by ``p`` (None = not): weights round-to-nearest on ``weight.scales``; with ``quantize_input`` the
    smoothed input ``x * p`` (rounded to the model dtype, as at run time) is quantized with the input scale of its
    max ``amax * p`` (``amax``: per-channel calibration max)."""
    ws = w.float() if p is None else w.float() / p
    q = quantize_weight_with(WeightMethod(scales=weight.scales, fp8_per_channel=weight.fp8_per_channel), ws, fmt,
                             WeightContext(name=name))
    wq = fmt.dequantize_weight(q)
    xs = x if p is None else (x.float() * p).to(x.dtype)
    xs = xs.float()
    if quantize_input:
        clip = amax.float().amax() if p is None else (amax.float() * p).amax()
        xs = fmt.fake_quantize_activation(xs, fmt.input_scale_from_amax(clip))
    return float((xs @ wq.t() - y_ref).double().pow(2).sum())


def search_pre_quant_scale(name: str, w: torch.Tensor, stats: LinearInputStats, fmt: NumberFormat,
                           recipe: QuantRecipe) -> SmoothingChoice:
    """The ``pre_quant_scale`` of one layer (see the module docstring); ``stats`` must hold calibration rows."""
    cfg: Smoothing = recipe.smoothing
    if stats.rows is None or stats.rows.numel() == 0:
        raise ValueError(f"{name}: smoothing needs calibration input rows (calibrate with rows_per_call > 0)")
    x = _search_rows(stats, w.device)
    y_ref = x.float() @ w.float().t()
    amax = stats.channel_amax.to(w.device)
    wmax = w.float().abs().amax(0)

    def err(p: torch.Tensor | None) -> float:
        return output_error(w, x, y_ref, p, fmt, recipe.weight, not recipe.weight_only, name, amax)

    base = err(None)
    best = SmoothingChoice(None, "", None, base, base)
    for statistic in cfg.statistics:
        act = channel_statistic(stats, statistic).to(w.device)
        for alpha in cfg.alphas:
            p = candidate_scale(act, wmax, float(alpha), statistic)
            if float((amax * p).amax()) > FP16_SAFE:
                continue
            e = err(p)
            if e < best.error:
                best = SmoothingChoice(p, statistic, float(alpha), e, base)
    return best


def smoothed_stats(stats: LinearInputStats, p: torch.Tensor) -> LinearInputStats:
    """Statistics of the smoothed input ``x * p``: per-channel and overall max exact (``channel_amax * p``); the
    random block samples, their steps and the per-step maxima are rebuilt from the calibration rows (the step maxima
    thus from the rows only, never above the exact max)."""
    dev = stats.channel_amax.device
    p = p.to(dev)
    ch = stats.channel_amax.float() * p
    rows = stats.rows
    xs = (rows.float() * p.cpu()).to(rows.dtype).float().abs()
    keep = max(1, min(rows.shape[0], -(-4 * (1 << 17) // rows.shape[1])))
    stride = max(rows.shape[0] // keep, 1)
    picked = xs[::stride][:keep]
    steps = None
    step_amax = None
    if stats.row_steps is not None:
        row_steps = stats.row_steps[::stride][:keep]
        steps = row_steps.repeat_interleave(rows.shape[1])
        if stats.step_amax is not None:
            n = stats.step_amax.numel()
            per_row = xs.amax(1)
            step_amax = torch.zeros(n, dtype=torch.float32)
            valid = (stats.row_steps >= 0) & (stats.row_steps < n)
            step_amax.scatter_reduce_(0, stats.row_steps[valid], per_row[valid], reduce="amax")
            step_amax = torch.minimum(step_amax, ch.amax().cpu()).to(dev)
    block = 16 if rows.shape[1] % 16 == 0 else 1
    return LinearInputStats(ch.amax(), ch, step_amax, picked.reshape(-1), stats.calls, stats.tokens, block, steps,
                            rows, stats.row_steps)


def smoothed_hessian(h: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor | None:
    """``diag(p) H diag(p)``: the input Hessian of the smoothed input ``x * p`` (None stays None)."""
    if h is None:
        return None
    p = p.to(h.device, torch.float32)
    return h * p.reshape(-1, 1) * p.reshape(1, -1)
