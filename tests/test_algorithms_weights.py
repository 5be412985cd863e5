"""Weight-scale search methods ("mse", "four_over_six", FP8 MSE clipping): never worse than round-to-nearest max
calibration, valid NVFP4 / FP8 tensors, and files that the exporters write and verify like max-calibrated ones."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ptq.algorithms import weight_search as ws
from ptq.algorithms.methods import WEIGHT_METHODS, quantize_weight
from ptq.algorithms.qlinear import QuantizedLinearState
from ptq.algorithms.quantize import quantize_, quantized_layers
from ptq.algorithms.recipe import LayerSelection, QuantRecipe
from ptq.algorithms.weight_quant import WeightContext
from ptq.calibration.observers import LinearInputObserver
from ptq.formats import nvfp4 as nf


def heavy_tailed(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Student-t (3 d.o.f.) weights in bf16: the outliers that make block scaling hard."""
    torch.manual_seed(seed)
    return (torch.distributions.StudentT(3.0).sample((rows, cols)) * 0.02).to(torch.bfloat16)


def _sse(w: torch.Tensor, fmt: str, method: str, **ctx) -> float:
    qw = quantize_weight(w, fmt, method, WeightContext("layer", **ctx))
    st = QuantizedLinearState(fmt, qw.weight, qw.scale, qw.scale_2, None, None, w.shape[1], w.shape[0])
    return float((st.dequantized_weight() - w.float()).pow(2).sum())


def test_methods_are_registered() -> None:
    assert {"max", "mse", "four_over_six", "gptq", "gptq_max", "gptq_four_over_six"} <= set(WEIGHT_METHODS)


