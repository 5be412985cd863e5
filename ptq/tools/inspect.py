"""``ptq inspect``: diagnose a quantized checkpoint from its safetensors header (plus a few small scale tensors).

:func:`inspect_file` reads only the header and, unless ``read_values=False``, the small scale tensors (per-tensor
scales, block scales within a byte budget, small float tensors) to check NaN/Inf/zero/negative values. It is a
driver: the file's view (:class:`ptq.targets.inspection.FileView`: naming and architecture from the registered model
families, the per-layer formats a target declares) and the checks each file target registers
(:func:`ptq.targets.inspection.run_checks`) do the work. The result is an :class:`InspectReport`: counts by dtype,
detected convention / naming / architecture, a per-layer format table, and :class:`Problem` entries with a stable
``code``, ``severity``, affected layers, and a fix. :func:`diff_files` compares two files structurally with names
normalised across naming conventions.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ptq.models.files import Architecture, Naming, strip_prefix
from ptq.targets.conventions import Convention
from ptq.targets.file_layout import split_key, tensor_infos_from_state_dict
from ptq.targets.inspection import (
    JUDGED_LOADERS,
    PROBLEM_CODES,
    FileView,
    LayerInfo,
    Problem,
    TensorSummary,
    choose_family,
    natural_key,
    recognise,
    run_checks,
)
from ptq.targets.safetensors_header import SafetensorsHeader, TensorInfo, TensorReader, read_header

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

TARGETS = JUDGED_LOADERS
"""Loaders problems are judged against: ComfyUI (default), or ModelOpt-style names without ComfyUI metadata
(diffusers' BFL / Model Optimizer loaders, TensorRT); ``diffusers`` is an alias of ``modelopt``."""


@dataclass
class DtypeStat:
    """Number of tensors and bytes of one dtype."""

    dtype: str
    tensors: int
    bytes: int


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
        out = {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
               if f.metadata.get("report", True)}
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


def _inspect(tensors: Mapping[str, TensorInfo], metadata: Mapping[str, str],
             read_bytes: Callable[[str], bytes] | None, value_budget: int, target: str) -> InspectReport:
    """Build the view, run the judged loader's checks, assemble the report."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {sorted(TARGETS)}")
    view = recognise(FileView(tensors, metadata, read_bytes, value_budget, TARGETS[target]))
    run_checks(view)
    sev = {"error": 0, "warning": 1}
    view.problems.sort(key=lambda p: (sev.get(p.severity, 2), list(PROBLEM_CODES).index(p.code)))
    stats: dict[str, list[int]] = {}
    for info in view.tensors.values():
        s = stats.setdefault(info.dtype, [0, 0])
        s[0] += 1
        s[1] += info.nbytes
    dtypes = [DtypeStat(d, n, b) for d, (n, b) in sorted(stats.items(), key=lambda kv: -kv[1][1])]
    return InspectReport(
        path="", file_size=0, header_size=0, n_tensors=len(view.tensors),
        data_bytes=sum(i.nbytes for i in view.tensors.values()),
        metadata={k: (v if len(v) <= 200 else v[:200] + f"... ({len(v)} chars)") for k, v in view.metadata.items()},
        dtypes=dtypes, convention=view.convention, naming=view.naming, architecture=view.arch,
        format_counts=dict(Counter(layer.format for layer in view.layers).most_common()), layers=view.layers,
        problems=view.problems, notes=view.notes, values_checked=view.values_checked,
        value_bytes_read=view.value_bytes, target=view.target,
        comfyui_min_version=view.report_fields.get("comfyui_min_version"),
        comfyui_features=view.report_fields.get("comfyui_features", []))


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
        report = _inspect(header.tensors, header.metadata, reader.read_bytes if reader else None,
                          value_budget_bytes, target)
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
    """Read the header of ``path`` (raises :class:`~ptq.targets.safetensors_header.HeaderError`) and inspect it."""
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
    report = _inspect(infos, metadata or {}, lambda name: _tensor_bytes(state_dict[name]), 1 << 62, target)
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
    (fa, na), (fb, nb) = choose_family(list(a.tensors)), choose_family(list(b.tensors))
    normalize = (na.style != nb.style and "unknown" not in (na.style, nb.style)) or "mixed" in (
        na.style,
        nb.style,
    )

    def norm(tensors: Mapping[str, TensorInfo], family: Any, naming: Naming) -> dict[str, TensorInfo]:
        out: dict[str, TensorInfo] = {}
        for key, info in tensors.items():
            k = family.canonical_name(key, naming) if normalize else strip_prefix(key, naming.prefix)
            out.setdefault(k, info)
        return out

    ta, tb = norm(a.tensors, fa, na), norm(b.tensors, fb, nb)
    only_a = sorted(set(ta) - set(tb), key=natural_key)
    only_b = sorted(set(tb) - set(ta), key=natural_key)
    dtype_diffs: list[KeyDiff] = []
    shape_diffs: list[KeyDiff] = []
    changes: Counter[str] = Counter()
    for key in sorted(set(ta) & set(tb), key=natural_key):
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
