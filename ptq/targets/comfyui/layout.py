"""What stock ComfyUI's "Load Diffusion Model" reads, as data: per-layer format names and JSON, which layers read
``pre_quant_scale``, the dtypes its safetensors reader knows, the nibble order and scale tiling of each format.

Read from ComfyUI 0.30.0 (``comfy/ops.py`` mixed-precision loading, ``comfy/quant_ops.py`` ``QUANT_ALGOS``,
``comfy/utils.py`` ``convert_old_quants`` / ``_TYPES``) and comfy-kitchen 0.2.40's layouts:

- the model's original key names (the adapter's name map), no ``model.diffusion_model.`` prefix;
- per quantized Linear ``<layer>.comfy_quant``: uint8 1-D tensor of the UTF-8 JSON ``{"format": ...}`` (plus
  ``"full_precision_matrix_mult": true`` for weight-only layers and the format's extra keys), and the same per-layer
  JSON in the header entry ``_quantization_metadata`` = ``{"format_version": "1.0", "layers": {...}}``;
- NVFP4: ``weight`` uint8 ``[out, in/2]`` first element in the HIGH nibble; ``weight_scale`` float8_e4m3fn in the
  cuBLAS tiled layout ``[roundup(out,128), roundup(in/16,4)]``; ``weight_scale_2`` float32 ``[]``; ``input_scale``
  float32 ``[]``; smoothing (ComfyUI >= 0.30.0, ``input = input * pre_quant_scale.to(input.dtype)`` before
  quantizing or dequantizing): ``pre_quant_scale`` bfloat16 ``[in]``, the stored weight being ``W / pre_quant_scale``
  per input column;
- FP8: ``weight`` float8_e4m3fn ``[out, in]``; ``weight_scale`` float32 ``[]`` (per tensor only); ``input_scale``
  float32 ``[]`` (without it ComfyUI quantizes activations with scale 1.0);
- int8 (``int8_tensorwise``): ``weight`` int8 ``[out, in]``; ``weight_scale`` float32 ``[]`` or ``[out, 1]``; no
  ``input_scale`` (activations are scaled per row at run time); ConvRot: the same format name with
  ``"convrot": true, "convrot_groupsize": 256``, the codes of the Hadamard-rotated weight, a per-row scale;
- MXFP8 (``mxfp8``): ``weight`` float8_e4m3fn ``[out, in]``; ``weight_scale`` E8M0 block scales (one per 32 inputs)
  in the cuBLAS tiled layout ``[roundup(out,128), roundup(in/32,4)]``, stored as uint8 (ComfyUI's own safetensors
  reader has no ``F8_E8M0``; its layer loader views the bytes as float8_e8m0fnu); no ``input_scale``;
- ConvRot W4A4 (``convrot_w4a4``): ``weight`` int8 ``[out, in/2]``, two signed int4 codes of the Hadamard-rotated
  weight per byte (even input column in the low nibble); ``weight_scale`` float32 ``[out]``; layer JSON
  ``"convrot_groupsize": 256`` (``"linear_dtype": "int8"`` would force W4A8); no ``input_scale``;
- unquantized tensors bf16 or float32; header ``config``: ``{"transformer": {...}}`` model-config override where
  ComfyUI's shape detection would build the model wrong (written by the model adapter).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ptq.algorithms.qlinear import QuantizedLinearState
from ptq.formats import CONVROT_W4A4, CONVROT_W4A8, INT8_CONVROT
from ptq.formats.nvfp4 import NibbleOrder

#: ptq format -> (the per-layer ``format`` ComfyUI's QUANT_ALGOS registers, extra keys of the layer JSON).
LAYER_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    "nvfp4": ("nvfp4", {}),
    "fp8": ("float8_e4m3fn", {}),
    "int8": ("int8_tensorwise", {}),
    "int8_convrot": ("int8_tensorwise", {"convrot": True, "convrot_groupsize": INT8_CONVROT.group_size}),
    "mxfp8": ("mxfp8", {}),
    "convrot_w4a4": ("convrot_w4a4", {"convrot_groupsize": CONVROT_W4A4.group_size}),
    "convrot_w4a8": ("convrot_w4a4", {"convrot_groupsize": CONVROT_W4A8.group_size, "linear_dtype": "int8"}),
}
#: Every per-layer ``format`` ComfyUI core knows (``QUANT_ALGOS``, in its order) -> the short name reports use (the
#: ptq format it holds; ``fp8_e5m2`` is not one). A layer of a name not in here fails to load.
COMFY_FORMATS: dict[str, str] = {"float8_e4m3fn": "fp8", "float8_e5m2": "fp8_e5m2", "nvfp4": "nvfp4",
                                 "mxfp8": "mxfp8", "int8_tensorwise": "int8", "convrot_w4a4": "convrot_w4a4",
                                 "asym_w4a8_int8": "asym_w4a8_int8"}
#: The weight dtype of the ComfyUI formats that are not ptq formats (ptq's: their format's storage dtype).
OTHER_STORAGE_DTYPES = {"fp8_e5m2": "F8_E5M2", "asym_w4a8_int8": "I8"}
#: ptq formats whose ComfyUI layers read ``pre_quant_scale`` (``QUANT_ALGOS[...]["parameters"]``).
PRE_QUANT_SCALE_FORMATS = ("nvfp4",)
#: dtype of ``pre_quant_scale`` in the file (exact in bf16 and fp16; ComfyUI casts it to the input dtype).
PRE_QUANT_SCALE_DTYPE = torch.bfloat16
#: Order of the two E2M1 codes in an NVFP4 byte (comfy-kitchen: the first element in the high nibble).
NIBBLE_ORDER = NibbleOrder.HIGH_FIRST
#: safetensors dtypes ComfyUI's own reader decodes (``comfy/utils.py`` ``_TYPES``, ComfyUI 0.30.0): with DynamicVRAM
#: (the default on NVIDIA GPUs outside WSL) ``load_safetensors`` maps each header dtype through that table, and any
#: other dtype (e.g. ``F8_E8M0``) raises ``KeyError`` before a layer is built. The safetensors library, used on the
#: CPU and with DynamicVRAM off, reads more. A ComfyUI file holds these dtypes only.
READER_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3",
                           "F8_E5M2", "C64", "U64", "U32", "U16"})
#: The header entry holding the per-layer JSON, and its version.
METADATA_KEY = "_quantization_metadata"
METADATA_VERSION = "1.0"


def layer_config(state: QuantizedLinearState) -> dict[str, Any]:
    """The per-layer JSON ComfyUI reads from ``comfy_quant`` / ``_quantization_metadata``."""
    name, extra = LAYER_FORMATS[state.format]
    conf: dict[str, Any] = {"format": name}
    if state.weight_only:
        conf["full_precision_matrix_mult"] = True
    conf.update(extra)
    return conf


def short_format(conf: Mapping[str, Any]) -> str:
    """The report name of a layer's ComfyUI JSON: a ptq format whose ComfyUI name and extra keys it carries (e.g.
    ``int8_convrot``), else :data:`COMFY_FORMATS`' short name, else the raw ``format``."""
    raw = str(conf.get("format"))

    def identity(extra: Mapping[str, Any]) -> dict[str, Any]:  # the flags and names that tell formats apart
        return {k: v for k, v in extra.items() if isinstance(v, (bool, str))}

    for ptq_name, (comfy, extra) in sorted(LAYER_FORMATS.items(), key=lambda kv: -len(identity(kv[1][1]))):
        if extra and comfy == raw and all((bool(conf.get(k)) if v is True else conf.get(k) == v)
                                          for k, v in identity(extra).items()):
            return ptq_name
    return COMFY_FORMATS.get(raw, raw)


