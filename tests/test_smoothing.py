"""Smoothing (``pre_quant_scale``): the search, its exact arithmetic, the layer it builds, and the ComfyUI file it
writes, checked against ComfyUI's semantics (``input * pre_quant_scale.to(input.dtype)``, then the dequantized or
quantized layer) with comfy-kitchen's own dequantization."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from torch import nn

from ptq.algorithms import smoothing
from ptq.algorithms.qlinear import QuantLinear
from ptq.algorithms.quantize import quantize_, quantize_layer
from ptq.algorithms.recipe import QuantRecipe, Smoothing
from ptq.calibration.observers import LinearInputObserver
from ptq.formats import NVFP4
from ptq.targets import export_model

ck = pytest.importorskip("comfy_kitchen")


def _outlier_inputs(n: int = 512, k: int = 128, seed: int = 0) -> torch.Tensor:
    """bf16 activations with a few large channels (the case SmoothQuant is for)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    x[:, 3] *= 40.0
    x[:, 70] *= 25.0
    x[:, 100:104] *= 8.0
    return x.to(torch.bfloat16)


def _calibrated(layer: nn.Linear, x: torch.Tensor, rows: int = 64):
    """Stats of ``layer`` over 8 calls on chunks of ``x``, with rows kept."""
    model = nn.Sequential(layer)
    with LinearInputObserver(model, ["0"], rows_per_call=rows) as obs, torch.no_grad():
        for chunk in x.chunk(8):
            model(chunk)
    return obs.stats()["0"]


def _layer(k: int = 128, out: int = 64, seed: int = 1) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(k, out).to(torch.bfloat16)
    return layer


def test_candidate_scales_are_exact_in_bf16_fp16_and_normalised() -> None:
    act = torch.tensor([0.0, 1e-3, 0.5, 3.0, 400.0, 7.0])
    wmax = torch.tensor([1.0, 0.2, 0.0, 0.05, 0.1, 2.0])
    for stat in ("max", "mean"):
        for a in (0.0, 0.3, 0.5, 1.0):
            p = smoothing.candidate_scale(act, wmax, a, stat)
            assert torch.equal(p.to(torch.bfloat16).float(), p) and torch.equal(p.to(torch.float16).float(), p)
            assert bool((p >= smoothing.P_MIN).all() and (p <= smoothing.P_MAX).all())
            assert p[0] == 1.0 and p[2] == 1.0  # dead channels (no activation / no weight) are left alone
    # SmoothQuant a=0.5: 1/p ~ sqrt(amax / wmax), geometric mid-range 1 (up to bf16 rounding)
    p = smoothing.candidate_scale(act, wmax, 0.5, "max")
    s = (act[[1, 3, 4, 5]] / wmax[[1, 3, 4, 5]]).sqrt()
    s = s / (s.max() * s.min()).sqrt()
    torch.testing.assert_close(p[[1, 3, 4, 5]], 1.0 / s, rtol=2 ** -8, atol=0)


def test_quantlinear_applies_pre_quant_scale_like_comfyui() -> None:
    """The QuantLinear of a smoothed layer computes ComfyUI's ``linear(x * p.to(x.dtype), dequant(W/p))`` bit for bit
    (weight dequantized by comfy-kitchen's eager dequantize_nvfp4 from the exported tensors)."""
    layer = _layer()
    x = _outlier_inputs()
    stats = _calibrated(layer, x)
    recipe = QuantRecipe(format="nvfp4", activation="none", smoothing="smoothquant")
    q, rec = quantize_layer("l", layer, "nvfp4", recipe, stats)
    assert q.pre_quant_scale is not None and q.pre_quant_scale.dtype == torch.bfloat16
    assert rec.smoothing.startswith("max a=") and rec.smoothing_gain < 1.0
    st = q.state()
    from comfy_kitchen.tensor import TensorCoreNVFP4Layout

    from ptq.targets.comfyui.writer import write_nvfp4

    file = write_nvfp4("l", st, torch.bfloat16)
    params = TensorCoreNVFP4Layout.Params(scale=file["l.weight_scale_2"], orig_dtype=torch.bfloat16,
                                          orig_shape=(64, 128), block_scale=file["l.weight_scale"])
    w_ck = TensorCoreNVFP4Layout.dequantize(file["l.weight"], params)  # what ComfyUI's dequantize path uses
    y_comfy = torch.nn.functional.linear(x * file["l.pre_quant_scale"].to(x.dtype), w_ck, file["l.bias"])
    assert torch.equal(q(x), y_comfy)
    # the effective weight is the stored one times p per input column
    torch.testing.assert_close(st.effective_weight(), st.dequantized_weight() * st.pre_quant_scale.float(),
                               rtol=0, atol=0)


