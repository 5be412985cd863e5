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
