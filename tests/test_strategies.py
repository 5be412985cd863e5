"""Quantization strategies (``ptq.algorithms.strategies``) and format capabilities: the strategy of a recipe comes
from its weight-method type, states its calibration needs, reruns and limits; algorithms ask formats what they
support (``scale_scheme``, ``activation_sample_block``, ``four_over_six``) instead of testing their names, and an
unsupported path is a clear error or a logged fallback."""

from __future__ import annotations

import logging
from typing import ClassVar

import pytest
import torch
from torch import nn

from ptq.algorithms.gptq_batched import gptq_quantize_many
from ptq.algorithms.quantize import quantize_
from ptq.algorithms.recipe import GPTQWeight, LayerSelection, MixedPrecision, QuantRecipe
from ptq.algorithms.strategies import STRATEGIES, calibration_needs, strategy_for, validate_recipe
from ptq.calibration.observers import LinearInputObserver
from ptq.formats import FORMATS, NumberFormat, QuantizedWeight, register_format


@pytest.mark.parametrize("weight,name,rerun", [
    ("max", "one_pass", False),
    ("mse", "one_pass", False),
    ("gptq", "gptq", False),
    (GPTQWeight(blocks_per_pass=2), "gptq_sequential", True),
    ("gptq_act_aware", "gptq_act_aware", True),
    (GPTQWeight(act_aware=True, blocks_per_pass=2), "gptq_act_aware", True),
])
def test_the_strategy_comes_from_the_weight_method(weight: object, name: str, rerun: bool) -> None:
    strategy = strategy_for(QuantRecipe(format="nvfp4", weight=weight))
    assert strategy.name == name and strategy.rerun == rerun
    assert any(strategy in group for group in STRATEGIES.values())


def test_strategies_state_what_the_first_calibration_pass_collects() -> None:
    one_pass = calibration_needs(QuantRecipe(format="nvfp4", weight="gptq"))
    assert one_pass.hessians and one_pass.amax
    sequential = calibration_needs(QuantRecipe(format="nvfp4", weight=GPTQWeight(blocks_per_pass=1)))
    assert not sequential.hessians and sequential.amax
    act_aware = calibration_needs(QuantRecipe(format="nvfp4", weight="gptq_act_aware", activation="mse"))
    assert not act_aware.hessians and act_aware.amax and act_aware.samples == 4096
    assert calibration_needs(QuantRecipe(format="nvfp4", activation="mse"), 100).samples == 100  # override
    assert calibration_needs(QuantRecipe(format="nvfp4"), 100).samples == 0  # nothing to override


@pytest.mark.parametrize("weight,offload_error", [
    ("max", None),
    ("gptq", "model.offload=true with quant/weight=gptq"),
    (GPTQWeight(blocks_per_pass=1), "model.offload=true with quant/weight=gptq"),
])
def test_strategies_own_their_device_limits(weight: object, offload_error: str | None) -> None:
    recipe = QuantRecipe(format="nvfp4", weight=weight)
    strategy_for(recipe).check_device(recipe, offload=False)
    if offload_error is None:
        strategy_for(recipe).check_device(recipe, offload=True)
    else:
        with pytest.raises(ValueError, match=offload_error):
            strategy_for(recipe).check_device(recipe, offload=True)
    mixed = QuantRecipe(format="nvfp4", weight="mse", mixed=MixedPrecision(sensitivity=True))
    with pytest.raises(ValueError, match="model.offload=true with quant.mixed"):
        strategy_for(mixed).check_device(mixed, offload=True)


def test_strategies_validate_their_recipes() -> None:
    with pytest.raises(ValueError, match="quant.mixed with GPTQ needs quant.weight.blocks_per_pass=0"):
        validate_recipe(QuantRecipe(format="nvfp4", weight=GPTQWeight(blocks_per_pass=1),
                                    mixed=MixedPrecision(sensitivity=True)))
    with pytest.raises(ValueError, match=r"act_aware=true: formats \['int8'\]"):
        validate_recipe(QuantRecipe(format="int8", weight="gptq_act_aware"))
    validate_recipe(QuantRecipe(format="nvfp4", weight="gptq_act_aware"))


def test_a_rerun_strategy_needs_rerun() -> None:
    model = nn.Sequential(nn.Linear(32, 16))
    with pytest.raises(ValueError, match="re-runs calibration"):
        strategy_for(QuantRecipe(format="nvfp4", weight="gptq_act_aware")).quantize(model, QuantRecipe(
            format="nvfp4", weight="gptq_act_aware"), {}, progress=False)


def test_four_over_six_is_a_format_capability() -> None:
    assert [n for n, f in FORMATS.items() if f.four_over_six] == ["nvfp4"]
    with pytest.raises(ValueError, match="four_over_six' applies to nvfp4 only"):
        QuantRecipe(format="fp8", weight="four_over_six").validate()


