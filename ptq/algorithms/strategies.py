"""Whole-model quantization strategies, looked up by the recipe's weight-method type (:data:`STRATEGIES`; torchao's
handler-by-config-type at model scope; like llm-compressor's modifiers, a strategy owns its calibration passes).

A strategy states what the first calibration pass must collect (:meth:`QuantStrategy.calibration_needs`), whether
quantization re-runs the calibration forwards (``rerun``: sequential GPTQ passes, the quantized-input statistics of
activation-aware GPTQ), the model placements it refuses (:meth:`QuantStrategy.check_device`) and the recipes it
refuses (:meth:`QuantStrategy.validate`), and it quantizes a model (:meth:`QuantStrategy.quantize`). A new strategy is
a subclass plus one entry in :data:`STRATEGIES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import nn

from ptq.algorithms.layers import LayerRules
from ptq.algorithms.quantize import LayerRecord, gptq_act_aware_, gptq_sequential_, quantize_
from ptq.algorithms.recipe import GPTQWeight, QuantRecipe, WeightMethod
from ptq.calibration.needs import CalibrationNeeds
from ptq.calibration.observers import LinearInputStats
from ptq.formats import FORMATS

#: ``rerun(observer)``: the calibration forwards once more with ``observer`` attached (strategies with ``rerun``).
Rerun = Callable[[Any], None]


class QuantStrategy:
    """One pass: :func:`~ptq.algorithms.quantize.quantize_` on the statistics (and Hessians) of the one calibration
    pass; round-to-nearest weight methods."""

    name: ClassVar[str] = "one_pass"
    #: quantization re-runs the calibration forwards (``quantize`` calls ``rerun``)
    rerun: ClassVar[bool] = False

    def accepts(self, weight: WeightMethod) -> bool:
        """Whether this strategy runs ``weight`` (a weight method of a type it is registered for)."""
        return True

    def calibration_needs(self, recipe: QuantRecipe) -> CalibrationNeeds:
        """What the first calibration pass must collect for ``recipe``."""
        return recipe.needs()

    def validate(self, recipe: QuantRecipe) -> None:
        """ValueError naming the key when this strategy cannot run ``recipe`` (its parts: ``recipe.validate``)."""

    def check_device(self, recipe: QuantRecipe, *, offload: bool) -> None:
        """ValueError when ``recipe`` cannot run with the model's placement (``offload``: weights in host memory,
        blocks streamed to the GPU)."""
        if offload and recipe.mixed.analyse:
            raise ValueError("model.offload=true with quant.mixed (sensitivity analysis): the analysis re-runs the "
                             "whole model once per layer and format, which offloading would stream from host memory "
                             "each time; use model.offload=false")

    def quantize(self, model: nn.Module, recipe: QuantRecipe, stats: Mapping[str, LinearInputStats], *,
                 hessians: Mapping[str, torch.Tensor] | None = None, rerun: Rerun | None = None,
                 rules: LayerRules | None = None, progress: bool = True,
                 device: torch.device | str | None = None) -> list[LayerRecord]:
        """Quantize ``model`` in place; one LayerRecord per ``nn.Linear`` (model order). ``stats`` / ``hessians``:
        the first calibration pass (Hessians used when :meth:`calibration_needs` asks for them); ``rerun``: needed
        by strategies with ``rerun``; ``device``: where layers are quantized when their weights live elsewhere."""
        validate_recipe(recipe)
        if self.rerun and rerun is None:
            raise ValueError(f"quantization strategy {self.name!r} re-runs calibration: pass rerun=")
        hessians = hessians if self.calibration_needs(recipe).hessians else None
        return self._run(model, recipe, stats, hessians=hessians, rerun=rerun, rules=rules, progress=progress,
                         device=device)

    def _run(self, model: nn.Module, recipe: QuantRecipe, stats: Mapping[str, LinearInputStats], *,
             hessians: Mapping[str, torch.Tensor] | None, rerun: Rerun | None, rules: LayerRules | None,
             progress: bool, device: torch.device | str | None) -> list[LayerRecord]:
        return quantize_(model, recipe, stats, hessians=hessians, rules=rules, progress=progress, device=device)


class GPTQStrategy(QuantStrategy):
    """GPTQ with every Linear's Hessian from the one calibration pass (:func:`~ptq.algorithms.quantize.quantize_`,
    batched per format)."""

    name: ClassVar[str] = "gptq"

    def check_device(self, recipe: QuantRecipe, *, offload: bool) -> None:
        if offload:
            raise ValueError("model.offload=true with quant/weight=gptq: GPTQ needs the weights on the GPU next to "
                             "its Hessians; use a round-to-nearest or mse weight method, or model.offload=false")
        super().check_device(recipe, offload=offload)


class SequentialGPTQ(GPTQStrategy):
    """GPTQ ``blocks_per_pass`` transformer blocks at a time, each pass's Hessians from a calibration re-run on the
    partly quantized model (:func:`~ptq.algorithms.quantize.gptq_sequential_`)."""

    name: ClassVar[str] = "gptq_sequential"
    rerun: ClassVar[bool] = True

    def accepts(self, weight: WeightMethod) -> bool:
        return isinstance(weight, GPTQWeight) and weight.blocks_per_pass > 0

    def calibration_needs(self, recipe: QuantRecipe) -> CalibrationNeeds:
        """The recipe's needs but the Hessians (collected by the later passes)."""
        return replace(recipe.needs(), hessians=False)

    def validate(self, recipe: QuantRecipe) -> None:
        if recipe.mixed.analyse:
            raise ValueError("quant.mixed with GPTQ needs quant.weight.blocks_per_pass=0 and act_aware=false (the "
                             "sensitivity analysis quantizes each layer with its Hessian from the one calibration "
                             "pass)")

    def _run(self, model: nn.Module, recipe: QuantRecipe, stats: Mapping[str, LinearInputStats], *,
             hessians: Mapping[str, torch.Tensor] | None, rerun: Rerun | None, rules: LayerRules | None,
             progress: bool, device: torch.device | str | None) -> list[LayerRecord]:
        assert rerun is not None
        return gptq_sequential_(model, recipe, stats, rerun, rules=rules, progress=progress)


