"""The structure of a quantized checkpoint's keys, model-agnostic: which suffixes hold a layer's weight, its scales and
its quantization metadata in the conventions people use (ComfyUI / ModelOpt, legacy scaled FP8, compressed-tensors,
torchao, Model Optimizer's ``_amax``), grouping keys by layer, packed FP4 storage and logical element counts."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

from ptq.targets.safetensors_header import DTYPE_BITS, TensorInfo

WEIGHT_SUFFIXES = ("weight", "weight_packed", "_weight_qdata")
"""Suffixes holding a layer's (possibly packed) weight: ComfyUI/ModelOpt, compressed-tensors, torchao."""

PER_TENSOR_SCALE_SUFFIXES = (
    "weight_scale_2",
    "input_scale",
    "scale_input",
    "weight_global_scale",
    "input_global_scale",
)
"""Scales that are float32 scalars in every convention."""

AUX_SUFFIXES = (
    "weight_scale_2",
    "weight_scale",
    "input_scale",
    "scale_weight",
    "scale_input",
    "weight_global_scale",
    "input_global_scale",
    "weight_zero_point",
    "input_zero_point",
    "weight_g_idx",
    "weight_shape",
    "comfy_quant",
    "pre_quant_scale",
    "weight_quantizer._amax",
    "input_quantizer._amax",
    "output_quantizer._amax",
)
"""Per-layer quantization tensors (not model parameters), longest match first."""

#: Suffixes a ComfyUI / ModelOpt quantized layer carries besides its weight.
COMFY_READ_SUFFIXES = frozenset({"comfy_quant", "weight_scale", "weight_scale_2", "input_scale"})
#: Legacy (Kijai-style) scaled-FP8 scale names, and names of other producers' conventions ComfyUI does not read.
LEGACY_SCALE_SUFFIXES = ("scale_weight", "scale_input")
FOREIGN_SUFFIXES = ("weight_global_scale", "input_global_scale", "weight_zero_point", "input_zero_point",
                    "weight_g_idx")
#: safetensors dtype -> short format name of an unscaled low-precision weight, and of a float weight.
STORAGE_FORMATS = {"F8_E4M3": "fp8", "F8_E5M2": "fp8_e5m2", "I8": "int8", "F4": "fp4"}
FLOAT_DTYPES = {"F16": "fp16", "BF16": "bf16", "F32": "fp32", "F64": "fp64"}

_TORCHAO_RE = re.compile(r"^(?P<layer>.+)\.(?P<suffix>_(?:weight|bias)_[A-Za-z0-9_]+)$")
_AMAX_RE = re.compile(r"^(?P<layer>.+)\.(?P<suffix>[A-Za-z0-9_]+_quantizer\._amax)$")


def split_key(key: str) -> tuple[str, str]:
    """Split a key into (layer, suffix): ``a.b.weight_scale_2`` -> (``a.b``, ``weight_scale_2``)."""
    for suffix in AUX_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    m = _AMAX_RE.match(key) or _TORCHAO_RE.match(key)
    if m:
        return m.group("layer"), m.group("suffix")
    if "." in key:
        layer, suffix = key.rsplit(".", 1)
        return layer, suffix
    return "", key


def group_layers(tensors: Iterable[TensorInfo]) -> dict[str, dict[str, TensorInfo]]:
    """Tensors grouped by layer name, each a ``{suffix: TensorInfo}`` dict, in file order."""
    groups: dict[str, dict[str, TensorInfo]] = {}
    for info in tensors:
        layer, suffix = split_key(info.name)
        groups.setdefault(layer, {})[suffix] = info
    return groups


def weight_suffix(group: Mapping[str, TensorInfo]) -> str | None:
    """The suffix holding the layer's weight (``weight``, ``weight_packed`` or ``_weight_qdata``), if any."""
    for suffix in WEIGHT_SUFFIXES:
        if suffix in group:
            return suffix
    return None


def is_packed_fp4(group: Mapping[str, TensorInfo], meta_format: str | None = None) -> bool:
    """Whether the layer's weight holds two FP4 codes per byte (uint8 storage of NVFP4 / FP4)."""
    ws = weight_suffix(group)
    if ws is None or group[ws].dtype != "U8":
        return False
    if meta_format is not None:
        return meta_format == "nvfp4"
    if ws != "weight" or "weight_scale_2" in group or "weight_global_scale" in group:
        return True
    block = group.get("weight_scale") or group.get("scale_weight")
    return block is not None and len(block.shape) == 2 and block.dtype in ("F8_E4M3", "U8")


def logical_numel(info: TensorInfo, packed_fp4: bool = False) -> int:
    """Element count of the unpacked tensor: a packed FP4 byte holds 2 values, compressed-tensors int32 holds 8."""
    if packed_fp4:
        return info.numel * (8 if info.dtype == "I32" else 2)
    return info.numel


def is_aux(suffix: str) -> bool:
    return suffix in AUX_SUFFIXES or suffix.endswith("._amax")


def tensor_infos_from_state_dict(state_dict: Mapping[str, object]) -> dict[str, TensorInfo]:
    """Header-style entries for an in-memory state dict of torch tensors (offsets are laid out contiguously)."""
    names = {
        "bool": "BOOL", "uint8": "U8", "int8": "I8", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
        "float8_e8m0fnu": "F8_E8M0", "int16": "I16", "uint16": "U16", "float16": "F16", "bfloat16": "BF16",
        "int32": "I32", "uint32": "U32", "float32": "F32", "int64": "I64", "uint64": "U64", "float64": "F64",
        "complex64": "C64", "float4_e2m1fn_x2": "F4",
    }  # fmt: skip
    out: dict[str, TensorInfo] = {}
    pos = 0
    for key, tensor in state_dict.items():
        dtype = names[str(tensor.dtype).removeprefix("torch.")]  # type: ignore[attr-defined]
        shape = tuple(int(d) for d in tensor.shape)  # type: ignore[attr-defined]
        if dtype == "F4" and shape:
            shape = (*shape[:-1], shape[-1] * 2)
        nbytes = math.prod(shape) * DTYPE_BITS[dtype] // 8
        out[key] = TensorInfo(key, dtype, shape, pos, pos + nbytes)
        pos += nbytes
    return out


__all__ = ["AUX_SUFFIXES", "COMFY_READ_SUFFIXES", "FLOAT_DTYPES", "FOREIGN_SUFFIXES", "LEGACY_SCALE_SUFFIXES",
           "PER_TENSOR_SCALE_SUFFIXES", "STORAGE_FORMATS", "WEIGHT_SUFFIXES", "group_layers", "is_aux", "is_packed_fp4",
           "logical_numel", "split_key", "tensor_infos_from_state_dict", "weight_suffix"]
