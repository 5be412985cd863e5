"""``ptq inspect``'s view of one file and the registry of its checks.

:class:`FileView` holds a file's header entries (and, within a byte budget, small tensors' values), grouped by layer,
with what the registered model families (:func:`ptq.models.file_families`) and file targets recognise in it: the
naming, the convention, the per-layer formats the file declares, the architecture and a per-layer table. Checks are
functions registered with :func:`register_check` (one per problem code, in the target folder whose loader they
describe); :func:`run_checks` runs those of the judged loader in their order, and they report through
:meth:`FileView.problem` (a stable code from :data:`PROBLEM_CODES`) and :attr:`FileView.notes`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ptq.formats import FORMATS
from ptq.models import file_families
from ptq.models.files import Architecture, FileFamily, Naming
from ptq.targets.conventions import Convention, detect_convention
from ptq.targets.file_layout import (
    COMFY_READ_SUFFIXES,
    FLOAT_DTYPES,
    FOREIGN_SUFFIXES,
    LEGACY_SCALE_SUFFIXES,
    STORAGE_FORMATS,
    WEIGHT_SUFFIXES,
    group_layers,
    is_aux,
    is_packed_fp4,
    logical_numel,
    weight_suffix,
)
from ptq.targets.safetensors_header import TensorInfo, bytes_to_tensor

#: Every problem code ``ptq inspect`` can emit, with a one-line meaning; reports list problems in this order.
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

#: The loaders a file can be judged against (``ptq inspect --target``): ComfyUI (default), or ModelOpt-style names
#: without ComfyUI metadata (diffusers' BFL / Model Optimizer loaders, TensorRT); ``diffusers`` = ``modelopt``.
JUDGED_LOADERS = {"comfyui": "comfyui", "modelopt": "modelopt", "diffusers": "modelopt"}


@dataclass
class TensorSummary:
    """A tensor as seen in the header: key suffix (or full name), dtype string, shape."""

    name: str
    dtype: str
    shape: list[int]


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


def natural_key(name: str) -> list[Any]:
    """Sort key that orders ``blocks.2`` before ``blocks.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def dynamic_format(name: str) -> bool:
    """Whether ``name`` is a ptq number format whose activations are scaled at run time (no input_scale)."""
    return name in FORMATS and FORMATS[name].dynamic_activations


def choose_family(keys: list[str]) -> tuple[FileFamily, Naming]:
    """The first registered family that recognises ``keys`` (its naming), else the first family's view."""
    families = file_families()
    views = [(f, f.naming(keys)) for f in families]
    return next(((f, n) for f, n in views if n.style != "unknown"), views[0])


def detect_naming(keys: Iterable[str]) -> Naming:
    """The naming of ``keys`` as the registered families see it (:func:`choose_family`)."""
    return choose_family(list(keys))[1]


def canonical_layers(groups: Mapping[str, Mapping[str, TensorInfo]], family: FileFamily, naming: Naming,
                     layer_formats: Mapping[str, str]) -> tuple[dict[str, dict[str, list[int]]], int]:
    """(canonical layer -> model-parameter suffix -> logical shape, with ``weight`` the unpacked weight shape;
    logical parameter count) of the file's layers: what :meth:`FileFamily.architecture` reads."""
    layers: dict[str, dict[str, list[int]]] = {}
    params = 0
    for layer, group in groups.items():
        packed = is_packed_fp4(group, layer_formats.get(layer))
        fmt = FORMATS.get(layer_formats.get(layer, ""))
        per_byte = fmt.codes_per_element if fmt is not None and not packed else 1  # e.g. int4 codes in int8 bytes
        shapes: dict[str, list[int]] = {}
        for suffix, info in group.items():
            if is_aux(suffix) or suffix == "scaled_fp8":
                continue
            weight = suffix in WEIGHT_SUFFIXES
            params += logical_numel(info, packed and weight) * (per_byte if weight else 1)
            shapes[suffix] = list(info.shape)
        ws = weight_suffix(group)
        if ws is not None:
            shape = list(group[ws].shape)
            if shape and packed:
                shape[-1] *= 8 if group[ws].dtype == "I32" else 2
            elif shape:
                shape[-1] *= per_byte
            shapes["weight"] = shape
        layers[family.canonical_name(layer, naming) if layer else ""] = shapes
    return layers, params