class ActAwareGPTQ(SequentialGPTQ):
    """Activation-aware GPTQ: input scales planned from the first pass, then per pass of ``blocks_per_pass`` blocks
    (0 = all) the quantized-input statistics from a calibration re-run (:func:`~ptq.algorithms.quantize.
    gptq_act_aware_`)."""

    name: ClassVar[str] = "gptq_act_aware"

    def accepts(self, weight: WeightMethod) -> bool:
        return isinstance(weight, GPTQWeight) and weight.act_aware

    def validate(self, recipe: QuantRecipe) -> None:
        dynamic = sorted(f for f in recipe.formats_used() if f in FORMATS and FORMATS[f].dynamic_activations
                         and not FORMATS[f].models_dynamic_quantizer)
        if dynamic:
            raise ValueError(f"quant.weight.act_aware=true: formats {dynamic} scale their activations at run "
                             "time and ptq does not model their quantizer for fitting (convrot_w4a4 does)")
        super().validate(recipe)
        if recipe.weight_only:
            raise ValueError("quant.weight.act_aware=true fits the weights to the quantized activations: it needs an "
                             "activation method other than 'none'")

    def _run(self, model: nn.Module, recipe: QuantRecipe, stats: Mapping[str, LinearInputStats], *,
             hessians: Mapping[str, torch.Tensor] | None, rerun: Rerun | None, rules: LayerRules | None,
             progress: bool, device: torch.device | str | None) -> list[LayerRecord]:
        assert rerun is not None
        return gptq_act_aware_(model, recipe, stats, rerun, rules=rules, progress=progress)


#: The strategies of each weight-method type, tried in order: the first that accepts the recipe's weight method runs
#: it (a weight method's own type first, then its base classes).
STRATEGIES: dict[type[WeightMethod], tuple[QuantStrategy, ...]] = {
    GPTQWeight: (ActAwareGPTQ(), SequentialGPTQ(), GPTQStrategy()),
    WeightMethod: (QuantStrategy(),),
}


def strategy_for(recipe: QuantRecipe) -> QuantStrategy:
    """The strategy that quantizes a model with ``recipe`` (:data:`STRATEGIES`)."""
    for cls in type(recipe.weight).__mro__:
        for strategy in STRATEGIES.get(cls, ()):
            if strategy.accepts(recipe.weight):
                return strategy
    raise ValueError(f"no quantization strategy accepts the weight method {recipe.weight.label!r} "
                     f"({type(recipe.weight).__name__}; ptq.algorithms.strategies.STRATEGIES)")


def validate_recipe(recipe: QuantRecipe) -> None:
    """The whole check of a recipe: its parts (``recipe.validate()``) and its strategy's limits (ValueError naming
    the key)."""
    recipe.validate()
    strategy_for(recipe).validate(recipe)


def calibration_needs(recipe: QuantRecipe, samples_per_call: int = 0) -> CalibrationNeeds:
    """What the first calibration pass collects for ``recipe``: its strategy's needs, ``samples_per_call`` > 0
    replacing the number of |x| samples per call it asks for (``calib.samples_per_call``)."""
    return strategy_for(recipe).calibration_needs(recipe).with_samples_per_call(samples_per_call)


__all__ = ["STRATEGIES", "ActAwareGPTQ", "GPTQStrategy", "QuantStrategy", "Rerun", "SequentialGPTQ",
           "calibration_needs", "strategy_for", "validate_recipe"]
