"""Per-GPU ComfyUI runtimes (``ptq.eval.runtimes``): which layers run natively where, the simulated arithmetic
(compute dtype, dequantization, FP8 activation rounding), restoring the model, float16 overflow detection, and the
leaderboard columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from ptq.algorithms.qlinear import QuantLinear
from ptq.algorithms.quantize import quantize_
from ptq.algorithms.recipe import QuantRecipe
from ptq.calibration.observers import LinearInputObserver
from ptq.eval import runtimes as rt
from ptq.eval.compare import collect_runs, write_leaderboard
from ptq.formats import fp8 as fp8_fmt


def _model(fmt: str, weight_only: bool = False) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).to(torch.bfloat16)
    x = (torch.randn(40, 64) * 3).to(torch.bfloat16)
    with LinearInputObserver(model) as obs, torch.no_grad():
        model(x)
    recipe = QuantRecipe(format=fmt, activation="none" if weight_only else
                         "dynamic" if fmt in ("int8", "mxfp8") else "max")
    recipe.layers.exclude = []
    quantize_(model, recipe, obs.stats(), progress=False)
    return model, x


def test_native_table_follows_comfyui_capabilities() -> None:
    formats = ("nvfp4", "fp8", "int8", "int8_convrot", "mxfp8", "convrot_w4a4")
    native = {name: {f for f in formats if r.native(f)} for name, r in rt.RUNTIMES.items()}
    # run-time scaled int8 / int4 kernels from SM 7.5, and comfy-kitchen's eager CPU kernels
    int8 = {"int8", "int8_convrot", "convrot_w4a4"}
    assert native == {"blackwell": {"nvfp4", "fp8", "mxfp8", *int8}, "hopper": {"fp8", *int8},
                      "ada": {"fp8", *int8}, "ampere": int8, "turing": int8, "cpu": int8}
    assert {r.compute_dtype for n, r in rt.RUNTIMES.items() if n != "cpu"} == {torch.float16}
    assert rt.RUNTIMES["cpu"].compute_dtype == torch.float32
    eager = rt.get_runtime("ada+eager")
    assert (eager.fp8_act_mode, eager.dequant_float32, eager.capability) == ("ck_eager", False, (8, 9))
    with pytest.raises(ValueError, match="unknown runtime 'volta'"):
        rt.get_runtime("volta")


def test_runtimes_with_equal_numerics_share_a_key() -> None:
    nv, _ = _model("nvfp4")
    keys = {n: rt.numerics_key(r, nv) for n, r in rt.RUNTIMES.items()}
    assert keys["hopper"] == keys["ada"] == keys["ampere"] != keys["blackwell"] != keys["cpu"]
    f8, _ = _model("fp8")
    keys = {n: rt.numerics_key(r, f8) for n, r in rt.RUNTIMES.items()}
    assert keys["blackwell"] == keys["hopper"] == keys["ada"] != keys["ampere"]
    assert rt.numerics_key(rt.get_runtime("ada+eager"), f8) != keys["ada"]
    wo, _ = _model("nvfp4", weight_only=True)  # weight-only files dequantize everywhere
    keys = {n: rt.numerics_key(r, wo) for n, r in rt.RUNTIMES.items()}
    assert keys["blackwell"] == keys["hopper"] == keys["ampere"] != keys["cpu"]
    assert rt.how_layers_run(rt.RUNTIMES["blackwell"], wo) == {"nvfp4 weight-only": "dequantized"}


def test_simulated_nvfp4_on_hopper_is_fp16_w4a16_and_restored() -> None:
    model, x = _model("nvfp4")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y_bf16 = model(x)
    layers = [m for m in model if isinstance(m, QuantLinear)]
    with rt.simulate(model, rt.RUNTIMES["hopper"]):
        assert {p.dtype for p in model.parameters()} == {torch.float16}
        x16 = x.to(torch.float16)
        h = layers[0](x16)
        # dequantized in float32, rounded once to fp16, fp16 linear (comfy-kitchen's CUDA dequantize + matmul)
        w16 = layers[0].dequantized_weight(torch.float32).to(torch.float16)
        assert torch.equal(h, nn.functional.linear(x16, w16, layers[0].bias))
        assert h.dtype == torch.float16
    with rt.simulate(model, rt.RUNTIMES["blackwell"]):  # native W4A4 on the fp16 activation, fp16 output
        x16 = x.to(torch.float16)
        q = layers[0]
        xv = q.fmt.activation_values(x16, q.input_scale, mode="float32")
        ref = (xv @ q.weight_values.float().t()) * (q.input_scale * q.weight_scale_2) + q.bias.float()
        assert torch.equal(q(x16), ref.to(torch.float16))
        yb = model(x16)
        assert yb.dtype == torch.float16
        assert float((yb.float() - y_bf16.float()).norm() / y_bf16.float().norm()) < 0.05
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert all("run_dequantized" not in m.__dict__ and "fp8_act_mode" not in m.__dict__ for m in layers)
    assert torch.equal(model(x), y_bf16)


def test_simulated_fp8_activation_rounding_per_backend() -> None:
    model, x = _model("fp8")
    layer = model[0]
    x16 = x.to(torch.float16)
    outs = {}
    for name in ("ada", "ada+eager"):
        with rt.simulate(model, rt.get_runtime(name)):
            outs[name] = layer(x16)
    mode = {"ada": "float32", "ada+eager": "ck_eager"}
    for name, y in outs.items():  # W8A8: fp8 codes of the fp16 activation as each comfy-kitchen backend rounds them
        xq = fp8_fmt.quantize_fp8(x16, layer.input_scale, mode=mode[name]).float()
        ref = (xq @ layer.weight_q.float().t()) * (layer.input_scale * layer.weight_scale) + layer.bias.float()
        assert torch.equal(y, ref.to(torch.float16)), name
    with rt.simulate(model, rt.RUNTIMES["ampere"]):  # no FP8 kernel: dequantized
        y = layer(x16)
        assert torch.equal(y, nn.functional.linear(x16, layer.dequantized_weight(torch.float32).half(),
                                                   layer.bias.half()))



@pytest.mark.parametrize("runtime", ["ampere+eager", "ada+eager"])
def test_eager_fp8_dequantization_is_comfy_kitchens(runtime: str) -> None:
    """Where FP8 runs dequantized with comfy-kitchen's eager backend, the weight is ``q.to(dt) * s.to(dt)`` computed
    in the compute dtype (kitchen's ``dequantize_per_tensor_fp8``), not rounded once from float32 (the CUDA
    backend: ``ampere``); on this layer the two differ in many elements."""
    pytest.importorskip("comfy_kitchen")
    from comfy_kitchen.backends.eager.quantization import dequantize_per_tensor_fp8

    model, x = _model("fp8", weight_only=runtime == "ada+eager")  # W8A8 runs natively on Ada: weight-only there
    layer = model[0]
    r = rt.get_runtime(runtime)
    xr = x.to(r.compute_dtype)
    kitchen = dequantize_per_tensor_fp8(layer.weight_q, layer.weight_scale, r.compute_dtype)
    with rt.simulate(model, r):
        assert torch.equal(layer(xr), nn.functional.linear(xr, kitchen, layer.bias))
    for dtype in (torch.float16, torch.bfloat16):
        eager = dequantize_per_tensor_fp8(layer.weight_q, layer.weight_scale, dtype)
        assert torch.equal(layer.dequantized_weight(dtype), eager)
        once = layer.dequantized_weight(torch.float32).to(dtype)
        assert (once != eager).float().mean() > 0.05  # the CUDA backend's rounding is another function
    with rt.simulate(model, rt.RUNTIMES["ampere"]):  # CUDA backend: float32, rounded once
        assert torch.equal(layer(x.half()), nn.functional.linear(
            x.half(), layer.dequantized_weight(torch.float32).half(), layer.bias.half()))

def test_activation_range_finds_the_overflowing_module() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).half()
    with torch.no_grad():
        model[0].weight.fill_(100.0)
        model[1].weight.fill_(100.0)
    with rt.ActivationRange(model) as mon, torch.no_grad():
        model(torch.full((2, 8), 0.5, dtype=torch.float16))  # 400, then 320000 -> inf in fp16
    s = mon.summary()
    assert s["overflow"] and s["first_nonfinite"] == "1" and s["max_module"] == "0"
    assert s["max_abs"] == pytest.approx(400.0 + float(model[0].bias.detach().abs().max()), rel=0.01)
    lines = rt.runtime_markdown({"ampere": {"gpus": "A100", "compute_dtype": "float16", "layers": {"nvfp4": "x"},
                                            "mean_final": {"rel_l2": 0.5, "cosine": 0.9, "psnr": 20.0},
                                            "activation_range": s}})
    assert "**overflow** (first at `1`)" in lines[-1]


def test_leaderboard_has_a_column_per_runtime(tmp_path: Path) -> None:
    for i, errs in enumerate(({"blackwell": 0.30, "hopper": 0.20}, {"blackwell": 0.25})):
        d = tmp_path / str(i)
        d.mkdir()
        report = {"run": {"recipe": {"format": "nvfp4"}}, "accuracy": {"mean_final": {"rel_l2": 0.3 - i / 10}},
                  "runtimes": {k: {"mean_final": {"rel_l2": v}} for k, v in errs.items()}, "exports": []}
        (d / "report.json").write_text(json.dumps(report))
    rows = collect_runs(tmp_path)
    assert [r.get("rel_l2@blackwell") for r in rows] == [0.25, 0.30] and rows[0].get("rel_l2@hopper") is None
    write_leaderboard(rows, tmp_path)
    md = (tmp_path / "leaderboard.md").read_text()
    assert "| rel_l2@blackwell | rel_l2@hopper |" in md and "0.2500 | - |" in md
    assert (tmp_path / "leaderboard.csv").read_text().splitlines()[0].endswith("rel_l2@blackwell,rel_l2@hopper,path")


@pytest.mark.gpu
def test_simulation_on_cuda_matches_cpu() -> None:
    """The per-runtime simulation runs on the GPU (fp16 activations take QuantLinear's reference path there) and
    agrees with the CPU simulation up to the GEMM's float32 summation order."""
    for fmt in ("nvfp4", "fp8"):
        model, x = _model(fmt)
        for name in ("blackwell", "hopper", "ampere"):
            with rt.simulate(model, rt.RUNTIMES[name]):
                y_cpu = model(x.to(torch.float16)).float()
            model.cuda()
            with rt.simulate(model, rt.RUNTIMES[name]):
                y_gpu = model(x.cuda().to(torch.float16)).float().cpu()
            model.cpu()
            assert float((y_gpu - y_cpu).norm() / y_cpu.norm()) < 2e-3, (fmt, name)


@pytest.mark.parametrize("fmt,native_on", [("int8", {"blackwell", "hopper", "ada", "ampere", "turing", "cpu"}),
                                           ("mxfp8", {"blackwell"})])
def test_run_time_scaled_formats_run_natively_where_comfyui_has_their_kernel(fmt: str, native_on: set[str]) -> None:
    """int8 (W8A8, per-row activation scales) runs its kernel from SM 7.5 and on the CPU, MXFP8 on Blackwell only;
    elsewhere the simulated layer computes with the dequantized weight in the runtime's dtype."""
    model, x = _model(fmt)
    layer = next(m for m in model if isinstance(m, QuantLinear))
    assert layer.dynamic_activations
    for name, runtime in rt.RUNTIMES.items():
        with rt.simulate(model, runtime):
            xr = x.to(runtime.compute_dtype)
            w = layer.dequantized_weight(torch.float32).to(runtime.compute_dtype)
            dequantized = nn.functional.linear(xr, w, layer.bias.to(runtime.compute_dtype))
            assert layer.run_dequantized == (name not in native_on), name
            assert torch.equal(layer(xr), dequantized) == (name not in native_on), name