def test_search_beats_no_smoothing_on_outlier_channels() -> None:
    layer = _layer()
    x = _outlier_inputs()
    stats = _calibrated(layer, x)
    for weight_only in (False, True):
        recipe = QuantRecipe(format="nvfp4", activation="none" if weight_only else "max",
                             smoothing=Smoothing(method="search", statistics=["max", "mean"]))
        choice = smoothing.search_pre_quant_scale("l", layer.weight.detach(), stats, NVFP4, recipe)
        assert choice.scale is not None and choice.error < choice.error_unsmoothed
        # W4A4 with 40x outlier channels: smoothing removes most of the layer's output error
        assert choice.gain < (0.8 if weight_only else 0.5), (weight_only, choice.gain)
    # never worse than no smoothing: an already flat input keeps p = 1 or improves
    flat = torch.randn(256, 128, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    stats = _calibrated(layer, flat)
    choice = smoothing.search_pre_quant_scale("l", layer.weight.detach(), stats, NVFP4,
                                              QuantRecipe(format="nvfp4", smoothing="smoothquant"))
    assert choice.error <= choice.error_unsmoothed


def test_smoothed_statistics_and_hessian_are_those_of_x_times_p() -> None:
    layer = _layer()
    x = _outlier_inputs(n=256)
    stats = _calibrated(layer, x, rows=1000)  # every row kept
    assert stats.rows.shape == (256, 128) and stats.rows.dtype == torch.bfloat16
    p = smoothing.candidate_scale(stats.channel_amax, layer.weight.detach().float().abs().amax(0), 0.5, "max")
    xs = (x.float() * p).to(torch.bfloat16).float()
    sm = smoothing.smoothed_stats(stats, p)
    assert float(sm.amax) == pytest.approx(float((x.float().abs() * p).amax()), rel=1e-6)
    torch.testing.assert_close(sm.channel_amax, x.float().abs().amax(0) * p)
    assert sm.sample_block == 16 and sm.samples.numel() % 128 == 0
    h = x.float().t() @ x.float()
    torch.testing.assert_close(smoothing.smoothed_hessian(h, p), (x.float() * p).t() @ (x.float() * p), rtol=1e-5,
                               atol=1e-3)
    assert float(xs.abs().amax()) <= float(sm.amax) * (1 + 2 ** -8)


def test_observer_rows_are_shared_by_siblings_and_not_graph_safe() -> None:
    model = nn.ModuleDict({"a": nn.Linear(32, 8), "b": nn.Linear(32, 8)})
    x = torch.randn(4, 50, 32)
    obs = LinearInputObserver(model, ["a", "b"], rows_per_call=7)
    assert not obs.graph_safe
    with obs, torch.no_grad():
        for _ in range(3):
            model["a"](x)
            model["b"](x)
    st = obs.stats()
    assert st["a"].rows.shape == (21, 32) and torch.equal(st["a"].rows, st["b"].rows)
    flat = x.reshape(-1, 32)
    assert all(any(torch.equal(r, f) for f in flat) for r in st["a"].rows[:7])  # real rows of x


def test_gptq_and_mse_compose_with_smoothing() -> None:
    layer = _layer()
    x = _outlier_inputs()
    model = nn.Sequential(layer)
    with LinearInputObserver(model, ["0"], rows_per_call=64, samples_per_call=512, sample_block=16,
                             hessian=True) as obs, torch.no_grad():
        for chunk in x.chunk(8):
            model(chunk)
    stats, hess = obs.stats(), obs.hessians()
    y = layer(x).float()
    errs = {}
    for name, weight, act in (("rtn", "max", "max"), ("gptq_4o6_mse", "gptq_four_over_six", "mse")):
        for smooth in ("none", "smoothquant_awq"):
            m = nn.Sequential(_layer())
            recipe = QuantRecipe(format="nvfp4", weight=weight, activation=act, smoothing=smooth)
            recipe.layers.exclude = []
            recs = quantize_(m, recipe, stats, hessians=hess, progress=False)
            assert isinstance(m[0], QuantLinear) and (m[0].pre_quant_scale is not None) == (smooth != "none")
            assert recs[0].input_scale > 0
            with torch.no_grad():
                errs[(name, smooth)] = float((m[0](x).float() - y).norm() / y.norm())
    assert errs[("rtn", "smoothquant_awq")] < 0.7 * errs[("rtn", "none")], errs
    assert errs[("gptq_4o6_mse", "smoothquant_awq")] < 0.7 * errs[("gptq_4o6_mse", "none")], errs


def test_smoothed_export_round_trips_and_diffusers_skips(random_tiny_dir: Path, tmp_path: Path) -> None:
    from ptq.models import wan
    from ptq.tools.inspect import inspect_file

    model = wan.load_transformer(random_tiny_dir)
    torch.manual_seed(0)
    xin = torch.randn(1, 48, 3, 16, 16).to(torch.bfloat16)
    text = torch.randn(1, 32, model.config.text_dim).to(torch.bfloat16)
    with LinearInputObserver(model, rows_per_call=32) as obs, torch.no_grad():
        for t in (900.0, 300.0):
            model(xin, torch.full((1, 3 * 8 * 8), t), text)
    recipe = QuantRecipe(format="nvfp4", smoothing=Smoothing(method="search", statistics=["max"], alphas=[0.5],
                                                             rows=64))
    quantize_(model, recipe, obs.stats(), progress=False)
    cfg = SimpleNamespace(targets=["comfyui", "diffusers"], unquantized_dtype="bfloat16", filename="m", verify=True)
    res = {r.target: r for r in export_model(model, cfg, tmp_path, progress=False)}
    assert res["comfyui"].verified, res["comfyui"].verify_detail
    assert "pre_quant_scale" in res["diffusers"].skipped
    smoothed = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.pre_quant_scale is not None]
    assert smoothed
    with safe_open(res["comfyui"].path, "pt") as f:
        key = wan.WanAdapter.target_key(smoothed[0], "comfyui") + ".pre_quant_scale"
        t = f.get_tensor(key)
        assert t.dtype == torch.bfloat16 and t.shape == (model.get_submodule(smoothed[0]).in_features,)
        assert json.loads(f.metadata()["config"]) == {"transformer": {"num_heads": 4, "text_dim": 256}}
    report = inspect_file(res["comfyui"].path)
    assert report.errors == [], [p.code for p in report.problems]
    assert report.comfyui_min_version == "0.30.0"
    assert any("pre_quant_scale" in n and "0.30.0" in n for n in report.notes)
