"""QuantLinear simulates the target kernels: checked against comfy-kitchen's quantizers and torch._scaled_mm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ptq.algorithms.qlinear import QuantLinear
from ptq.algorithms.quantize import quantize_
from ptq.algorithms.recipe import LayerSelection, QuantRecipe
from ptq.calibration.observers import LinearInputObserver

ck = pytest.importorskip("comfy_kitchen")


def _calibrated(fmt: str, weight_only: bool = False, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).to(torch.bfloat16)
    x = (torch.randn(3, 40, 64) * torch.linspace(0.1, 4, 64)).to(torch.bfloat16)  # channel outliers
    with LinearInputObserver(model) as obs:
        model(x)
    recipe = QuantRecipe(format=fmt, activation="none" if weight_only else "max", layers=LayerSelection(exclude=[]))
    records = quantize_(model, recipe, obs.stats(), progress=False)
    assert [r.format for r in records] == [fmt, fmt]
    return model, x


def test_nvfp4_w4a4_matches_comfy_kitchen_reference() -> None:
    model, x = _calibrated("nvfp4")
    layer: QuantLinear = model[0]
    # reference: comfy-kitchen quantizes x with the stored input_scale and dequantizes both operands
    x2 = x.reshape(-1, 64).float()
    qx, sx = ck.quantize_nvfp4(x2, layer.input_scale)
    xd = ck.dequantize_nvfp4(qx, layer.input_scale, sx, output_type=torch.float32)
    st = layer.state()
    qw, sw = ck.quantize_nvfp4(model[0].dequantized_weight(), st.weight_scale_2)  # re-quantizing is idempotent
    wd = ck.dequantize_nvfp4(qw, st.weight_scale_2, sw, output_type=torch.float32)
    assert torch.equal(wd, layer.dequantized_weight())
    ref = (xd @ wd.t() + st.bias.float()).to(torch.bfloat16)
    got = layer(x).reshape(-1, 96)
    # identical operands; only fp32 summation order and where the global scales are applied differ
    assert (got.float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()
    mismatch = (got != ref).float().mean()
    assert mismatch < 0.02, f"{mismatch:.3%} of outputs differ from the reference"


def test_fp8_w8a8_matches_scaled_mm() -> None:
    model, x = _calibrated("fp8")
    layer: QuantLinear = model[0]
    st = layer.state()
    x2 = x.reshape(-1, 64)
    # comfy-kitchen's CUDA backend (ComfyUI's runtime on NVIDIA GPUs): float32 product with the float32 reciprocal
    qx = torch.clamp(x2.float() * (1.0 / layer.input_scale), -448, 448).to(torch.float8_e4m3fn)
    ref = torch._scaled_mm(qx, st.weight.t(), layer.input_scale, st.weight_scale, out_dtype=torch.float32)
    ref = (ref + st.bias.float()).to(torch.bfloat16)
    got = layer(x).reshape(-1, 96)
    assert (got.float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()
    assert (got != ref).float().mean() < 0.02


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_weight_only_is_dequantized_linear(fmt: str) -> None:
    model, x = _calibrated(fmt, weight_only=True)
    layer: QuantLinear = model[0]
    assert layer.input_scale is None
    w = layer.dequantized_weight(torch.bfloat16)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, w, layer.bias.to(torch.bfloat16)))


@pytest.mark.parametrize("fmt,low,high", [("fp8", 0.02, 0.08), ("nvfp4", 0.08, 0.3)])
def test_quantized_output_error_is_in_expected_range(fmt: str, low: float, high: float) -> None:
    """W8A8 ~5% and W4A4 ~15% relative output error on this toy MLP (measured 0.052 / 0.15)."""
    model, x = _calibrated(fmt)
    torch.manual_seed(0)  # same seed as _calibrated: identical bf16 weights
    base = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).to(torch.bfloat16)
    y_ref, y = base(x).float(), model(x).float()
    rel = ((y - y_ref).norm() / y_ref.norm()).item()
    assert low < rel < high


def test_fallback_for_non_multiple_of_16() -> None:
    model = nn.Sequential(nn.Linear(24, 32)).to(torch.bfloat16)
    x = torch.randn(5, 24, dtype=torch.bfloat16)
    with LinearInputObserver(model) as obs:
        model(x)
    recs = quantize_(model, QuantRecipe(format="nvfp4", layers=LayerSelection(exclude=[], fallback="fp8")), obs.stats(), progress=False)
    assert recs[0].format == "fp8" and "not a multiple of 16" in recs[0].reason
    recs = quantize_(nn.Sequential(nn.Linear(24, 32)), QuantRecipe(format="nvfp4", layers=LayerSelection(exclude=[])), obs.stats(),
                     progress=False)
    assert recs[0].format == "bf16" and "not a multiple of 16" in recs[0].reason


def test_quantize_frees_the_replaced_linears() -> None:
    """After quantize_ the bf16 Linears are gone (only QuantLinears hold weights), even while the calibration
    observer that hooked them is still alive: peak memory is the quantized model, not bf16 twice."""
    import gc
    import weakref

    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).to(torch.bfloat16)
    refs = [weakref.ref(model[0]), weakref.ref(model[2])]
    obs = LinearInputObserver(model)
    with obs:
        model(torch.randn(4, 64).to(torch.bfloat16))
    quantize_(model, QuantRecipe(format="nvfp4", layers=LayerSelection(exclude=[])), obs.stats(), progress=False)
    gc.collect()
    assert all(r() is None for r in refs)
    assert isinstance(model[0], QuantLinear) and isinstance(model[2], QuantLinear)
    with pytest.raises(RuntimeError, match="no longer exists"):
        obs.attach()


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_released_gemm_operand_is_rebuilt_bit_for_bit(fmt: str) -> None:
    """release_gemm_operand (offloaded layers keep only codes and scales): the output is the same bit for bit,
    the buffer is gone from the state dict (nothing to stream), the export state unchanged."""
    model, x = _calibrated(fmt)
    layer: QuantLinear = model[0]
    ref, operand, state = layer(x), layer.weight_values.clone(), layer.state()
    layer.release_gemm_operand()
    assert "weight_values" not in dict(layer.named_buffers())
    assert torch.equal(layer.gemm_operand(), operand) and torch.equal(layer(x), ref)
    after = layer.state()
    for a, b in ((after.weight, state.weight), (after.weight_scale, state.weight_scale)):
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
