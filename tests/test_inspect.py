"""Tests for ``ptq inspect``: convention detection, problem codes, the CLI and the two-file diff."""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from ptq.models.wan.files import to_diffusers_name, to_original_name
from ptq.targets.file_layout import split_key, tensor_infos_from_state_dict
from ptq.targets.inspection import detect_architecture, detect_naming
from ptq.targets.safetensors_header import DTYPE_BITS, HeaderError
from ptq.tools import inspect_cli
from ptq.tools.inspect import PROBLEM_CODES, diff_files, inspect_file, inspect_state_dict, to_dict

# ----------------------------------------------------------------------------------------------- builders

TINY = dict(dim=64, ffn=128, in_dim=48, text_dim=32, freq_dim=16, layers=3, out_dim=48)
#: dim 64 = one 64-wide head, text_dim 32: a ComfyUI file of this size must carry the header config override
#: (ComfyUI >= 0.15.1) or ComfyUI's detection builds it wrong (num_heads = dim // 128 = 0, text_dim 4096).
TINY_CONFIG = {"config": json.dumps({"transformer": {"num_heads": 1, "text_dim": TINY["text_dim"]}})}
WAN5B = dict(dim=3072, ffn=14336, in_dim=48, text_dim=4096, freq_dim=256, layers=30, out_dim=48)
PATCH = (1, 2, 2)