def encode_comfy_quant(conf: dict[str, Any]) -> torch.Tensor:
    """``comfy_quant`` tensor: uint8 1-D UTF-8 bytes of ``json.dumps(conf)`` (ComfyUI decodes with json.loads)."""
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


def decode_comfy_quant(t: torch.Tensor) -> dict[str, Any]:
    """The JSON of a ``comfy_quant`` tensor ({} when it is not a JSON object)."""
    try:
        conf = json.loads(bytes(t.tolist()))
    except (ValueError, AttributeError, TypeError):
        return {}
    return conf if isinstance(conf, dict) else {}


@dataclass
class QuantMetadata:
    """ComfyUI ``_quantization_metadata`` as parsed from the header (``layers``: layer -> per-layer config)."""

    present: bool
    layers: dict[str, dict[str, object]] = field(default_factory=dict)
    format_version: str | None = None
    error: str | None = None


def parse_quant_metadata(metadata: Mapping[str, str]) -> QuantMetadata:
    """Parse ``_quantization_metadata``; a malformed entry is reported in ``error`` rather than raised."""
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        return QuantMetadata(False)
    try:
        obj = json.loads(raw)
    except ValueError as e:
        return QuantMetadata(True, error=f"_quantization_metadata is not valid JSON: {e}")
    if not isinstance(obj, dict) or not isinstance(obj.get("layers"), dict):
        return QuantMetadata(True, error='_quantization_metadata has no "layers" object')
    layers: dict[str, dict[str, object]] = {}
    bad: list[str] = []
    for name, conf in obj["layers"].items():
        if isinstance(conf, str):  # some writers store the bare format name
            conf = {"format": conf}
        if not isinstance(conf, dict) or not isinstance(conf.get("format"), str):
            bad.append(name)
            continue
        layers[name] = conf
    version = obj.get("format_version")
    qm = QuantMetadata(True, layers, str(version) if version is not None else None)
    if bad:
        qm.error = f'{len(bad)} layer entries without a "format" string (first: {bad[0]!r})'
    return qm


__all__ = ["COMFY_FORMATS", "LAYER_FORMATS", "METADATA_KEY", "METADATA_VERSION", "NIBBLE_ORDER",
           "OTHER_STORAGE_DTYPES", "PRE_QUANT_SCALE_DTYPE", "PRE_QUANT_SCALE_FORMATS", "READER_DTYPES",
           "QuantMetadata", "decode_comfy_quant", "encode_comfy_quant", "layer_config", "parse_quant_metadata",
           "short_format"]
