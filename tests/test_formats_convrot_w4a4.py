"""ConvRot W4A4 (ComfyUI ``convrot_w4a4``): bit-exact agreement with comfy-kitchen's eager quantizer, dequantizer,
packing and linear; the per-GPU kernel variants; GPTQ / MSE in the rotated basis; the ComfyUI export read back by
comfy-kitchen and by ``ptq verify``."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ptq.algorithms.gptq import layer_output_error
from ptq.algorithms.methods import quantize_weight_with
from ptq.algorithms.qlinear import QuantLinear
from ptq.algorithms.quantize import quantize_, quantized_layers
from ptq.algorithms.recipe import GPTQWeight, LayerSelection, QuantRecipe, WeightMethod
from ptq.algorithms.weight_quant import WeightContext
from ptq.calibration.observers import LinearInputObserver
from ptq.eval.runtimes import get_runtime, numerics_key, simulate
from ptq.formats import get_format
from ptq.formats.convrot_w4a4 import convrot_w4a4_linear, int4_rowwise, pack_int4, unpack_int4
from ptq.formats.int8 import int8_linear
from ptq.formats.int8_convrot import rotate_activation
from ptq.targets import export_model

FMT = get_format("convrot_w4a4")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(scope="module")
def ck():
    pytest.importorskip("comfy_kitchen")
    from comfy_kitchen.backends.eager import convrot_w4a4, svdquant

    return SimpleNamespace(cr=convrot_w4a4, sq=svdquant)


def _weight(seed: int = 0, shape: tuple[int, int] = (96, 512)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[3, 7] = 2.0  # an outlier
    w[5] = 0.0  # an all-zero row
    return w


def test_packing_is_comfy_kitchens(ck) -> None:
    codes = torch.randint(-8, 8, (7, 24), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    packed = pack_int4(codes)
    assert packed.dtype == torch.int8 and packed.shape == (7, 12)
    assert torch.equal(packed, ck.sq._pack_int4_row_major(codes))
    assert torch.equal(unpack_int4(packed), codes) and torch.equal(ck.sq._unpack_int4_row_major(packed), codes)
    assert int(pack_int4(torch.tensor([[1, -2]]))[0, 0]) == (1 | (0xE << 4)) - 256  # even column in the low nibble


@pytest.mark.parametrize("seed", [0, 1])
def test_weight_quantizer_and_dequantizer_are_comfy_kitchens(ck, seed: int) -> None:
    w = _weight(seed)
    q = FMT.quantize_weight(w)
    kq, ks = ck.cr.quantize_convrot_w4a4_weight(w, 256, 64)
    assert torch.equal(q.weight, kq) and torch.equal(q.scale.reshape(-1), ks)
    assert int(unpack_int4(q.weight).abs().max()) == 7 and bool((unpack_int4(q.weight)[5] == 0).all())
    for dtype in DTYPES:
        assert torch.equal(FMT.dequantize_weight(q, dtype), ck.cr.dequantize_convrot_w4a4_weight(kq, ks, 256, 64, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_eager_linear_is_comfy_kitchens(ck, dtype: torch.dtype) -> None:
    w = _weight(2)
    q = FMT.quantize_weight(w)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 10, 512, generator=g) * torch.logspace(-2, 1, 512)).to(dtype)
    x[0, 0] = 0  # an all-zero row
    bias = torch.randn(96, generator=g).to(dtype)
    for b in (bias, None):
        want = ck.cr.convrot_w4a4_linear(x, q.weight, q.scale.reshape(-1), b, 256, 64, "int4")
        assert torch.equal(FMT.dynamic_linear(x, q, b, mode="ck_eager"), want)
        assert torch.equal(FMT.dynamic_linear(x, q, b, mode="float32", variant="eager"), want)


def test_cuda_variants_are_w4a4_and_w4a8() -> None:
    """"int4": int4 codes of the float32-rotated activation, an exact integer GEMM, one rounding; "int8": the int8
    ConvRot activation quantizer against the int4 weight codes."""
    w, x = _weight(4), torch.randn(16, 512).to(torch.bfloat16)
    q = FMT.quantize_weight(w)
    codes = unpack_int4(q.weight)
    y4 = convrot_w4a4_linear(x, codes, q.scale, None, variant="int4")
    xq, xs = int4_rowwise(rotate_activation(x, mode="float32"), float32=True)
    assert int(xq.abs().max()) == 7
    want = ((xq.double() @ codes.double().t()) * xs.double() * q.scale.double().reshape(1, -1)).float().to(x.dtype)
    assert torch.equal(y4, want)
    y8 = convrot_w4a4_linear(x, codes, q.scale, None, variant="int8")
    assert torch.equal(y8, int8_linear(rotate_activation(x, mode="float32"), codes, q.scale, None, mode="float32"))
    exact = x.float() @ FMT.dequantize_weight(q).t()
    e4, e8 = (float((y.float() - exact).norm() / exact.norm()) for y in (y4, y8))
    assert e8 < 0.5 * e4 < 0.1  # int8 activations lose much less than int4 ones
    with pytest.raises(ValueError, match="variant"):
        convrot_w4a4_linear(x, codes, q.scale, None, variant="fp4")


def test_runtime_variant_by_gpu() -> None:
    """W4A4 on Turing / Ampere / Ada, W4A8 on Hopper / Blackwell, the eager arithmetic on the CPU."""
    want = {"turing": "int4", "ampere": "int4", "ada": "int4", "hopper": "int8", "blackwell": "int8", "cpu": "eager"}
    assert {name: FMT.runtime_variant(get_runtime(name).capability) for name in want} == want
    assert all(get_runtime(name).native("convrot_w4a4") for name in want)
    model = nn.Sequential(nn.Linear(256, 64))
    quantize_(model, QuantRecipe(format="convrot_w4a4", activation="dynamic", layers=LayerSelection(exclude=[])),
              {}, progress=False)
    keys = {name: numerics_key(get_runtime(name), model) for name in ("ampere", "ada", "hopper", "blackwell")}
    assert keys["ampere"][-1] == keys["ada"][-1] == ("int4",) and keys["hopper"][-1] == ("int8",)
    x = torch.randn(8, 256).to(torch.float16)
    with torch.no_grad():
        with simulate(model, get_runtime("ada")):
            ya = model(x)
        with simulate(model, get_runtime("hopper")):
            yh = model(x)
    layer = quantized_layers(model)["0"]
    codes = unpack_int4(layer.weight_q)
    assert torch.equal(ya, convrot_w4a4_linear(x, codes, layer.weight_scale, layer.bias, variant="int4"))
    assert torch.equal(yh, convrot_w4a4_linear(x, codes, layer.weight_scale, layer.bias, variant="int8"))


def _calibrated(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    torch.manual_seed(seed)
    lin = nn.Linear(512, 128)
    x = torch.randn(1024, 512) @ (torch.eye(512) + 0.3 * torch.randn(512, 512) / 512**0.5)
    with LinearInputObserver(lin, [""], hessian=True) as obs, torch.no_grad():
        lin(x)
    return lin.weight.detach(), x, obs.hessians()[""]


def test_gptq_and_mse_lower_the_output_error() -> None:
    w, x, h = _calibrated()
    ctx = WeightContext("layer", hessian=h)
    rtn = FMT.quantize_weight(w)
    gptq = quantize_weight_with(GPTQWeight(scales="max", damp=0.01), w, FMT, ctx)
    mse = quantize_weight_with(WeightMethod(scales="mse"), w, FMT, ctx)
    err = {k: layer_output_error(w, FMT.dequantize_weight(q), h) for k, q in
           (("rtn", rtn), ("gptq", gptq), ("mse", mse))}
    assert err["gptq"] < 0.8 * err["rtn"] and err["mse"] <= err["rtn"]
    assert gptq.weight.shape == (128, 256) and gptq.scale.shape == (128, 1)
    assert int(unpack_int4(gptq.weight).abs().max()) <= 7


def test_comfyui_export_round_trips_through_comfy_kitchen(ck, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).to(torch.bfloat16)
    quantize_(model, QuantRecipe(format="convrot_w4a4", activation="dynamic", layers=LayerSelection(exclude=[])),
              {}, progress=False)
    cfg = SimpleNamespace(targets=["comfyui"], unquantized_dtype="bfloat16", filename="m", verify=True)
    (res,) = export_model(model, cfg, tmp_path, progress=False, key_maps={"comfyui": str})
    assert res.verified, res.verify_detail
    sd = load_file(res.path)
    with safe_open(res.path, "pt") as f:
        meta = json.loads(f.metadata()["_quantization_metadata"])["layers"]
    x = torch.randn(8, 256).to(torch.bfloat16)
    for name, layer in quantized_layers(model).items():
        conf = json.loads(bytes(sd[f"{name}.comfy_quant"].tolist()))
        assert conf == meta[name] == {"format": "convrot_w4a4", "convrot_groupsize": 256}
        w, s = sd[f"{name}.weight"], sd[f"{name}.weight_scale"]
        assert w.dtype == torch.int8 and w.shape == (layer.out_features, layer.in_features // 2)
        assert s.dtype == torch.float32 and s.shape == (layer.out_features,)
        assert torch.equal(ck.cr.dequantize_convrot_w4a4_weight(w, s, 256, 64, torch.bfloat16),
                           layer.dequantized_weight(torch.bfloat16))
        xin = x if name == "0" else torch.randn(8, 512).to(torch.bfloat16)
        with torch.no_grad(), simulate(model, get_runtime("cpu")):
            got = layer(xin.float())
        assert torch.equal(got, ck.cr.convrot_w4a4_linear(xin.float(), w, s, layer.bias.float(), 256, 64, "int4"))


def test_weight_only_is_not_exported(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(256, 64))
    quantize_(model, QuantRecipe(format="convrot_w4a4", activation="none", layers=LayerSelection(exclude=[])), {},
              progress=False)
    cfg = SimpleNamespace(targets=["comfyui"], unquantized_dtype="bfloat16", filename="m", verify=True)
    (res,) = export_model(model, cfg, tmp_path, progress=False, key_maps={"comfyui": str})
    assert "full_precision_matrix_mult" in (res.skipped or "") and not list(tmp_path.glob("*.safetensors"))


def test_bits_and_unsupported_shapes() -> None:
    assert FMT.storage_bits(64, 512) / (64 * 512) == pytest.approx(4 + 32 / 512)
    assert FMT.unsupported(384, 64) and FMT.unsupported(512, 64) is None
    assert QuantLinear is not None


def test_act_aware_gptq_fits_the_runtime_quantizer_of_a_dynamic_format() -> None:
    """convrot_w4a4 models its run-time quantizer (int4 / int8 per row in the rotated basis), so activation-aware
    GPTQ quantizes every layer (it once kept them all: dynamic formats collect no activation statistics)."""
    from ptq.algorithms.quantize import gptq_act_aware_
    from ptq.calibration.quantized_inputs import QuantizedInputObserver

    x = torch.randn(64, 256)
    xq = FMT.fake_quantize_dynamic(x, "int4")
    x_rot = rotate_activation(x, mode="float32")
    codes, scale = int4_rowwise(x_rot, float32=True)
    assert torch.allclose(rotate_activation(xq, mode="float32"), codes.float() * scale, rtol=1e-5, atol=1e-5)
    assert float((FMT.fake_quantize_dynamic(x, "int8") - x).norm()) < 0.1 * float((xq - x).norm())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
    recipe = QuantRecipe(format="convrot_w4a4", activation="dynamic", weight=GPTQWeight(act_aware=True),
                         layers=LayerSelection(exclude=[]))

    def rerun(obs: QuantizedInputObserver) -> None:
        with obs, torch.no_grad():
            model(x)

    records = gptq_act_aware_(model, recipe, {}, rerun, progress=False)
    assert [r.format for r in records] == ["convrot_w4a4", "convrot_w4a4"]


def test_a_recipe_that_keeps_every_layer_is_an_error() -> None:
    from ptq.algorithms.layers import LayerRules
    from ptq.calibration.needs import CalibrationNeeds
    from ptq.pipeline import stages
    from ptq.pipeline.checks import JobError

    model = nn.Sequential(nn.Linear(256, 64))
    adapter = SimpleNamespace(targets=lambda: {"transformer": SimpleNamespace(module=model)},
                              layer_rules=LayerRules(), compute_device="cpu")
    cal = stages.Calibration(CalibrationNeeds())
    recipe = QuantRecipe(format="convrot_w4a4", activation="dynamic", layers=LayerSelection(exclude=["*"]))
    with pytest.raises(JobError, match="quantized no Linear layer"):
        stages.quantize(adapter, {"transformer": recipe}, cal, progress=False)


def test_tiny_wan_file_inspects_and_verifies(random_tiny_dir: Path, tmp_path: Path) -> None:
    """The random tiny WAN as convrot_w4a4 for ComfyUI: ``ptq verify`` decodes every layer bit for bit and simulates
    it as ComfyUI runs it; ``ptq inspect`` counts the unpacked parameters, says W4A4 / W4A8 by GPU, and flags a
    scale of the wrong shape and a group size ComfyUI cannot rotate with."""
    from ptq.models import wan
    from ptq.tools.inspect import inspect_file
    from ptq.tools.verify import verify_file

    model = wan.load_transformer(random_tiny_dir)
    params = sum(p.numel() for p in model.parameters())
    recipe = QuantRecipe(format="convrot_w4a4", activation="dynamic")
    records = quantize_(model, recipe, {}, progress=False)
    assert sum(r.format == "convrot_w4a4" for r in records) > 0
    cfg = SimpleNamespace(targets=["comfyui"], unquantized_dtype="bfloat16", filename="cr", verify=True)
    (res,) = export_model(model, cfg, tmp_path, progress=False)
    assert res.verified, res.verify_detail
    r = verify_file(Path(res.path), str(random_tiny_dir))
    assert r.ok, [c.problems for c in r.layers if c.problems] + r.problems
    assert {c.format for c in r.layers} == {"convrot_w4a4"}
    assert all(c.weight_err_file == pytest.approx(c.weight_err_ptq, rel=1e-6) for c in r.layers)
    rep = inspect_file(Path(res.path))
    assert not rep.errors, [p.code for p in rep.errors]
    assert rep.architecture.params == params
    assert any("convrot_w4a4 layer(s): int4 weights" in n and "W4A8" in n for n in rep.notes)
    assert rep.comfyui_min_version == "0.28.0"  # ComfyUI 73e84d5e "Support convrot int4 models" (#14859)
    sd = load_file(res.path)
    with safe_open(res.path, "pt") as f:
        meta = f.metadata()
    layer = next(k.removesuffix(".comfy_quant") for k in sd if k.endswith(".comfy_quant"))
    sd[f"{layer}.weight_scale"] = sd[f"{layer}.weight_scale"][:-1]  # one row short
    layers = json.loads(meta["_quantization_metadata"])
    other = next(k for k in layers["layers"] if k != layer)
    layers["layers"][other]["convrot_groupsize"] = 48
    sd[f"{other}.comfy_quant"] = torch.tensor(list(json.dumps(layers["layers"][other]).encode()), dtype=torch.uint8)
    third = next(k for k in layers["layers"] if k not in (layer, other))
    sd[f"{third}.weight_scale"] = sd[f"{third}.weight_scale"].to(torch.bfloat16)  # scales in a 16-bit dtype
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file(sd, str(bad), metadata={**meta, "_quantization_metadata": json.dumps(layers)})
    rep = inspect_file(bad)
    codes = {p.code: p.layers for p in rep.errors}
    assert codes.get("int8_scale_shape") == [layer] and codes.get("convrot_group") == [other]
    assert {p.code: p.layers for p in rep.warnings}.get("scale_not_float32") == [third]


def test_w4a8_layers_carry_linear_dtype_int8(tmp_path: Path) -> None:
    """``convrot_w4a8``: the same layout with ``"linear_dtype": "int8"``: int8 activations on every GPU, the eager
    W4A4 arithmetic on the CPU (comfy-kitchen's eager backend ignores the key); the file is read back as W4A8."""
    from ptq.targets.comfyui.layout import short_format

    w8 = get_format("convrot_w4a8")
    assert {n: w8.runtime_variant(get_runtime(n).capability) for n in ("turing", "ada", "hopper", "cpu")} == \
        {"turing": "int8", "ada": "int8", "hopper": "int8", "cpu": "eager"}
    assert short_format({"format": "convrot_w4a4", "convrot_groupsize": 256, "linear_dtype": "int8"}) == "convrot_w4a8"
    assert short_format({"format": "convrot_w4a4", "convrot_groupsize": 256}) == "convrot_w4a4"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64))
    quantize_(model, QuantRecipe(format="convrot_w4a8", activation="dynamic", layers=LayerSelection(exclude=[])),
              {}, progress=False)
    cfg = SimpleNamespace(targets=["comfyui"], unquantized_dtype="bfloat16", filename="m", verify=True)
    (res,) = export_model(model, cfg, tmp_path, progress=False, key_maps={"comfyui": str})
    assert res.verified, res.verify_detail
    conf = json.loads(bytes(load_file(res.path)["0.comfy_quant"].tolist()))
    assert conf == {"format": "convrot_w4a4", "convrot_groupsize": 256, "linear_dtype": "int8"}