# measured on these three matrices (128 x 256): mse 0.848-0.859, four_over_six 0.903-0.922 of max's SSE
@pytest.mark.parametrize("method,bound", [("mse", 0.88), ("four_over_six", 0.95)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nvfp4_methods_beat_max_on_heavy_tails(method: str, bound: float, seed: int) -> None:
    w = heavy_tailed(128, 256, seed)
    ratio = _sse(w, "nvfp4", method) / _sse(w, "nvfp4", "max")
    assert ratio <= bound, f"{method}: SSE ratio {ratio:.4f} vs max"


def test_block_search_never_loses_a_block() -> None:
    """For a fixed global scale, every block's error is <= round-to-nearest's (offset 0 is a candidate)."""
    w = heavy_tailed(64, 512, 3).float()
    g = nf.nvfp4_global_scale(w.abs().amax())
    s_max = ws.nvfp4_max_scales(w, g)
    s_mse, sse = ws.nvfp4_mse_scales(w, g)
    rtn = ws.nvfp4_block_sse(w, g, s_max)
    assert torch.equal(sse, ws.nvfp4_block_sse(w, g, s_mse))
    assert bool((sse <= rtn).all())
    assert float(sse.sum()) < 0.9 * float(rtn.sum())
    # round-to-nearest scales are reproduced exactly (same rounding as the format's quantizer)
    _, s_ref = nf.quantize_nvfp4(w, g)
    assert torch.equal(s_max.view(torch.uint8), s_ref.view(torch.uint8))


def test_column_weights_steer_the_search() -> None:
    """With diag(H) weights, the weighted error is lower than with the plain search's scales."""
    w = heavy_tailed(64, 256, 4).float()
    g = nf.nvfp4_global_scale(w.abs().amax())
    cw = torch.linspace(0.01, 10.0, 256) ** 2
    s_plain, _ = ws.nvfp4_mse_scales(w, g)
    s_w, _ = ws.nvfp4_mse_scales(w, g, col_weight=cw)
    assert ws.nvfp4_weight_sse(w, g, s_w, cw) <= ws.nvfp4_weight_sse(w, g, s_plain, cw)


@pytest.mark.parametrize("method", ["mse", "four_over_six"])
def test_nvfp4_output_is_valid(method: str) -> None:
    w = heavy_tailed(32, 128, 5)
    qw = quantize_weight(w, "nvfp4", method, WeightContext("layer"))
    assert qw.weight.dtype == torch.uint8 and qw.weight.shape == (32, 64)
    assert qw.scale.dtype == torch.float8_e4m3fn and qw.scale.shape == (32, 8)
    assert bool(torch.isfinite(qw.scale.float()).all()) and float(qw.scale.float().max()) <= 448
    assert qw.scale_2.dtype == torch.float32 and qw.scale_2.shape == () and float(qw.scale_2) > 0
    values = nf.decode_e2m1(nf.unpack_e2m1(qw.weight))
    assert bool(torch.isfinite(values).all()) and float(values.abs().max()) <= 6
    # the codes are round-to-nearest-even of w / (global * block_scale), as the format's quantizer computes them
    total = (qw.scale_2 * qw.scale.float()).repeat_interleave(16, dim=1)
    expected = nf.encode_e2m1(torch.clamp(w.float() / total, -6, 6))
    assert torch.equal(nf.unpack_e2m1(qw.weight), expected)


def test_four_over_six_picks_six_or_four_per_block() -> None:
    w = heavy_tailed(32, 256, 6).float()
    g, s = ws.nvfp4_four_over_six_scales(w)
    assert torch.allclose(g, w.abs().amax() / (6 * 256))
    bmax = w.reshape(32, 16, 16).abs().amax(-1)
    s6 = torch.clamp(bmax / 6 / g, max=448).to(torch.float8_e4m3fn)
    s4 = torch.clamp(bmax / 4 / g, max=448).to(torch.float8_e4m3fn)
    is6, is4 = s.view(torch.uint8) == s6.view(torch.uint8), s.view(torch.uint8) == s4.view(torch.uint8)
    assert bool((is6 | is4).all())
    assert 0 < int(is4.sum()) < is4.numel()  # both choices occur
    e = ws.nvfp4_block_sse(w, g, s)
    assert bool((e <= ws.nvfp4_block_sse(w, g, s6)).all()) and bool((e <= ws.nvfp4_block_sse(w, g, s4)).all())


@pytest.mark.parametrize("per_channel", [False, True])
def test_fp8_mse_scale_never_worse(per_channel: bool) -> None:
    for seed in range(3):
        w = heavy_tailed(64, 128, seed)
        kw = {"fp8_per_channel": per_channel}
        assert _sse(w, "fp8", "mse", **kw) <= _sse(w, "fp8", "max", **kw)
    s = ws.fp8_mse_scale(heavy_tailed(64, 128, 0), per_channel)
    assert s.dtype == torch.float32 and s.shape == ((64, 1) if per_channel else ())


def test_methods_are_deterministic() -> None:
    w = heavy_tailed(64, 128, 7)
    for method in ("mse", "four_over_six"):
        a = quantize_weight(w, "nvfp4", method, WeightContext("l"))
        b = quantize_weight(w, "nvfp4", method, WeightContext("l"))
        assert torch.equal(a.weight, b.weight) and torch.equal(a.scale.view(torch.uint8), b.scale.view(torch.uint8))


def test_shape_errors_fall_back_like_max() -> None:
    """NVFP4 needs in_features % 16 == 0: every method raises the format's error, so quantize_ falls back."""
    model = torch.nn.Sequential(torch.nn.Linear(24, 32))
    x = torch.randn(4, 24)
    with LinearInputObserver(model) as obs:
        model(x)
    for method in ("mse", "four_over_six"):
        recs = quantize_(model, QuantRecipe(format="nvfp4", weight=method,
                                                     layers=LayerSelection(exclude=[], fallback="bf16")),
                         obs.stats(), progress=False)
        assert recs[0].format == "bf16" and "multiple of 16" in recs[0].reason


# ---------------------------------------------------------------------------------------------------------------
# exporter round trip (ComfyUI via comfy-kitchen's own layout classes, diffusers' BFL loader)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["four_over_six", "mse", "gptq"])
def test_export_round_trip(method: str, random_tiny_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("comfy_kitchen")
    from ptq.models import wan
    from ptq.targets import export_model

    model = wan.load_transformer(random_tiny_dir)
    torch.manual_seed(0)
    x = torch.randn(1, 48, 3, 16, 16).to(torch.bfloat16)
    text = torch.randn(1, 32, model.config.text_dim).to(torch.bfloat16)
    with LinearInputObserver(model, hessian=method == "gptq") as obs, torch.no_grad():
        for t in (900.0, 300.0):
            model(x, torch.full((1, 3 * 8 * 8), t), text)
    recipe = QuantRecipe(format="nvfp4", weight=method)
    records = quantize_(model, recipe, obs.stats(), hessians=obs.hessians() if method == "gptq" else None,
                        progress=False)
    assert sum(r.format == "nvfp4" for r in records) == 50
    cfg = SimpleNamespace(targets=["comfyui", "diffusers"], unquantized_dtype="bfloat16", filename="m", verify=True)
    results = export_model(model, cfg, tmp_path, progress=False)
    assert all(r.verified for r in results), [r.verify_detail for r in results]
    for layer in quantized_layers(model).values():
        assert bool(torch.isfinite(layer.dequantized_weight()).all())
