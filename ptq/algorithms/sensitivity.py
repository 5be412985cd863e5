"""Sensitivity analysis: how much each Linear (and each transformer block) perturbs the model output when it alone
is quantized, measured on recorded calibration inputs.

For every candidate layer and format, the layer is quantized exactly as the final checkpoint would be (same recipe,
activation scale from the calibration statistics, weight method, Hessian for GPTQ) and swapped into the otherwise
unquantized model; the error is the squared relative L2 distance of the transformer output (the noise/flow
prediction), averaged over the recorded inputs::

    err(layer, fmt) = mean_i ||f_q(x_i) - f(x_i)||^2 / ||f(x_i)||^2

Squared errors of independent perturbations add up approximately, which is what the mixed-precision planner
(:mod:`ptq.algorithms.mixed_precision`) relies on. Cost: ``(layers x formats + blocks) x inputs`` forwards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ptq.algorithms.gptq_batched import GIB, gptq_quantize_many
from ptq.algorithms.layers import LayerRules, rules_for
from ptq.algorithms.quantize import batchable_format, batches_gptq, quantize_layer, set_module
from ptq.algorithms.recipe import KEEP, GPTQWeight, QuantRecipe, WeightMethod
from ptq.calibration.observers import LinearInputStats
from ptq.calibration.recorder import ForwardInputRecorder, to_device
from ptq.formats import QuantizedWeight, get_format
from ptq.formats.checks import FormatError

log = logging.getLogger(__name__)


def _output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample


@dataclass
class SensitivityReport:
    """Measured output errors. layer_error[name][fmt] and block_error[block][fmt]: mean squared relative L2 error of
    the transformer output with only that layer / block quantized to fmt (``inf`` if it cannot be); numel[name]:
    weight elements; bf16 error is 0 by definition."""

    layer_error: dict[str, dict[str, float]] = field(default_factory=dict)
    block_error: dict[str, dict[str, float]] = field(default_factory=dict)
    numel: dict[str, int] = field(default_factory=dict)
    inputs: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rel_l2(self, name: str, fmt: str) -> float:
        """The layer's error as a relative L2 (sqrt of the mean squared relative error)."""
        return self.layer_error[name][fmt] ** 0.5


class _Evaluator:
    """Runs the recorded inputs and measures the mean squared relative output error vs the reference."""

    def __init__(self, model: nn.Module, inputs: list[tuple[tuple, dict]]) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.inputs = inputs
        self.refs = [self._run(i) for i in range(len(inputs))]

    @torch.no_grad()
    def _run(self, i: int) -> torch.Tensor:
        args, kwargs = self.inputs[i]
        return _output(self.model(*to_device(args, self.device), **to_device(kwargs, self.device))).float()

    def error(self) -> float:
        errs = []
        for i, ref in enumerate(self.refs):
            out = self._run(i)
            errs.append(float((out - ref).double().pow(2).sum() / ref.double().pow(2).sum().clamp_min(1e-30)))
        return sum(errs) / len(errs)


def _moved(qw: QuantizedWeight, device: torch.device | str) -> QuantizedWeight:
    return QuantizedWeight(qw.weight.to(device), qw.scale.to(device),
                           None if qw.scale_2 is None else qw.scale_2.to(device))


def batched_gptq_weights(modules: Mapping[str, nn.Module], candidates: Mapping[str, list[str]], recipe: QuantRecipe,
                         hessians: Mapping[str, torch.Tensor] | None, *, progress: bool
                         ) -> dict[tuple[str, str], QuantizedWeight]:
    """(layer, format) -> the GPTQ weight the analysis would compute layer by layer, computed in batches
    (``ptq.algorithms.gptq_batched``, the same bits) and kept on the CPU; empty unless the recipe is a batched
    GPTQ one. Layers without a Hessian or refused by a format are left to the per-layer path."""
    if not (batches_gptq(recipe) and hessians):
        return {}
    cache: dict[tuple[str, str], QuantizedWeight] = {}
    max_bytes = int(recipe.weight.batch_gib * GIB) if recipe.weight.batch_gib > 0 else None
    for fmt in sorted({f for fmts in candidates.values() for f in fmts if f != KEEP}):
        if not batchable_format(recipe, fmt):
            continue
        number_format = get_format(fmt)
        weights = {}
        for name, fmts in candidates.items():
            if fmt not in fmts or hessians.get(name) is None:
                continue
            try:
                number_format.check_weight(modules[name].weight, f"{name}.weight")
            except FormatError:
                continue
            weights[name] = modules[name].weight.detach()

        def keep(name: str, qw: QuantizedWeight, _fmt: str = fmt) -> None:
            cache[(name, _fmt)] = _moved(qw, "cpu")

        gptq_quantize_many(weights, hessians, number_format, recipe.weight, max_bytes=max_bytes, progress=progress,
                           on_done=keep)
    return cache