def detect_architecture(tensors: Mapping[str, TensorInfo], naming: Naming | None = None,
                        layer_formats: Mapping[str, str] | None = None) -> Architecture:
    """The architecture of a file's tensors as the family that recognises them reads it; ``params`` is the logical
    count (an NVFP4 byte counts as 2 weights); ``layer_formats``: file layer -> short format where declared."""
    family, detected = choose_family(list(tensors))
    layers, params = canonical_layers(group_layers(tensors.values()), family, naming or detected,
                                      layer_formats or {})
    return family.architecture(layers, params)


class FileView:
    """One file under inspection (see the module docstring): header entries, what was recognised in them, the
    problems and notes found so far, and budgeted access to small tensors' values."""

    def __init__(self, tensors: Mapping[str, TensorInfo], metadata: Mapping[str, str],
                 read_bytes: Callable[[str], bytes] | None, value_budget: int, target: str) -> None:
        self.tensors = dict(tensors)
        self.metadata = dict(metadata)
        self.read_bytes = read_bytes
        self.value_budget = value_budget
        self.target = target
        self.values_checked = 0
        self.value_bytes = 0
        self.problems: list[Problem] = []
        self.notes: list[str] = []
        self.cache: dict[str, Any] = {}  # surveys several checks share, by name
        self.report_fields: dict[str, Any] = {}  # target-specific report fields (ComfyUI's minimum release)
        self.family, self.naming = choose_family(list(self.tensors))
        self.convention: Convention = detect_convention(self.tensors, self.metadata)
        self.groups = group_layers(self.tensors.values())
        self.declared: Any = None  # the per-layer declarations a target resolved (ComfyUI: its resolution)
        self.confs: dict[str, dict[str, Any]] = {}
        self.layer_formats: dict[str, str] = {}
        self.arch = Architecture("unknown", "")
        self.layers: list[LayerInfo] = []

    def recognise(self, declared: Any, confs: dict[str, dict[str, Any]], layer_formats: dict[str, str]) -> None:
        """Set the per-layer declarations, then derive the architecture and the layer table from them."""
        self.declared, self.confs, self.layer_formats = declared, confs, layer_formats
        known = {k: v for k, v in layer_formats.items() if v != "?"}  # "?": comfy_quant not read (header only)
        layers, params = canonical_layers(self.groups, self.family, self.naming, known)
        self.arch = self.family.architecture(layers, params, self.metadata)
        self.layers = layer_table(self.groups, self.family, self.naming, layer_formats)

    # -- reporting ----------------------------------------------------------------------------------------------
    def problem(self, code: str, severity: str, layers: Iterable[str], message: str, fix: str) -> None:
        """Record a problem of ``code`` (:data:`PROBLEM_CODES`) on ``layers``."""
        if code not in PROBLEM_CODES:
            raise KeyError(f"problem code {code!r} is not in PROBLEM_CODES")
        names = sorted(set(layers), key=natural_key)
        self.problems.append(Problem(code, severity, message, fix, names[:5], len(names), names))

    # -- values -------------------------------------------------------------------------------------------------
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

    def load(self, name: str) -> torch.Tensor | None:
        """Tensor ``name`` within the value budget (``None`` when over budget, unreadable or no reader)."""
        info = self.tensors[name]
        data = self.load_bytes(info)
        return None if data is None else bytes_to_tensor(data, info)

    def batch_float_check(self, items: list[tuple[str, TensorInfo]],
                          positive: bool = True) -> tuple[list[int], list[int], int]:
        """Read float tensors in one pass per dtype; indices of items with NaN/Inf and (``positive``) with values
        <= 0, and the number skipped (over budget or unreadable)."""
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


def storage_format(group: Mapping[str, TensorInfo], meta_fmt: str | None) -> str:
    """A layer's format as stored: the declared one when known, else recognised from dtypes and shapes."""
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
    return STORAGE_FORMATS.get(dtype) or FLOAT_DTYPES.get(dtype, dtype.lower())


