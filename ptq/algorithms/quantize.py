"""``quantize_(model, recipe, stats)``: replace the selected ``nn.Linear`` modules by simulated ``QuantLinear``.

Model-agnostic: layers are chosen by the recipe's layer selection over module names, with the model's
:class:`~ptq.algorithms.layers.LayerRules` (block numbering, default high-precision layers) as data. The weight
and activation methods run through :mod:`ptq.algorithms.methods`. :func:`gptq_sequential_` is GPTQ over a model
a few blocks at a time (bounded Hessian memory); :func:`gptq_act_aware_` fits the weights to the runtime-quantized
inputs measured in extra calibration passes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from ptq.algorithms import gptq_batched, smoothing
from ptq.algorithms.gptq_batched import GIB, gptq_quantize_many
from ptq.algorithms.layers import LayerPlanner, LayerRules, rules_for
from ptq.algorithms.methods import choose_clip, quantize_weight_with
from ptq.algorithms.qlinear import QuantizedLinearState, QuantLinear
from ptq.algorithms.recipe import KEEP, GPTQWeight, QuantRecipe
from ptq.algorithms.weight_quant import WeightContext
from ptq.calibration.observers import LinearInputObserver, LinearInputStats
from ptq.calibration.quantized_inputs import QuantizedInputObserver
from ptq.formats import QuantizedWeight, get_format
from ptq.formats.checks import FormatError

log = logging.getLogger(__name__)


@dataclass
class LayerRecord:
    """What happened to one Linear. format: a number format name, or "bf16" when kept; reason says why when
    kept / fallen back."""

    name: str
    format: str
    weight_only: bool
    in_features: int
    out_features: int
    input_amax: float | None = None
    input_clip: float | None = None
    clip_ratio: float | None = None  # input_clip / input_amax (1.0 = no clipping)
    input_scale: float | None = None
    weight_rel_error: float | None = None  # ||W - deq(W)|| / ||W|| (deq(W) * pre_quant_scale when smoothed)
    bits_per_weight: float = 16.0
    reason: str = ""
    dtype: str = ""  # storage dtype of a kept layer ("bfloat16", "float32")
    smoothing: str | None = None  # the chosen pre_quant_scale candidate ("max a=0.5", "none"); None = not searched
    smoothing_gain: float | None = None  # calibration output error with / without it (squared)

    def to_dict(self) -> dict:
        return asdict(self)


def kept_record(name: str, module: nn.Linear, reason: str) -> LayerRecord:
    """The record of a Linear left unquantized."""
    return LayerRecord(name, KEEP, False, module.in_features, module.out_features,
                       bits_per_weight=float(module.weight.element_size() * 8), reason=reason,
                       dtype=str(module.weight.dtype).removeprefix("torch."))


def num_blocks(model: nn.Module, rules: LayerRules | None = None) -> int:
    """Number of transformer blocks of ``model`` (by its layer rules)."""
    return (rules_for(model) if rules is None else rules).num_blocks(model)


@dataclass
class ActivationPlan:
    """The input side of one quantized layer, decided from calibration before its weight is quantized:
    ``pre_quant_scale`` (smoothing, float32 ``[in]`` or None), the statistics of the (smoothed) input, the input
    scale (None for weight-only), and the partly filled record."""

    pre_quant_scale: torch.Tensor | None
    stats: LinearInputStats | None
    input_scale: torch.Tensor | None
    record: LayerRecord
    dynamic: bool = False  # activations quantized with run-time scales (the format's dynamic_activations)


@torch.no_grad()
def plan_activation(name: str, module: nn.Linear, fmt: str, recipe: QuantRecipe,
                    stats: LinearInputStats | None) -> ActivationPlan:
    """Smoothing (``recipe.smoothing`` searches ``pre_quant_scale`` on ``stats.rows``) and input scale of one layer;
    ``stats`` is required unless the recipe is weight-only or the format scales its activations at run time."""
    number_format = get_format(fmt)
    rec = LayerRecord(name, fmt, recipe.weight_only, module.in_features, module.out_features)
    pre_quant_scale = None
    if recipe.smoothing.applies_to(fmt) and stats is not None:
        choice = smoothing.search_pre_quant_scale(name, module.weight.detach(), stats, number_format, recipe)
        rec.smoothing, rec.smoothing_gain = choice.label, choice.gain
        if choice.scale is not None:
            pre_quant_scale = choice.scale.to(module.weight.device)
            stats = smoothing.smoothed_stats(stats, pre_quant_scale)
    input_scale = None
    dynamic = number_format.dynamic_activations and not recipe.weight_only
    if not recipe.weight_only and not dynamic:
        if stats is None:
            raise ValueError(f"{name}: no calibration statistics (layer never called during calibration)")
        clip = choose_clip(recipe.activation, stats, number_format)
        input_scale = number_format.input_scale_from_amax(clip).to(module.weight.device)
        rec.input_amax = float(stats.amax)
        rec.input_clip = float(clip)
        rec.clip_ratio = rec.input_clip / rec.input_amax if rec.input_amax > 0 else 1.0
        rec.input_scale = float(input_scale)
    return ActivationPlan(pre_quant_scale, stats, input_scale, rec, dynamic)


@torch.no_grad()
def quantize_layer(
    name: str,
    module: nn.Linear,
    fmt: str,
    recipe: QuantRecipe,
    stats: LinearInputStats | None,
    hessian: torch.Tensor | None = None,
    *,
    plan: ActivationPlan | None = None,
    input_hessians: tuple[torch.Tensor, torch.Tensor] | None = None,
    weight: QuantizedWeight | None = None,
) -> tuple[QuantLinear, LayerRecord]:
    """Quantize one Linear to ``fmt`` with ``recipe``; ``stats`` is required unless the recipe is weight-only or
    the format scales its activations at run time. ``plan``: its :func:`plan_activation` (computed here when
    None); ``input_hessians``: ``(H_qq, H_xq)`` of the runtime-quantized input for activation-aware GPTQ
    (:func:`gptq_act_aware_`), replacing ``hessian``; ``weight``: the quantized weight already computed by the
    recipe's weight method (batched GPTQ, unsmoothed layers only), used as is."""
    number_format = get_format(fmt)
    plan = plan_activation(name, module, fmt, recipe, stats) if plan is None else plan
    rec, p = plan.record, plan.pre_quant_scale
    w = module.weight.detach()
    cross = None
    if p is not None:
        if weight is not None:
            raise ValueError(f"{name}: a precomputed weight cannot be smoothed")
        w = w.float() / p
        hessian = smoothing.smoothed_hessian(hessian, p)
    if input_hessians is not None:
        hessian, cross = input_hessians
    qw = weight if weight is not None else quantize_weight_with(
        recipe.weight, w, number_format, WeightContext(name=name, hessian=hessian, input_cross=cross))
    state = QuantizedLinearState(fmt, qw.weight, qw.scale, qw.scale_2, plan.input_scale,
                                 None if module.bias is None else module.bias.detach().clone(),
                                 module.in_features, module.out_features, plan.dynamic,
                                 None if p is None else p.to(torch.bfloat16))
    deq = state.effective_weight()
    w32 = module.weight.detach().float()
    rec.weight_rel_error = float((deq - w32).norm() / w32.norm().clamp_min(1e-30))
    rec.bits_per_weight = state.bits_per_weight
    return QuantLinear(state, compute_dtype=module.weight.dtype), rec


