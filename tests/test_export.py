"""Export round trips: the written bytes, read back by the loaders' own code (comfy-kitchen's layout classes for
ComfyUI, diffusers' BFL quantizer for diffusers), equal the simulated quantized weights bit for bit."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from ptq.algorithms.quantize import quantize_, quantized_layers
from ptq.algorithms.recipe import QuantRecipe
from ptq.calibration.observers import LinearInputObserver
from ptq.models import wan
from ptq.models.wan.names import diffusers_to_original
from ptq.targets import TARGETS, export_model
from ptq.targets.roundtrip import verify_export

ck = pytest.importorskip("comfy_kitchen")


def _quantized_tiny(model_dir: Path, recipe: QuantRecipe) -> torch.nn.Module:
    model = wan.load_transformer(model_dir)
    torch.manual_seed(0)
    x = torch.randn(1, 48, 3, 16, 16).to(torch.bfloat16)
    text = torch.randn(1, 32, model.config.text_dim).to(torch.bfloat16)
    with LinearInputObserver(model) as obs, torch.no_grad():
        for t in (900.0, 300.0):
            model(x, torch.full((1, 3 * 8 * 8), t), text)
    quantize_(model, recipe, obs.stats(), progress=False)
    return model


def _export(model: torch.nn.Module, out: Path, targets: list[str]) -> dict[str, str]:
    cfg = SimpleNamespace(targets=targets, unquantized_dtype="bfloat16", filename="m", verify=True)
    results = export_model(model, cfg, out, progress=False)
    assert all(r.verified for r in results if not r.skipped), [r.verify_detail for r in results]
    return {r.target: r.path for r in results}


@pytest.fixture(scope="module")
def nvfp4_export(random_tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    model = _quantized_tiny(random_tiny_dir, QuantRecipe(format="nvfp4"))
    out = tmp_path_factory.mktemp("export_nvfp4")
    return model, _export(model, out, ["comfyui", "diffusers"])


def test_comfyui_nvfp4_bytes_decode_with_comfy_kitchen(nvfp4_export) -> None:
    from comfy_kitchen.tensor import TensorCoreNVFP4Layout

    model, paths = nvfp4_export
    layers = quantized_layers(model)
    assert len(layers) == 50  # 5 blocks x 10 Linears; embedders and proj_out kept by the default excludes
    with safe_open(paths["comfyui"], "pt") as f:
        meta = json.loads(f.metadata()["_quantization_metadata"])
        assert meta["format_version"] == "1.0"
        for name, layer in layers.items():
            key = diffusers_to_original(name)
            assert meta["layers"][key] == {"format": "nvfp4"}
            conf = json.loads(bytes(f.get_tensor(f"{key}.comfy_quant").tolist()))
            assert conf == {"format": "nvfp4"}
            w, bs = f.get_tensor(f"{key}.weight"), f.get_tensor(f"{key}.weight_scale")
            ts, inp = f.get_tensor(f"{key}.weight_scale_2"), f.get_tensor(f"{key}.input_scale")
            assert w.dtype == torch.uint8 and w.shape == (layer.out_features, layer.in_features // 2)
            assert bs.dtype == torch.float8_e4m3fn and ts.dtype == inp.dtype == torch.float32
            assert ts.shape == inp.shape == ()
            # ComfyUI builds exactly these Params from the file (comfy/ops.py) and dequantizes via comfy-kitchen
            params = TensorCoreNVFP4Layout.Params(scale=ts, orig_dtype=torch.float32,
                                                  orig_shape=(layer.out_features, layer.in_features),
                                                  block_scale=bs.view(torch.float8_e4m3fn))
            deq = TensorCoreNVFP4Layout.dequantize(w, params)
            assert torch.equal(deq, layer.dequantized_weight()), name
            assert torch.equal(inp, layer.input_scale)


def test_comfyui_unquantized_tensors_and_names(nvfp4_export, random_tiny_dir: Path) -> None:
    model, paths = nvfp4_export
    with safe_open(paths["comfyui"], "pt") as f:
        keys = set(f.keys())
        assert "head.modulation" in keys and "blocks.0.norm3.weight" in keys and "head.head.weight" in keys
        assert not any(k.startswith("model.diffusion_model.") for k in keys)
        dtypes = {f.get_tensor(k).dtype for k in keys if not k.endswith(("comfy_quant", ".weight_scale"))}
        assert torch.float16 not in dtypes
        assert f.get_tensor("head.head.weight").dtype == torch.bfloat16  # kept layer, bf16
        assert f.get_tensor("time_embedding.0.weight").dtype == torch.float32  # diffusers' fp32 module stays fp32


def test_diffusers_export_loads_with_diffusers_bfl_quantizer(nvfp4_export) -> None:
    from ptq.targets.diffusers.loader import load_diffusers_export

    model, paths = nvfp4_export
    loaded = load_diffusers_export(Path(paths["diffusers"]).parents[1])
    from diffusers.quantizers.bfl.utils import dequantize_nvfp4

    for name, layer in quantized_layers(model).items():
        m = loaded.get_submodule(name)
        assert type(m).__name__ == "BFLNVFP4Linear", name
        deq = dequantize_nvfp4(m.weight, m.weight_scale, m.weight_scale_2)
        assert torch.equal(deq, layer.dequantized_weight()), name
        assert torch.equal(m.input_scale, layer.input_scale)


def test_fp8_export_round_trip(random_tiny_dir: Path, tmp_path: Path) -> None:
    from comfy_kitchen.tensor import TensorCoreFP8Layout

    model = _quantized_tiny(random_tiny_dir, QuantRecipe(format="fp8"))
    paths = _export(model, tmp_path, ["comfyui", "diffusers"])
    with safe_open(paths["comfyui"], "pt") as f:
        for name, layer in quantized_layers(model).items():
            key = diffusers_to_original(name)
            assert json.loads(bytes(f.get_tensor(f"{key}.comfy_quant").tolist())) == {"format": "float8_e4m3fn"}
            w, s = f.get_tensor(f"{key}.weight"), f.get_tensor(f"{key}.weight_scale")
            params = TensorCoreFP8Layout.Params(scale=s, orig_dtype=torch.float32, orig_shape=tuple(w.shape))
            assert torch.equal(TensorCoreFP8Layout.dequantize(w, params), layer.dequantized_weight())
            assert f.get_tensor(f"{key}.input_scale").shape == ()


def test_weight_only_marks_full_precision_and_skips_bfl(random_tiny_dir: Path, tmp_path: Path) -> None:
    model = _quantized_tiny(random_tiny_dir, QuantRecipe(format="nvfp4", activation="none"))
    cfg = SimpleNamespace(targets=["comfyui", "diffusers"], unquantized_dtype="float32", filename="m", verify=True)
    res = {r.target: r for r in export_model(model, cfg, tmp_path, progress=False)}
    assert res["comfyui"].verified and "requires input_scale" in res["diffusers"].skipped
    with safe_open(res["comfyui"].path, "pt") as f:
        assert json.loads(bytes(f.get_tensor("blocks.0.ffn.0.comfy_quant").tolist())) == {
            "format": "nvfp4", "full_precision_matrix_mult": True}
        assert "blocks.0.ffn.0.input_scale" not in set(f.keys())
        assert f.get_tensor("blocks.0.norm3.weight").dtype == torch.float32


def test_verify_detects_swapped_nibbles(nvfp4_export, tmp_path: Path) -> None:
    """A file whose nibbles were written in the other order fails verification."""
    from safetensors.torch import load_file, save_file

    from ptq.targets.base import split_model_state

    model, paths = nvfp4_export
    with safe_open(paths["comfyui"], "pt") as f:
        meta = f.metadata()
    sd = load_file(paths["comfyui"])
    sd["blocks.1.ffn.2.weight"] = (sd["blocks.1.ffn.2.weight"] << 4) | (sd["blocks.1.ffn.2.weight"] >> 4)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad), metadata=meta)
    plain, quant = split_model_state(model)
    ok, detail = verify_export(TARGETS["comfyui"], bad, plain, quant, diffusers_to_original)
    assert not ok and "blocks.1.ffn.2: dequantized weight differs" in detail


def test_same_tensors_give_the_same_bytes(tmp_path: Path) -> None:
    """Header metadata order is canonical: writing the same tensors twice (in any dict order) gives identical files,
    readable by safetensors; a stale temp file of a killed writer is removed, a live one is kept."""
    import hashlib
    import os

    from safetensors.torch import load_file

    from ptq.targets.safetensors_io import remove_stale_temp_files, save_safetensors

    tensors = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(3, dtype=torch.bfloat16),
               "c": torch.tensor([1, 2], dtype=torch.uint8), "d": torch.zeros(()), "e": torch.zeros(0)}
    meta = {f"k{i}": str(i) for i in range(20)}
    p1, p2 = tmp_path / "x.safetensors", tmp_path / "y.safetensors"
    save_safetensors(tensors, p1, meta)
    save_safetensors(dict(reversed(list(tensors.items()))), p2, dict(reversed(list(meta.items()))))
    assert hashlib.sha256(p1.read_bytes()).digest() == hashlib.sha256(p2.read_bytes()).digest()
    loaded = load_file(p1)
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with safe_open(str(p1), "pt") as f:
        assert f.metadata() == meta
    head = int.from_bytes(p1.read_bytes()[:8], "little")
    assert head % 8 == 0
    dead = tmp_path / ".model_comfyui.safetensors.999999999.tmp"
    live = tmp_path / f".model_comfyui.safetensors.{os.getpid()}.tmp"
    dead.write_bytes(b"x")
    live.write_bytes(b"x")
    assert remove_stale_temp_files(tmp_path) == [dead]
    assert live.exists() and not dead.exists()


@pytest.mark.parametrize("end", ["killed", "failed"])
def test_only_verified_exports_carry_their_final_names(random_tiny_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, end: str) -> None:
    """Files are written into a hidden staging folder and moved to their final names after verification: a run
    killed between writing and verifying (here: interrupted in the verification) or failing verification leaves no
    file under a final name; a later export into the folder removes a dead process's staging folder."""
    import ptq.targets.roundtrip as roundtrip

    model = _quantized_tiny(random_tiny_dir, QuantRecipe(format="nvfp4"))

    def stop(files, plain, quant, **kw):  # noqa: ANN001, ANN003, ANN202
        assert all(Path(p).is_file() and ".unverified." in str(p) for _, p, _ in files)
        if end == "killed":
            raise KeyboardInterrupt
        return [(False, "bad bytes")] * len(files)

    monkeypatch.setattr(roundtrip, "verify_exports", stop)
    cfg = SimpleNamespace(targets=["comfyui", "diffusers"], unquantized_dtype="bfloat16", filename="m", verify=True)
    with pytest.raises(KeyboardInterrupt if end == "killed" else RuntimeError):
        export_model(model, cfg, tmp_path, progress=False)
    visible = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert visible == [] and not list(tmp_path.glob("*.safetensors")) and not (tmp_path / "m_diffusers").exists()
    monkeypatch.undo()
    staging = next(tmp_path.glob(".unverified.*.tmp"))
    dead = staging.with_name(".unverified.999999999.tmp")  # as a killed process leaves it
    staging.rename(dead)
    results = export_model(model, cfg, tmp_path, progress=False)
    assert all(r.verified for r in results) and not dead.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m_comfyui.safetensors", "m_diffusers"]
    assert (tmp_path / "m_diffusers" / "transformer" / "config.json").is_file()
