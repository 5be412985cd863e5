"""``ptq verify``: decode a quantized checkpoint independently and check it against the unquantized model.

A driver over the file targets and the model adapters. For every quantized Linear of the file:
1. its target's loader (:func:`ptq.targets.registry.target_of_file`) and format decide how it is decoded
   (:data:`ptq.targets.file_decoders.FILE_DECODERS`: table-driven, independent of the quantizers); NVFP4 is decoded
   under every packing convention and the one closest to the bf16 weight kept, so a file whose best convention
   differs from what its loader reads has its nibbles or scales in the wrong order;
2. the file's weight error is compared with ptq's own round-to-nearest quantization of the same bf16 weight;
3. the layer runs on real inputs (captured from one forward of the model on the family's example inputs) through
   the simulated kernel with the file's tensors, and its output error must be within ``tolerance`` x ptq's (+1e-3);
4. the dequantized state dict loads into the model class (strict: no missing or unexpected key).

The model comes from the adapter of the family that recognises the file (:func:`ptq.models.adapter_for_file`):
its :meth:`~ptq.models.base.ModelAdapter.reference` finds the folder, ``module_key`` maps the file's names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import safe_open

from ptq.algorithms.qlinear import QuantizedLinearState, QuantLinear
from ptq.eval.metrics import rel_l2
from ptq.formats import get_format
from ptq.models import adapter_for_file
from ptq.models.base import ReferenceCheckpoint
from ptq.targets.base import FileTarget
from ptq.targets.conventions import detect_convention
from ptq.targets.file_decoders import FILE_DECODERS, FileLayer
from ptq.targets.registry import target_of_file
from ptq.targets.safetensors_header import read_header

KNOWN_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
#: Per-layer tensors that are quantization data, not model parameters.
_AUX = {"weight_scale", "weight_scale_2", "input_scale", "comfy_quant", "scale_weight", "scale_input",
        "pre_quant_scale"}


@dataclass
class LayerCheck:
    """Result for one quantized layer (module name)."""

    name: str
    format: str
    packing: str = ""  # detected "high_first/tiled" etc. for nvfp4
    weight_err_file: float | None = None  # rel. L2 of the file's weight vs bf16
    weight_err_ptq: float | None = None  # same for ptq's own RTN quantization
    output_err_file: float | None = None
    output_err_ptq: float | None = None
    input_scale: float | None = None
    observed_amax: float | None = None
    ok: bool = True
    problems: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    path: str
    convention: str
    expected_packing: str
    tolerance: float
    layers: list[LayerCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    loads_into_diffusers: bool | None = None
    load_detail: str = ""
    #: How the text report names the module class the file loads into (the family's reference label).
    module_label: ClassVar[str] = "diffusers WanTransformer3DModel"

    @property
    def ok(self) -> bool:
        return not self.problems and all(layer.ok for layer in self.layers) and self.loads_into_diffusers is not False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


@dataclass
class _File:
    """The file under verification: its target, layer tensors by layer and suffix, and header metadata."""

    target: FileTarget
    raw: dict[str, torch.Tensor]
    groups: dict[str, dict[str, torch.Tensor]]
    metadata: dict[str, str]


def _strip_prefix(keys: list[str]) -> str:
    for p in KNOWN_PREFIXES:
        if sum(k.startswith(p) for k in keys) > len(keys) // 2:
            return p
    return ""


def _read(path: str | Path, target: FileTarget, metadata: dict[str, str], keys: list[str]) -> _File:
    prefix = _strip_prefix(keys)
    with safe_open(str(path), framework="pt") as f:
        raw = {k[len(prefix):] if prefix and k.startswith(prefix) else k: f.get_tensor(k) for k in f.keys()}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        layer, _, suffix = key.rpartition(".")
        groups.setdefault(layer, {})[suffix] = t
    return _File(target, raw, groups, metadata)


def capture_linear_inputs(model: torch.nn.Module, names: list[str], inputs: tuple[tuple, dict[str, Any]], *,
                          tokens: int = 256) -> dict[str, torch.Tensor]:
    """Inputs of the named Linears during one forward on ``inputs`` (first ``tokens`` rows)."""
    captured: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = []
    for n in names:

        def hook(_m: torch.nn.Module, args: tuple, _n: str = n) -> None:
            captured.setdefault(_n, args[0].detach().reshape(-1, args[0].shape[-1])[:tokens].clone())

        handles.append(modules[n].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*inputs[0], **inputs[1])
    finally:
        for h_ in handles:
            h_.remove()
    return captured


def _cache_dir() -> Path:
    return Path(os.environ.get("PTQ_CACHE_DIR", ".ptq_cache"))


def _wrong_model(ref: ReferenceCheckpoint, metadata: Mapping[str, str], model_path: str | None) -> str | None:
    """The problem when the file records another source model than ``ref``."""
    recorded = metadata.get("ptq_source_sha256")
    if not recorded:
        return None
    actual = ref.content_hash(_cache_dir())
    if actual == recorded:
        return None
    source = metadata.get("ptq_source_model", "?")
    return (f"wrong model: the file was made from {source!r} (transformer sha256 {recorded[:12]}), --model "
            f"{str(model_path) if model_path else 'tiny_wan'} has sha256 {actual[:12]}; pass the bf16 model the file "
            f"was quantized from (--model {source})")


def _compare(chk: LayerCheck, layer: FileLayer, w_ref: torch.Tensor, x: torch.Tensor | None,
             ref_state: Mapping[str, torch.Tensor], tolerance: float, device: str) -> None:
    """Weight and output errors of the file's layer against ptq's own round-to-nearest of the bf16 weight."""
    assert layer.state is not None and layer.weight is not None
    fmt, st = get_format(layer.format), layer.state
    out, inp = w_ref.shape
    chk.weight_err_file = rel_l2(w_ref, layer.weight)
    qw = fmt.quantize_weight(w_ref, f"{chk.name}.weight", per_channel=layer.per_channel)
    ptq_state = QuantizedLinearState(layer.format, qw.weight, qw.scale, qw.scale_2, layer.input_scale, st.bias, inp,
                                     out, st.dynamic_activations)
    chk.weight_err_ptq = rel_l2(w_ref, QuantizedLinearState(layer.format, qw.weight, qw.scale, qw.scale_2, None, None,
                                                            inp, out, st.dynamic_activations).dequantized_weight())
    if x is None:
        return
    chk.observed_amax = float(x.float().abs().max())
    y_ref = torch.nn.functional.linear(x, ref_state[f"{chk.name}.weight"], ref_state.get(f"{chk.name}.bias"))
    chk.output_err_file = rel_l2(y_ref, QuantLinear(st.to(device))(x))
    chk.output_err_ptq = rel_l2(y_ref, QuantLinear(ptq_state)(x))
    if chk.output_err_file > tolerance * chk.output_err_ptq + 1e-3:
        chk.problems.append(f"Linear output error {chk.output_err_file:.4f} exceeds {tolerance}x ptq's "
                            f"simulation ({chk.output_err_ptq:.4f})")
    if chk.input_scale is not None:
        fmax = round(1.0 / float(fmt.input_scale_from_amax(torch.tensor(1.0))), 3)
        if chk.observed_amax > 16 * fmax * chk.input_scale:
            chk.problems.append(f"input_scale {chk.input_scale:.3g} clips activations: amax "
                                f"{chk.observed_amax:.3g} > 16x its range {fmax * chk.input_scale:.3g}")


def _check_layer(file: _File, dname: str, layer_key: str, ref_state: Mapping[str, torch.Tensor],
                 x: torch.Tensor | None, tolerance: float, expected: str, device: str
                 ) -> tuple[LayerCheck, FileLayer]:
    g = file.groups[layer_key]
    conf = file.target.layer_declaration(file.raw, layer_key, file.metadata)
    fmt = file.target.file_layer_format(g, conf)
    w_ref = ref_state[f"{dname}.weight"].float()
    layer = FILE_DECODERS[fmt](g, conf, w_ref.shape[0], w_ref.shape[1], w_ref, expected, device)
    chk = LayerCheck(dname, layer.format, problems=layer.problems)
    chk.input_scale = None if layer.input_scale is None else float(layer.input_scale)
    if not layer.readable:
        chk.ok = False
        return chk, layer
    chk.packing = layer.packing
    _compare(chk, layer, w_ref, x, ref_state, tolerance, device)
    static = not get_format(layer.format).dynamic_activations
    if static and layer.input_scale is None and not file.target.weight_only_declared(file.raw, layer_key):
        chk.problems.append("no input_scale: W4A4/W8A8 kernels need a calibrated activation scale "
                            "(ComfyUI falls back to dynamic NVFP4 / unit-scale FP8 activations)")
    chk.ok = not chk.problems
    return chk, layer


def verify_file(
    path: str | Path,
    model_path: str | None,
    *,
    tolerance: float = 1.5,
    device: str = "cpu",
    check_load: bool = True,
    component: str | None = None,
) -> VerifyReport:
    """Verify ``path`` against the unquantized model at ``model_path`` (model folder, hub id in the HF cache, or
    None for the family's default); ``component``: the folder's module the file holds (default: from the file).
    Raises HeaderError for unreadable files, ModelLoadError when the model cannot be found."""
    header = read_header(path)
    conv = detect_convention(header.tensors, header.metadata)
    target = target_of_file(header.metadata, header.tensors, conv.name)
    report = VerifyReport(str(path), conv.name, target.nvfp4_packing, tolerance)
    adapter = adapter_for_file(list(header.tensors))
    ref = adapter.reference(model_path, file_name=str(path), metadata=header.metadata, component=component)
    report.module_label = ref.label
    problem = _wrong_model(ref, header.metadata, model_path)
    if problem:
        report.problems.append(problem)
        return report
    model = ref.load(device)
    ref_state = model.state_dict()
    file = _read(path, target, header.metadata, list(header.tensors))
    quant = {layer: g for layer, g in file.groups.items() if "weight" in g and target.file_layer_format(g, {})}
    if not quant:
        report.problems.append("no quantized Linear found (no uint8/float8 weight)")
    names = {_module_key(adapter, layer, target.name): layer for layer in quant}
    modules = dict(model.named_modules())
    missing = [n for n in names if not isinstance(modules.get(n), torch.nn.Linear)]
    if missing:
        report.problems.append(f"{len(missing)} quantized layers are not Linears of the model (first: {missing[0]})")
    inputs = capture_linear_inputs(model, [n for n in names if n not in missing], ref.example_inputs(model))
    dequant: dict[str, torch.Tensor] = {}
    for dname, layer_key in names.items():
        if dname in missing:
            continue
        chk, layer = _check_layer(file, dname, layer_key, ref_state, inputs.get(dname), tolerance,
                                  report.expected_packing, device)
        report.layers.append(chk)
        if layer.readable and layer.weight is not None:
            dequant[f"{dname}.weight"] = layer.weight.to(ref_state[f"{dname}.weight"].dtype)
            if "bias" in file.groups[layer_key]:
                dequant[f"{dname}.bias"] = file.groups[layer_key]["bias"]
    if check_load:
        _check_load(report, ref, model, file, adapter, quant, dequant)
    return report


def _module_key(adapter: Any, key: str, target: str) -> str:
    """The model's name of a file key (unchanged when the family's map does not know it: the load check names it)."""
    return adapter.module_key(key, target) or key


def _check_load(report: VerifyReport, ref: ReferenceCheckpoint, model: torch.nn.Module, file: _File, adapter: Any,
                quant: Mapping[str, Any], dequant: dict[str, torch.Tensor]) -> None:
    """Strict load of the dequantized, module-named state into the model class built on the meta device."""
    state: dict[str, torch.Tensor] = {}
    for layer, g in file.groups.items():
        if layer in quant:
            continue
        for suffix, t in g.items():
            if suffix not in _AUX:
                state[_module_key(adapter, f"{layer}.{suffix}", file.target.name)] = t
    report.problems += ref.unquantized_problems(state)
    state.update(dequant)
    empty = ref.empty(model)
    expected = empty.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shape_bad = [k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shape_bad:
        report.loads_into_diffusers = False
        report.load_detail = (f"missing {len(missing)} {missing[:3]}, unexpected {len(unexpected)} {unexpected[:3]}, "
                              f"shape mismatches {len(shape_bad)} {shape_bad[:3]}")
        return
    empty.load_state_dict(state, strict=True, assign=True)
    report.loads_into_diffusers = True
    report.load_detail = f"all {len(expected)} {type(empty).__name__} tensors loaded (strict)"
