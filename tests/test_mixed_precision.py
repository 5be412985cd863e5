"""Sensitivity analysis and automatic mixed precision: the knapsack never exceeds the budget and is near-optimal,
bits are counted as the files store them, and a mixed plan quantizes, exports (per-layer formats in ComfyUI's
metadata) and verifies."""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ptq.algorithms.mixed_precision import choose_formats, layer_bits, plan_mixed_precision
from ptq.algorithms.qlinear import QuantizedLinearState
from ptq.algorithms.quantize import quantize_
from ptq.algorithms.recipe import LayerSelection, MixedPrecision, QuantRecipe
from ptq.algorithms.sensitivity import _Evaluator
from ptq.calibration.observers import LinearInputObserver
from ptq.calibration.recorder import ForwardInputRecorder
from ptq.formats import nvfp4 as nf
from ptq.models.cpu_matmul import Float32LinearOnCPU


def _random_problem(rng: random.Random, layers: int) -> dict[str, dict[str, tuple[float, float]]]:
    out = {}
    for i in range(layers):
        n = rng.choice([256, 512, 1024, 4096])
        e4 = rng.uniform(0.1, 10.0)
        e8 = e4 * rng.uniform(0.01, 0.5)
        out[f"l{i}"] = {"nvfp4": (4.5 * n, e4), "fp8": (8.0 * n, e8), "bf16": (16.0 * n, 0.0)}
    return out


@pytest.mark.parametrize("seed", range(20))
def test_knapsack_feasible_and_near_optimal(seed: int) -> None:
    """Exhaustive check on 6-layer problems: within budget, and at most one layer's largest step above optimal."""
    rng = random.Random(seed)
    opts = _random_problem(rng, 6)
    lo = sum(o["nvfp4"][0] for o in opts.values())
    hi = sum(o["bf16"][0] for o in opts.values())
    budget = rng.uniform(lo, lo + 0.5 * (hi - lo))
    choice = choose_formats(opts, budget)
    used = sum(opts[n][f][0] for n, f in choice.items())
    err = sum(opts[n][f][1] for n, f in choice.items())
    assert used <= budget
    best = min(sum(opts[n][f][1] for n, f in zip(opts, fs))
               for fs in itertools.product(*[list(o) for o in opts.values()])
               if sum(opts[n][f][0] for n, f in zip(opts, fs)) <= budget)
    slack = max(o["nvfp4"][1] for o in opts.values())
    assert best <= err <= best + slack
    assert err <= sum(o["nvfp4"][1] for o in opts.values())


def test_knapsack_exact_cases() -> None:
    opts = {"a": {"nvfp4": (4.5, 10.0), "fp8": (8.0, 1.0)}, "b": {"nvfp4": (4.5, 1.0), "fp8": (8.0, 0.5)}}
    assert choose_formats(opts, 9.0) == {"a": "nvfp4", "b": "nvfp4"}
    assert choose_formats(opts, 12.5) == {"a": "fp8", "b": "nvfp4"}  # the sensitive layer gets the bits
    assert choose_formats(opts, 16.0) == {"a": "fp8", "b": "fp8"}
    with pytest.raises(ValueError, match="infeasible"):
        choose_formats(opts, 8.0)


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_layer_bits_match_the_stored_tensors(fmt: str) -> None:
    w = torch.randn(48, 160)
    if fmt == "nvfp4":
        g = nf.nvfp4_global_scale(w.abs().amax())
        packed, s = nf.quantize_nvfp4(w, g)
        st = QuantizedLinearState("nvfp4", packed, s, g, None, None, 160, 48)
        stored = packed.numel() * 8 + s.numel() * 8
    else:
        q = w.to(torch.float8_e4m3fn)
        st = QuantizedLinearState("fp8", q, torch.ones(()), None, None, None, 160, 48)
        stored = q.numel() * 8 + 32
    assert layer_bits(fmt, 48, 160) == stored
    assert st.bits_per_weight * 48 * 160 == pytest.approx(layer_bits(fmt, 48, 160))
    assert layer_bits("bf16", 48, 160) == 48 * 160 * 16


