"""ComfyUI compatibility of a file: which ComfyUI release each feature it uses needs, whether ComfyUI's WAN detection
builds the model the file holds, and whether its ``pre_quant_scale`` tensors are read.

Versions are the first ComfyUI release containing the commit that added the feature (read from the history of
ComfyUI master, ``comfyui_version.py`` per release); :data:`COMFYUI_FEATURES` lists them with that commit.
Used by :mod:`ptq.tools.inspect` (problem codes ``unreadable_dtype``, ``comfyui_wan_misbuilt``,
``invalid_config_override``, ``unread_pre_quant_scale``; the minimum release in ``InspectReport.comfyui_min_version`` and the notes).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ptq.models.wan.comfyui import (
    COMFYUI_CONFIG_KEY,
    COMFYUI_CONFIG_MIN_VERSION,
    COMFYUI_CONFIG_SECTION,
    COMFYUI_WAN_HEAD_DIM,
    COMFYUI_WAN_TEXT_DIM,
)
from ptq.targets.comfyui.layout import READER_DTYPES
from ptq.targets.safetensors_header import TensorInfo
from ptq.tools.conventions import Architecture


@dataclass(frozen=True)
class ComfyFeature:
    """A loader feature and the first ComfyUI release that has it (``commit``: the change that added it)."""

    what: str
    version: str
    date: str
    commit: str


#: Features a ptq file may use, by key. Per-layer formats are keyed by their short name (``conventions.
#: COMFY_FORMATS`` values): one entry per format.
COMFYUI_FEATURES: dict[str, ComfyFeature] = {
    "quant_metadata": ComfyFeature("per-layer quantization metadata (comfy_quant / _quantization_metadata)",
                                   "0.3.69", "2025-11-17", "3b3ef9a7"),
    "full_precision_matrix_mult": ComfyFeature("weight-only layers (comfy_quant full_precision_matrix_mult)",
                                               "0.3.72", "2025-11-25", "25022e0b"),
    "fp8": ComfyFeature("float8_e4m3fn layers", "0.3.69", "2025-11-17", "3b3ef9a7"),
    "nvfp4": ComfyFeature("nvfp4 layers", "0.8.0", "2026-01-07", "6da00dd8"),
    "mxfp8": ComfyFeature("mxfp8 layers", "0.18.0", "2026-03-20", "1c5db739"),
    "int8": ComfyFeature("int8_tensorwise layers", "0.27.0", "2026-06-30", "1a510f04"),
    "config_override": ComfyFeature("header `config` override of the detected WAN config",
                                    COMFYUI_CONFIG_MIN_VERSION, "2026-02-26", "907e5dcb"),
    "pre_quant_scale": ComfyFeature("nvfp4 pre_quant_scale (input smoothing)", "0.30.0", "2026-08-02", "57500fc5"),
}
#: Features older ComfyUI releases ignore without an error (the file loads, the model computes wrong).
SILENT_FEATURES = ("config_override", "pre_quant_scale")
#: Formats whose ComfyUI layers read ``pre_quant_scale`` (``QUANT_ALGOS[...]["parameters"]``).
PRE_QUANT_SCALE_FORMATS = ("nvfp4",)

ProblemFn = Callable[[str, str, Iterable[str], str, str], None]


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def min_version(features: Iterable[str]) -> str | None:
    """The first ComfyUI release with every feature in ``features`` (None for none)."""
    versions = [COMFYUI_FEATURES[f].version for f in features]
    return max(versions, key=_version_key) if versions else None


def features_used(metadata: Mapping[str, str], groups: Mapping[str, Mapping[str, TensorInfo]],
                  confs: Mapping[str, Mapping[str, Any]], layer_formats: Mapping[str, str]) -> list[str]:
    """Keys of :data:`COMFYUI_FEATURES` that the file relies on."""
    used: list[str] = []
    if confs:
        used.append("quant_metadata")
    if any(c.get("full_precision_matrix_mult") for c in confs.values()):
        used.append("full_precision_matrix_mult")
    used += sorted({f for f in layer_formats.values() if f in COMFYUI_FEATURES})
    if COMFYUI_CONFIG_KEY in metadata:
        used.append("config_override")
    if any("pre_quant_scale" in g for g in groups.values()):
        used.append("pre_quant_scale")
    return used


def config_override(metadata: Mapping[str, str], problem: ProblemFn) -> dict[str, Any]:
    """The header ``config`` section ComfyUI applies to the diffusion model ({} if none or unreadable)."""
    raw = metadata.get(COMFYUI_CONFIG_KEY)
    if raw is None:
        return {}
    try:
        conf = json.loads(raw)
    except ValueError:
        conf = None
    section = conf.get(COMFYUI_CONFIG_SECTION) if isinstance(conf, dict) else None
    if not isinstance(section, dict):
        problem("invalid_config_override", "error", [],
                f"the header entry {COMFYUI_CONFIG_KEY!r} is not JSON of the form {{\"{COMFYUI_CONFIG_SECTION}\": "
                f"{{...}}}} ({raw[:80]!r}); ComfyUI's model detection json.loads it and fails or ignores it.",
                'write metadata["config"] = json.dumps({"transformer": {"num_heads": N, "text_dim": D}})')
        return {}
    return section


def check_wan_build(arch: Architecture, metadata: Mapping[str, str], problem: ProblemFn) -> dict[str, Any]:
    """Problems where ComfyUI's WAN detection (``num_heads = dim // 128``, ``text_dim`` 4096 unless the header
    ``config`` says otherwise) would build another model than the file holds; returns the override in effect."""
    override = config_override(metadata, problem)
    if arch.family != "wan" or not arch.dim:
        return override
    dim = arch.dim
    heads = override.get("num_heads", dim // COMFYUI_WAN_HEAD_DIM)
    text_dim = override.get("text_dim", COMFYUI_WAN_TEXT_DIM)
    file_text_dim = arch.text_dim if arch.text_dim is not None else "<text_dim>"
    fix = (f'add the header entry config = json.dumps({{"transformer": {{"num_heads": <heads>, "text_dim": '
           f'{file_text_dim}}}}}) (ComfyUI >= {COMFYUI_CONFIG_MIN_VERSION}; ptq run writes it)')
    if not isinstance(heads, int) or heads < 1 or dim % heads:
        problem("comfyui_wan_misbuilt", "error", [],
                f"ComfyUI builds this WAN model (dim {dim}) with num_heads={heads!r}, which does not divide dim "
                f"({'from the header config' if 'num_heads' in override else 'its detection assumes 128-wide heads'}"
                "): the attention is computed wrong or the model fails to build.", fix)
    elif "num_heads" not in override and not arch.known_model:
        problem("comfyui_wan_misbuilt", "warning", [],
                f"the head count of this WAN model (dim {dim}, not a published size) cannot be read from its shapes; "
                f"ComfyUI assumes 128-wide heads, i.e. {heads} heads. If the heads are not 128 wide, ComfyUI computes "
                "the wrong attention (quantized files still load: no shape check catches it).", fix)
    if arch.text_dim is not None and arch.text_dim != text_dim:
        problem("comfyui_wan_misbuilt", "error", ["text_embedding.0"],
                f"the text embedding takes {arch.text_dim}-dim inputs but ComfyUI builds it for text_dim={text_dim} "
                f"({'from the header config' if 'text_dim' in override else 'WanModel default, never detected'}): an "
                "unquantized file fails to load (size mismatch), a quantized one loads the weight unchecked and "
                "computes wrong.", fix)
    return override


def check_reader_dtypes(tensors: Iterable[TensorInfo], problem: ProblemFn) -> None:
    """``unreadable_dtype``: tensors whose safetensors dtype ComfyUI's own reader has no entry for."""
    bad = [info for info in tensors if info.dtype not in READER_DTYPES]
    if not bad:
        return
    dtypes = ", ".join(sorted({info.dtype for info in bad}))
    problem("unreadable_dtype", "error", [info.name for info in bad],
            f"{len(bad)} tensors are stored as {dtypes}, a dtype missing from ComfyUI's own safetensors reader "
            "(comfy/utils.py _TYPES). With DynamicVRAM, the default on NVIDIA GPUs outside WSL, 'Load Diffusion "
            f"Model' fails with KeyError: '{bad[0].dtype}'; the same file loads on the CPU or with "
            "--disable-dynamic-vram (read by the safetensors library).",
            "store the bytes in a dtype ComfyUI reads (E8M0 block scales as uint8: ComfyUI's loader views them as "
            "float8_e8m0fnu); ptq writes them so")


