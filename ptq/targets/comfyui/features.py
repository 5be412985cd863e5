"""Which ComfyUI release reads each feature a file uses: the first release containing the commit that added it (read
from the history of ComfyUI master, ``comfyui_version.py`` per release). Model families add the features of their
own header entries (:meth:`ptq.models.files.FileFamily.features`, e.g. WAN's ``config`` override)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ptq.targets.safetensors_header import TensorInfo


@dataclass(frozen=True)
class ComfyFeature:
    """A loader feature and the first ComfyUI release that has it (``commit``: the change that added it);
    ``silent``: older releases load the file without error but ignore it, and the model computes wrong."""

    what: str
    version: str
    date: str
    commit: str
    silent: bool = False


#: Features a ptq file may use, by key. Per-layer formats are keyed by their short name
#: (:data:`ptq.targets.comfyui.layout.COMFY_FORMATS` values): one entry per format.
COMFYUI_FEATURES: dict[str, ComfyFeature] = {
    "quant_metadata": ComfyFeature("per-layer quantization metadata (comfy_quant / _quantization_metadata)",
                                   "0.3.69", "2025-11-17", "3b3ef9a7"),
    "full_precision_matrix_mult": ComfyFeature("weight-only layers (comfy_quant full_precision_matrix_mult)",
                                               "0.3.72", "2025-11-25", "25022e0b"),
    "fp8": ComfyFeature("float8_e4m3fn layers", "0.3.69", "2025-11-17", "3b3ef9a7"),
    "nvfp4": ComfyFeature("nvfp4 layers", "0.8.0", "2026-01-07", "6da00dd8"),
    "mxfp8": ComfyFeature("mxfp8 layers", "0.18.0", "2026-03-20", "1c5db739"),
    "int8": ComfyFeature("int8_tensorwise layers", "0.27.0", "2026-06-30", "1a510f04"),
    "int8_convrot": ComfyFeature("int8_tensorwise layers with convrot", "0.27.0", "2026-06-30", "1a510f04"),
    "convrot_w4a4": ComfyFeature("convrot_w4a4 layers", "0.28.0", "2026-07-15", "73e84d5e"),
    "convrot_w4a8": ComfyFeature("convrot_w4a4 layers with linear_dtype int8", "0.28.0", "2026-07-15", "73e84d5e"),
    "pre_quant_scale": ComfyFeature("nvfp4 pre_quant_scale (input smoothing)", "0.30.0", "2026-08-02", "57500fc5",
                                    silent=True),
}


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def features_used(metadata: Mapping[str, str], groups: Mapping[str, Mapping[str, TensorInfo]],
                  confs: Mapping[str, Mapping[str, Any]], layer_formats: Mapping[str, str],
                  family: Mapping[str, ComfyFeature]) -> tuple[list[str], dict[str, ComfyFeature]]:
    """(keys of the features the file relies on, in report order; the table with the family's features added)."""
    table = {**COMFYUI_FEATURES, **family}
    used: list[str] = []
    if confs:
        used.append("quant_metadata")
    if any(c.get("full_precision_matrix_mult") for c in confs.values()):
        used.append("full_precision_matrix_mult")
    used += sorted({f for f in layer_formats.values() if f in COMFYUI_FEATURES})
    used += list(family)
    if any("pre_quant_scale" in g for g in groups.values()):
        used.append("pre_quant_scale")
    return used, table


def version_notes(used: Iterable[str], table: Mapping[str, ComfyFeature]
                  ) -> tuple[str | None, list[dict[str, str]], list[str]]:
    """(minimum ComfyUI release, per-feature rows, notes) for the report; the notes name features whose absence in
    older releases changes results silently."""
    used = list(used)
    rows = [{"feature": f, "what": table[f].what, "min_version": table[f].version, "date": table[f].date,
             "commit": table[f].commit} for f in used]
    notes = [f"{table[f].what} needs ComfyUI >= {table[f].version} ({table[f].date}); older releases load the file "
             "without error but ignore it, and the model computes wrong" for f in used if table[f].silent]
    versions = [table[f].version for f in used]
    return (max(versions, key=_version_key) if versions else None), rows, notes


__all__ = ["COMFYUI_FEATURES", "ComfyFeature", "features_used", "version_notes"]
