"""Every ComfyUI export is readable by ComfyUI's own safetensors reader (``comfy.utils.load_safetensors``), the path
"Load Diffusion Model" takes with DynamicVRAM, ComfyUI's default on NVIDIA GPUs outside WSL. That reader maps each
header dtype through a fixed table and raises ``KeyError`` for any other (ptq's MXFP8 files once stored their E8M0
scales as ``F8_E8M0`` and failed on the GPU while loading on the CPU). The table below is the oracle, copied from
ComfyUI 0.30.0 ``comfy/utils.py`` ``_TYPES`` (``scripts/comfyui_crosscheck.py dtypes`` compares ptq's table with a
ComfyUI checkout's)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ptq.algorithms.quantize import quantize_, quantized_layers
from ptq.algorithms.recipe import LayerSelection, QuantRecipe
from ptq.calibration.observers import LinearInputObserver
from ptq.targets import export_model
from ptq.targets.base import UnsupportedExport
from ptq.targets.comfyui.layout import READER_DTYPES
from ptq.targets.comfyui.target import ComfyUITarget
from ptq.tools.inspect import inspect_file

#: ComfyUI 0.30.0 comfy/utils.py ``_TYPES`` (the reader's whole dtype table).
COMFYUI_TYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64, "U64": torch.uint64,
    "U32": torch.uint32, "U16": torch.uint16,
}  # fmt: skip

#: (format, activation method) of every ComfyUI file ptq writes, weight-only variants included.
FILES = [("fp8", "max"), ("fp8", "none"), ("nvfp4", "max"), ("nvfp4", "none"), ("int8", "dynamic"),
         ("int8_convrot", "dynamic"), ("mxfp8", "dynamic"), ("mxfp8", "none")]


def read_like_comfyui(path: Path) -> dict[str, torch.Tensor]:
    """``comfy.utils.load_safetensors``'s decoding (header -> ``torch.frombuffer`` through the dtype table), over a
    plain read of the file instead of comfy-aimdo's memory map."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = bytearray(data[8 + n:])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = COMFYUI_TYPES[info["dtype"]]  # KeyError: what ComfyUI raises
        out[name] = (torch.empty(info["shape"], dtype=dtype) if start == end
                     else torch.frombuffer(body[start:end], dtype=dtype).view(info["shape"]))
    return out


def _quantized(fmt: str, activation: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).to(torch.bfloat16)
    x = torch.randn(64, 256).to(torch.bfloat16)
    with LinearInputObserver(model) as obs, torch.no_grad():
        model(x)
    quantize_(model, QuantRecipe(format=fmt, activation=activation, layers=LayerSelection(exclude=[])),
              obs.stats(), progress=False)
    return model


def _export(tmp_path: Path, fmt: str, activation: str) -> tuple[Path, nn.Module]:
    model = _quantized(fmt, activation)
    cfg = SimpleNamespace(targets=["comfyui"], unquantized_dtype="bfloat16", filename="m", verify=True)
    (res,) = export_model(model, cfg, tmp_path, progress=False, key_maps={"comfyui": str})
    assert res.verified, res.verify_detail
    return Path(res.path), model


def test_ptqs_reader_table_is_comfyuis() -> None:
    assert set(READER_DTYPES) == set(COMFYUI_TYPES)


@pytest.mark.parametrize(("fmt", "activation"), FILES)
def test_every_export_loads_through_comfyuis_own_reader(tmp_path: Path, fmt: str, activation: str) -> None:
    path, model = _export(tmp_path, fmt, activation)
    theirs = read_like_comfyui(path)
    ours = load_file(path)
    assert set(theirs) == set(ours)
    for key, t in ours.items():
        a, b = theirs[key].reshape(-1), t.reshape(-1)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), key
    if fmt != "mxfp8":
        return
    # ComfyUI's layer loader views the uint8 scales as E8M0 (comfy/ops.py pop_scale(..., torch.float8_e8m0fnu))
    # and comfy-kitchen's MXFP8 layout decodes exactly ptq's weight.
    pytest.importorskip("comfy_kitchen")
    from comfy_kitchen.tensor.mxfp8 import TensorCoreMXFP8Layout

    for name, layer in quantized_layers(model).items():
        scale = theirs[f"{name}.weight_scale"]
        assert scale.dtype == torch.uint8
        params = TensorCoreMXFP8Layout.Params(scale=scale.view(torch.float8_e8m0fnu), orig_dtype=torch.bfloat16,
                                              orig_shape=(layer.out_features, layer.in_features))
        deq = TensorCoreMXFP8Layout.dequantize(theirs[f"{name}.weight"], params)
        assert torch.equal(deq, layer.dequantized_weight(torch.bfloat16))


def test_an_e8m0_file_fails_comfyuis_reader_and_inspect_says_so(tmp_path: Path) -> None:
    """The file ptq wrote before: the same bytes with the scales typed F8_E8M0."""
    path, _ = _export(tmp_path, "mxfp8", "dynamic")
    assert "unreadable_dtype" not in inspect_file(path).codes()
    tensors = load_file(path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    old = {k: v.view(torch.float8_e8m0fnu) if k.endswith("weight_scale") else v for k, v in tensors.items()}
    old_path = tmp_path / "old.safetensors"
    save_file(old, old_path, metadata=meta)
    with pytest.raises(KeyError, match="F8_E8M0"):
        read_like_comfyui(old_path)
    report = inspect_file(old_path)
    problem = next(p for p in report.problems if p.code == "unreadable_dtype")
    assert problem.severity == "error" and problem.count == 2
    assert "KeyError: 'F8_E8M0'" in problem.message and "uint8" in problem.fix


def test_the_exporter_refuses_a_dtype_comfyui_cannot_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def e8m0_writer(layer, state, dtype):  # noqa: ANN001, ANN202
        out = dict(original(layer, state, dtype))
        out[f"{layer}.weight_scale"] = out[f"{layer}.weight_scale"].view(torch.float8_e8m0fnu)
        return out

    original = ComfyUITarget.writers["mxfp8"]
    monkeypatch.setitem(ComfyUITarget.writers, "mxfp8", e8m0_writer)
    model = _quantized("mxfp8", "dynamic")
    with pytest.raises(UnsupportedExport, match="dtype F8_E8M0 is not one the comfyui loader reads"):
        ComfyUITarget().write({}, {n: m.state() for n, m in quantized_layers(model).items()}, tmp_path, "x",
                                dtype=torch.bfloat16, key_map=str, metadata={}, module_config={})
    assert not list(tmp_path.glob("x*"))
    cfg = SimpleNamespace(targets=["comfyui"], unquantized_dtype="bfloat16", filename="y", verify=True)
    (res,) = export_model(model, cfg, tmp_path, progress=False, key_maps={"comfyui": str})
    assert "F8_E8M0" in res.skipped and not res.path and not list(tmp_path.glob("y*"))