def _quantize_layer_on(device: torch.device | str | None, name: str, module: nn.Linear, fmt: str,
                       recipe: QuantRecipe, stats: LinearInputStats | None, hessian: torch.Tensor | None, *,
                       weight: QuantizedWeight | None) -> tuple[QuantLinear, LayerRecord]:
    """:func:`quantize_layer` on ``device`` (None: where ``module`` is), on a copy of ``module`` moved there; the
    QuantLinear is returned on ``module``'s device holding its codes and scales only
    (:meth:`QuantLinear.release_gemm_operand`), and ``module`` is left as it was."""
    home = module.weight.device
    if device is None or torch.device(device) == home:
        return quantize_layer(name, module, fmt, recipe, stats, hessian, weight=weight)
    device = torch.device(device)
    work = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
    work.weight = nn.Parameter(module.weight.detach().to(device), requires_grad=False)
    if module.bias is not None:
        work.bias = nn.Parameter(module.bias.detach().to(device), requires_grad=False)
    qlinear, rec = quantize_layer(name, work, fmt, recipe, None if stats is None else stats.to(device),
                                  None if hessian is None else hessian.to(device), weight=weight)
    qlinear.release_gemm_operand()
    return qlinear.to(home), rec


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
    rules: LayerRules | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> list[LayerRecord]:
    """Quantize ``model`` in place following ``recipe``; returns one LayerRecord per ``nn.Linear`` (kept ones too).

    ``rules``: the model's layer rules (default: those registered for its class). Layers that cannot take the
    recipe's format fall back (``recipe.layers.fallback``) with the reason logged and recorded. ``device``: where
    each layer is quantized when its weight lives elsewhere (offloaded weights in CPU memory: one layer at a time
    on the GPU); its QuantLinear goes back to the weight's device without its resident GEMM operand.
    """
    recipe.validate()
    stats = stats or {}
    planner = LayerPlanner.for_model(model, recipe, rules)
    # names only: each replaced nn.Linear is freed as soon as its QuantLinear is in place (peak memory = the model
    # plus one layer, not the bf16 model twice)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    records: list[LayerRecord] = []
    batched = batched_gptq_weights(model, recipe, stats, hessians, planner, progress=progress)
    for name in tqdm(names, desc=f"quantize {recipe.format}", disable=not progress, leave=False):
        module = model.get_submodule(name)
        fmt, reason = planner.plan_with_fallback(name, module)
        if reason.startswith("fallback: "):
            log.warning("%s: %s; falls back to %s", name, reason.removeprefix("fallback: "), fmt)
        if fmt != KEEP and not recipe.weight_only and name not in stats and not get_format(fmt).dynamic_activations:
            log.warning("%s: never called during calibration, kept in high precision", name)
            fmt, reason = KEEP, "no calibration statistics (layer never called)"
        if fmt == KEEP:
            records.append(kept_record(name, module, reason))
            continue
        try:
            qlinear, rec = _quantize_layer_on(device, name, module, fmt, recipe, stats.get(name),
                                              None if hessians is None else hessians.get(name),
                                              weight=batched.pop(name, None))
        except FormatError as exc:
            log.warning("%s: %s; kept in high precision", name, exc)
            records.append(kept_record(name, module, str(exc)))
            continue
        rec.reason = reason
        set_module(model, name, qlinear)
        records.append(rec)
        del module, qlinear
    return records


