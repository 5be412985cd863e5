"""int8 / int8_convrot / mxfp8 through the rest of ptq: QuantLinear (dynamic activation scales), recipes, GPTQ and
MSE scales, mixed precision, the ComfyUI exporter (read back by comfy-kitchen's own layouts), ``ptq verify``,
``ptq inspect`` and ``ptq run``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ptq.algorithms.gptq import layer_output_error
from ptq.algorithms.methods import quantize_weight_with
from ptq.algorithms.mixed_precision import layer_bits, mixed_candidates
from ptq.algorithms.qlinear import QuantLinear
from ptq.algorithms.quantize import quantize_, quantized_layers
from ptq.algorithms.recipe import GPTQWeight, LayerSelection, MixedPrecision, QuantRecipe, WeightMethod
from ptq.algorithms.weight_quant import WeightContext
from ptq.calibration.needs import CalibrationNeeds
from ptq.calibration.observers import LinearInputObserver
from ptq.formats import get_format
from ptq.targets import export_model

DYNAMIC = ("int8", "int8_convrot", "mxfp8")


def _mlp(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).to(torch.bfloat16)
    x = torch.randn(64, 256)
    x[:, 5] *= 30.0  # an outlier channel
    return model, x.to(torch.bfloat16)


# ------------------------------------------------------------------------------------------------ QuantLinear


@pytest.mark.parametrize("fmt", DYNAMIC)
def test_dynamic_layers_run_their_formats_kernel_without_calibration(fmt: str) -> None:
    model, x = _mlp()
    with torch.no_grad():
        ref = model(x).float()
    recipe = QuantRecipe(format=fmt, activation="dynamic", layers=LayerSelection(exclude=[]))
    assert recipe.needs() == CalibrationNeeds()  # nothing to calibrate
    records = quantize_(model, recipe, {}, progress=False)
    assert [r.format for r in records] == [fmt, fmt] and not any(r.weight_only for r in records)
    layer = quantized_layers(model)["0"]
    assert layer.dynamic_activations and not layer.weight_only and layer.input_scale is None
    with torch.no_grad():
        got = layer(x)
        want = layer.fmt.dynamic_linear(x, layer._qweight(), layer.bias, mode=QuantLinear.fp8_act_mode)
        assert torch.equal(got, want)
        out = model(x).float()
    # an outlier channel: per-row int8 loses the other channels' resolution, ConvRot spreads it over 256 inputs
    assert float((out - ref).norm() / ref.norm()) < {"int8": 0.045, "int8_convrot": 0.02, "mxfp8": 0.065}[fmt]
    assert layer.state().dynamic_activations and layer.state().to("cpu").dynamic_activations


@pytest.mark.parametrize("fmt", DYNAMIC)
def test_weight_only_dynamic_formats_dequantize(fmt: str) -> None:
    model, x = _mlp()
    quantize_(model, QuantRecipe(format=fmt, activation="none", layers=LayerSelection(exclude=[])), {},
              progress=False)
    layer = quantized_layers(model)["0"]
    assert layer.weight_only and not layer.dynamic_activations and layer.state().weight_only
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.dequantized_weight(torch.bfloat16), layer.bias))


def test_activation_methods_with_dynamic_formats() -> None:
    assert QuantRecipe(format="int8").needs() == CalibrationNeeds()  # "max" has nothing to calibrate for int8
    mixed = MixedPrecision(enabled=True, formats=["nvfp4", "int8", "bf16"])
    assert QuantRecipe(format="int8", mixed=mixed).needs().amax  # the nvfp4 candidates need input scales
    with pytest.raises(ValueError, match=r"quant.activation=dynamic: formats \['nvfp4'\]"):
        QuantRecipe(format="nvfp4", activation="dynamic").validate()
    with pytest.raises(ValueError, match="dynamic"):
        QuantRecipe(format="int8", activation="dynamic", mixed=mixed).validate()
    QuantRecipe(format="mxfp8", activation="dynamic").validate()
    # int8 under an activation method that calibrates: still dynamic, no statistics needed
    model, _ = _mlp()
    records = quantize_(model, QuantRecipe(format="int8", layers=LayerSelection(exclude=[])), {}, progress=False)
    assert all(r.format == "int8" for r in records)
    with pytest.raises(ValueError, match="static activation scales"):
        from ptq.algorithms.qlinear import QuantizedLinearState

        q = get_format("nvfp4").quantize_weight(torch.randn(16, 32))
        QuantLinear(QuantizedLinearState("nvfp4", q.weight, q.scale, q.scale_2, None, None, 32, 16, True))


# ------------------------------------------------------------------------------------------------ weight methods


def _correlated(n: int = 2048, d: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) @ (torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d))
    x[:, 3] *= 10.0
    w = torch.randn(128, d, generator=g) * 0.05
    return w, x.t() @ x / n


@pytest.mark.parametrize(("fmt", "per_channel"), [("int8", False), ("int8", True), ("int8_convrot", False),
                                                  ("mxfp8", False)])
def test_gptq_lowers_the_layer_output_error(fmt: str, per_channel: bool) -> None:
    w, h = _correlated()
    f = get_format(fmt)
    ctx = WeightContext("layer", hessian=h)
    rtn = quantize_weight_with(WeightMethod(fp8_per_channel=per_channel), w, f, ctx)
    gptq = quantize_weight_with(GPTQWeight(scales="max", fp8_per_channel=per_channel), w, f, ctx)
    assert gptq.weight.dtype == rtn.weight.dtype and gptq.scale.shape == rtn.scale.shape
    e_rtn = layer_output_error(w, f.dequantize_weight(rtn), h)
    e_gptq = layer_output_error(w, f.dequantize_weight(gptq), h)
    assert e_gptq < 0.8 * e_rtn
    gptq_mse = quantize_weight_with(GPTQWeight(fp8_per_channel=per_channel), w, f, ctx)
    assert layer_output_error(w, f.dequantize_weight(gptq_mse), h) < e_rtn


@pytest.mark.parametrize(("fmt", "per_channel"), [("int8", False), ("int8", True), ("int8_convrot", False),
                                                  ("mxfp8", False)])
def test_mse_scales_never_increase_the_weight_error(fmt: str, per_channel: bool) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 512, generator=g) / torch.rand(64, 512, generator=g).clamp_min(0.02) ** 0.5  # heavy tails
    f = get_format(fmt)
    ctx = WeightContext("layer")
    rtn = quantize_weight_with(WeightMethod(fp8_per_channel=per_channel), w, f, ctx)
    mse = quantize_weight_with(WeightMethod(scales="mse", fp8_per_channel=per_channel), w, f, ctx)
    err = [float((f.dequantize_weight(q) - w).pow(2).sum()) for q in (rtn, mse)]
    assert err[1] <= err[0] and mse.scale.shape == rtn.scale.shape
    if fmt != "mxfp8":
        assert err[1] < err[0]  # heavy tails: clipping pays at 8 bits too


# ------------------------------------------------------------------------------------------------ mixed precision


def test_mixed_precision_candidates_and_bits() -> None:
    assert layer_bits("int8", 96, 320) == 96 * 320 * 8 + 32
    assert layer_bits("int8", 96, 320, fp8_per_channel=True) == 96 * 320 * 8 + 32 * 96
    assert layer_bits("mxfp8", 96, 320) == 96 * 320 * 8.25
    model = nn.Sequential(nn.Linear(256, 96), nn.Linear(96, 48))
    recipe = QuantRecipe(format="int8", layers=LayerSelection(exclude=[]),
                         mixed=MixedPrecision(enabled=True, bits_budget=8.0,
                                              formats=["nvfp4", "int8", "int8_convrot", "mxfp8", "bf16"]))
    recipe.validate()
    cands, fixed = mixed_candidates(model, recipe, None)
    assert cands["0"] == ["nvfp4", "int8", "int8_convrot", "mxfp8", "bf16"]
    assert cands["1"] == ["nvfp4", "int8", "bf16"]  # in=96: no ConvRot group of 256, out=48: no MXFP8 32x32
    assert fixed == {}


def test_mixed_nvfp4_int8_layers_keep_their_own_activation_scales() -> None:
    model, x = _mlp()
    with LinearInputObserver(model) as obs, torch.no_grad():
        model(x)
    recipe = QuantRecipe(format="nvfp4", layers=LayerSelection(exclude=[], formats={"2": "int8"}))
    records = quantize_(model, recipe, obs.stats(), progress=False)
    assert [r.format for r in records] == ["nvfp4", "int8"]
    layers = quantized_layers(model)
    assert layers["0"].input_scale is not None and not layers["0"].dynamic_activations
    assert layers["2"].input_scale is None and layers["2"].dynamic_activations


# ------------------------------------------------------------------------------------------------ export


def _ck_dequantize(sd: dict[str, torch.Tensor], layer: str, conf: dict, shape: tuple[int, int]) -> torch.Tensor:
    """comfy-kitchen's own layout classes on the file's tensors, as ComfyUI's loader builds them."""
    from comfy_kitchen.tensor.int8 import TensorWiseINT8Layout
    from comfy_kitchen.tensor.mxfp8 import TensorCoreMXFP8Layout

    w, s = sd[f"{layer}.weight"], sd[f"{layer}.weight_scale"]
    if conf["format"] == "mxfp8":
        params = TensorCoreMXFP8Layout.Params(scale=s.view(torch.float8_e8m0fnu), orig_dtype=torch.bfloat16,
                                              orig_shape=shape)
        return TensorCoreMXFP8Layout.dequantize(w, params)
    params = TensorWiseINT8Layout.Params(scale=s, orig_dtype=torch.bfloat16, orig_shape=shape,
                                         convrot=bool(conf.get("convrot")),
                                         convrot_groupsize=int(conf.get("convrot_groupsize", 256)))
    return TensorWiseINT8Layout.dequantize(w, params)


