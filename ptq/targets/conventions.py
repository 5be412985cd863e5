"""Which producer's convention a quantized checkpoint follows, from key names, dtypes and header metadata alone:

- ``comfyui``: ComfyUI mixed precision: ``_quantization_metadata`` header JSON or ``<layer>.comfy_quant`` tensors,
  with ``weight`` / ``weight_scale`` / ``weight_scale_2`` / ``input_scale``.
- ``comfyui-scaled-fp8``: legacy ComfyUI / Kijai FP8: ``scaled_fp8`` marker and ``<layer>.scale_weight`` /
  ``scale_input`` (ComfyUI converts these only when the marker is present and no header metadata exists).
- ``modelopt``: TensorRT Model Optimizer HF export: same tensor names as ComfyUI but no ComfyUI metadata
  (``weight_scale_2``, ``input_scale``, ``*_quantizer._amax``, a ``quantization_config``-like header entry).
- ``compressed-tensors``: ``weight_packed`` / ``weight_global_scale`` / ``input_global_scale``.
- ``torchao``: ``<module>._weight_qdata`` tensors and a ``tensor_names`` header entry.
- ``plain``: unquantized bf16 / fp16 / fp32 (or unscaled fp8 weights).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from ptq.targets.file_layout import WEIGHT_SUFFIXES, split_key
from ptq.targets.safetensors_header import TensorInfo


@dataclass
class Convention:
    """Detected quantization convention of a checkpoint."""

    name: str
    label: str
    metadata_style: str  # "header" | "comfy_quant tensors" | "header+comfy_quant tensors" | "none" | ...
    evidence: list[str] = field(default_factory=list)
    also_seen: list[str] = field(default_factory=list)


_MODELOPT_META_RE = re.compile(r"quantization_config|hf_quant_config|quant_algo|modelopt", re.IGNORECASE)
_QUANT_DTYPES = {"U8", "I8", "F8_E4M3", "F8_E5M2", "F4", "I32"}


def detect_convention(tensors: Mapping[str, TensorInfo], metadata: Mapping[str, str]) -> Convention:
    """Classify the checkpoint's quantization convention from key names, dtypes and header metadata."""
    suffixes: Counter[str] = Counter()
    weight_dtypes: Counter[str] = Counter()
    marker = False
    for key, info in tensors.items():
        layer, suffix = split_key(key)
        suffixes[suffix] += 1
        if suffix == "scaled_fp8":
            marker = True
        if suffix in WEIGHT_SUFFIXES and len(info.shape) >= 2:
            weight_dtypes[info.dtype] += 1
    amax = sum(n for s, n in suffixes.items() if s.endswith("._amax"))
    torchao = sum(n for s, n in suffixes.items() if s.startswith(("_weight_", "_bias_")))
    evidence: dict[str, list[str]] = {}

    def add(conv: str, text: str) -> None:
        evidence.setdefault(conv, []).append(text)

    if "_quantization_metadata" in metadata:
        add("comfyui", "header _quantization_metadata")
    if suffixes["comfy_quant"]:
        add("comfyui", f"{suffixes['comfy_quant']} <layer>.comfy_quant tensors")
    if marker:
        add("comfyui-scaled-fp8", "scaled_fp8 marker tensor")
    for s in ("scale_weight", "scale_input"):
        if suffixes[s]:
            add("comfyui-scaled-fp8", f"{suffixes[s]} .{s} tensors")
    for s in ("weight_packed", "weight_global_scale", "input_global_scale"):
        if suffixes[s]:
            add("compressed-tensors", f"{suffixes[s]} .{s} tensors")
    if torchao or "tensor_names" in metadata:
        add(
            "torchao",
            f"{torchao} ._weight_* tensors" + (", header tensor_names" if "tensor_names" in metadata else ""),
        )
    if amax:
        add("modelopt", f"{amax} *_quantizer._amax tensors")
    meta_hits = [k for k in metadata if _MODELOPT_META_RE.search(k)]
    if meta_hits:
        add("modelopt", f"header entries {meta_hits[:3]}")
    for s in ("weight_scale_2", "input_scale", "weight_scale"):
        if suffixes[s] and "comfyui" not in evidence:
            add("modelopt", f"{suffixes[s]} .{s} tensors without ComfyUI metadata")

    quant_weights = sum(n for d, n in weight_dtypes.items() if d in _QUANT_DTYPES)
    order = ("comfyui", "torchao", "compressed-tensors", "comfyui-scaled-fp8", "modelopt")
    primary = next((c for c in order if c in evidence), None)
    if primary is None:
        if quant_weights:
            primary = "plain-quantized"
            add(
                primary,
                f"{quant_weights} weights stored as {', '.join(d for d in weight_dtypes if d in _QUANT_DTYPES)}",
            )
        else:
            primary = "plain"
            if weight_dtypes:
                add(primary, f"weights are {weight_dtypes.most_common(1)[0][0]}")
            else:
                add(primary, "no 2-D weight tensors")
    has_header = "_quantization_metadata" in metadata
    style = {
        (True, True): "header+comfy_quant tensors",
        (True, False): "header",
        (False, True): "comfy_quant tensors",
    }.get((has_header, bool(suffixes["comfy_quant"])), "none")
    if primary == "comfyui-scaled-fp8" and marker:
        style = "scaled_fp8 marker"
    labels = {
        "comfyui": f"ComfyUI mixed precision (metadata: {style})",
        "comfyui-scaled-fp8": "legacy ComfyUI / Kijai scaled FP8 (scale_weight"
        + (", scaled_fp8 marker)" if marker else ", NO scaled_fp8 marker)"),
        "modelopt": "TensorRT Model Optimizer HF-export style (weight_scale / weight_scale_2 / input_scale, "
        "no ComfyUI metadata)",
        "compressed-tensors": "compressed-tensors (weight_packed / weight_global_scale / input_global_scale)",
        "torchao": "torchao tensor-subclass safetensors (._weight_qdata ...)",
        "plain-quantized": "low-precision weights without scales or metadata (unscaled cast)",
        "plain": "plain (unquantized)",
    }
    label = labels[primary]
    if primary == "comfyui-scaled-fp8" and weight_dtypes["U8"]:
        label = (
            f"naming confusion: {weight_dtypes['U8']} uint8 (NVFP4-packed) weights with legacy FP8 .scale_weight "
            "names" + (", scaled_fp8 marker" if marker else ", no ComfyUI metadata")
        )
    if primary == "plain" and weight_dtypes:
        label = f"plain {weight_dtypes.most_common(1)[0][0].lower()} (unquantized)"
    also = [c for c in order if c in evidence and c != primary]
    return Convention(primary, label, style, evidence.get(primary, []), also)

__all__ = ["Convention", "detect_convention"]