def test_formats_declare_their_scale_schemes_and_sample_blocks() -> None:
    assert {n: f.scale_scheme for n, f in FORMATS.items()} == {
        "fp8": "tensor", "nvfp4": "global_block", "int8": "tensor", "int8_convrot": "tensor", "mxfp8": "block",
        "convrot_w4a4": "tensor", "convrot_w4a8": "tensor"}
    for f in FORMATS.values():
        assert f.activation_sample_block % f.activation_block == 0


# ---------------------------------------------------------------------------------------------------------------
# a throwaway block format: int8 codes with one float32 scale per 8 inputs, static per-tensor activation scale
# ---------------------------------------------------------------------------------------------------------------


class ToyBlock8(NumberFormat):
    name = "toy_block8"
    block_size = 8
    storage_dtype = torch.int8
    weight_bits = 8.0 + 32.0 / 8
    candidates: ClassVar[bool] = True

    def storage_bits(self, out_features: int, in_features: int, *, per_channel: bool = False) -> float:
        return out_features * in_features * self.weight_bits

    def _blocks(self, w: torch.Tensor) -> torch.Tensor:
        return w.float().reshape(w.shape[0], -1, 8)

    def quantize_weight(self, w: torch.Tensor, name: str = "weight", *, per_channel: bool = False) -> QuantizedWeight:
        self.check_weight(w, name)
        s = (self._blocks(w).abs().amax(-1) / 127).clamp_min(1e-12)
        codes, _ = self.gptq_round(self._blocks(w), s.unsqueeze(-1))
        return QuantizedWeight(codes.reshape(w.shape), s)

    def dequantize_weight(self, q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self._blocks(q.weight) * q.scale.unsqueeze(-1)).reshape(q.weight.shape).to(dtype)

    def gemm_operand(self, q: QuantizedWeight) -> torch.Tensor:
        return self.dequantize_weight(q)

    def gemm_alpha(self, q: QuantizedWeight) -> torch.Tensor:
        return torch.ones((), device=q.weight.device)

    def input_scale_from_amax(self, amax: torch.Tensor) -> torch.Tensor:
        return (amax.float() / 127).clamp_min(1e-12).reshape(())

    def activation_values(self, x: torch.Tensor, input_scale: torch.Tensor, *, mode: str) -> torch.Tensor:
        return torch.clamp(torch.round(x.float() / input_scale), -127, 127)

    def fake_quantize_activation(self, x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
        return self.activation_values(x, input_scale, mode="") * input_scale

    def gptq_round(self, col: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = torch.clamp(torch.round(col / scale), -127, 127)
        return c.to(torch.int8), c * scale

    def block_scale_candidates(self, blocks: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if not self.candidates:
            return super().block_scale_candidates(blocks)
        s = (blocks.abs().amax(-1) / 127).clamp_min(1e-12)
        return [(s, s), (s * 0.9, s * 0.9)]


@pytest.fixture()
def toy_block():
    fmt = register_format(ToyBlock8())
    yield fmt
    del FORMATS[fmt.name]


def _gptq_model() -> tuple[nn.Module, dict, dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))
    with LinearInputObserver(model, hessian=True) as obs, torch.no_grad():
        model(torch.randn(256, 64))
    return model, obs.stats(), obs.hessians()


def test_a_new_block_format_runs_gptq_layer_by_layer_with_a_logged_fallback(
        toy_block, caplog: pytest.LogCaptureFixture) -> None:
    assert toy_block.scale_scheme == "block"
    recipes = [QuantRecipe(format="toy_block8", weight=GPTQWeight(batched=b), layers=LayerSelection(exclude=[]))
               for b in (True, False)]
    results = []
    for recipe in recipes:
        model, stats, hessians = _gptq_model()
        with caplog.at_level(logging.INFO, logger="ptq.algorithms.quantize"):
            records = quantize_(model, recipe, stats, hessians=hessians, progress=False)
        assert [r.format for r in records] == ["toy_block8", "toy_block8"]
        results.append([m.weight_q.clone() for m in model.modules() if hasattr(m, "weight_q")])
    assert "batched GPTQ for 'toy_block8' ('block' weight scales) is not implemented" in caplog.text
    assert "they run GPTQ one by one" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(*results))
    with pytest.raises(ValueError, match="batched GPTQ for 'toy_block8'"):
        model, _, hessians = _gptq_model()
        gptq_quantize_many({"0": model[0].weight.detach()}, hessians, toy_block, GPTQWeight())


def test_a_block_format_without_scale_candidates_is_a_clear_gptq_error(toy_block) -> None:
    toy_block.candidates = False
    model, stats, hessians = _gptq_model()
    with pytest.raises(NotImplementedError, match="'toy_block8' has no per-block scale candidates"):
        quantize_(model, QuantRecipe(format="toy_block8", weight="gptq", layers=LayerSelection(exclude=[])), stats,
                  hessians=hessians, progress=False)


def test_register_format_checks_capabilities() -> None:
    class Bad(ToyBlock8):
        name = "bad_block"
        activation_block = 8
        activation_sample_block = 12

    with pytest.raises(ValueError, match="activation_sample_block=12 is not a multiple of activation_block=8"):
        register_format(Bad())
    assert "bad_block" not in FORMATS