def layer_table(groups: Mapping[str, Mapping[str, TensorInfo]], family: FileFamily, naming: Naming,
                layer_formats: Mapping[str, str]) -> list[LayerInfo]:
    """Every weight-bearing layer (2-D+ weights, or any layer with quantization tensors), canonical order."""
    out: list[LayerInfo] = []
    for layer, group in groups.items():
        ws = weight_suffix(group)
        aux = [s for s in group if s not in WEIGHT_SUFFIXES and s != "bias"]
        has_quant_aux = any(s in COMFY_READ_SUFFIXES or s in LEGACY_SCALE_SUFFIXES or s in FOREIGN_SUFFIXES
                            or s.endswith("_amax") or s.startswith("_") for s in aux)
        weight = group.get(ws) if ws else None
        if weight is None and not has_quant_aux:
            continue
        if weight is not None and len(weight.shape) < 2 and not has_quant_aux:
            continue  # norms, 1-D parameters
        meta_fmt = layer_formats.get(layer)
        shape = list(weight.shape) if weight else []
        if weight is not None and shape and is_packed_fp4(group, None if meta_fmt == "?" else meta_fmt):
            shape[-1] *= 8 if weight.dtype == "I32" else 2
        out.append(LayerInfo(
            name=layer, canonical=family.canonical_name(layer, naming), format=storage_format(group, meta_fmt),
            weight=TensorSummary(ws, weight.dtype, list(weight.shape)) if weight and ws else None,
            logical_shape=shape, scales=[TensorSummary(s, group[s].dtype, list(group[s].shape)) for s in aux],
            metadata_format=meta_fmt))
    out.sort(key=lambda li: natural_key(li.canonical))
    return out


# -------------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Check:
    """A registered check: the problem ``code`` it reports (or a ``note:...`` name for one that only adds notes),
    the judged loaders it applies to (None: all), its place in the run (``order``, then registration) and the
    function ``fn(view)``."""

    code: str
    fn: Callable[[FileView], None]
    order: float
    loaders: tuple[str, ...] | None = None


CHECKS: list[Check] = []


def register_check(code: str, *, order: float, loaders: tuple[str, ...] | None = None
                   ) -> Callable[[Callable[[FileView], None]], Callable[[FileView], None]]:
    """Decorator: register ``fn(view)`` as the check of ``code`` (a :data:`PROBLEM_CODES` key or ``note:<name>``)
    for ``loaders`` (None: every judged loader), run at ``order``."""
    if code not in PROBLEM_CODES and not code.startswith("note:"):
        raise KeyError(f"problem code {code!r} is not in PROBLEM_CODES")

    def deco(fn: Callable[[FileView], None]) -> Callable[[FileView], None]:
        CHECKS.append(Check(code, fn, order, loaders))
        return fn

    return deco


#: Readers of the per-layer formats a file declares: ``fn(view) -> (declaration, confs, layer formats)`` or None
#: when the file carries none of that target's declarations; the first that answers wins.
DECLARATION_READERS: list[Callable[[FileView], tuple[Any, dict[str, dict[str, Any]], dict[str, str]] | None]] = []


def recognise(view: FileView) -> FileView:
    """Resolve ``view``'s declared per-layer formats (:data:`DECLARATION_READERS`; importing :mod:`ptq.targets`
    registers every target's), architecture and layer table."""
    for reader in DECLARATION_READERS:
        found = reader(view)
        if found is not None:
            view.recognise(*found)
            return view
    view.recognise(None, {}, {})
    return view


def run_checks(view: FileView) -> None:
    """Every registered check that applies to ``view.target``, in order (importing :mod:`ptq.targets` registers
    the checks of every target)."""
    ranked = sorted(enumerate(CHECKS), key=lambda ic: (ic[1].order, ic[0]))
    for _, check in ranked:
        if check.loaders is None or view.target in check.loaders:
            check.fn(view)


__all__ = ["CHECKS", "DECLARATION_READERS", "JUDGED_LOADERS", "PROBLEM_CODES", "Check", "FileView", "LayerInfo", "Problem", "TensorSummary",
           "canonical_layers", "choose_family", "detect_architecture", "detect_naming", "dynamic_format",
           "layer_table", "natural_key", "recognise", "register_check", "run_checks", "storage_format"]