def batches_gptq(recipe: QuantRecipe) -> bool:
    """The recipe's weight method is GPTQ run in batches (``GPTQWeight.batched``, not activation-aware)."""
    return isinstance(recipe.weight, GPTQWeight) and recipe.weight.batched and not recipe.weight.act_aware


def batchable_format(recipe: QuantRecipe, fmt: str) -> bool:
    """Batched GPTQ computes the same weights as the per-layer path for layers of format ``fmt``: a weight-scale
    layout it sweeps, codes in the weight's own basis (:func:`~ptq.algorithms.gptq_batched.unsupported`), no
    smoothing searched. Logs (INFO) why not: those layers then run GPTQ one by one."""
    why = gptq_batched.unsupported(get_format(fmt))
    if why is None and recipe.smoothing.applies_to(fmt):
        why = f"batched GPTQ skips {fmt!r} layers (smoothing may rescale them)"
    if why is not None:
        log.info("%s; they run GPTQ one by one (the same result, slower)", why)
    return why is None


def batched_gptq_weights(model: nn.Module, recipe: QuantRecipe, stats: Mapping[str, LinearInputStats],
                         hessians: Mapping[str, torch.Tensor] | None, planner: LayerPlanner, *, progress: bool
                         ) -> dict[str, QuantizedWeight]:
    """The GPTQ weights of the layers :func:`quantize_` will quantize with a batched GPTQ recipe
    (``recipe.weight.batched``), computed per format by :func:`~ptq.algorithms.gptq_batched.gptq_quantize_many`
    (the same codes and scales as layer by layer). Layers the per-layer path would refuse (no Hessian, a weight the
    format rejects, a layer smoothing may rescale) are left out: quantize_ then quantizes them one by one, raises or
    falls back exactly as without batching."""
    if not (batches_gptq(recipe) and hessians):
        return {}
    by_format: dict[str, dict[str, torch.Tensor]] = {}
    batchable: dict[str, bool] = {}  # per format, decided (and a refusal logged) once
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        fmt, _ = planner.plan_with_fallback(name, module)
        if fmt == KEEP or hessians.get(name) is None:
            continue
        if fmt not in batchable:
            batchable[fmt] = batchable_format(recipe, fmt)
        if not batchable[fmt]:
            continue
        number_format = get_format(fmt)
        if not recipe.weight_only and name not in stats and not number_format.dynamic_activations:
            continue  # kept by quantize_ (never called during calibration)
        try:
            number_format.check_weight(module.weight, f"{name}.weight")
        except FormatError:
            continue
        by_format.setdefault(fmt, {})[name] = module.weight.detach()
    max_bytes = int(recipe.weight.batch_gib * GIB) if recipe.weight.batch_gib > 0 else None
    out: dict[str, QuantizedWeight] = {}
    for fmt, weights in by_format.items():
        out.update(gptq_quantize_many(weights, {n: hessians[n] for n in weights}, get_format(fmt), recipe.weight,
                                      max_bytes=max_bytes, progress=progress))
    return out


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    """Name -> QuantLinear of every quantized layer of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


# ---------------------------------------------------------------------------------------------------------------
# Sequential (memory-bounded) GPTQ over a model
# ---------------------------------------------------------------------------------------------------------------


def plan_groups(names: list[str], blocks_per_pass: int, rules: LayerRules) -> list[list[str]]:
    """Split layer names (model order) into passes of ``blocks_per_pass`` transformer blocks (``rules``' block
    numbering); layers outside the blocks join the first pass (before the first block: embedders) or the last
    (after: output projections)."""
    idx = {n: rules.block_of(n) for n in names}
    blocks = sorted({b for b in idx.values() if b is not None})
    if not blocks or blocks_per_pass <= 0:
        return [list(names)]
    chunks = [blocks[i : i + blocks_per_pass] for i in range(0, len(blocks), blocks_per_pass)]
    groups: list[list[str]] = [[] for _ in chunks]
    first_seen_block = False
    for n in names:
        b = idx[n]
        if b is None:
            groups[0 if not first_seen_block else -1].append(n)
        else:
            first_seen_block = True
            groups[next(k for k, c in enumerate(chunks) if b in c)].append(n)
    return [g for g in groups if g]


def gptq_sequential_(
    model: nn.Module,
    recipe: QuantRecipe,
    stats: Mapping[str, LinearInputStats],
    calibrate: Callable[[LinearInputObserver], None],
    *,
    rules: LayerRules | None = None,
    progress: bool = True,
) -> list[LayerRecord]:
    """Quantize ``model`` in place with GPTQ, ``recipe.weight.blocks_per_pass`` transformer blocks at a time.

    Before each pass, ``calibrate(observer)`` runs the calibration forwards with a :class:`LinearInputObserver`
    (``hessian=True`` for that pass's layers only; ``calibrate`` may set ``observer.step``) attached to the model in
    which the earlier passes are already quantized, so at most one pass's Hessians are in memory (and later layers'
    Hessians see the quantized inputs, as in the GPTQ paper). ``stats`` (activation scales) come from the first,
    unquantized calibration, as for every other recipe. Returns one LayerRecord per Linear, in model order.
    """
    if not isinstance(recipe.weight, GPTQWeight):
        raise ValueError(f"gptq_sequential_ needs a GPTQ weight method, got {recipe.weight.label!r}")
    rules = rules_for(model) if rules is None else rules
    planner = LayerPlanner.for_model(model, recipe, rules)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    planned = {n: planner.plan(n, m) for n, m in linears}
    targets = [n for n, _ in linears if planned[n][0] != KEEP]
    groups = plan_groups(targets, recipe.weight.blocks_per_pass, rules)
    done: dict[str, LayerRecord] = {}
    for names in tqdm(groups, desc="gptq passes", disable=not progress, leave=False):
        observer = LinearInputObserver(model, names, hessian=True)
        with observer:
            calibrate(observer)
        hessians = observer.hessians()
        del observer
        sub = replace(recipe, layers=replace(recipe.layers, include=[], formats={n: planned[n][0] for n in names}))
        for rec in quantize_(model, sub, stats, hessians=hessians, rules=rules, progress=False):
            if rec.name in names:
                if rec.format != KEEP:
                    rec.reason = planned[rec.name][1]
                done[rec.name] = rec
        del hessians
    records = []
    for name, module in linears:
        records.append(done[name] if name in done else kept_record(name, module, planned[name][1]))
    return records


# ---------------------------------------------------------------------------------------------------------------
# Activation-aware GPTQ over a model
# ---------------------------------------------------------------------------------------------------------------


def _runtime_quantizer(fmt: str, input_scale: torch.Tensor | None, variant: str = ""
                       ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The format's runtime activation quantize + dequantize: with the layer's input scale, or (formats that scale
    their activations at run time) as the kernel ``variant`` does it."""
    number_format = get_format(fmt)
    if number_format.dynamic_activations:
        return lambda x: number_format.fake_quantize_dynamic(x, variant)
    assert input_scale is not None
    return lambda x: number_format.fake_quantize_activation(x, input_scale.to(x.device))