def check_pre_quant_scales(groups: Mapping[str, Mapping[str, TensorInfo]], layer_formats: Mapping[str, str],
                           load: Callable[[str], torch.Tensor | None], problem: ProblemFn) -> None:
    """``pre_quant_scale`` tensors ComfyUI does not read (layer format other than nvfp4), of the wrong shape, or
    with non-positive / non-finite values (checked when ``load`` can read them)."""
    unread, bad_shape, bad_values = [], [], []
    for layer, group in groups.items():
        info = group.get("pre_quant_scale")
        if info is None:
            continue
        fmt = layer_formats.get(layer)
        if fmt not in PRE_QUANT_SCALE_FORMATS:
            unread.append(layer)
            continue
        w = group.get("weight")
        in_features = 2 * w.shape[-1] if w is not None and w.dtype == "U8" else (w.shape[-1] if w else None)
        if list(info.shape) != [in_features]:
            bad_shape.append(layer)
            continue
        t = load(info.name)
        if t is not None and not bool((torch.isfinite(t.float()) & (t.float() > 0)).all()):
            bad_values.append(layer)
    fix_unread = "fold the scale back into the weight (W * pre_quant_scale per input column) or use nvfp4 layers"
    if unread:
        problem("unread_pre_quant_scale", "error", unread,
                f"pre_quant_scale on layers whose format ComfyUI does not smooth (it reads it for "
                f"{', '.join(PRE_QUANT_SCALE_FORMATS)} only): the stored weight is W / pre_quant_scale, so these "
                "layers compute wrong.", fix_unread)
    if bad_shape:
        problem("unread_pre_quant_scale", "error", bad_shape,
                "pre_quant_scale must have one value per input channel ([in_features]); ComfyUI multiplies the "
                "input by it (broadcast over the last dim).", "store a 1-D [in_features] tensor")
    if bad_values:
        problem("unread_pre_quant_scale", "error", bad_values,
                "pre_quant_scale holds zero, negative, NaN or Inf values (the layer's input is multiplied by it).",
                "re-export the layer")


def version_notes(features: list[str]) -> tuple[str | None, list[dict[str, str]], list[str]]:
    """(minimum ComfyUI release, per-feature rows, notes) for the report; the notes name features whose absence in
    older releases changes results silently (``pre_quant_scale``, the ``config`` override)."""
    rows = [{"feature": f, "what": COMFYUI_FEATURES[f].what, "min_version": COMFYUI_FEATURES[f].version,
             "date": COMFYUI_FEATURES[f].date, "commit": COMFYUI_FEATURES[f].commit} for f in features]
    notes = []
    for f in features:
        if f in SILENT_FEATURES:
            feat = COMFYUI_FEATURES[f]
            notes.append(f"{feat.what} needs ComfyUI >= {feat.version} ({feat.date}); older releases load the file "
                         "without error but ignore it, and the model computes wrong")
    return min_version(features), rows, notes
