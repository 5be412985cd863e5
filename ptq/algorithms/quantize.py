"""``quantize_(model, recipe, stats)``: replace the selected ``nn.Linear`` modules by simulated ``QuantLinear``.

Model-agnostic: layers are chosen by module name (fnmatch patterns) and, for ``keep_first/last_blocks``, by the
``blocks.N.`` numbering that diffusion transformers share.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ptq.algorithms.activation_scale import choose_input_amax, input_scale_from_amax
from ptq.algorithms.qlinear import CANONICAL_NIBBLE_ORDER, QuantizedLinearState, QuantLinear
from ptq.algorithms.recipe import QuantRecipe
from ptq.algorithms.weight_quant import WeightContext, quantize_weight
from ptq.calibration.observers import LinearInputStats
from ptq.formats.checks import FormatError

log = logging.getLogger(__name__)
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


@dataclass
class LayerRecord:
    """What happened to one Linear. format: "fp8" / "nvfp4" / "bf16" (kept); reason says why when kept/fallen back."""

    name: str
    format: str
    weight_only: bool
    in_features: int
    out_features: int
    input_amax: float | None = None
    input_clip: float | None = None
    clip_ratio: float | None = None  # input_clip / input_amax (1.0 = no clipping)
    input_scale: float | None = None
    weight_rel_error: float | None = None  # ||W - deq(W)|| / ||W||
    bits_per_weight: float = 16.0
    reason: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def num_blocks(model: nn.Module) -> int:
    idx = {int(m.group(1)) for n, _ in model.named_modules() if (m := _BLOCK_RE.match(n + "."))}
    return max(idx) + 1 if idx else 0


def plan_layer_format(name: str, module: nn.Linear, recipe: QuantRecipe, num_blocks: int) -> tuple[str, str]:
    """(format, reason) for one Linear before calibration data is considered; "bf16" means kept."""
    if name in recipe.layer_formats:
        fmt = recipe.layer_formats[name]
        return fmt, "" if fmt != "bf16" else "kept by quant.layer_formats"
    if not any(fnmatch.fnmatchcase(name, p) for p in recipe.include):
        return "bf16", "not matched by quant.include"
    if any(fnmatch.fnmatchcase(name, p) for p in recipe.exclude):
        return "bf16", "matched by quant.exclude"
    m = _BLOCK_RE.match(name + ".")
    if m is not None:
        b = int(m.group(1))
        if b < recipe.keep_first_blocks:
            return "bf16", f"block {b} < quant.keep_first_blocks={recipe.keep_first_blocks}"
        if b >= num_blocks - recipe.keep_last_blocks:
            return "bf16", f"block {b} in the last quant.keep_last_blocks={recipe.keep_last_blocks}"
    return recipe.format, ""


def _shape_fallback(fmt: str, module: nn.Linear, recipe: QuantRecipe) -> tuple[str, str]:
    if fmt == "nvfp4" and module.in_features % 16:
        return recipe.fallback, f"in_features={module.in_features} is not a multiple of 16 (NVFP4 blocks)"
    return fmt, ""


@torch.no_grad()
def quantize_layer(
    name: str,
    module: nn.Linear,
    fmt: str,
    recipe: QuantRecipe,
    stats: LinearInputStats | None,
    hessian: torch.Tensor | None = None,
) -> tuple[QuantLinear, LayerRecord]:
    """Quantize one Linear to ``fmt`` with ``recipe``; ``stats`` is required unless the recipe is weight-only."""
    rec = LayerRecord(name, fmt, recipe.weight_only, module.in_features, module.out_features)
    input_scale = None
    if not recipe.weight_only:
        if stats is None:
            raise ValueError(f"{name}: no calibration statistics (layer never called during calibration)")
        clip = choose_input_amax(stats, recipe.activation, fmt, percentile=recipe.percentile)
        input_scale = input_scale_from_amax(clip, fmt).to(module.weight.device)
        rec.input_amax = float(stats.amax)
        rec.input_clip = float(clip)
        rec.clip_ratio = rec.input_clip / rec.input_amax if rec.input_amax > 0 else 1.0
        rec.input_scale = float(input_scale)
    ctx = WeightContext(name=name, fp8_per_channel=recipe.fp8_per_channel, order=CANONICAL_NIBBLE_ORDER,
                        hessian=hessian, gptq_damp=recipe.gptq_damp)
    w = module.weight.detach()
    qw = quantize_weight(w, fmt, recipe.weight, ctx)
    state = QuantizedLinearState(fmt, qw.weight, qw.scale, qw.scale_2, input_scale,
                                 None if module.bias is None else module.bias.detach().clone(),
                                 module.in_features, module.out_features)
    deq = state.dequantized_weight()
    w32 = w.float()
    rec.weight_rel_error = float((deq - w32).norm() / w32.norm().clamp_min(1e-30))
    rec.bits_per_weight = state.bits_per_weight
    return QuantLinear(state, compute_dtype=w.dtype), rec


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) of ``model`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_(
    model: nn.Module,
    recipe: QuantRecipe,
    stats: Mapping[str, LinearInputStats] | None = None,
    *,
    hessians: Mapping[str, torch.Tensor] | None = None,
    progress: bool = True,
) -> list[LayerRecord]:
    """Quantize ``model`` in place following ``recipe``; returns one LayerRecord per ``nn.Linear`` (kept ones too).

    Layers that cannot take the recipe's format fall back (``recipe.fallback``) with the reason logged and recorded.
    """
    recipe.validate()
    stats = stats or {}
    nb = num_blocks(model)
    # names only: each replaced nn.Linear is freed as soon as its QuantLinear is in place (peak memory = the model
    # plus one layer, not the bf16 model twice)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    records: list[LayerRecord] = []
    for name in tqdm(names, desc=f"quantize {recipe.format}", disable=not progress, leave=False):
        module = model.get_submodule(name)
        fmt, reason = plan_layer_format(name, module, recipe, nb)
        if fmt != "bf16":
            fmt2, why = _shape_fallback(fmt, module, recipe)
            if fmt2 != fmt:
                log.warning("%s: %s; falls back to %s", name, why, fmt2)
                fmt, reason = fmt2, f"fallback: {why}"
        if fmt != "bf16" and not recipe.weight_only and name not in stats:
            log.warning("%s: never called during calibration, kept in high precision", name)
            fmt, reason = "bf16", "no calibration statistics (layer never called)"
        if fmt == "bf16":
            records.append(LayerRecord(name, "bf16", False, module.in_features, module.out_features,
                                       bits_per_weight=float(module.weight.element_size() * 8), reason=reason))
            continue
        try:
            qlinear, rec = quantize_layer(name, module, fmt, recipe, stats.get(name),
                                          None if hessians is None else hessians.get(name))
        except FormatError as exc:
            log.warning("%s: %s; kept in high precision", name, exc)
            records.append(LayerRecord(name, "bf16", False, module.in_features, module.out_features,
                                       bits_per_weight=float(module.weight.element_size() * 8), reason=str(exc)))
            continue
        rec.reason = reason
        set_module(model, name, qlinear)
        records.append(rec)
        del module, qlinear
    return records


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """Name -> QuantLinear of every quantized layer of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
