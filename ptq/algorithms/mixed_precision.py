"""Automatic mixed precision: per-layer NVFP4 / FP8 / bf16 chosen to meet a size budget with the least output error.

Budget: ``quant.bits_budget`` = average storage bits per Linear weight element, scales included exactly as the
exporters store them: NVFP4 4.5 (4-bit codes + one float8 scale per 16), FP8 8 (+ one float32 scale per tensor or
per row), unquantized = the weight dtype's width (16 for bf16). Layers the recipe keeps in high precision (include /
exclude / keep_*_blocks, explicit ``layer_formats``) are fixed; every other Linear is a candidate.
``quant.bits_scope="all"`` averages over every ``nn.Linear`` of the model, fixed layers included (the number the
report prints as "bits per weight"); ``"quantized"`` over the candidate layers only.

Choice: a multiple-choice knapsack over the measured per-layer errors (:mod:`ptq.algorithms.sensitivity`),
assuming they add up. Greedy on the lower convex hull of each layer's (bits, error) options by error reduction per
bit (the LP-relaxation optimum, exact whenever the budget is used up exactly), then a fill pass that spends what
is left on the upgrades with the largest error reduction that still fit. The plan never exceeds the budget.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ptq.algorithms.layers import LayerPlanner, LayerRules, rules_for
from ptq.algorithms.recipe import KEEP, QuantRecipe
from ptq.algorithms.sensitivity import SensitivityReport, measure_sensitivity
from ptq.calibration.observers import LinearInputStats
from ptq.formats import get_format

log = logging.getLogger(__name__)


def layer_bits(fmt: str, out_features: int, in_features: int, *, dtype_bits: int = 16,
               fp8_per_channel: bool = False) -> float:
    """Total storage bits of one Linear weight in ``fmt`` (bias excluded), as ``QuantizedLinearState.bits_per_weight``
    counts them (the format's ``storage_bits``: nvfp4 ``n*4 + n/16*8``; fp8 ``n*8 + 32``, ``+32*out`` per channel);
    kept ("bf16") ``n*dtype_bits``."""
    if fmt == KEEP:
        return out_features * in_features * float(dtype_bits)
    return get_format(fmt).storage_bits(out_features, in_features, per_channel=fp8_per_channel)


@dataclass
class MixedPrecisionPlan:
    """Result of the planner. formats: candidate layer -> chosen format; fixed: non-candidate layer -> format;
    bits_per_weight: achieved average over ``scope`` ("all" Linears or the "quantized" candidates); predicted_error: sum of the chosen layers' measured squared
    relative output errors (additive model); counts: layers per format."""

    formats: dict[str, str]
    fixed: dict[str, str]
    budget: float
    scope: str
    bits_per_weight: float
    predicted_error: float
    counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def choose_formats(
    options: Mapping[str, Mapping[str, tuple[float, float]]],
    budget_bits: float,
) -> dict[str, str]:
    """Multiple-choice knapsack: ``options[layer][fmt] = (bits, error)``; pick one format per layer with total bits
    ``<= budget_bits`` minimising the summed error. Raises ValueError if even the cheapest choice does not fit.
    Deterministic (ties broken by layer name, then format name)."""
    choice: dict[str, str] = {}
    hulls: dict[str, list[tuple[float, float, str]]] = {}
    for name in sorted(options):
        opts = sorted((b, e, f) for f, (b, e) in options[name].items())
        if not opts:
            raise ValueError(f"{name}: no format to choose from")
        # Pareto front (bits ascending, error strictly decreasing), then its lower convex hull
        front: list[tuple[float, float, str]] = []
        for b, e, f in opts:
            if not front or e < front[-1][1]:
                if front and b == front[-1][0]:
                    front[-1] = (b, e, f)
                else:
                    front.append((b, e, f))
        hull: list[tuple[float, float, str]] = []
        for p in front:
            while len(hull) >= 2:
                (b1, e1, _), (b2, e2, _) = hull[-2], hull[-1]
                # drop hull[-1] if it lies on or above the segment hull[-2] -> p
                if (e2 - e1) * (p[0] - b1) >= (p[1] - e1) * (b2 - b1):
                    hull.pop()
                else:
                    break
            hull.append(p)
        hulls[name] = hull
        choice[name] = hull[0][2]
    cheapest = {n: min(options[n][f][0] for f in options[n]) for n in options}
    used = sum(options[n][choice[n]][0] for n in options)
    if used > budget_bits * (1 + 1e-12):
        raise ValueError(f"bits budget infeasible: the cheapest formats need {used:.0f} bits, budget {budget_bits:.0f} "
                         f"(lowest possible {sum(cheapest.values()):.0f})")
    # greedy along the hulls by error reduction per bit
    pos = {n: 0 for n in options}
    heap: list[tuple[float, str]] = []

    def push(n: str) -> None:
        h, i = hulls[n], pos[n]
        if i + 1 < len(h):
            db, de = h[i + 1][0] - h[i][0], h[i][1] - h[i + 1][1]
            heapq.heappush(heap, (-de / db, n))

    for n in sorted(options):
        push(n)
    while heap:
        _, n = heapq.heappop(heap)
        h, i = hulls[n], pos[n]
        db = h[i + 1][0] - h[i][0]
        if used + db <= budget_bits:
            used += db
            pos[n] = i + 1
            choice[n] = h[i + 1][2]
            push(n)
    # fill: any remaining upgrade that fits, largest error reduction first
    while True:
        best = None
        for n in sorted(options):
            b0, e0 = options[n][choice[n]]
            for f in sorted(options[n]):
                b, e = options[n][f]
                if b > b0 and e < e0 and used - b0 + b <= budget_bits:
                    key = (e0 - e, -(b - b0))
                    if best is None or key > best[0]:
                        best = (key, n, f)
        if best is None:
            break
        _, n, f = best
        used += options[n][f][0] - options[n][choice[n]][0]
        choice[n] = f
    return choice


def mixed_candidates(model: nn.Module, recipe: QuantRecipe, stats: Mapping[str, LinearInputStats] | None,
                     rules: LayerRules | None = None) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(candidate layer -> formats it may take, fixed layer -> its format). Candidates: Linears the base recipe
    would quantize and that the per-layer map ``layers.formats`` does not name; formats the layer's shape cannot
    take are dropped; a layer without calibration statistics (never called) is fixed to bf16 unless the recipe is
    weight-only."""
    mapped = LayerPlanner.for_model(model, recipe, rules)
    base = LayerPlanner.for_model(model, replace(recipe, layers=replace(recipe.layers, formats={})), rules)
    cands: dict[str, list[str]] = {}
    fixed: dict[str, str] = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        explicit = mapped._mapped(name)
        if explicit is not None:
            fixed[name] = explicit
            continue
        fmt, _ = base.plan(name, m)
        if fmt == KEEP or (not recipe.weight_only and stats is not None and name not in stats):
            fixed[name] = KEEP
            continue
        fmts = [f for f in recipe.mixed.formats
                if f == KEEP or get_format(f).unsupported(m.in_features, m.out_features) is None]
        if not fmts:
            fixed[name] = KEEP
            continue
        cands[name] = fmts
    return cands, fixed


def plan_mixed_precision(
    model: nn.Module,
    recipe: QuantRecipe,
    stats: Mapping[str, LinearInputStats],
    inputs: list[tuple[tuple, dict]],
    hessians: Mapping[str, torch.Tensor] | None = None,
    *,
    sensitivity: SensitivityReport | None = None,
    rules: LayerRules | None = None,
    progress: bool = True,
) -> tuple[QuantRecipe, MixedPrecisionPlan, SensitivityReport]:
    """Measure sensitivities (unless given), choose per-layer formats within ``recipe.mixed.bits_budget`` and return
    ``(recipe with layers.formats set for every candidate, plan, sensitivity)``. The model is left unchanged."""
    rules = rules_for(model) if rules is None else rules
    cands, fixed = mixed_candidates(model, recipe, stats, rules)
    if sensitivity is None:
        sensitivity = measure_sensitivity(model, inputs, cands, recipe, stats, hessians, rules=rules,
                                          progress=progress)
    modules = dict(model.named_modules())
    dtype_bits = {n: modules[n].weight.element_size() * 8 for n in (*cands, *fixed)}
    total = sum(modules[n].in_features * modules[n].out_features for n in (*cands, *fixed))

    def bits(n: str, f: str) -> float:
        m = modules[n]
        return layer_bits(f, m.out_features, m.in_features, dtype_bits=dtype_bits[n],
                          fp8_per_channel=recipe.weight.fp8_per_channel)

    fixed_bits = sum(bits(n, f) for n, f in fixed.items())
    if recipe.mixed.bits_scope == "quantized":  # the budget covers the candidate layers only
        total = sum(modules[n].in_features * modules[n].out_features for n in cands)
        fixed_bits = 0.0
    budget_bits = recipe.mixed.bits_budget * total - fixed_bits
    options = {n: {f: (bits(n, f), sensitivity.layer_error[n].get(f, 0.0 if f == KEEP else float("inf")))
                   for f in fmts} for n, fmts in cands.items()}
    options = {n: {f: v for f, v in o.items() if v[1] != float("inf")} for n, o in options.items()}
    try:
        choice = choose_formats(options, budget_bits)
    except ValueError as exc:
        raise ValueError(f"quant.mixed.bits_budget={recipe.mixed.bits_budget}: {exc} (fixed high-precision layers take "
                         f"{fixed_bits / total:.2f} bits per weight of the total)") from None
    used = fixed_bits + sum(options[n][f][0] for n, f in choice.items())
    counts: dict[str, int] = {}
    for f in choice.values():
        counts[f] = counts.get(f, 0) + 1
    plan = MixedPrecisionPlan(formats=dict(choice), fixed=fixed, budget=recipe.mixed.bits_budget,
                              scope=recipe.mixed.bits_scope,
                              bits_per_weight=used / total,
                              predicted_error=sum(options[n][f][1] for n, f in choice.items()), counts=counts)
    log.info("mixed precision: %s, %.3f bits per weight (budget %.3f)", counts, plan.bits_per_weight,
             recipe.mixed.bits_budget)
    return recipe.with_layer_formats(choice), plan, sensitivity


def analyse_and_plan(
    model: nn.Module,
    recipe: QuantRecipe,
    stats: Mapping[str, LinearInputStats],
    inputs: list[tuple[tuple, dict]],
    hessians: Mapping[str, torch.Tensor] | None = None,
    *,
    rules: LayerRules | None = None,
    progress: bool = True,
) -> tuple[QuantRecipe, dict[str, Any]]:
    """What ``ptq run`` does for ``quant.mixed.sensitivity`` / ``quant.mixed.enabled``: measure the per-layer and
    per-block sensitivity of the candidate layers in ``recipe.mixed.formats`` and, for mixed precision, plan the
    formats. Returns ``(recipe to quantize with, {"sensitivity": ..., "plan": ... or None, "base_format": ...})``
    for the report."""
    rules = rules_for(model) if rules is None else rules
    cands, _ = mixed_candidates(model, recipe, stats, rules)
    sens = measure_sensitivity(model, inputs, cands, recipe, stats, hessians, rules=rules, progress=progress)
    out: dict[str, Any] = {"sensitivity": sens.to_dict(), "plan": None, "base_format": recipe.format,
                           "weight": recipe.weight.label}
    if recipe.mixed.enabled:
        recipe, plan, _ = plan_mixed_precision(model, recipe, stats, inputs, hessians, sensitivity=sens,
                                               rules=rules, progress=progress)
        out["plan"] = plan.to_dict()
    return recipe, out


__all__ = ["MixedPrecisionPlan", "analyse_and_plan", "choose_formats", "layer_bits", "mixed_candidates",
           "plan_mixed_precision"]
