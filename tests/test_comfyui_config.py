"""ComfyUI's header ``config`` override: written where its WAN shape detection would build the model wrong, checked
by ``ptq inspect`` (misbuilt WAN files, pre_quant_scale that is not read, minimum ComfyUI versions)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ptq.algorithms.quantize import quantize_
from ptq.algorithms.recipe import QuantRecipe
from ptq.models import wan
from ptq.models.tiny_wan import TINY_TRANSFORMER_CONFIG
from ptq.models.wan.comfyui import comfyui_config_override, comfyui_detected, comfyui_wan_kwargs
from ptq.targets import export_model
from ptq.tools.inspect import inspect_file, inspect_state_dict


def test_override_lists_exactly_what_detection_gets_wrong() -> None:
    assert comfyui_config_override(wan.WAN22_TI2V_5B_TRANSFORMER_CONFIG) == {}  # 24 x 128, text_dim 4096
    assert comfyui_config_override(TINY_TRANSFORMER_CONFIG) == {"transformer": {"num_heads": 4, "text_dim": 256}}
    odd = {**wan.WAN22_TI2V_5B_TRANSFORMER_CONFIG, "eps": 1e-5, "freq_dim": 128, "qk_norm": None}
    assert comfyui_config_override(odd) == {"transformer": {"eps": 1e-5, "freq_dim": 128, "qk_norm": False}}
    # detection + override = the model's own values
    for cfg in (TINY_TRANSFORMER_CONFIG, odd):
        want = comfyui_wan_kwargs(cfg)
        built = {**comfyui_detected(want.pop("_dim")), **comfyui_config_override(cfg).get("transformer", {})}
        assert {k: built[k] for k in want} == want


def _tiny_export(model_dir: Path, out: Path) -> Path:
    model = wan.load_transformer(model_dir)
    recipe = QuantRecipe(format="nvfp4", activation="none")
    quantize_(model, recipe, {}, progress=False)
    cfg = SimpleNamespace(targets=["comfyui"], unquantized_dtype="bfloat16", filename="m", verify=True)
    (res,) = export_model(model, cfg, out, progress=False)
    assert res.verified, res.verify_detail
    return Path(res.path)


def test_tiny_export_carries_the_override_and_inspects_clean(random_tiny_dir: Path, tmp_path: Path) -> None:
    path = _tiny_export(random_tiny_dir, tmp_path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert json.loads(meta["config"]) == {"transformer": {"num_heads": 4, "text_dim": 256}}
    dim = tensors["head.modulation"].shape[-1]
    assert dim == 256 and dim // 128 == 2  # what ComfyUI would build without the override: 2 heads
    report = inspect_file(path)
    assert report.errors == [] and "comfyui_wan_misbuilt" not in report.codes(), [p.code for p in report.problems]
    assert report.comfyui_min_version == "0.15.1"
    assert {f["feature"] for f in report.comfyui_features} == {"quant_metadata", "full_precision_matrix_mult",
                                                             "nvfp4", "config_override"}
    # the same file without the override: ComfyUI builds text_dim 4096 (error) and 2 heads of 128 (warning)
    del meta["config"]
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, str(bare), metadata=meta)
    report = inspect_file(bare)
    probs = {(p.code, p.severity) for p in report.problems}
    assert {("comfyui_wan_misbuilt", "error"), ("comfyui_wan_misbuilt", "warning")} <= probs
    assert any("text_dim=4096" in p.message for p in report.errors)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={**meta, "config": "{not json"})
    assert "invalid_config_override" in inspect_file(bad).codes()


def test_inspect_flags_pre_quant_scale_comfyui_does_not_read() -> None:
    w = torch.randn(32, 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    sd = {"blocks.0.ffn.0.weight": w, "blocks.0.ffn.0.weight_scale": torch.tensor(0.01),
          "blocks.0.ffn.0.input_scale": torch.tensor(0.02), "blocks.0.ffn.0.pre_quant_scale": torch.ones(64)}
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0",
                                                  "layers": {"blocks.0.ffn.0": {"format": "float8_e4m3fn"}}})}
    report = inspect_state_dict(sd, meta)
    assert "unread_pre_quant_scale" in {p.code for p in report.errors}
    assert report.comfyui_min_version == "0.30.0"  # pre_quant_scale
