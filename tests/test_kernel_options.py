"""QuantLinear's public kernel knobs: ``kernel_options`` sets and restores the class-level options, clears the shared
activation cache; ``epilogue_scale`` / ``native_gemm_failed`` expose the fast path's per-layer facts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ptq.algorithms.qlinear import QuantLinear, clear_activation_cache, kernel_options
from ptq.algorithms.quantize import quantize_
from ptq.algorithms.recipe import LayerSelection, QuantRecipe
from ptq.calibration.observers import LinearInputObserver

OPTIONS = ("fast_path", "fp8_gemm", "fp8_act_mode", "fast_path_any_device")


def _options() -> dict[str, object]:
    return {k: getattr(QuantLinear, k) for k in OPTIONS}


def _quantized(fmt: str, activation: str = "max") -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).to(torch.bfloat16)
    x = torch.randn(2, 8, 64).to(torch.bfloat16)
    with LinearInputObserver(model) as obs:
        model(x)
    recipe = QuantRecipe(format=fmt, activation=activation, layers=LayerSelection(exclude=[]))
    quantize_(model, recipe, obs.stats(), progress=False)
    return model, x


def test_kernel_options_set_and_restore() -> None:
    before = _options()
    with kernel_options(fast_path=False, fp8_gemm="scaled_mm", fp8_act_mode="ck_eager", fast_path_any_device=True):
        assert _options() == {"fast_path": False, "fp8_gemm": "scaled_mm", "fp8_act_mode": "ck_eager",
                              "fast_path_any_device": True}
        with kernel_options(fast_path=True):  # None leaves the others as the outer block set them
            assert _options()["fast_path"] is True and _options()["fp8_gemm"] == "scaled_mm"
        assert _options()["fast_path"] is False
    assert _options() == before


def test_kernel_options_restore_after_an_error() -> None:
    before = _options()
    with pytest.raises(RuntimeError), kernel_options(fast_path=False, fp8_gemm="scaled_mm"):
        raise RuntimeError("boom")
    assert _options() == before


@pytest.mark.parametrize("kwargs", [{"fp8_gemm": "fp16"}, {"fp8_act_mode": "nearest"}])
def test_kernel_options_reject_unknown_values(kwargs: dict[str, str]) -> None:
    before = _options()
    with pytest.raises(ValueError), kernel_options(**kwargs):
        pass
    assert _options() == before


def test_activation_cache_cleared() -> None:
    QuantLinear._act_cache = ("stale",)
    clear_activation_cache()
    assert QuantLinear._act_cache is None
    QuantLinear._act_cache = ("stale",)
    with kernel_options(fast_path=True):
        assert QuantLinear._act_cache is None
        QuantLinear._act_cache = ("inside",)
    assert QuantLinear._act_cache is None


def test_any_device_keeps_the_reference_path_where_triton_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model, x = _quantized("nvfp4")
    ref = model(x)
    with kernel_options(fast_path_any_device=True):
        assert torch.equal(model(x), ref)


def test_epilogue_scale_and_native_gemm_flag() -> None:
    model, _ = _quantized("nvfp4")
    layer: QuantLinear = model[0]
    want = float(layer.input_scale.float().reshape(()) * layer.weight_scale_2.float().reshape(()))
    assert layer.epilogue_scale == want
    assert layer.native_gemm_failed is False
    weight_only, _ = _quantized("nvfp4", activation="none")
    assert weight_only[0].epilogue_scale is None
