"""The registry of weight and activation methods: each recipe part's type -> the code that runs it.

A new method is its own module (a config dataclass subclassing ``WeightMethod`` / ``ActivationMethod`` plus a
handler) and one line in :data:`WEIGHT_HANDLERS` / :data:`ACTIVATION_HANDLERS` (and, to give it a name on the
command line, one in ``recipe.WEIGHT_METHODS`` / ``recipe.ACTIVATION_METHODS``). Handlers are looked up by the
config's type, most specific class first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from ptq.algorithms import activation_scale as act
from ptq.algorithms.gptq import quantize_gptq
from ptq.algorithms.recipe import (
    ACTIVATION_METHODS,
    WEIGHT_METHODS,
    ActivationMethod,
    GPTQWeight,
    MSEActivation,
    PercentileActivation,
    WeightMethod,
)
from ptq.algorithms.weight_quant import WeightContext, quantize_rtn
from ptq.calibration.observers import LinearInputStats
from ptq.formats import NumberFormat, QuantizedWeight, get_format

WeightHandler = Callable[[torch.Tensor, NumberFormat, Any, WeightContext], QuantizedWeight]
ActivationHandler = Callable[[LinearInputStats, Any, NumberFormat], torch.Tensor]

WEIGHT_HANDLERS: dict[type, WeightHandler] = {
    WeightMethod: quantize_rtn,
    GPTQWeight: quantize_gptq,
}


def _clip_max(stats: LinearInputStats, cfg: ActivationMethod, fmt: NumberFormat) -> torch.Tensor:
    if cfg.method == "none":
        raise ValueError("activation method 'none' (weight-only) has no input_scale")
    return act.clip_max(stats)


ACTIVATION_HANDLERS: dict[type, ActivationHandler] = {
    ActivationMethod: _clip_max,
    PercentileActivation: lambda stats, cfg, fmt: act.clip_percentile(stats, cfg.percentile),
    MSEActivation: lambda stats, cfg, fmt: act.clip_mse(stats, fmt, step_weighting=cfg.step_weighting,
                                                        grid=cfg.grid, lo=cfg.lo),
}


def _handler(table: dict[type, Any], cfg: Any, what: str) -> Any:
    for cls in type(cfg).__mro__:
        if cls in table:
            return table[cls]
    raise ValueError(f"no {what} handler registered for {type(cfg).__name__} (ptq.algorithms.methods)")


def quantize_weight_with(cfg: WeightMethod, w: torch.Tensor, fmt: NumberFormat, ctx: WeightContext
                         ) -> QuantizedWeight:
    """Quantize ``w`` to ``fmt`` with the weight method ``cfg``."""
    return _handler(WEIGHT_HANDLERS, cfg, "weight method")(w, fmt, cfg, ctx)


def choose_clip(cfg: ActivationMethod, stats: LinearInputStats, fmt: NumberFormat) -> torch.Tensor:
    """Clipping value (float32 ``[]``) of one layer's input for the activation method ``cfg``."""
    return _handler(ACTIVATION_HANDLERS, cfg, "activation method")(stats, cfg, fmt)


def quantize_weight(w: torch.Tensor, fmt: str, method: str, ctx: WeightContext) -> QuantizedWeight:
    """Shorthand: quantize with the named weight method (:data:`WEIGHT_METHODS`); ``ctx.fp8_per_channel`` and
    ``ctx.gptq_damp`` set those fields of the method."""
    try:
        cfg = WEIGHT_METHODS[method]
    except KeyError:
        raise ValueError(f"unknown weight method {method!r}; known: {sorted(WEIGHT_METHODS)}") from None
    cfg = replace(cfg, fp8_per_channel=ctx.fp8_per_channel)
    if isinstance(cfg, GPTQWeight):
        cfg = replace(cfg, damp=ctx.gptq_damp)
    return quantize_weight_with(cfg, w, get_format(fmt), ctx)


__all__ = ["ACTIVATION_HANDLERS", "ACTIVATION_METHODS", "WEIGHT_HANDLERS", "WEIGHT_METHODS", "choose_clip",
           "quantize_weight", "quantize_weight_with"]