def gptq_act_aware_(
    model: nn.Module,
    recipe: QuantRecipe,
    stats: Mapping[str, LinearInputStats],
    calibrate: Callable[[QuantizedInputObserver], None],
    *,
    rules: LayerRules | None = None,
    progress: bool = True,
) -> list[LayerRecord]:
    """Quantize ``model`` in place with activation-aware GPTQ (``GPTQWeight.act_aware``),
    ``recipe.weight.blocks_per_pass`` transformer blocks per pass (0 = all in one).

    Per pass: each layer's smoothing and input scale are planned from ``stats`` (:func:`plan_activation`), then
    ``calibrate(observer)`` runs the calibration forwards with a :class:`QuantizedInputObserver` measuring
    ``H_qq`` / ``H_xq`` of the inputs as the runtime quantizes them (earlier passes already quantized), and every
    layer of the pass is quantized by GPTQ onto the least-squares target for those inputs
    (:func:`ptq.algorithms.gptq.quantized_input_target`). Returns one LayerRecord per Linear, in model order."""
    if not (isinstance(recipe.weight, GPTQWeight) and recipe.weight.act_aware):
        raise ValueError(f"gptq_act_aware_ needs GPTQ with act_aware=true, got {recipe.weight.label!r}")
    recipe.validate()
    rules = rules_for(model) if rules is None else rules
    planner = LayerPlanner.for_model(model, recipe, rules)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    planned = {n: planner.plan_with_fallback(n, m) for n, m in linears}
    # layers of formats with run-time activation scales need no activation statistics
    targets = [n for n, _ in linears if planned[n][0] != KEEP
               and (n in stats or get_format(planned[n][0]).dynamic_activations)]
    done: dict[str, LayerRecord] = {}
    for names in tqdm(plan_groups(targets, recipe.weight.blocks_per_pass, rules), desc="act-aware gptq passes",
                      disable=not progress, leave=False):
        plans = {n: plan_activation(n, model.get_submodule(n), planned[n][0], recipe, stats.get(n)) for n in names}
        observer = QuantizedInputObserver(model, {n: (plans[n].pre_quant_scale,
                                                      _runtime_quantizer(planned[n][0], plans[n].input_scale,
                                                                         recipe.weight.act_aware_variant))
                                                  for n in names})
        with observer:
            calibrate(observer)
        measured = observer.hessians()
        del observer
        for n in names:
            if n not in measured:
                raise ValueError(f"{n}: not called in the quantized-input calibration pass")
            try:
                q, rec = quantize_layer(n, model.get_submodule(n), planned[n][0], recipe, stats.get(n), plan=plans[n],
                                        input_hessians=measured[n])
            except FormatError as exc:
                log.warning("%s: %s; kept in high precision", n, exc)
                done[n] = kept_record(n, model.get_submodule(n), str(exc))
                continue
            rec.reason = planned[n][1]
            set_module(model, n, q)
            done[n] = rec
        del measured
    return [done[n] if n in done else kept_record(n, m, "no calibration statistics (layer never called)"
                                                   if planned[n][0] != KEEP else planned[n][1])
            for n, m in linears]