def wan_layout(
    dim: int, ffn: int, in_dim: int, text_dim: int, freq_dim: int, layers: int, out_dim: int
) -> dict:
    """Original-Wan key -> (kind, shape) for a WAN transformer (825 keys for 30 layers)."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}

    def linear(name: str, o: int, i: int) -> None:
        out[f"{name}.weight"] = ("linear", (o, i))
        out[f"{name}.bias"] = ("bias", (o,))

    out["patch_embedding.weight"] = ("conv", (dim, in_dim, *PATCH))
    out["patch_embedding.bias"] = ("bias", (dim,))
    linear("text_embedding.0", dim, text_dim)
    linear("text_embedding.2", dim, dim)
    linear("time_embedding.0", dim, freq_dim)
    linear("time_embedding.2", dim, dim)
    linear("time_projection.1", 6 * dim, dim)
    for n in range(layers):
        b = f"blocks.{n}"
        out[f"{b}.modulation"] = ("mod", (1, 6, dim))
        for att in ("self_attn", "cross_attn"):
            for p in "qkvo":
                linear(f"{b}.{att}.{p}", dim, dim)
            out[f"{b}.{att}.norm_q.weight"] = ("norm", (dim,))
            out[f"{b}.{att}.norm_k.weight"] = ("norm", (dim,))
        out[f"{b}.norm3.weight"] = ("norm", (dim,))
        out[f"{b}.norm3.bias"] = ("norm", (dim,))
        linear(f"{b}.ffn.0", ffn, dim)
        linear(f"{b}.ffn.2", dim, ffn)
    linear("head.head", out_dim * math.prod(PATCH), dim)
    out["head.modulation"] = ("mod", (1, 2, dim))
    return out


def roundup(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def nvfp4_tensors(
    layer: str,
    o: int,
    i: int,
    *,
    tiled: bool = True,
    input_scale: bool = True,
    block_name: str = "weight_scale",
) -> dict[str, torch.Tensor]:
    """Plausible NVFP4 tensors for one Linear (random codes, block scales = 1.0, positive global scales)."""
    g = torch.Generator().manual_seed(hash(layer) % 2**31)
    rows, cols = (roundup(o, 128), roundup(i // 16, 4)) if tiled else (o, i // 16)
    t = {
        f"{layer}.weight": torch.randint(0, 256, (o, i // 2), dtype=torch.uint8, generator=g),
        f"{layer}.{block_name}": torch.ones(rows, cols).to(torch.float8_e4m3fn),
        f"{layer}.weight_scale_2": torch.tensor(0.01, dtype=torch.float32),
    }
    if input_scale:
        t[f"{layer}.input_scale"] = torch.tensor(0.02, dtype=torch.float32)
    return t


def build_state(
    layout: dict, quantize: set[str], fmt: str = "nvfp4", base: torch.dtype = torch.bfloat16, **kw: object
) -> dict[str, torch.Tensor]:
    """State dict of the layout with the layers named in ``quantize`` quantized."""
    sd: dict[str, torch.Tensor] = {}
    for key, (kind, shape) in layout.items():
        layer = key.rsplit(".", 1)[0]
        if kind == "linear" and layer in quantize:
            if fmt == "nvfp4":
                sd.update(nvfp4_tensors(layer, shape[0], shape[1], **kw))  # type: ignore[arg-type]
            else:  # fp8 (ComfyUI names)
                sd[key] = (torch.randn(shape) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
                sd[f"{layer}.weight_scale"] = torch.tensor(0.001)
                sd[f"{layer}.input_scale"] = torch.tensor(0.01)
        else:
            sd[key] = torch.randn(shape).to(base) * 0.1
    return sd


def middle_linears(layout: dict, layers: int) -> set[str]:
    """Block Linears except in the first and last block (the sensitive ones stay bf16)."""
    return {
        k.rsplit(".", 1)[0]
        for k, (kind, _) in layout.items()
        if kind == "linear" and k.startswith("blocks.") and int(k.split(".")[1]) not in (0, layers - 1)
    }


def comfy_meta(layers: set[str], fmt: str = "nvfp4", **extra: str) -> dict[str, str]:
    return {
        "_quantization_metadata": json.dumps(
            {"format_version": "1.0", "layers": {n: {"format": fmt} for n in sorted(layers)}}
        ),
        **extra,
    }


@pytest.fixture(scope="module")
def tiny() -> dict:
    return wan_layout(**TINY)


@pytest.fixture(scope="module")
def good_nvfp4(tmp_path_factory: pytest.TempPathFactory, tiny: dict) -> Path:
    q = middle_linears(tiny, TINY["layers"])
    path = tmp_path_factory.mktemp("good") / "wan_nvfp4.safetensors"
    save_file(build_state(tiny, q), path, metadata=comfy_meta(q, **TINY_CONFIG))
    return path


@pytest.fixture(scope="module")
def broken_nvfp4(tmp_path_factory: pytest.TempPathFactory, tiny: dict) -> Path:
    """The four root causes of a known-bad WAN NVFP4 conversion in one file."""
    q = middle_linears(tiny, TINY["layers"])
    sd = build_state(tiny, q, base=torch.float16, input_scale=False, block_name="scale_weight")
    path = tmp_path_factory.mktemp("broken") / "wan_nvfp4_broken.safetensors"
    save_file(sd, path)  # no _quantization_metadata, no comfy_quant tensors
    return path


# ----------------------------------------------------------------------------------------------- naming


def test_name_map_roundtrip_and_counts() -> None:
    layout = wan_layout(**WAN5B)
    assert len(layout) == 825
    n_params = sum(math.prod(s) for _, s in layout.values())
    assert n_params == 4_999_787_712  # shared/README.md
    for key in layout:
        assert to_original_name(to_diffusers_name(key)) == key
    assert to_diffusers_name("blocks.3.self_attn.o.weight") == "blocks.3.attn1.to_out.0.weight"
    assert to_diffusers_name("blocks.3.norm3.bias") == "blocks.3.norm2.bias"
    assert to_diffusers_name("head.modulation") == "scale_shift_table"
    assert to_diffusers_name("blocks.0.modulation") == "blocks.0.scale_shift_table"
    assert to_original_name("condition_embedder.time_proj.weight") == "time_projection.1.weight"
    assert to_original_name("proj_out.bias") == "head.head.bias"
    assert to_original_name("blocks.0.ffn.net.0.proj.weight") == "blocks.0.ffn.0.weight"
    assert to_original_name("proj_outx.weight") == "proj_outx.weight"


def test_split_key() -> None:
    assert split_key("blocks.0.self_attn.q.weight_scale_2") == ("blocks.0.self_attn.q", "weight_scale_2")
    assert split_key("blocks.0.self_attn.q.input_quantizer._amax") == (
        "blocks.0.self_attn.q",
        "input_quantizer._amax",
    )
    assert split_key("blocks.0.ffn.0._weight_qdata") == ("blocks.0.ffn.0", "_weight_qdata")
    assert split_key("scaled_fp8") == ("", "scaled_fp8")


def test_naming_and_prefix_detection(tiny: dict) -> None:
    orig = detect_naming(tiny)
    assert (orig.style, orig.prefix) == ("original", "")
    diff = detect_naming({"model.diffusion_model." + to_diffusers_name(k): v for k, v in tiny.items()})
    assert (diff.style, diff.prefix, diff.unprefixed_keys) == ("diffusers", "model.diffusion_model.", 0)
    mixed = detect_naming(list(tiny) + ["blocks.0.attn1.to_q.weight"])
    assert mixed.style == "mixed"


def test_architecture_5b_both_namings() -> None:
    layout = wan_layout(**WAN5B)
    infos = tensor_infos_from_state_dict({k: torch.empty(s, device="meta") for k, (_, s) in layout.items()})
    arch = detect_architecture(infos)
    assert arch.known_model == "WAN 2.2 TI2V-5B" and arch.params == 4_999_787_712
    assert (arch.dim, arch.num_layers, arch.num_heads, arch.in_dim, arch.ffn_dim) == (3072, 30, 24, 48, 14336)
    assert (arch.text_dim, arch.freq_dim, arch.out_dim, arch.patch_size) == (4096, 256, 48, [1, 2, 2])
    dinfos = tensor_infos_from_state_dict(
        {to_diffusers_name(k): torch.empty(s, device="meta") for k, (_, s) in layout.items()}
    )
    darch = detect_architecture(dinfos)
    assert darch.known_model == "WAN 2.2 TI2V-5B" and darch.params == arch.params


def test_architecture_tiny_description(tiny: dict) -> None:
    infos = tensor_infos_from_state_dict({k: torch.empty(s, device="meta") for k, (_, s) in tiny.items()})
    arch = detect_architecture(infos)
    assert arch.family == "wan" and arch.known_model is None
    assert arch.description.startswith("WAN-architecture, dim=64, layers=3")


# ----------------------------------------------------------------------------------------------- good / broken


def test_good_comfyui_nvfp4_has_no_errors(good_nvfp4: Path) -> None:
    r = inspect_file(good_nvfp4)
    assert r.convention.name == "comfyui" and r.convention.metadata_style == "header"
    assert r.errors == [] and r.problems == [], [p.code for p in r.problems]
    assert r.format_counts["nvfp4"] == 10 and r.format_counts["bf16"] > 0
    nv = next(li for li in r.layers if li.format == "nvfp4")
    assert nv.logical_shape[1] == 2 * nv.weight.shape[1]  # type: ignore[union-attr]
    assert any("nibble order: not checkable from the header" in n for n in r.notes)
    assert r.values_checked > 0
    # logical parameter count equals the unquantized model's
    plain = sum(math.prod(s) for _, s in wan_layout(**TINY).values())
    assert r.architecture.params == plain


def test_broken_nvfp4_names_all_four_root_causes(broken_nvfp4: Path) -> None:
    r = inspect_file(broken_nvfp4)
    codes = r.codes()
    for code in (
        "missing_input_scale",
        "unread_scale_name",
        "float16_base_tensors",
        "missing_quant_metadata",
    ):
        assert code in codes, (code, codes)
    assert r.exit_code == 1
    for p in r.problems:
        assert p.code in PROBLEM_CODES and p.severity in ("error", "warning") and p.fix and p.message
    miss = next(p for p in r.problems if p.code == "missing_quant_metadata")
    assert miss.count == 10 and len(miss.layers) == 5
    unread = next(p for p in r.problems if p.code == "unread_scale_name")
    assert "scale_weight" in unread.message and "weight_scale" in unread.fix
    # shape check also works on the misnamed block scale: tiled [128, 4] for a 64x64 layer is accepted
    assert "block_scale_shape_mismatch" not in codes


def test_comfy_quant_tensor_style(tmp_path: Path, tiny: dict) -> None:
    q = middle_linears(tiny, TINY["layers"])
    sd = build_state(tiny, q)
    for layer in q:
        sd[f"{layer}.comfy_quant"] = torch.tensor(
            list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8
        )
    path = tmp_path / "cq.safetensors"
    save_file(sd, path, metadata=TINY_CONFIG)
    r = inspect_file(path)
    assert r.convention.metadata_style == "comfy_quant tensors"
    assert r.errors == [], [p.code for p in r.problems]
    # header-only mode cannot read the JSON but must not invent errors
    ho = inspect_file(path, read_values=False)
    assert ho.errors == [] and ho.architecture.params == r.architecture.params
    assert ho.format_counts.get("nvfp4") == 10
    sd[f"{sorted(q)[0]}.comfy_quant"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    save_file(sd, path)
    assert "invalid_quant_metadata" in inspect_file(path).codes()


def test_weight_only_layers_need_no_input_scale(tmp_path: Path, tiny: dict) -> None:
    q = middle_linears(tiny, TINY["layers"])
    sd = build_state(tiny, q, input_scale=False)
    meta = {
        "format_version": "1.0",
        "layers": {n: {"format": "nvfp4", "full_precision_matrix_mult": True} for n in q},
    }
    path = tmp_path / "wo.safetensors"
    save_file(sd, path, metadata={"_quantization_metadata": json.dumps(meta)})
    assert "missing_input_scale" not in inspect_file(path).codes()


# ----------------------------------------------------------------------------------------------- other conventions


def test_kijai_fp8(tmp_path: Path, tiny: dict) -> None:
    q = middle_linears(tiny, TINY["layers"])
    sd: dict[str, torch.Tensor] = {}
    for key, (kind, shape) in tiny.items():
        layer = key.rsplit(".", 1)[0]
        if kind == "linear" and layer in q:
            sd[key] = torch.randn(shape).to(torch.float8_e4m3fn)
            sd[f"{layer}.scale_weight"] = torch.tensor(0.01)
            sd[f"{layer}.scale_input"] = torch.tensor(0.02)
        else:
            sd[key] = torch.randn(shape).to(torch.bfloat16)
    sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / "kijai.safetensors"
    save_file(sd, path, metadata=TINY_CONFIG)
    r = inspect_file(path)
    assert r.convention.name == "comfyui-scaled-fp8"
    assert r.errors == [], [(p.code, p.message) for p in r.problems]
    assert r.format_counts["fp8"] == 10
    del sd["scaled_fp8"]  # without the marker ComfyUI never reads scale_weight
    save_file(sd, path)
    r = inspect_file(path)
    assert {"unread_scale_name", "missing_quant_metadata"} <= r.codes()


def test_compressed_tensors_naming(tmp_path: Path, tiny: dict) -> None:
    q = middle_linears(tiny, TINY["layers"])
    sd: dict[str, torch.Tensor] = {}
    for key, (kind, shape) in tiny.items():
        layer = key.rsplit(".", 1)[0]
        if kind == "linear" and layer in q:
            o, i = shape
            sd[f"{layer}.weight_packed"] = torch.zeros(o, i // 2, dtype=torch.uint8)
            sd[f"{layer}.weight_scale"] = torch.ones(o, i // 16).to(torch.float8_e4m3fn)
            sd[f"{layer}.weight_global_scale"] = torch.tensor([100.0])
            sd[f"{layer}.input_global_scale"] = torch.tensor([50.0])
        else:
            sd[key] = torch.randn(shape).to(torch.bfloat16)
    path = tmp_path / "ct.safetensors"
    save_file(sd, path)
    r = inspect_file(path)
    assert r.convention.name == "compressed-tensors"
    assert "unread_scale_name" in r.codes()
    assert r.format_counts["nvfp4"] == 10
    assert r.architecture.params == sum(math.prod(s) for _, s in tiny.values())
    # row-major [64, 4] scales: wrong for ComfyUI (tiled [128, 4]), right for row-major (ModelOpt-style) loaders
    assert "block_scale_layout" in r.codes()
    assert "block_scale_layout" not in inspect_file(path, target="modelopt").codes()


def test_modelopt_export_detected(tmp_path: Path, tiny: dict) -> None:
    q = middle_linears(tiny, TINY["layers"])
    sd = build_state(tiny, q, tiled=False)
    for layer in q:
        sd[f"{layer}.input_quantizer._amax"] = torch.tensor(3.0)
    path = tmp_path / "mo.safetensors"
    save_file(sd, path, metadata={"quantization_config": json.dumps({"quant_algo": "NVFP4"})})
    r = inspect_file(path)
    assert r.convention.name == "modelopt"
    assert "missing_quant_metadata" in r.codes()
    assert any(p.code == "unread_scale_name" and p.severity == "warning" for p in r.problems)
    assert "--target modelopt" in next(p.message for p in r.problems if p.code == "missing_quant_metadata")
    # judged against ModelOpt-style loaders, the same file is fine (row-major scales, no metadata needed)
    mo = inspect_file(path, target="modelopt")
    assert mo.target == "modelopt" and mo.errors == [], [p.code for p in mo.errors]
    assert inspect_cli.main([str(path), "--target", "diffusers"]) == 0


def test_torchao_detected(tmp_path: Path) -> None:
    sd = {
        "blocks.0.ffn.0._weight_qdata": torch.zeros(64, 32, dtype=torch.uint8),
        "blocks.0.ffn.0._weight_scale": torch.ones(64, 4).to(torch.float8_e4m3fn),
        "blocks.0.ffn.0.bias": torch.zeros(64, dtype=torch.bfloat16),
    }
    path = tmp_path / "ao.safetensors"
    save_file(
        sd, path, metadata={"tensor_names": json.dumps(["blocks.0.ffn.0.weight", "blocks.0.ffn.0.bias"])}
    )
    r = inspect_file(path)
    assert r.convention.name == "torchao"
    assert "unread_scale_name" in r.codes()


def test_plain_bf16(tmp_path: Path, tiny: dict) -> None:
    path = tmp_path / "plain.safetensors"
    save_file(build_state(tiny, set()), path, metadata=TINY_CONFIG)
    r = inspect_file(path)
    assert r.convention.name == "plain" and r.convention.label == "plain bf16 (unquantized)"
    assert r.problems == []
    assert "nibble order" not in " ".join(r.notes)


# ----------------------------------------------------------------------------------------------- specific problems


def _codes_for(tmp_path: Path, sd: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> set[str]:
    path = tmp_path / "x.safetensors"
    save_file(sd, path, metadata=meta)
    r = inspect_file(path)
    assert inspect_state_dict(sd, meta).codes() == r.codes()  # in-memory inspection agrees
    return r.codes()


def test_metadata_vs_weights(tmp_path: Path, tiny: dict) -> None:
    q = middle_linears(tiny, TINY["layers"])
    sd = build_state(tiny, q)
    listed = set(sorted(q)[:5]) | {"blocks.9.self_attn.q"}
    codes = _codes_for(tmp_path, sd, comfy_meta(listed))
    assert {"metadata_layer_without_weight", "quantized_layer_not_in_metadata"} <= codes


def test_metadata_with_diffusers_names_in_original_file(tmp_path: Path, tiny: dict) -> None:
    q = middle_linears(tiny, TINY["layers"])
    sd = build_state(tiny, q)
    path = tmp_path / "x.safetensors"
    save_file(sd, path, metadata=comfy_meta({to_diffusers_name(n) for n in q}))
    r = inspect_file(path)
    p = next(p for p in r.problems if p.code == "metadata_layer_without_weight")
    assert "another naming convention" in p.message


def test_block_scale_shape_layout_dtype(tmp_path: Path, tiny: dict) -> None:
    q = middle_linears(tiny, TINY["layers"])
    base = build_state(tiny, q)
    meta = comfy_meta(q)
    layer = sorted(q)[0]
    sd = dict(base)
    sd[f"{layer}.weight_scale"] = torch.ones(64, 5).to(torch.float8_e4m3fn)
    assert "block_scale_shape_mismatch" in _codes_for(tmp_path, sd, meta)
    sd = dict(base)
    sd[f"{layer}.weight_scale"] = torch.ones(64, 4).to(torch.float8_e4m3fn)  # row-major, ComfyUI wants tiled
    assert "block_scale_layout" in _codes_for(tmp_path, sd, meta)
    sd = dict(base)
    sd[f"{layer}.weight_scale"] = torch.ones(128, 4)  # float32 block scales
    assert "scale_dtype" in _codes_for(tmp_path, sd, meta)
    sd = dict(base)
    sd[f"{layer}.weight_scale_2"] = torch.tensor([0.1, 0.2])
    sd[f"{layer}.input_scale"] = torch.tensor(0.1, dtype=torch.bfloat16)
    assert {"scale_not_scalar", "scale_not_float32"} <= _codes_for(tmp_path, sd, meta)
    sd = dict(base)
    del sd[f"{layer}.weight_scale_2"]
    assert "missing_weight_scale" in _codes_for(tmp_path, sd, meta)
    sd = dict(base)
    sd[f"{layer}.weight"] = torch.zeros(64, 32).to(torch.float8_e4m3fn)
    assert "format_dtype_mismatch" in _codes_for(tmp_path, sd, meta)
    assert "unknown_quant_format" in _codes_for(tmp_path, base, comfy_meta(q, fmt="nvfp4_v2"))
    assert "invalid_quant_metadata" in _codes_for(tmp_path, base, {"_quantization_metadata": "{oops"})


def test_scale_values(tmp_path: Path, tiny: dict) -> None:
    q = middle_linears(tiny, TINY["layers"])
    base = build_state(tiny, q)
    meta = comfy_meta(q)
    layer = sorted(q)[0]
    sd = dict(base)
    sd[f"{layer}.input_scale"] = torch.tensor(float("nan"))
    assert "nonfinite_scale" in _codes_for(tmp_path, sd, meta)
    sd = dict(base)
    bs = torch.ones(128, 4).to(torch.float8_e4m3fn).view(torch.uint8).clone()
    bs[3, 1] = 0x7F  # float8_e4m3fn NaN
    sd[f"{layer}.weight_scale"] = bs.view(torch.float8_e4m3fn)
    assert "nonfinite_scale" in _codes_for(tmp_path, sd, meta)
    sd = dict(base)
    sd[f"{layer}.weight_scale_2"] = torch.tensor(0.0)
    assert "nonpositive_scale" in _codes_for(tmp_path, sd, meta)
    sd = dict(base)
    sd[f"{layer}.weight_scale"] = torch.zeros(128, 4).to(torch.float8_e4m3fn)
    assert "zero_block_scales" in _codes_for(tmp_path, sd, meta)
    sd = dict(base)
    sd["blocks.1.norm3.bias"] = torch.full((64,), float("inf"), dtype=torch.bfloat16)
    assert "nonfinite_values" in _codes_for(tmp_path, sd, meta)


def test_sensitive_layers_and_naming_problems(tmp_path: Path, tiny: dict) -> None:
    q = middle_linears(tiny, TINY["layers"]) | {"blocks.0.self_attn.q", "text_embedding.2"}
    codes = _codes_for(tmp_path, build_state(tiny, q), comfy_meta(q))
    assert "sensitive_layer_quantized" in codes
    sd = build_state(tiny, set())
    sd["blocks.0.attn1.to_q.weight"] = sd.pop("blocks.0.self_attn.q.weight")
    assert "mixed_naming" in _codes_for(tmp_path, sd)
    q = middle_linears(tiny, TINY["layers"])
    sd = {"model.diffusion_model." + k: v for k, v in build_state(tiny, q).items()}
    codes = _codes_for(tmp_path, sd, comfy_meta(q))
    assert "prefixed_quantized_file" in codes and "metadata_layer_without_weight" not in codes
    sd["blocks.0.norm3.weight"] = sd.pop("model.diffusion_model.blocks.0.norm3.weight")
    assert "mixed_prefix" in _codes_for(tmp_path, sd, comfy_meta(q))


def test_comfy_kitchen_layout_is_accepted(tmp_path: Path) -> None:
    """A layer quantized by comfy-kitchen (ComfyUI's own kernel library) passes the shape/layout checks."""
    ck = pytest.importorskip("comfy_kitchen")
    from comfy_kitchen.tensor import TensorCoreNVFP4Layout

    sd: dict[str, torch.Tensor] = {}
    layers = {"blocks.1.ffn.0": (128, 64), "head.head": (192, 64)}  # 192 rows -> tiled scales padded to 256
    for layer, shape in layers.items():
        with ck.registry.use_backend("eager"):
            qdata, params = TensorCoreNVFP4Layout.quantize(torch.randn(shape, dtype=torch.bfloat16))
        for suffix, t in TensorCoreNVFP4Layout.state_dict_tensors(qdata, params).items():
            sd[f"{layer}.weight{suffix}"] = t
        sd[f"{layer}.input_scale"] = torch.tensor(0.01)
    assert tuple(sd["head.head.weight_scale"].shape) == (256, 4)
    codes = _codes_for(tmp_path, sd, comfy_meta(set(layers)))
    assert not codes & {
        "block_scale_shape_mismatch",
        "block_scale_layout",
        "scale_dtype",
        "nonfinite_scale",
        "nonpositive_scale",
        "zero_block_scales",
        "missing_weight_scale",
    }, codes


# ----------------------------------------------------------------------------------------------- realistic size


def write_sparse_safetensors(
    path: Path, layout: dict, dtypes: dict[str, str], metadata: dict[str, str]
) -> None:
    """A valid safetensors file of real size whose data section is a hole (costs no disk time)."""
    header: dict[str, object] = {"__metadata__": metadata}
    pos = 0
    for key, shape in layout.items():
        nbytes = math.prod(shape) * DTYPE_BITS[dtypes[key]] // 8
        header[key] = {"dtype": dtypes[key], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + pos)


def wan5b_nvfp4_header_layout() -> tuple[dict[str, tuple[int, ...]], dict[str, str], dict[str, str]]:
    layout = wan_layout(**WAN5B)
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    quant = middle_linears(layout, 30)
    for key, (kind, shape) in layout.items():
        layer = key.rsplit(".", 1)[0]
        if kind == "linear" and layer in quant:
            o, i = shape
            shapes[key], dtypes[key] = (o, i // 2), "U8"
            shapes[f"{layer}.weight_scale"], dtypes[f"{layer}.weight_scale"] = (
                (roundup(o, 128), roundup(i // 16, 4)),
                "F8_E4M3",
            )
            for s in ("weight_scale_2", "input_scale"):
                shapes[f"{layer}.{s}"], dtypes[f"{layer}.{s}"] = (), "F32"
        else:
            shapes[key] = shape
            dtypes[key] = "F32" if kind == "mod" or "time_embedding" in key or "norm3" in key else "BF16"
    return shapes, dtypes, comfy_meta(quant)


def test_realistic_5b_header_is_fast(tmp_path: Path) -> None:
    shapes, dtypes, meta = wan5b_nvfp4_header_layout()
    path = tmp_path / "wan2.2_ti2v_5B_nvfp4.safetensors"
    write_sparse_safetensors(path, shapes, dtypes, meta)
    assert path.stat().st_size > 3e9
    t0 = time.perf_counter()
    r = inspect_file(path, read_values=False)  # header only: what must answer instantly
    assert time.perf_counter() - t0 < 1.0
    assert r.architecture.known_model == "WAN 2.2 TI2V-5B"
    assert r.architecture.params == 4_999_787_712
    assert r.format_counts["nvfp4"] == 280 and r.n_tensors == 825 + 3 * 280
    assert r.errors == [], [p.code for p in r.errors]
    # default mode also reads ~170 MB of scales (a cold hole here); ~0.3-0.7 s on an idle 2-core box
    t0 = time.perf_counter()
    r = inspect_file(path)
    assert time.perf_counter() - t0 < 4.0
    assert r.architecture.known_model == "WAN 2.2 TI2V-5B"
    # the data section is a hole, so every scale reads as 0: the value checks must say so
    assert {"nonpositive_scale", "zero_block_scales"} <= r.codes()


# ----------------------------------------------------------------------------------------------- CLI and diff


def test_cli_exit_codes_and_text(
    good_nvfp4: Path, broken_nvfp4: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert inspect_cli.main([str(good_nvfp4)]) == 0
    out = capsys.readouterr().out
    assert "ComfyUI mixed precision" in out and "problems: 0 error(s)" in out and "nibble order" in out
    assert inspect_cli.main([str(broken_nvfp4), "--max-layers", "3"]) == 1
    out = capsys.readouterr().out
    assert "[error] missing_quant_metadata" in out and "fix:" in out and "... " in out and "more" in out
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00")
    assert inspect_cli.main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.safetensors" in err and "shorter than the 8-byte" in err and "Traceback" not in err
    assert inspect_cli.main([str(tmp_path / "missing.safetensors")]) == 2
    assert "cannot read file" in capsys.readouterr().err
    assert inspect_cli.main([]) == 2
    capsys.readouterr()


def test_cli_json(broken_nvfp4: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert inspect_cli.main([str(broken_nvfp4), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["exit_code"] == 1
    assert {p["code"] for p in data["problems"]} >= {"missing_input_scale", "missing_quant_metadata"}
    assert data["architecture"]["family"] == "wan" and data["naming"]["style"] == "original"


def test_diff_normalises_naming_and_prefix(
    tmp_path: Path, tiny: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    sd = build_state(tiny, set())
    a = tmp_path / "orig.safetensors"
    b = tmp_path / "diffusers.safetensors"
    save_file(sd, a, metadata=TINY_CONFIG)
    save_file({"model.diffusion_model." + to_diffusers_name(k): v for k, v in sd.items()}, b, metadata=TINY_CONFIG)
    d = diff_files(a, b)
    assert d.normalized_names and d.b_prefix == "model.diffusion_model."
    assert d.identical and d.common == len(sd)
    assert inspect_cli.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "identical structure" in out and "prefixes differ" in out and "normalised to original" in out


def test_diff_bf16_vs_nvfp4(
    tmp_path: Path, good_nvfp4: Path, tiny: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    a = tmp_path / "plain.safetensors"
    save_file(build_state(tiny, set()), a, metadata=TINY_CONFIG)
    d = diff_files(a, good_nvfp4)
    assert d.only_in_a == [] and len(d.only_in_b) == 30
    assert d.only_in_b_suffixes == {"*.weight_scale": 10, "*.weight_scale_2": 10, "*.input_scale": 10}
    assert len(d.dtype_diffs) == 10 and len(d.shape_diffs) == 10
    assert inspect_cli.main([str(a), str(good_nvfp4)]) == 0
    out = capsys.readouterr().out
    assert "only in B: 30" in out and "10 x *.weight_scale_2" in out and "BF16 -> U8" in out
    assert inspect_cli.main([str(a), str(good_nvfp4), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["diff"]["only_in_b"]) == 30 and data["b"]["convention"]["name"] == "comfyui"


def test_header_error_is_raised_not_crash(tmp_path: Path) -> None:
    path = tmp_path / "trunc.safetensors"
    save_file({"a": torch.zeros(100)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(HeaderError, match="truncated data section"):
        inspect_file(path)


NAMES = st.sampled_from(
    [
        "blocks.0.self_attn.q", "blocks.1.attn1.to_q", "blocks.0.ffn.0", "head.head", "proj_out", "patch_embedding",
        "model.diffusion_model.blocks.2.cross_attn.k", "text_embedding.0", "head", "blocks.0", "x", "",
    ]
)  # fmt: skip
SUFFIXES = st.sampled_from(
    [
        "weight", "bias", "weight_scale", "weight_scale_2", "input_scale", "scale_weight", "scale_input",
        "comfy_quant", "weight_packed", "weight_global_scale", "input_quantizer._amax", "_weight_qdata",
        "modulation", "scaled_fp8",
    ]
)  # fmt: skip
DTYPES = st.sampled_from(
    [torch.uint8, torch.float8_e4m3fn, torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.int32]
)


@settings(max_examples=60, deadline=None)
@given(
    entries=st.lists(
        st.tuples(NAMES, SUFFIXES, DTYPES, st.lists(st.integers(0, 40), min_size=0, max_size=3)), max_size=12
    ),
    meta=st.one_of(
        st.none(),
        st.just({"_quantization_metadata": "{"}),
        st.dictionaries(NAMES, st.sampled_from(["nvfp4", "float8_e4m3fn", "bogus"]), max_size=3).map(
            lambda d: {
                "_quantization_metadata": json.dumps({"layers": {k: {"format": v} for k, v in d.items()}})
            }
        ),
    ),
)
def test_inspect_never_crashes(entries: list, meta: dict | None) -> None:
    """Arbitrary mixes of names, suffixes, dtypes and shapes give a report, never an exception."""
    sd: dict[str, torch.Tensor] = {}
    for name, suffix, dtype, shape in entries:
        key = f"{name}.{suffix}" if name else suffix
        sd[key] = (
            torch.zeros(shape, dtype=torch.uint8).view(dtype)
            if dtype.itemsize == 1
            else torch.zeros(shape, dtype=dtype)
        )
    report = inspect_state_dict(sd, meta)
    assert report.exit_code in (0, 1)
    for p in report.problems:
        assert p.code in PROBLEM_CODES
    json.dumps(to_dict(report))
    inspect_cli.format_report(report)


def test_heads_are_the_ones_comfyui_builds(good_nvfp4: Path) -> None:
    """The architecture line reports the head count ComfyUI builds: the header config override's (here 1 head of
    64) and, beside it, what ComfyUI's shape rule (dim // 128) alone gives; without an override, the rule's."""
    arch = inspect_file(good_nvfp4).architecture
    assert arch.num_heads == 1 and "heads=1 (header config; ComfyUI's shape rule alone: 0)" in arch.description
    layout = wan_layout(**WAN5B)
    infos = tensor_infos_from_state_dict({k: torch.empty(s, device="meta") for k, (_, s) in layout.items()})
    rule = detect_architecture(infos)
    assert rule.num_heads == 24 and "heads=24," in rule.description and "header config" not in rule.description
