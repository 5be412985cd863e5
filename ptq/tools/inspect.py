"""Diagnose a quantized checkpoint from its safetensors header (plus a few small scale tensors).

:func:`inspect_file` reads only the header and, unless ``read_values=False``, the small scale tensors (per-tensor
scales, block scales within a byte budget, small float tensors) to check NaN/Inf/zero/negative values. The
result is an :class:`InspectReport`: counts by dtype, detected convention / naming / architecture, a per-layer
format table, and :class:`Problem` entries with a stable ``code``, ``severity``, affected layers, and a fix.

The target loader is ComfyUI (``comfy/ops.py`` mixed-precision loading, ``comfy/utils.py`` ``convert_old_quants``,
``comfy/quant_ops.py`` ``QUANT_ALGOS``): problems say what ComfyUI does with the file as written.
:func:`diff_files` compares two files structurally with names normalised across naming conventions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ptq.targets.safetensors_header import (
    SafetensorsHeader,
    TensorInfo,
    TensorReader,
    bytes_to_tensor,
    read_header,
)
from ptq.tools import comfy_compat
from ptq.tools.conventions import (
    COMFY_FORMATS,
    PER_TENSOR_SCALE_SUFFIXES,
    WEIGHT_SUFFIXES,
    Architecture,
    Convention,
    Naming,
    canonical_name,
    detect_architecture,
    detect_convention,
    detect_naming,
    group_layers,
    is_packed_fp4,
    parse_quant_metadata,
    sensitive_layer_kind,
    split_key,
    strip_prefix,
    tensor_infos_from_state_dict,
    to_original_name,
    weight_suffix,
)

__all__ = [
    "PROBLEM_CODES",
    "TARGETS",
    "DiffReport",
    "DtypeStat",
    "InspectReport",
    "KeyDiff",
    "LayerInfo",
    "Problem",
    "TensorSummary",
    "diff_files",
    "diff_headers",
    "inspect_file",
    "inspect_header",
    "inspect_state_dict",
    "to_dict",
]

PROBLEM_CODES: dict[str, str] = {
    "invalid_quant_metadata": "_quantization_metadata / comfy_quant JSON is malformed",
    "unknown_quant_format": "a layer's format is not one ComfyUI core knows",
    "format_dtype_mismatch": "a layer's declared format does not match its weight dtype",
    "missing_quant_metadata": "quantized weights but no _quantization_metadata and no comfy_quant tensors",
    "quantized_layer_not_in_metadata": "quantized weights of layers that the metadata does not list",
    "metadata_layer_without_weight": "metadata lists layers that have no <layer>.weight in the file",
    "unread_scale_name": "scale tensors under names the target loader does not read",
    "missing_weight_scale": "quantized layers without their required weight scales",
    "missing_input_scale": "quantized layers without a static input_scale",
    "block_scale_shape_mismatch": "NVFP4 block-scale shape does not fit the packed weight shape",
    "block_scale_layout": "NVFP4 block scales in the layout the target loader does not expect",
    "scale_dtype": "NVFP4 block scales not stored as float8_e4m3fn",
    "scale_not_scalar": "per-tensor scales with more than one element",
    "scale_not_float32": "per-tensor scales not stored as float32",
    "nonfinite_scale": "NaN or Inf in scale tensors",
    "nonpositive_scale": "zero or negative scales",
    "zero_block_scales": "all block scales of a layer are zero (the weight dequantizes to 0)",
    "nonfinite_values": "NaN or Inf in small unquantized tensors (biases, norms, modulation)",
    "float16_base_tensors": "unquantized tensors stored as float16",
    "sensitive_layer_quantized": "layers usually kept in high precision are quantized",
    "mixed_naming": "diffusers and original Wan names in one file",
    "diffusers_naming": "ComfyUI-style quantized file with diffusers names",
    "mixed_prefix": "some keys carry the model prefix and others do not",
    "prefixed_quantized_file": "quantization metadata in a file whose keys carry model.diffusion_model.",
    "orphan_scale": "scale tensors for layers that have no weight",
    "int8_scale_shape": "int8_tensorwise weight scale neither a scalar nor one per output row [out, 1]",
    "convrot_group": "ConvRot group size not a power of 4 dividing in_features",
    "mxfp8_scale_layout": "MXFP8 block scales not E8M0 in the cuBLAS tiled shape ComfyUI reads",
    "int8_weight_only_ignored": "int8_tensorwise layers marked full_precision_matrix_mult, which ComfyUI ignores",
    "unreadable_dtype": "tensors in a dtype ComfyUI's own safetensors reader (DynamicVRAM, NVIDIA default) lacks",
    "comfyui_wan_misbuilt": "ComfyUI's WAN detection would build another model than the file holds (heads, text_dim)",
    "invalid_config_override": "the header config override is not the JSON ComfyUI reads",
    "unread_pre_quant_scale": "pre_quant_scale tensors ComfyUI does not apply (format, shape) or invalid values",
}
"""Every problem code :func:`inspect_file` can emit, with a one-line meaning."""

TARGETS = {"comfyui": "comfyui", "modelopt": "modelopt", "diffusers": "modelopt"}
"""Loaders problems are judged against: ComfyUI (default), or ModelOpt-style names without ComfyUI metadata
(diffusers' BFL / Model Optimizer loaders, TensorRT); ``diffusers`` is an alias of ``modelopt``."""

_FLOAT_DTYPES = {"F16": "fp16", "BF16": "bf16", "F32": "fp32", "F64": "fp64"}
_STORAGE_FORMATS = {"F8_E4M3": "fp8", "F8_E5M2": "fp8_e5m2", "I8": "int8", "F4": "fp4"}
_REQUIRED_DTYPE = {"nvfp4": "U8", "fp8": "F8_E4M3", "fp8_e5m2": "F8_E5M2", "mxfp8": "F8_E4M3", "int8": "I8",
                   "int8_convrot": "I8"}
#: Formats whose activation scales ComfyUI computes at run time (no input_scale): checked by _check_dynamic_formats.
_DYNAMIC_FORMATS = ("int8", "int8_convrot", "mxfp8")
_LEGACY = ("scale_weight", "scale_input")
_FOREIGN = (
    "weight_global_scale",
    "input_global_scale",
    "weight_zero_point",
    "input_zero_point",
    "weight_g_idx",
)
_NVFP4_READ = {"comfy_quant", "weight_scale", "weight_scale_2", "input_scale"}
_FP8_READ = {"comfy_quant", "weight_scale", "input_scale"}
_METADATA_FIX = (
    'add the header entry _quantization_metadata = {"format_version": "1.0", "layers": {"<layer>": {"format": '
    '"nvfp4"}}} (format "float8_e4m3fn" for FP8) listing every quantized layer by its full state-dict prefix, '
    'e.g. "blocks.0.self_attn.q"; with safetensors: save_file(tensors, path, metadata={"_quantization_metadata": '
    "json.dumps(meta)}) - or write <layer>.comfy_quant uint8 tensors holding the same per-layer JSON"
)


# --------------------------------------------------------------------------------------------- report types


@dataclass
class TensorSummary:
    """A tensor as seen in the header: key suffix (or full name), dtype string, shape."""

    name: str
    dtype: str
    shape: list[int]


@dataclass
class DtypeStat:
    """Number of tensors and bytes of one dtype."""

    dtype: str
    tensors: int
    bytes: int


@dataclass
class LayerInfo:
    """One weight-bearing layer (Linear / Conv) and how it is stored."""

    name: str
    canonical: str
    format: str
    weight: TensorSummary | None
    logical_shape: list[int]
    scales: list[TensorSummary] = field(default_factory=list)
    metadata_format: str | None = None

    @property
    def quantized(self) -> bool:
        """True when the weight is stored in a low-precision format."""
        return self.format not in ("bf16", "fp16", "fp32", "fp64", "none")


@dataclass
class Problem:
    """A diagnosed problem: stable ``code``, ``severity`` ("error" / "warning"), affected layers (``layers``: the
    first five, as the text output shows them; ``all_layers``: every one, as ``--json`` writes them), and a fix."""

    code: str
    severity: str
    message: str
    fix: str
    layers: list[str] = field(default_factory=list)
    count: int = 0
    all_layers: list[str] = field(default_factory=list)


@dataclass
class InspectReport:
    """Everything ``ptq inspect`` knows about one file."""

    path: str
    file_size: int
    header_size: int
    n_tensors: int
    data_bytes: int
    metadata: dict[str, str]
    dtypes: list[DtypeStat]
    convention: Convention
    naming: Naming
    architecture: Architecture
    format_counts: dict[str, int]
    layers: list[LayerInfo]
    problems: list[Problem]
    notes: list[str]
    values_checked: int = 0
    value_bytes_read: int = 0
    target: str = "comfyui"
    comfyui_min_version: str | None = None  # first ComfyUI release with every feature the file uses
    comfyui_features: list[dict[str, str]] = field(default_factory=list)  # per feature: what, min_version, ...

    @property
    def errors(self) -> list[Problem]:
        """Problems of severity "error"."""
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        """Problems of severity "warning"."""
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def exit_code(self) -> int:
        """1 when there is at least one error, else 0."""
        return 1 if self.errors else 0

    def codes(self) -> set[str]:
        """The set of problem codes (handy in tests)."""
        return {p.code for p in self.problems}


def to_dict(obj: Any) -> Any:
    """Dataclasses (reports, problems, ...) to plain JSON-able dicts; adds derived fields such as labels."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, Naming):
            out["label"] = obj.label
        if isinstance(obj, InspectReport):
            out["summary"] = {
                "errors": len(obj.errors),
                "warnings": len(obj.warnings),
                "exit_code": obj.exit_code,
            }
        if isinstance(obj, LayerInfo):
            out["quantized"] = obj.quantized
        if isinstance(obj, Problem):  # JSON lists every affected layer
            out["layers"] = out.pop("all_layers") or out["layers"]
        return out
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# --------------------------------------------------------------------------------------------- inspection


class _Inspector:
    """Builds an :class:`InspectReport` from header entries and an optional value reader."""

    def __init__(
        self,
        tensors: Mapping[str, TensorInfo],
        metadata: Mapping[str, str],
        read_bytes: Callable[[str], bytes] | None,
        value_budget: int,
        target: str = "comfyui",
    ) -> None:
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; expected one of {sorted(TARGETS)}")
        self.target = TARGETS[target]
        self.tensors = dict(tensors)
        self.metadata = dict(metadata)
        self.read_bytes = read_bytes
        self.value_budget = value_budget
        self.values_checked = 0
        self.value_bytes = 0
        self.problems: list[Problem] = []
        self.notes: list[str] = []

    # ---- helpers
    def problem(self, code: str, severity: str, layers: Iterable[str], message: str, fix: str) -> None:
        names = sorted(set(layers), key=_natural_key)
        self.problems.append(Problem(code, severity, message, fix, names[:5], len(names), names))

    def load(self, name: str) -> torch.Tensor | None:
        """Tensor ``name`` within the value budget (``None`` when over budget, unreadable or no reader)."""
        info = self.tensors[name]
        data = self.load_bytes(info)
        return None if data is None else bytes_to_tensor(data, info)

    # ---- main
    def run(self) -> tuple[InspectReport, dict[str, Any]]:
        naming = detect_naming(self.tensors)
        convention = detect_convention(self.tensors, self.metadata)
        groups = group_layers(self.tensors.values())
        confs = self._resolve_confs(groups, naming)
        layer_formats = {layer: _short_format(c) for layer, c in confs.items()}
        known = {
            k: v for k, v in layer_formats.items() if v != "?"
        }  # "?": comfy_quant not read (header only)
        arch = detect_architecture(self.tensors, naming, known)
        layers = self._layer_table(groups, naming, layer_formats)
        self._check_metadata_vs_storage(groups, confs, layers, convention)
        self._check_names(groups, confs, naming, convention)
        self._check_scales(groups, layers, confs, convention)
        self._check_dynamic_formats(groups, layers, confs)
        self._check_base_tensors(groups, layers, naming, arch)
        self._check_sensitive(layers, arch)
        comfy_version, comfy_features = self._check_comfyui(groups, confs, layer_formats, arch)
        if self.read_bytes is not None:
            self._check_values(groups, layers)
        self._add_notes(layers, arch, convention)
        sev = {"error": 0, "warning": 1}
        self.problems.sort(key=lambda p: (sev.get(p.severity, 2), list(PROBLEM_CODES).index(p.code)))
        stats: dict[str, list[int]] = {}
        for info in self.tensors.values():
            s = stats.setdefault(info.dtype, [0, 0])
            s[0] += 1
            s[1] += info.nbytes
        dtypes = [DtypeStat(d, n, b) for d, (n, b) in sorted(stats.items(), key=lambda kv: -kv[1][1])]
        fmt_counts = dict(Counter(layer.format for layer in layers).most_common())
        report = InspectReport(
            path="",
            file_size=0,
            header_size=0,
            n_tensors=len(self.tensors),
            data_bytes=sum(i.nbytes for i in self.tensors.values()),
            metadata={
                k: (v if len(v) <= 200 else v[:200] + f"... ({len(v)} chars)")
                for k, v in self.metadata.items()
            },
            dtypes=dtypes,
            convention=convention,
            naming=naming,
            architecture=arch,
            format_counts=fmt_counts,
            layers=layers,
            problems=self.problems,
            notes=self.notes,
            values_checked=self.values_checked,
            value_bytes_read=self.value_bytes,
            target=self.target,
            comfyui_min_version=comfy_version,
            comfyui_features=comfy_features,
        )
        return report, confs

    def _check_comfyui(self, groups: dict[str, dict[str, TensorInfo]], confs: dict[str, dict[str, Any]],
                       layer_formats: dict[str, str], arch: Architecture) -> tuple[str | None, list[dict[str, str]]]:
        """ComfyUI-only checks (``ptq.tools.comfy_compat``): WAN build from shapes + header config,
        pre_quant_scale, minimum ComfyUI release per feature."""
        if self.target != "comfyui":
            return None, []
        comfy_compat.check_reader_dtypes(self.tensors.values(), self.problem)
        comfy_compat.check_wan_build(arch, self.metadata, self.problem)
        load = self.load if self.read_bytes is not None else (lambda name: None)
        comfy_compat.check_pre_quant_scales(groups, layer_formats, load, self.problem)
        used = comfy_compat.features_used(self.metadata, groups, confs, layer_formats)
        version, rows, notes = comfy_compat.version_notes(used)
        self.notes += notes
        return version, rows

    # ---- ComfyUI's view of per-layer configs
    def _resolve_confs(
        self, groups: dict[str, dict[str, TensorInfo]], naming: Naming
    ) -> dict[str, dict[str, Any]]:
        """Per-layer quant config as ComfyUI would see it (keyed by the layer name in the file)."""
        confs: dict[str, dict[str, Any]] = {}
        bad_json: list[str] = []
        for layer, group in groups.items():
            if "comfy_quant" not in group:
                continue
            conf: Any = {"format": "?"}
            if self.read_bytes is not None:
                t = self.load(group["comfy_quant"].name)
                if t is not None:
                    try:
                        conf = json.loads(t.contiguous().view(torch.uint8).numpy().tobytes())
                    except (ValueError, RuntimeError, TypeError):
                        conf = None
            if not isinstance(conf, dict) or not isinstance(conf.get("format"), str):
                bad_json.append(layer)
                continue
            confs[layer] = conf
        if bad_json:
            self.problem(
                "invalid_quant_metadata",
                "error",
                bad_json,
                '<layer>.comfy_quant tensors that are not a JSON object with a "format" string; ComfyUI\'s '
                "loader fails on json.loads / has no format for these layers.",
                'write each comfy_quant as torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()), '
                "dtype=torch.uint8)",
            )
        qm = parse_quant_metadata(self.metadata)
        if qm.error:
            self.problem(
                "invalid_quant_metadata",
                "error",
                [],
                f"{qm.error}. ComfyUI json.loads this entry at load time and fails or skips the layers.",
                _METADATA_FIX,
            )
        if qm.present:
            missing: list[str] = []
            for name, conf in qm.layers.items():
                candidates = [name, naming.prefix + name, strip_prefix(name, naming.prefix)]
                target = next(
                    (c for c in candidates if c in groups and weight_suffix(groups[c]) == "weight"), None
                )
                if target is None:
                    missing.append(name)
                    continue
                confs[target] = dict(conf)
            if missing:
                self._report_metadata_without_weight(missing, groups, naming)
        elif any(k.rsplit(".", 1)[-1] == "scaled_fp8" for k in self.tensors):
            for layer, group in groups.items():  # ComfyUI's convert_old_quants legacy path
                if "scale_weight" in group and "weight" in group:
                    confs.setdefault(layer, {"format": "float8_e4m3fn", "_legacy": True})
        return confs

    def _report_metadata_without_weight(
        self, missing: list[str], groups: dict[str, dict[str, TensorInfo]], naming: Naming
    ) -> None:
        by_canon = {to_original_name(strip_prefix(layer, naming.prefix)): layer for layer in groups}
        renamed = {
            m: by_canon[c]
            for m in missing
            if (c := to_original_name(strip_prefix(m, naming.prefix))) in by_canon
        }
        hint = ""
        if renamed:
            first = next(iter(renamed.items()))
            hint = (
                f" {len(renamed)} of them exist under another naming convention or prefix (e.g. {first[0]!r} -> "
                f"{first[1]!r})."
            )
        self.problem(
            "metadata_layer_without_weight",
            "error",
            missing,
            "_quantization_metadata lists layers that have no <layer>.weight tensor in this file. ComfyUI "
            "attaches the per-layer format to <name>.comfy_quant; with no matching weight it is ignored, so the "
            "real layer (if it exists under another name) is loaded as plain bytes." + hint,
            "make the metadata layer names exactly the weight keys without the trailing '.weight' (same naming "
            "convention and prefix as the tensors)",
        )

    # ---- layer table
    def _layer_table(
        self, groups: dict[str, dict[str, TensorInfo]], naming: Naming, layer_formats: dict[str, str]
    ) -> list[LayerInfo]:
        out: list[LayerInfo] = []
        for layer, group in groups.items():
            ws = weight_suffix(group)
            aux = [s for s in group if s not in WEIGHT_SUFFIXES and s != "bias"]
            has_quant_aux = any(
                s in _NVFP4_READ or s in _LEGACY or s in _FOREIGN or s.endswith("_amax") or s.startswith("_")
                for s in aux
            )
            weight = group.get(ws) if ws else None
            if weight is None and not has_quant_aux:
                continue
            if weight is not None and len(weight.shape) < 2 and not has_quant_aux:
                continue  # norms, 1-D parameters
            meta_fmt = layer_formats.get(layer)
            fmt = self._storage_format(group, meta_fmt)
            shape = list(weight.shape) if weight else []
            if weight is not None and shape and is_packed_fp4(group, None if meta_fmt == "?" else meta_fmt):
                shape[-1] *= 8 if weight.dtype == "I32" else 2
            scales = [TensorSummary(s, group[s].dtype, list(group[s].shape)) for s in aux]
            out.append(
                LayerInfo(
                    name=layer,
                    canonical=canonical_name(layer, naming),
                    format=fmt,
                    weight=TensorSummary(ws, weight.dtype, list(weight.shape)) if weight and ws else None,
                    logical_shape=shape,
                    scales=scales,
                    metadata_format=meta_fmt,
                )
            )
        out.sort(key=lambda li: _natural_key(li.canonical))
        return out

    @staticmethod
    def _storage_format(group: Mapping[str, TensorInfo], meta_fmt: str | None) -> str:
        ws = weight_suffix(group)
        if ws is None:
            return "none"
        dtype = group[ws].dtype
        if meta_fmt and meta_fmt != "?":
            return meta_fmt
        if is_packed_fp4(group):
            return "nvfp4"
        scale = group.get("weight_scale")
        if dtype == "F8_E4M3" and scale is not None and (scale.dtype == "F8_E8M0" or (
                scale.dtype == "U8" and len(scale.shape) == 2)):
            return "mxfp8"
        if dtype == "U8":
            return "uint8"
        if ws == "weight_packed" and dtype == "I32":
            return "int4-packed"
        return _STORAGE_FORMATS.get(dtype) or _FLOAT_DTYPES.get(dtype, dtype.lower())

    # ---- checks
    def _check_metadata_vs_storage(
        self,
        groups: dict[str, dict[str, TensorInfo]],
        confs: dict[str, dict[str, Any]],
        layers: list[LayerInfo],
        convention: Convention,
    ) -> None:
        unknown = [
            name
            for name, c in confs.items()
            if c.get("format") not in COMFY_FORMATS and c.get("format") != "?"
        ]
        if unknown:
            fmts = sorted({str(confs[n].get("format")) for n in unknown})
            self.problem(
                "unknown_quant_format",
                "error",
                unknown,
                f"layer format(s) {fmts} are not in ComfyUI core's QUANT_ALGOS ({', '.join(COMFY_FORMATS)}); "
                "ComfyUI raises KeyError while loading (unless a custom node registers the format).",
                'use "nvfp4" for NVFP4 and "float8_e4m3fn" for FP8 E4M3',
            )
        mismatch: list[str] = []
        detail = ""
        for li in layers:
            req = _REQUIRED_DTYPE.get(li.metadata_format or "")
            if req and li.weight and li.weight.dtype != req:
                mismatch.append(li.name)
                detail = (
                    detail or f"e.g. {li.name}: format {li.metadata_format} but weight is {li.weight.dtype}"
                )
        if mismatch:
            self.problem(
                "format_dtype_mismatch",
                "error",
                mismatch,
                f"declared format does not match the stored weight dtype ({detail}). ComfyUI converts the weight "
                "with .to(storage dtype) - a numeric cast, not a reinterpretation - so the codes become garbage.",
                "store NVFP4 weights as uint8 [out, in/2] (two E2M1 codes per byte) and FP8 weights as "
                "float8_e4m3fn, or fix the per-layer format",
            )
        quant_storage = [
            li
            for li in layers
            if li.weight is not None
            and li.weight.name == "weight"
            and li.weight.dtype in ("U8", "F8_E4M3", "F8_E5M2", "I8", "F4")
            and li.name not in confs
        ]
        # FP8 weights with no scale at all are a plain "cast" checkpoint, which ComfyUI loads as such.
        quant_storage = [li for li in quant_storage if li.weight.dtype == "U8" or len(li.scales) > 0]  # type: ignore[union-attr]
        if not quant_storage or (self.target == "modelopt" and not confs):
            return
        names = [li.name for li in quant_storage]
        dts = ", ".join(sorted({li.weight.dtype for li in quant_storage}))  # type: ignore[union-attr]
        what = (
            "ComfyUI then loads the raw bytes as ordinary tensors: uint8 NVFP4 codes [out, in/2] are not "
            "dequantized (size-mismatch load error or garbage weights) and fp8 weights are used without their "
            "scales - the output is noise."
        )
        if confs:
            self.problem(
                "quantized_layer_not_in_metadata",
                "error",
                names,
                f"{len(names)} layers store quantized weights ({dts}) but are not listed in the quantization "
                f"metadata / have no comfy_quant tensor. {what}",
                "add these layers to _quantization_metadata (or write their <layer>.comfy_quant tensors)",
            )
        else:
            legacy = ""
            if convention.name == "comfyui-scaled-fp8":
                legacy = (
                    " (ComfyUI's legacy conversion only handles FP8 layers with a .scale_weight and a "
                    "scaled_fp8 marker tensor)"
                )
            self.problem(
                "missing_quant_metadata",
                "error",
                names,
                f"{len(names)} layers store quantized weights ({dts}) but the file has no _quantization_metadata "
                f"header entry and no <layer>.comfy_quant tensors{legacy}. {what}"
                + (
                    " (If the file is meant for diffusers' BFL / Model Optimizer style loaders, not ComfyUI, "
                    "inspect it with --target modelopt.)"
                    if convention.name == "modelopt"
                    else ""
                ),
                _METADATA_FIX,
            )

    def _check_names(
        self,
        groups: dict[str, dict[str, TensorInfo]],
        confs: dict[str, dict[str, Any]],
        naming: Naming,
        convention: Convention,
    ) -> None:
        qm_present = "_quantization_metadata" in self.metadata
        has_marker = any(k.rsplit(".", 1)[-1] == "scaled_fp8" for k in self.tensors)
        legacy_read = has_marker and not qm_present
        legacy: list[str] = []
        foreign: list[str] = []
        amax: list[str] = []
        ws_in_legacy: list[str] = []
        torchao: list[str] = []
        for layer, group in groups.items():
            for s in group:
                if s in _LEGACY and not (legacy_read and "weight" in group):
                    legacy.append(layer)
                elif s in _FOREIGN or s == "weight_packed":
                    foreign.append(layer)
                elif s.endswith("._amax"):
                    amax.append(layer)
                elif s.startswith(("_weight_", "_bias_")):
                    torchao.append(layer)
            if legacy_read and "weight_scale" in group and "scale_weight" not in group and layer not in confs:
                ws_in_legacy.append(layer)
        if legacy:
            why = (
                "the file has _quantization_metadata, so ComfyUI skips its legacy conversion"
                if qm_present
                else "the file has no scaled_fp8 marker tensor, so ComfyUI never converts them"
            )
            self.problem(
                "unread_scale_name",
                "error",
                legacy,
                ".scale_weight / .scale_input are the legacy (Kijai-style) FP8 names. ComfyUI renames them to "
                ".weight_scale / .input_scale only in files with a scaled_fp8 marker and no _quantization_metadata, "
                f"and only as FP8; here {why}: these scales are ignored and the layers run without them.",
                "rename <layer>.scale_weight -> <layer>.weight_scale and <layer>.scale_input -> <layer>.input_scale, "
                "and declare the layers in _quantization_metadata (format nvfp4 / float8_e4m3fn)",
            )
        if ws_in_legacy:
            self.problem(
                "unread_scale_name",
                "error",
                ws_in_legacy,
                "legacy scaled_fp8 file (scale_weight naming) in which these layers use .weight_scale instead: "
                "ComfyUI's legacy conversion only registers layers that have .scale_weight, so these weights load "
                "unscaled.",
                "use one convention: either all .scale_weight with the scaled_fp8 marker, or .weight_scale with "
                "_quantization_metadata (recommended)",
            )
        if foreign:
            self.problem(
                "unread_scale_name",
                "error",
                foreign,
                "compressed-tensors names (weight_packed / weight_global_scale / input_global_scale / zero points) "
                "are not read by ComfyUI, which looks for <layer>.weight, .weight_scale, .weight_scale_2 and "
                ".input_scale (layers without .weight are left uninitialised).",
                "rename weight_packed -> weight; store weight_scale_2 = 1/weight_global_scale and input_scale = "
                "1/input_global_scale (compressed-tensors stores reciprocal global scales); add "
                "_quantization_metadata; check nibble order and block-scale layout with ptq verify",
            )
        if torchao:
            self.problem(
                "unread_scale_name",
                "error",
                torchao,
                "torchao tensor-subclass keys (<module>._weight_qdata, ._weight_scale, ...) are not read by "
                "ComfyUI (it looks for <layer>.weight / .weight_scale / .weight_scale_2 / .input_scale).",
                "re-export with ComfyUI names (ptq run writes them) or convert: _weight_qdata -> weight, "
                "_weight_scale -> weight_scale, _weight_per_tensor_scale -> weight_scale_2, plus metadata",
            )
        if amax:
            self.problem(
                "unread_scale_name",
                "warning",
                amax,
                "TensorRT Model Optimizer *_quantizer._amax tensors are ignored by ComfyUI; calibrated activation "
                "ranges in them are lost unless converted to input_scale.",
                "write input_scale = input_quantizer._amax / (6*448) for NVFP4 (/448 for FP8) as a float32 scalar "
                "and drop the _amax tensors",
            )
        orphans = [
            layer
            for layer, group in groups.items()
            if weight_suffix(group) is None
            and any(s in _NVFP4_READ or s in _LEGACY or s in _FOREIGN for s in group)
        ]
        if orphans:
            self.problem(
                "orphan_scale",
                "warning",
                orphans,
                "scale / comfy_quant tensors for layers that have no weight tensor; no loader uses them (often a "
                "renaming or prefix mistake).",
                "rename them to the layer their weight uses, or drop them",
            )
        if naming.style == "mixed":
            self.problem(
                "mixed_naming",
                "error",
                naming.examples.get("diffusers", [])[:2] + naming.examples.get("original", [])[:2],
                f"the file mixes diffusers names ({naming.diffusers_keys} keys, e.g. blocks.N.attn1.to_q) and original "
                f"Wan names ({naming.original_keys} keys, e.g. blocks.N.self_attn.q). Any loader expects one of them: "
                "the other keys are 'unexpected' and their layers stay uninitialised (noise).",
                "rename every key to original Wan names for ComfyUI (pure rename: table in shared/README.md)",
            )
        elif naming.style == "diffusers" and convention.name == "comfyui" and self.target == "comfyui":
            self.problem(
                "diffusers_naming",
                "warning",
                [],
                "ComfyUI-style quantization metadata with diffusers key names. ComfyUI detects WAN and applies "
                "per-layer formats using original Wan names (head.modulation, blocks.N.self_attn.q, ...), which is "
                "what files in models/diffusion_models use.",
                "rename keys and metadata layer names to original Wan names (pure rename, shared/README.md)",
            )
        if naming.prefix and naming.unprefixed_keys:
            bare = [k for k in self.tensors if not k.startswith(naming.prefix)]
            self.problem(
                "mixed_prefix",
                "warning",
                bare,
                f"{naming.prefixed_keys} keys start with {naming.prefix!r} and {naming.unprefixed_keys} do not; "
                "ComfyUI strips the prefix only from keys that have it (and drops the others when loading a "
                "diffusion model from a full checkpoint).",
                "use the same prefix on every key - preferably none (models/diffusion_models convention)",
            )
        if naming.prefix and (convention.name == "comfyui" or qm_present) and self.target == "comfyui":
            names = list(parse_quant_metadata(self.metadata).layers)
            prefixed = sum(n.startswith(naming.prefix) for n in names)
            where = (
                "prefixed, so they only match when loaded as a full checkpoint"
                if prefixed > len(names) // 2
                else "unprefixed, so they only match in Load Diffusion Model (which strips the prefix first)"
            )
            self.problem(
                "prefixed_quantized_file",
                "warning",
                [],
                f"keys carry the prefix {naming.prefix!r}. ComfyUI's Load Diffusion Model strips it before applying "
                "_quantization_metadata (metadata names must then be unprefixed) while full-checkpoint loading "
                f"keeps it (names must be prefixed). Metadata names here are {where}.",
                "write diffusion-model files without the prefix, with unprefixed metadata layer names",
            )

    def _check_scales(
        self,
        groups: dict[str, dict[str, TensorInfo]],
        layers: list[LayerInfo],
        confs: dict[str, dict[str, Any]],
        convention: Convention,
    ) -> None:
        missing_ws: list[str] = []
        missing_in: list[str] = []
        bad_shape: list[str] = []
        shape_detail = ""
        rowmajor: list[str] = []
        tiled: list[str] = []
        same_layout = 0
        u8_scale: list[str] = []
        bad_dtype: list[str] = []
        not_scalar: list[str] = []
        fp8_channel: list[str] = []
        not_f32: list[str] = []
        comfy_target = self.target == "comfyui"
        for li in layers:
            if not li.quantized or li.weight is None:
                continue
            g = groups[li.name]
            fmt = li.format
            if fmt in _DYNAMIC_FORMATS:
                continue
            block = g.get("weight_scale") or g.get("scale_weight")
            if fmt == "nvfp4":
                if block is None and "_weight_scale" not in g:
                    missing_ws.append(li.name)
                elif (
                    "weight_scale_2" not in g
                    and "weight_global_scale" not in g
                    and "_weight_per_tensor_scale" not in g
                ):
                    missing_ws.append(li.name)
            elif fmt in ("fp8", "fp8_e5m2") and block is None and (li.name in confs or li.scales):
                missing_ws.append(li.name)
            if fmt in ("nvfp4", "fp8", "fp8_e5m2", "mxfp8") and not (
                {"input_scale", "scale_input", "input_global_scale", "_weight_act_per_tensor_scale"} & set(g)
            ):
                weight_only = bool(confs.get(li.name, {}).get("full_precision_matrix_mult"))
                if (li.name in confs or li.scales) and not weight_only:
                    missing_in.append(li.name)
            # per-tensor scale shapes / dtypes
            for s in PER_TENSOR_SCALE_SUFFIXES:
                if s in g:
                    info = g[s]
                    if info.numel != 1:
                        not_scalar.append(li.name)
                    elif info.dtype != "F32":
                        not_f32.append(li.name)
            if fmt in ("fp8", "fp8_e5m2") and block is not None:
                if block.numel != 1 and comfy_target:
                    fp8_channel.append(li.name)
                elif block.dtype != "F32":
                    not_f32.append(li.name)
            # NVFP4 block scales
            if fmt == "nvfp4" and block is not None and li.weight.dtype == "U8":
                wshape = li.weight.shape
                if len(wshape) != 2 or len(block.shape) != 2:
                    bad_shape.append(li.name)
                    shape_detail = (
                        shape_detail or f"{li.name}: weight {wshape}, block scale {list(block.shape)}"
                    )
                    continue
                out_f, in_f = wshape[0], wshape[1] * 2
                rm = [out_f, in_f // 16]
                tl = [_roundup(out_f, 128), _roundup(in_f // 16, 4)]
                bs = list(block.shape)
                if in_f % 16 or bs not in (rm, tl):
                    bad_shape.append(li.name)
                    shape_detail = shape_detail or (
                        f"{li.name}: weight U8 {wshape} (= [{out_f}, {in_f}] logical) needs a block scale "
                        f"[{out_f}, {in_f // 16}] (row-major) or {tl} (cuBLAS tiled), found {bs}"
                    )
                elif rm == tl:
                    same_layout += 1
                elif bs == rm:
                    rowmajor.append(li.name)
                else:
                    tiled.append(li.name)
                if block.dtype == "U8":
                    u8_scale.append(li.name)
                elif block.dtype != "F8_E4M3":
                    bad_dtype.append(li.name)
        if missing_ws:
            self.problem(
                "missing_weight_scale",
                "error",
                missing_ws,
                "quantized layers without their weight scales (NVFP4 needs .weight_scale [out, in/16] float8_e4m3fn "
                "and .weight_scale_2 float32 scalar; FP8 needs .weight_scale). ComfyUI raises 'Missing NVFP4 scales' "
                "or dequantizes without the scale.",
                "write the missing scales (ptq run exports weight_scale, weight_scale_2 and input_scale per layer)",
            )
        if missing_in:
            self.problem(
                "missing_input_scale",
                "warning",
                missing_in,
                "quantized layers without a static .input_scale. W4A4 / W8A8 kernels quantize the activation with "
                "it; without it ComfyUI's nvfp4/float8 linear computes a per-tensor activation scale from each "
                "input's amax at run time (an extra reduction per call, and not the calibrated range the checkpoint "
                "was validated with), and loaders that need static scales (TensorRT / Model Optimizer style) refuse "
                "the layer or fall back to weight-only.",
                "calibrate and write <layer>.input_scale as a float32 scalar: amax(X)/(6*448) for NVFP4, "
                "amax(X)/448 for FP8 (ptq run calibrates over the whole sampling schedule); for intentional "
                'weight-only layers set "full_precision_matrix_mult": true in the layer\'s metadata',
            )
        if bad_shape:
            self.problem(
                "block_scale_shape_mismatch",
                "error",
                bad_shape,
                f"NVFP4 block-scale shape does not match the packed weight ({shape_detail}). One scale per 16 "
                "input elements is required; a mismatch means the weight was packed/padded differently from its "
                "scales, and dequantization reads the wrong scales (or fails).",
                "pack weights as uint8 [out, in/2] with block scales [out, in/16] (ModelOpt / compressed-tensors) "
                "or to_blocked() tiled [roundup(out,128), roundup(in/16,4)] (ComfyUI)",
            )
        if rowmajor and comfy_target:
            self.problem(
                "block_scale_layout",
                "error",
                rowmajor,
                "block scales are row-major [out, in/16] but ComfyUI (comfy-kitchen TensorCoreNVFP4Layout) reads "
                "the cuBLAS tiled layout padded to [roundup(out,128), roundup(in/16,4)]: the scales are applied "
                "to the wrong blocks.",
                "convert with comfy-kitchen's to_blocked(scales) (pads to 128x4 tiles) before saving",
            )
        if tiled and not comfy_target:
            self.problem(
                "block_scale_layout",
                "error",
                tiled,
                f"block scales have the padded cuBLAS tiled shape, but {convention.label} loaders read row-major "
                "[out, in/16] block scales.",
                "convert with comfy-kitchen's from_blocked(scales, rows, cols) to row-major before saving",
            )
        if same_layout:
            self.notes.append(
                f"block-scale layout (row-major vs cuBLAS tiled) is not checkable from the header for {same_layout} "
                "layer(s) whose two layouts have the same shape; run `ptq verify FILE --model ...`"
            )
        if bad_dtype:
            self.problem(
                "scale_dtype",
                "error",
                bad_dtype,
                "NVFP4 block scales must be float8_e4m3fn; ComfyUI views the stored bytes as float8_e4m3fn, so any "
                "other dtype is reinterpreted byte-wise (wrong values and shape).",
                "store block scales as float8_e4m3fn (clamped to 448 before the cast)",
            )
        if u8_scale:
            self.problem(
                "scale_dtype",
                "warning",
                u8_scale,
                "NVFP4 block scales stored as uint8. ComfyUI views them as float8_e4m3fn (works), but loaders that "
                "cast instead of view read numbers 0..255.",
                "store block scales with dtype float8_e4m3fn",
            )
        if not_scalar:
            self.problem(
                "scale_not_scalar",
                "error",
                not_scalar,
                "per-tensor scales (weight_scale_2 / input_scale / global scales) with more than one element; the "
                "NVFP4 and FP8 layouts use one float32 value per tensor.",
                "store a single float32 value (shape [] or [1])",
            )
        if fp8_channel:
            self.problem(
                "scale_not_scalar",
                "warning",
                fp8_channel,
                "FP8 weight_scale is per-channel; ComfyUI's float8_e4m3fn layout is per-tensor (a single float32), "
                "per-channel scales only broadcast in the dequantize fallback.",
                "use one per-tensor float32 weight_scale = amax(W)/448",
            )
        if not_f32:
            self.problem(
                "scale_not_float32",
                "warning",
                not_f32,
                "per-tensor scales stored in a 16-bit dtype; loaders upcast them to float32, but the value has "
                "already lost precision (bf16 keeps 8 mantissa bits) and fp16 under/overflows small amax/(6*448).",
                "store per-tensor scales as float32",
            )

    def _check_dynamic_formats(
        self, groups: dict[str, dict[str, TensorInfo]], layers: list[LayerInfo], confs: dict[str, dict[str, Any]]
    ) -> None:
        """int8_tensorwise (with or without ConvRot) and MXFP8 layers, as ComfyUI's loader and comfy-kitchen's layouts
        read them: no input_scale needed (activations are scaled at run time)."""
        missing_ws: list[str] = []
        bad_int8: list[str] = []
        bad_group: list[str] = []
        bad_mx: list[str] = []
        not_f32: list[str] = []
        unused_in: list[str] = []
        fp_ignored: list[str] = []
        counts: Counter[str] = Counter()
        detail = {"int8": "", "mx": "", "group": ""}
        for li in layers:
            if li.format not in _DYNAMIC_FORMATS or li.weight is None or len(li.weight.shape) != 2:
                continue
            counts[li.format] += 1
            g = groups[li.name]
            out_f, in_f = li.weight.shape
            ws = g.get("weight_scale")
            if "input_scale" in g:
                unused_in.append(li.name)
            if li.format != "mxfp8" and confs.get(li.name, {}).get("full_precision_matrix_mult"):
                fp_ignored.append(li.name)
            if ws is None:
                missing_ws.append(li.name)
                continue
            if li.format == "mxfp8":
                want = [_roundup(out_f, 128), _roundup(in_f // 32, 4)]
                if in_f % 32 or out_f % 32 or list(ws.shape) != want or ws.dtype not in ("F8_E8M0", "U8"):
                    bad_mx.append(li.name)
                    detail["mx"] = detail["mx"] or (f"{li.name}: weight [{out_f}, {in_f}], weight_scale {ws.dtype} "
                                                    f"{list(ws.shape)}, expected U8 {want}")
                continue
            if ws.numel != 1 and list(ws.shape) != [out_f, 1]:
                bad_int8.append(li.name)
                detail["int8"] = detail["int8"] or f"{li.name}: weight [{out_f}, {in_f}], weight_scale {list(ws.shape)}"
            elif ws.dtype != "F32":
                not_f32.append(li.name)
            if li.format == "int8_convrot":
                gs = confs.get(li.name, {}).get("convrot_groupsize", 256)
                if not isinstance(gs, int) or not _power_of_4(gs) or in_f % gs:
                    bad_group.append(li.name)
                    detail["group"] = detail["group"] or f"{li.name}: convrot_groupsize {gs!r}, in_features {in_f}"
        self._report_dynamic_formats(missing_ws, bad_int8, bad_group, bad_mx, not_f32, detail)
        if fp_ignored:
            self.problem("int8_weight_only_ignored", "warning", fp_ignored,
                         'int8_tensorwise layers with "full_precision_matrix_mult": true: ComfyUI still runs them as '
                         "W8A8 with dynamic per-row activations (the weight keeps the compute dtype, so comfy.ops "
                         "never dequantizes it and comfy-kitchen's int8 linear quantizes the input), not as W8A16.",
                         "drop the flag (what ComfyUI computes anyway), or store the layer in bf16 / another format "
                         "for weight-only precision")
        if unused_in:
            self.notes.append(f"{len(unused_in)} int8/mxfp8 layer(s) carry an input_scale, which ComfyUI does not "
                              "use for these formats (activations are scaled at run time)")
        self._runtime_notes(counts)

    def _report_dynamic_formats(self, missing_ws: list[str], bad_int8: list[str], bad_group: list[str],
                                bad_mx: list[str], not_f32: list[str], detail: dict[str, str]) -> None:
        if missing_ws:
            self.problem("missing_weight_scale", "error", missing_ws,
                         "int8_tensorwise / mxfp8 layers without .weight_scale: ComfyUI raises 'Missing INT8 weight "
                         "scale' / 'Missing MXFP8 block scales' while loading.",
                         "write .weight_scale (int8: float32 [] or [out, 1]; mxfp8: E8M0 block scales)")
        if bad_int8:
            self.problem("int8_scale_shape", "error", bad_int8,
                         f"int8 weight_scale is neither a scalar nor [out, 1] ({detail['int8']}). comfy-kitchen "
                         "dequantizes as code * scale: a 1-D [out] scale broadcasts along the input dimension.",
                         "store one float32 scale per tensor ([]) or per output row ([out, 1])")
        if bad_group:
            self.problem("convrot_group", "error", bad_group,
                         f"ConvRot group size is not a power of 4 dividing in_features ({detail['group']}); "
                         "comfy-kitchen builds the Hadamard matrix from it and fails or rotates the wrong inputs.",
                         'write "convrot_groupsize": 256 (the default) for in_features divisible by 256')
        if bad_mx:
            self.problem("mxfp8_scale_layout", "error", bad_mx,
                         f"MXFP8 block scales do not have the layout ComfyUI reads ({detail['mx']}): one E8M0 "
                         "scale per 32 inputs in the cuBLAS tiled layout [roundup(out,128), roundup(in/32,4)], "
                         "weights a multiple of 32 in both dimensions.",
                         "tile the [out, in/32] E8M0 scales with comfy-kitchen's to_blocked and store their bytes "
                         "as uint8")
        if not_f32:
            self.problem("scale_not_float32", "warning", not_f32,
                         "int8 weight scales stored in a 16-bit dtype; comfy-kitchen multiplies in float32, but the "
                         "value has already lost precision.", "store int8 weight scales as float32")

    def _runtime_notes(self, counts: Counter[str]) -> None:
        """What ComfyUI computes for the dynamic-activation formats of the file, from the format objects' facts."""
        from ptq.formats import get_format

        for name, n in sorted(counts.items()):
            fmt = get_format(name)
            cc = ".".join(map(str, fmt.native_min_capability)) if fmt.native_min_capability else "?"
            where = ("; on CPU comfy-kitchen's eager kernel computes the same W8A8"
                     if fmt.portable_kernel else "; below that ComfyUI dequantizes the weight (W8A16 numerics)")
            self.notes.append(f"{n} {name} layer(s): W8A8 with activation scales computed at run time, native on "
                              f"CUDA compute capability >= {cc}{where}")

    def _check_base_tensors(
        self,
        groups: dict[str, dict[str, TensorInfo]],
        layers: list[LayerInfo],
        naming: Naming,
        arch: Architecture,
    ) -> None:
        f16: list[str] = []
        others: Counter[str] = Counter()
        for group in groups.values():
            for s, info in group.items():
                if (
                    s in PER_TENSOR_SCALE_SUFFIXES
                    or s in ("weight_scale", "scale_weight")
                    or s.endswith("_amax")
                ):
                    continue
                if info.dtype == "F16":
                    f16.append(info.name)
                elif info.dtype in ("BF16", "F32"):
                    others[info.dtype] += 1
        if not f16:
            return
        quantized = any(li.quantized for li in layers)
        if not quantized and not others:
            self.notes.append(
                "all tensors are float16: ComfyUI may run WAN in fp16 (risk of activation overflow); bf16 is the "
                "reference dtype"
            )
            return
        self.problem(
            "float16_base_tensors",
            "warning",
            f16,
            f"{len(f16)} unquantized tensors (biases, norms, modulation, embeddings, high-precision layers) are "
            "float16. WAN is trained and run in bf16 (diffusers keeps time_embedder, scale_shift_table and norm2 in "
            "fp32); ComfyUI picks its compute dtype from the stored weights, so an fp16 base can make it run in "
            "fp16, where WAN activations overflow (inf/NaN -> black or noisy frames); any source value above 65504 "
            "became inf in the conversion (checked below when values are read).",
            "write unquantized tensors as bfloat16 (float32 for time_embedding.*, *.modulation / scale_shift_table "
            "and blocks.N.norm3), converted from the original bf16/fp32 weights",
        )

    def _check_sensitive(self, layers: list[LayerInfo], arch: Architecture) -> None:
        """Warn about quantized embeddings / output head (small layers that dominate the error). Quantized first or
        last blocks are ptq's default and usually fine (calibrated; the report measures them), so they are not a
        problem on their own."""
        if arch.family != "wan":
            return
        hits: list[str] = []
        kinds: set[str] = set()
        for li in layers:
            if not li.quantized:
                continue
            kind = sensitive_layer_kind(li.canonical, arch.num_layers)
            if kind and kind not in ("first block", "last block"):
                hits.append(li.name)
                kinds.add(kind)
        if hits:
            self.problem(
                "sensitive_layer_quantized",
                "warning",
                hits,
                f"quantized layers that are usually kept in bf16 ({', '.join(sorted(kinds))}): they are small, see "
                "every token / the timestep signal, and dominate the quantization error.",
                "keep patch_embedding, text/time embeddings, time_projection and head.head in bf16 unless verify "
                "shows the loss is acceptable (ptq keeps patch_embedding, condition_embedder.* and proj_out by "
                "default: quant.layers.exclude)",
            )

    def _batch_float_check(
        self, items: list[tuple[str, TensorInfo]], positive: bool = True
    ) -> tuple[list[int], list[int], int]:
        """Read float tensors in one pass per dtype; indices of items with NaN/Inf and (``positive``) with
        values <= 0."""
        nonfinite: list[int] = []
        nonpos: list[int] = []
        skipped = 0
        by_dtype: dict[str, list[int]] = {}
        for idx, (_, info) in enumerate(items):
            if info.numel:
                by_dtype.setdefault(info.dtype, []).append(idx)
        for dtype, idxs in by_dtype.items():
            chunks: list[bytes] = []
            starts: list[int] = []
            kept: list[int] = []
            pos = 0
            for idx in idxs:
                data = self.load_bytes(items[idx][1])
                if data is None:
                    skipped += 1
                    continue
                chunks.append(data)
                kept.append(idx)
                starts.append(pos)
                pos += items[idx][1].numel
            if not pos:
                continue
            flat = bytes_to_tensor(b"".join(chunks), TensorInfo("", dtype, (pos,))).float()
            checks = [(~torch.isfinite(flat), nonfinite)] + ([(flat <= 0, nonpos)] if positive else [])
            for mask, out in checks:
                if bool(mask.any()):
                    per_item = np.add.reduceat(mask.numpy(), np.asarray(starts))
                    out.extend(kept[k] for k in np.flatnonzero(per_item).tolist())
        return nonfinite, nonpos, skipped

    def load_bytes(self, info: TensorInfo) -> bytes | None:
        """Raw bytes of a tensor within the value budget (``None`` when over budget or unreadable)."""
        if self.read_bytes is None or self.value_bytes + info.nbytes > self.value_budget:
            return None
        try:
            data = self.read_bytes(info.name)
        except (ValueError, KeyError, OSError) as e:
            self.notes.append(f"could not read {info.name}: {e}")
            return None
        self.value_bytes += info.nbytes
        self.values_checked += 1
        return data

    def _check_values(self, groups: dict[str, dict[str, TensorInfo]], layers: list[LayerInfo]) -> None:
        nonfinite: list[str] = []
        nonpos: list[str] = []
        zero_blocks: list[str] = []
        bad_base: list[str] = []
        nf_detail: list[str] = []
        np_detail: list[str] = []
        scales: list[tuple[str, TensorInfo]] = []
        small: list[tuple[str, TensorInfo]] = []
        for layer, group in groups.items():
            for s, info in group.items():
                if info.dtype not in _FLOAT_DTYPES:
                    continue
                if s in PER_TENSOR_SCALE_SUFFIXES or s in ("weight_scale", "scale_weight"):
                    if info.numel <= 65536 and not (s == "scale_input" and info.numel == 1):
                        scales.append((layer, info))
                elif not s.endswith("_amax") and info.nbytes <= (1 << 20):
                    small.append((layer, info))
        # 1. per-tensor scales (tiny), batched
        bad_nf, bad_np, skipped = self._batch_float_check(scales)
        for i in bad_nf:
            nonfinite.append(scales[i][0])
            nf_detail.append(f"{scales[i][1].name} is NaN/Inf")
        for i in sorted(set(bad_np) - set(bad_nf)):
            nonpos.append(scales[i][0])
            np_detail.append(f"{scales[i][1].name} <= 0")
        # 2. NVFP4 block scales, scanned as float8_e4m3fn bytes: NaN = 0x7F / 0xFF, sign bit 0x80 (0x80 = -0)
        for li in layers:
            if li.format != "nvfp4":
                continue
            group = groups[li.name]
            block = group.get("weight_scale") or group.get("scale_weight")
            if block is None or block.dtype not in ("F8_E4M3", "U8") or len(block.shape) != 2:
                continue
            data = self.load_bytes(block)
            if data is None:
                skipped += 1
                continue
            a = np.frombuffer(data, dtype=np.uint8)
            top = int(a.max()) if a.size else 0
            if top == 0:
                zero_blocks.append(li.name)
                continue
            if top < 0x7F:  # fast path: all positive and finite (E4M3 448 = 0x7E)
                continue
            mag = a & 0x7F
            nan = mag == 0x7F
            if nan.any():
                nonfinite.append(li.name)
                nf_detail.append(f"{block.name}: {int(nan.sum())} NaN block scales")
            elif ((a > 0x80) & ~nan).any():
                nonpos.append(li.name)
                np_detail.append(f"{block.name}: negative block scales")
            elif a.size and not mag.any():
                zero_blocks.append(li.name)
        # 3. small unquantized float tensors (biases, norms, modulation): fp16 overflow shows up as inf
        bad_nf, _, sk = self._batch_float_check(small, positive=False)
        skipped += sk
        bad_base = [small[i][1].name for i in bad_nf]
        if nonfinite:
            self.problem(
                "nonfinite_scale",
                "error",
                nonfinite,
                f"NaN/Inf in scale tensors ({'; '.join(nf_detail[:2])}); every output of these layers becomes NaN "
                "(black frames). Typical cause: an unclamped float8 cast (E4M3 has no Inf; overflow gives NaN).",
                "clamp to +-448 before casting block scales to float8_e4m3fn; recompute the scales from amax",
            )
        if nonpos:
            self.problem(
                "nonpositive_scale",
                "error",
                nonpos,
                f"zero or negative scales ({'; '.join(np_detail[:2])}): a "
                "zero per-tensor scale zeroes the layer (or divides by zero for input_scale), a negative one flips "
                "signs.",
                "scales are amax-based and must be > 0: use max(amax, tiny)/(6*448) (NVFP4) or /448 (FP8)",
            )
        if zero_blocks:
            self.problem(
                "zero_block_scales",
                "error",
                zero_blocks,
                "every block scale of these layers is 0, so the weight dequantizes to all zeros.",
                "recompute block scales = block_amax / (6 * weight_scale_2), clamped to 448, in float8_e4m3fn",
            )
        if bad_base:
            self.problem(
                "nonfinite_values",
                "error",
                bad_base,
                "NaN/Inf in unquantized tensors (biases, norms, modulation) - e.g. a bf16/fp32 -> fp16 conversion "
                "that overflowed; the model outputs NaN.",
                "re-export these tensors from the original bf16/fp32 weights",
            )
        if skipped:
            self.notes.append(
                f"value checks skipped {skipped} tensors (value byte budget {self.value_budget / 2**20:.0f} MiB "
                "reached or tensor unreadable)"
            )

    def _add_notes(self, layers: list[LayerInfo], arch: Architecture, convention: Convention) -> None:
        if any(li.format == "nvfp4" for li in layers):
            self.notes.insert(
                0,
                "nibble order: not checkable from the header (both orders have identical shapes and per-block code "
                "sets); run `ptq verify FILE --model ...`",
            )
        if arch.missing_blocks:
            self.notes.append(f"blocks missing from the numbering: {arch.missing_blocks[:10]}")
        if convention.also_seen:
            self.notes.append(f"evidence of other conventions too: {', '.join(convention.also_seen)}")
        if self.target == "comfyui":
            self.notes.append(
                "problems are judged against ComfyUI's loader (the deployment target; --target modelopt "
                "for diffusers' BFL / Model Optimizer style loaders)"
            )
        else:
            self.notes.append(
                "problems are judged against ModelOpt-style loaders (diffusers' BFL quantizer, "
                "TensorRT Model Optimizer): row-major block scales, no ComfyUI metadata needed"
            )


def _short_format(conf: Mapping[str, Any]) -> str:
    """Report name of a layer's ComfyUI config: ``COMFY_FORMATS`` short names, ``int8_convrot`` for int8 + ConvRot."""
    name = COMFY_FORMATS.get(str(conf.get("format")), str(conf.get("format")))
    return "int8_convrot" if name == "int8" and conf.get("convrot") else name


def _power_of_4(n: int) -> bool:
    return n >= 4 and n & (n - 1) == 0 and (n.bit_length() - 1) % 2 == 0


def _roundup(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def inspect_header(
    header: SafetensorsHeader,
    *,
    read_values: bool = True,
    value_budget_bytes: int = 512 * 1024 * 1024,
    target: str = "comfyui",
) -> InspectReport:
    """Inspect a parsed header; with ``read_values`` also reads small scale tensors from ``header.path``.

    ``target`` is the loader problems are judged against (see :data:`TARGETS`).
    """
    reader = TensorReader(header.path, header) if read_values else None
    try:
        ins = _Inspector(
            header.tensors, header.metadata, reader.read_bytes if reader else None, value_budget_bytes, target
        )
        report, _ = ins.run()
    finally:
        if reader is not None:
            reader.close()
    report.path = header.path
    report.file_size = header.file_size
    report.header_size = header.header_size
    return report


def inspect_file(
    path: str | os.PathLike[str],
    *,
    read_values: bool = True,
    value_budget_bytes: int = 512 * 1024 * 1024,
    target: str = "comfyui",
) -> InspectReport:
    """Read the header of ``path`` (raises :class:`~ptq.tools.safetensors_header.HeaderError`) and inspect it."""
    return inspect_header(
        read_header(path), read_values=read_values, value_budget_bytes=value_budget_bytes, target=target
    )


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def inspect_state_dict(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, target: str = "comfyui"
) -> InspectReport:
    """Inspect an in-memory state dict (e.g. before ``save_file``) with the same checks as a file."""
    infos = tensor_infos_from_state_dict(state_dict)
    ins = _Inspector(infos, metadata or {}, lambda name: _tensor_bytes(state_dict[name]), 1 << 62, target)
    report, _ = ins.run()
    report.path = "<state_dict>"
    report.file_size = report.data_bytes
    return report


# --------------------------------------------------------------------------------------------- diff


@dataclass
class KeyDiff:
    """A key present in both files with a different dtype or shape (names as normalised for the diff)."""

    key: str
    a_dtype: str
    b_dtype: str
    a_shape: list[int]
    b_shape: list[int]


@dataclass
class DiffReport:
    """Structural difference between two files."""

    a_path: str
    b_path: str
    a_naming: str
    b_naming: str
    a_prefix: str
    b_prefix: str
    normalized_names: bool
    common: int
    only_in_a: list[str]
    only_in_b: list[str]
    dtype_diffs: list[KeyDiff]
    shape_diffs: list[KeyDiff]
    only_in_a_groups: dict[str, int] = field(default_factory=dict)
    only_in_b_groups: dict[str, int] = field(default_factory=dict)
    dtype_change_groups: dict[str, int] = field(default_factory=dict)
    only_in_a_suffixes: dict[str, int] = field(default_factory=dict)
    only_in_b_suffixes: dict[str, int] = field(default_factory=dict)
    dtype_transitions: dict[str, int] = field(default_factory=dict)

    @property
    def identical(self) -> bool:
        """True when both files have the same keys, dtypes and shapes (after normalisation)."""
        return not (self.only_in_a or self.only_in_b or self.dtype_diffs or self.shape_diffs)


def _pattern(key: str) -> str:
    return re.sub(r"(?<=blocks\.)\d+(?=\.)", "*", key)


def diff_headers(a: SafetensorsHeader, b: SafetensorsHeader) -> DiffReport:
    """Compare two headers key by key; names are normalised (prefix stripped, diffusers -> original) as needed."""
    na, nb = detect_naming(a.tensors), detect_naming(b.tensors)
    normalize = (na.style != nb.style and "unknown" not in (na.style, nb.style)) or "mixed" in (
        na.style,
        nb.style,
    )

    def norm(tensors: Mapping[str, TensorInfo], naming: Naming) -> dict[str, TensorInfo]:
        out: dict[str, TensorInfo] = {}
        for key, info in tensors.items():
            k = canonical_name(key, naming) if normalize else strip_prefix(key, naming.prefix)
            out.setdefault(k, info)
        return out

    ta, tb = norm(a.tensors, na), norm(b.tensors, nb)
    only_a = sorted(set(ta) - set(tb), key=_natural_key)
    only_b = sorted(set(tb) - set(ta), key=_natural_key)
    dtype_diffs: list[KeyDiff] = []
    shape_diffs: list[KeyDiff] = []
    changes: Counter[str] = Counter()
    for key in sorted(set(ta) & set(tb), key=_natural_key):
        ia, ib = ta[key], tb[key]
        d = KeyDiff(key, ia.dtype, ib.dtype, list(ia.shape), list(ib.shape))
        if ia.dtype != ib.dtype:
            dtype_diffs.append(d)
            changes[f"{_pattern(key)}: {ia.dtype} -> {ib.dtype}"] += 1
        if ia.shape != ib.shape:
            shape_diffs.append(d)
    return DiffReport(
        a_path=a.path,
        b_path=b.path,
        a_naming=na.style,
        b_naming=nb.style,
        a_prefix=na.prefix,
        b_prefix=nb.prefix,
        normalized_names=normalize,
        common=len(set(ta) & set(tb)),
        only_in_a=only_a,
        only_in_b=only_b,
        dtype_diffs=dtype_diffs,
        shape_diffs=shape_diffs,
        only_in_a_groups=dict(Counter(_pattern(k) for k in only_a).most_common()),
        only_in_b_groups=dict(Counter(_pattern(k) for k in only_b).most_common()),
        dtype_change_groups=dict(changes.most_common()),
        only_in_a_suffixes=dict(Counter("*." + split_key(k)[1] for k in only_a).most_common()),
        only_in_b_suffixes=dict(Counter("*." + split_key(k)[1] for k in only_b).most_common()),
        dtype_transitions=dict(Counter(f"{d.a_dtype} -> {d.b_dtype}" for d in dtype_diffs).most_common()),
    )


def diff_files(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> DiffReport:
    """Structural diff of two safetensors files (headers only)."""
    return diff_headers(read_header(a), read_header(b))