@pytest.fixture(scope="module")
def calibrated(random_tiny_dir: Path):
    from ptq.models import wan

    model = wan.load_transformer(random_tiny_dir)
    torch.manual_seed(0)
    text = torch.randn(1, 32, model.config.text_dim).to(torch.bfloat16)
    recipe = QuantRecipe(format="nvfp4", layers=LayerSelection(include=["blocks.0.*", "blocks.1.*"]),
                         mixed=MixedPrecision(enabled=True, bits_budget=6.0, bits_scope="quantized",
                                              formats=["nvfp4", "fp8", "bf16"], sensitivity_inputs=2))
    with LinearInputObserver(model) as obs, ForwardInputRecorder(model, 2, seed=0) as rec, torch.no_grad(), \
            Float32LinearOnCPU():
        for t in (900.0, 500.0, 100.0):
            x = torch.randn(1, 48, 3, 16, 16).to(torch.bfloat16)
            model(x, torch.full((1, 3 * 8 * 8), t), text)
    return model, recipe, obs.stats(), rec.inputs


def test_mixed_plan_quantizes_exports_and_verifies(calibrated, random_tiny_dir: Path, tmp_path: Path) -> None:
    with Float32LinearOnCPU():  # bf16 Linears as float32 GEMMs: ptq run's CPU arithmetic, 4x faster here
        _mixed_plan(calibrated, random_tiny_dir, tmp_path)


def _mixed_plan(calibrated, random_tiny_dir: Path, tmp_path: Path) -> None:
    from ptq.models import wan
    from ptq.targets import export_model
    from ptq.targets.safetensors_header import read_header

    model, recipe, stats, inputs = calibrated
    assert len(inputs) == 2
    new_recipe, plan, sens = plan_mixed_precision(model, recipe, stats, inputs, progress=False)
    # 20 candidate layers (blocks 0-1), each measured in nvfp4 and fp8; block errors too
    assert len(plan.formats) == 20 and set(sens.block_error) == {"blocks.0", "blocks.1"}
    assert all(e["nvfp4"] > e["fp8"] > 0 for e in sens.layer_error.values())
    assert plan.bits_per_weight <= 6.0 and plan.counts.get("nvfp4", 0) > 0 and plan.counts.get("fp8", 0) > 0
    # quantize a fresh copy with the plan: the stored bits match the plan
    fresh = wan.load_transformer(random_tiny_dir)
    records = quantize_(fresh, new_recipe, stats, progress=False)
    chosen = {r.name: r for r in records if r.name in plan.formats}
    assert {n: r.format for n, r in chosen.items()} == plan.formats
    stored = sum(layer_bits(r.format, r.out_features, r.in_features) for r in chosen.values())
    numel = sum(r.in_features * r.out_features for r in chosen.values())
    assert stored / numel == pytest.approx(plan.bits_per_weight)
    # mixed is more accurate than all-NVFP4 on the recorded inputs (the additive model's premise)
    ev = _Evaluator(model, inputs)
    all4 = wan.load_transformer(random_tiny_dir)
    quantize_(all4, replace(recipe, mixed=replace(recipe.mixed, enabled=False)), stats, progress=False)
    ev.model = fresh
    err_mixed = ev.error()
    ev.model = all4
    assert err_mixed < ev.error()
    # the ComfyUI file carries each layer's own format
    cfg = SimpleNamespace(targets=["comfyui"], unquantized_dtype="bfloat16", filename="mixed", verify=True)
    (res,) = export_model(fresh, cfg, tmp_path, progress=False)
    assert res.verified, res.verify_detail
    layers = json.loads(read_header(res.path).metadata["_quantization_metadata"])["layers"]
    assert {c["format"] for c in layers.values()} == {"nvfp4", "float8_e4m3fn"}
    assert sum(c["format"] == "float8_e4m3fn" for c in layers.values()) == plan.counts["fp8"]


def test_infeasible_budget_names_the_setting(calibrated) -> None:
    model, recipe, stats, inputs = calibrated
    from ptq.algorithms.sensitivity import SensitivityReport

    fake = SensitivityReport(layer_error={}, numel={})
    from ptq.algorithms.mixed_precision import mixed_candidates

    cands, _ = mixed_candidates(model, recipe, stats)
    fake.layer_error = {n: {"nvfp4": 1.0, "fp8": 0.5, "bf16": 0.0} for n in cands}
    with pytest.raises(ValueError, match="quant.mixed.bits_budget=4.0"):
        plan_mixed_precision(model, replace(recipe, mixed=replace(recipe.mixed, bits_budget=4.0)), stats, inputs,
                             sensitivity=fake)
    _, plan, _ = plan_mixed_precision(model, replace(recipe, mixed=replace(recipe.mixed, bits_budget=16.0)), stats,
                                      inputs, sensitivity=fake)
    assert plan.counts == {"bf16": 20} and plan.predicted_error == 0.0