@pytest.mark.parametrize(("fmt", "activation", "per_channel"),
                         [("int8", "dynamic", False), ("int8", "dynamic", True), ("int8_convrot", "dynamic", False),
                          ("mxfp8", "dynamic", False), ("mxfp8", "none", False)])
def test_comfyui_export_round_trips_through_comfy_kitchen(tmp_path: Path, fmt: str, activation: str,
                                                          per_channel: bool) -> None:
    ck = pytest.importorskip("comfy_kitchen")
    from comfy_kitchen.backends.eager import quantization as eager

    model, x = _mlp()
    recipe = QuantRecipe(format=fmt, activation=activation, weight=WeightMethod(fp8_per_channel=per_channel),
                         layers=LayerSelection(exclude=[]))
    quantize_(model, recipe, {}, progress=False)
    cfg = SimpleNamespace(targets=["comfyui", "diffusers"], unquantized_dtype="bfloat16", filename="m", verify=True)
    comfy, diffusers = export_model(model, cfg, tmp_path, progress=False, key_maps={"comfyui": str, "diffusers": str})
    assert comfy.verified, comfy.verify_detail
    assert f"cannot write format '{fmt}'" in diffusers.skipped
    sd = load_file(comfy.path)
    with safe_open(comfy.path, "pt") as f:
        meta = json.loads(f.metadata()["_quantization_metadata"])["layers"]
    assert set(meta) == {"0", "2"} and "0.input_scale" not in sd
    for name, layer in quantized_layers(model).items():
        conf = json.loads(bytes(sd[f"{name}.comfy_quant"].tolist()))
        assert conf == meta[name]
        assert conf["format"] == {"mxfp8": "mxfp8"}.get(fmt, "int8_tensorwise")
        assert conf.get("full_precision_matrix_mult", False) == (activation == "none")
        assert conf.get("convrot", False) == (fmt == "int8_convrot")
        w, s = sd[f"{name}.weight"], sd[f"{name}.weight_scale"]
        out_f, in_f = layer.out_features, layer.in_features
        if fmt == "mxfp8":
            assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.uint8  # every ComfyUI reader reads U8
            assert s.shape == (-(-out_f // 128) * 128, -(-(in_f // 32) // 4) * 4)
        else:
            assert w.dtype == torch.int8 and s.dtype == torch.float32
            assert s.shape == ((out_f, 1) if per_channel or fmt == "int8_convrot" else ())
        deq = _ck_dequantize(sd, name, conf, (out_f, in_f))
        assert torch.equal(deq, layer.dequantized_weight(torch.bfloat16))
        if fmt != "mxfp8" and activation != "none":  # comfy-kitchen's eager W8A8 linear on the file's tensors
            with torch.no_grad():
                xin = x if name == "0" else torch.randn(8, 512).to(torch.bfloat16)
                want = eager.int8_linear(xin, w, s, layer.bias, out_dtype=torch.bfloat16, convrot=conf.get(
                    "convrot", False), convrot_groupsize=256)
                QuantLinear.fp8_act_mode = "ck_eager"
                try:
                    assert torch.equal(layer(xin), want)
                finally:
                    QuantLinear.fp8_act_mode = "float32"
    assert ck is not None


@pytest.mark.parametrize("fmt", ["int8", "int8_convrot"])
def test_weight_only_int8_is_not_exported_for_comfyui(tmp_path: Path, fmt: str) -> None:
    """ComfyUI runs int8_tensorwise as W8A8 even with full_precision_matrix_mult (checked by loading such a file
    through comfy.ops): a weight-only int8 file would not compute what ptq simulated, so the exporter refuses."""
    model, _ = _mlp()
    quantize_(model, QuantRecipe(format=fmt, activation="none", layers=LayerSelection(exclude=[])), {},
              progress=False)
    cfg = SimpleNamespace(targets=["comfyui"], unquantized_dtype="bfloat16", filename="m", verify=True)
    (res,) = export_model(model, cfg, tmp_path, progress=False, key_maps={"comfyui": str})
    assert "runs int8_tensorwise layers as W8A8" in res.skipped and not list(tmp_path.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------------ verify, inspect


@pytest.fixture(scope="module")
def mixed_file(random_tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random tiny WAN with int8 / int8_convrot / mxfp8 / nvfp4 blocks, exported for ComfyUI."""
    from ptq.models import wan

    model = wan.load_transformer(random_tiny_dir)
    torch.manual_seed(0)
    with LinearInputObserver(model) as obs, torch.no_grad():
        model(torch.randn(1, 48, 3, 16, 16).to(torch.bfloat16), torch.full((1, 192), 700.0),
              torch.randn(1, 32, model.config.text_dim).to(torch.bfloat16))
    formats = {"blocks.0.*": "mxfp8", "blocks.1.*": "int8_convrot", "blocks.2.*": "nvfp4", "blocks.3.attn1.*": "mxfp8"}
    recipe = QuantRecipe(format="int8", weight=WeightMethod(fp8_per_channel=True),
                         layers=LayerSelection(formats=formats))
    quantize_(model, recipe, obs.stats(), progress=False)
    out = tmp_path_factory.mktemp("mixed")
    cfg = SimpleNamespace(targets=["comfyui"], unquantized_dtype="bfloat16", filename="mixed", verify=True)
    (res,) = export_model(model, cfg, out, progress=False)
    assert res.verified, res.verify_detail
    return Path(res.path)


def test_verify_decodes_every_format(mixed_file: Path, random_tiny_dir: Path) -> None:
    from ptq.tools.verify import verify_file

    r = verify_file(mixed_file, str(random_tiny_dir))
    assert r.ok, [c.problems for c in r.layers if c.problems] + r.problems
    by_fmt: dict[str, int] = {}
    for c in r.layers:
        by_fmt[c.format] = by_fmt.get(c.format, 0) + 1
        assert c.weight_err_file == pytest.approx(c.weight_err_ptq, rel=1e-6)
        assert c.output_err_file == pytest.approx(c.output_err_ptq, rel=1e-6)
    assert by_fmt == {"mxfp8": 14, "int8_convrot": 10, "nvfp4": 10, "int8": 16}
    assert r.loads_into_diffusers


def test_verify_and_inspect_flag_broken_layouts(mixed_file: Path, random_tiny_dir: Path, tmp_path: Path) -> None:
    from ptq.tools.inspect import PROBLEM_CODES, inspect_file
    from ptq.tools.verify import verify_file

    good = inspect_file(mixed_file)
    assert not good.errors, [p.code for p in good.errors]
    assert {li.format for li in good.layers if li.quantized} == {"mxfp8", "int8_convrot", "nvfp4", "int8"}
    assert any("int8 layer(s): W8A8" in n and ">= 7.5" in n for n in good.notes)
    assert any("mxfp8 layer(s)" in n and "dequantizes the weight" in n for n in good.notes)
    assert not any(p.code == "missing_input_scale" for p in good.problems)
    sd = load_file(str(mixed_file))
    with safe_open(str(mixed_file), "pt") as f:
        meta = f.metadata()
    sd["blocks.3.ffn.0.weight_scale"] = sd["blocks.3.ffn.0.weight_scale"].reshape(-1)  # int8 scale as [out]
    mx = "blocks.0.self_attn.q.weight_scale"  # MXFP8 scales as float32 numbers instead of E8M0 bytes
    sd[mx] = sd[mx].view(torch.uint8).float()
    layers = json.loads(meta["_quantization_metadata"])
    layers["layers"]["blocks.1.ffn.0"]["convrot_groupsize"] = 48
    layers["layers"]["blocks.3.ffn.2"]["full_precision_matrix_mult"] = True
    for name in ("blocks.1.ffn.0", "blocks.3.ffn.2"):
        sd[f"{name}.comfy_quant"] = torch.tensor(list(json.dumps(layers["layers"][name]).encode()), dtype=torch.uint8)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad), metadata={**meta, "_quantization_metadata": json.dumps(layers)})
    rep = inspect_file(bad)
    codes = {p.code: p for p in rep.errors}
    assert {"int8_scale_shape", "mxfp8_scale_layout", "convrot_group"} <= set(codes) <= set(PROBLEM_CODES)
    assert codes["int8_scale_shape"].layers == ["blocks.3.ffn.0"]
    assert codes["mxfp8_scale_layout"].layers == ["blocks.0.self_attn.q"]
    assert codes["convrot_group"].layers == ["blocks.1.ffn.0"]
    assert [p.layers for p in rep.warnings if p.code == "int8_weight_only_ignored"] == [["blocks.3.ffn.2"]]
    r = verify_file(bad, str(random_tiny_dir), check_load=False)
    failing = {c.name for c in r.layers if not c.ok}
    assert {"blocks.0.attn1.to_q", "blocks.1.ffn.net.0.proj"} <= failing
    assert "blocks.3.ffn.net.2" not in failing  # simulated as ComfyUI runs it: W8A8 despite the flag


@pytest.mark.slow
def test_ptq_run_int8_convrot(random_tiny_dir: Path, tmp_path: Path) -> None:
    """`python -m ptq run config=tiny_nvfp4 quant=int8_convrot`: no calibration, W8A8 layers, ComfyUI file verified,
    the diffusers target skipped with its reason."""
    from tests.test_pipeline import FAST, _run

    proc = _run(["run", "config=tiny_nvfp4", "quant=int8_convrot", f"model.path={random_tiny_dir}",
                 f"hydra.run.dir={tmp_path}", f"eval.cache_dir={tmp_path / 'cache'}", "eval.decode=false",
                 "eval.runtimes=[]", *FAST], cwd=tmp_path)  # the runtimes' ConvRot emulation: tests/test_runtimes.py
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_quantized_layers"] == 50 and report["run"]["recipe"]["activation"] == "dynamic"
    assert "calibrate" not in report["timings_s"]
    assert all(r["format"] == "int8_convrot" and r["input_scale"] is None
               for r in report["layers"] if r["name"].startswith("blocks."))
    exports = {e["target"]: e for e in report["exports"]}
    assert exports["comfyui"]["verified"] is True
    assert "cannot write format 'int8_convrot'" in exports["diffusers"]["skipped"]
    assert report["accuracy"]["mean_final"]["rel_l2"] < 0.2


def test_recipes_compose() -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from ptq.config import register_configs
    from ptq.run import CONFIG_DIR

    register_configs()
    names = ["int8", "int8_per_channel", "int8_gptq", "int8_convrot", "int8_convrot_gptq", "int8_mixed", "mxfp8",
             "mxfp8_gptq", "mxfp8_weight_only"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        for name in names:
            recipe = OmegaConf.to_object(compose("ptq", overrides=["config=tiny_nvfp4", f"quant={name}"])).quant
            recipe.validate()
            assert recipe.format in ("int8", "int8_convrot", "mxfp8")
            assert recipe.weight_only == name.endswith("weight_only")
    assert replace(recipe, format="mxfp8").format == "mxfp8"
