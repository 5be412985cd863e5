"""Activation-aware GPTQ: weights fitted to the inputs as the runtime quantizes them (``GPTQWeight.act_aware``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ptq.algorithms.gptq import TARGET_RIDGE, quantized_input_target
from ptq.algorithms.qlinear import QuantLinear
from ptq.algorithms.quantize import gptq_act_aware_, quantize_
from ptq.algorithms.recipe import QuantRecipe
from ptq.algorithms.strategies import validate_recipe
from ptq.calibration.observers import LinearInputObserver
from ptq.calibration.quantized_inputs import QuantizedInputObserver
from ptq.formats import NVFP4


def _inputs(n: int, k: int = 64, seed: int = 0, rank: int = 8) -> torch.Tensor:
    """bf16 ``[n, k]`` with correlated channels (rank-8 signal + small noise; the same mixing for every seed), like
    transformer activations: their quantization error is partly predictable from the other channels."""
    mix = torch.randn(rank, k, generator=torch.Generator().manual_seed(100))
    z = torch.randn(n, rank, generator=torch.Generator().manual_seed(seed))
    noise = torch.randn(n, k, generator=torch.Generator().manual_seed(seed + 1))
    return (z @ mix + 0.05 * noise).to(torch.bfloat16)


def test_target_solves_the_quantized_input_least_squares() -> None:
    x = _inputs(4096).float()
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    g = NVFP4.input_scale_from_amax(x.abs().amax())
    xq = NVFP4.fake_quantize_activation(x, g)
    h_qq, h_xq = xq.t() @ xq / x.shape[0], x.t() @ xq / x.shape[0]
    v = quantized_input_target(w, h_qq, h_xq)
    # normal equations of the ridge problem: H_qq V^T + r diag(H_qq) V^T = H_xq^T W^T
    lhs = (h_qq + TARGET_RIDGE * torch.diag(torch.diagonal(h_qq))) @ v.t()
    torch.testing.assert_close(lhs, h_xq.t() @ w.t(), rtol=1e-4, atol=1e-4)
    y = x @ w.t()
    assert float((xq @ v.t() - y).norm()) < 0.6 * float((xq @ w.t() - y).norm())  # correlated channels


def test_observer_accumulates_the_smoothed_quantized_statistics() -> None:
    layer = nn.Linear(64, 8).to(torch.bfloat16)
    p = torch.full((64,), 0.5)
    p[::3] = 2.0
    quantize = lambda t: t.round()  # noqa: E731 - any quantizer of a float32 matrix
    obs = QuantizedInputObserver(nn.Sequential(layer), {"0": (p, quantize)})
    xs = [_inputs(30, seed=s).reshape(3, 10, 64) for s in range(2)]
    with obs, torch.no_grad():
        for x in xs:
            layer(x)
    h_qq, h_xq = obs.hessians()["0"]
    flat = torch.cat([(x * p.to(x.dtype)).reshape(-1, 64).float() for x in xs])
    torch.testing.assert_close(h_qq, flat.round().t() @ flat.round() / 60)
    torch.testing.assert_close(h_xq, flat.t() @ flat.round() / 60)


def _model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(approximate="tanh"), nn.Linear(128, 64)).to(torch.bfloat16)


@pytest.mark.parametrize("smooth", ["none", "smoothquant"])
def test_act_aware_gptq_lowers_the_w4a4_output_error(smooth: str) -> None:
    calib, held_out = _inputs(4096, seed=0), _inputs(1024, seed=9)
    base = _model()
    with LinearInputObserver(base, hessian=True, rows_per_call=256) as obs, torch.no_grad():
        for chunk in calib.chunk(8):
            base(chunk)
    stats, hessians = obs.stats(), obs.hessians()
    with torch.no_grad():
        y = base(held_out).float()
    errs = {}
    for weight in ("gptq_four_over_six", "gptq_four_over_six_act_aware"):
        model = _model()
        recipe = QuantRecipe(format="nvfp4", weight=weight, activation="max", smoothing=smooth)
        recipe.layers.exclude = []
        if recipe.weight.act_aware:
            calls = []

            def calibrate(observer: QuantizedInputObserver, _m: nn.Module = model, _calls: list = calls) -> None:
                _calls.append(observer)
                with torch.no_grad():
                    for chunk in calib.chunk(8):
                        _m(chunk)

            recs = gptq_act_aware_(model, recipe, stats, calibrate, progress=False)
            assert len(calls) == 1 and [r.format for r in recs] == ["nvfp4", "nvfp4"]
        else:
            recs = quantize_(model, recipe, stats, hessians=hessians, progress=False)
        assert all(isinstance(m, QuantLinear) for m in (model[0], model[2]))
        with torch.no_grad():
            errs[weight] = float((model(held_out).float() - y).norm() / y.norm())
    assert errs["gptq_four_over_six_act_aware"] < 0.97 * errs["gptq_four_over_six"], errs


def test_act_aware_needs_quantized_activations() -> None:
    with pytest.raises(ValueError, match="act_aware"):
        validate_recipe(QuantRecipe(format="nvfp4", weight="gptq_act_aware", activation="none"))