def _layer_recipe(recipe: QuantRecipe, name: str, hessians: Mapping[str, torch.Tensor] | None) -> QuantRecipe:
    """GPTQ needs the layer's Hessian; without one the sensitivity is measured with round-to-nearest "mse" scales."""
    if isinstance(recipe.weight, GPTQWeight) and (hessians is None or name not in hessians):
        return replace(recipe, weight=WeightMethod(scales="mse", fp8_per_channel=recipe.weight.fp8_per_channel))
    return recipe


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module,
    inputs: list[tuple[tuple, dict]],
    candidates: Mapping[str, list[str]],
    recipe: QuantRecipe,
    stats: Mapping[str, LinearInputStats],
    hessians: Mapping[str, torch.Tensor] | None = None,
    *,
    blocks: bool = True,
    rules: LayerRules | None = None,
    progress: bool = True,
) -> SensitivityReport:
    """Quantize one layer (``candidates[name]``: formats to try, "bf16" skipped) at a time on top of the unquantized
    ``model`` and measure the output error on ``inputs`` (from :class:`ForwardInputRecorder`); with ``blocks``,
    also each transformer block (``rules``' block numbering) with all its candidate layers in each of their
    formats. The model is left unchanged."""
    if not inputs:
        raise ValueError("sensitivity analysis needs recorded model inputs (ForwardInputRecorder saw no forward)")
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    ev = _Evaluator(model, inputs)
    modules = dict(model.named_modules())
    rep = SensitivityReport(inputs=len(inputs))
    rules = rules_for(model) if rules is None else rules
    jobs = [(n, f) for n, fmts in candidates.items() for f in fmts if f != KEEP]
    cache = batched_gptq_weights(modules, candidates, recipe, hessians, progress=progress)

    def cached(name: str, fmt: str) -> QuantizedWeight | None:
        qw = cache.get((name, fmt))
        return None if qw is None else _moved(qw, modules[name].weight.device)

    for name, fmts in candidates.items():
        m = modules[name]
        rep.numel[name] = m.in_features * m.out_features
        rep.layer_error[name] = {KEEP: 0.0} if KEEP in fmts else {}
    for name, fmt in tqdm(jobs, desc="sensitivity (layers)", disable=not progress, leave=False):
        module = modules[name]
        try:
            q, _ = quantize_layer(name, module, fmt, _layer_recipe(recipe, name, hessians), stats.get(name),
                                  None if hessians is None else hessians.get(name), weight=cached(name, fmt))
        except (FormatError, ValueError) as exc:
            log.warning("sensitivity: %s cannot be quantized to %s: %s", name, fmt, exc)
            rep.layer_error[name][fmt] = float("inf")
            continue
        set_module(model, name, q)
        try:
            rep.layer_error[name][fmt] = ev.error()
        finally:
            set_module(model, name, module)
    if blocks:
        groups: dict[str, list[str]] = {}
        for name in candidates:
            block = rules.block_name(name)
            if block is not None:
                groups.setdefault(block, []).append(name)
        for block, names in tqdm(list(groups.items()), desc="sensitivity (blocks)", disable=not progress,
                                 leave=False):
            fmts = sorted({f for n in names for f in candidates[n] if f != KEEP})
            for fmt in fmts:
                swapped = []
                try:
                    for name in names:
                        if fmt not in candidates[name]:
                            continue
                        try:
                            q, _ = quantize_layer(name, modules[name], fmt, _layer_recipe(recipe, name, hessians),
                                                  stats.get(name), None if hessians is None else hessians.get(name),
                                                  weight=cached(name, fmt))
                        except (FormatError, ValueError):
                            continue
                        set_module(model, name, q)
                        swapped.append(name)
                    rep.block_error.setdefault(block, {})[fmt] = ev.error() if swapped else 0.0
                finally:
                    for name in swapped:
                        set_module(model, name, modules[name])
    model.train(was_training)
    rep.seconds = time.perf_counter() - t0
    return rep


__all__ = ["ForwardInputRecorder", "SensitivityReport", "measure_sensitivity"]  # recorder re-exported
