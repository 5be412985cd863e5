"""ComfyUI export: one ``.safetensors`` that stock ComfyUI's "Load Diffusion Model" reads as quantized.

What ComfyUI reads (comfy/ops.py mixed-precision ops, comfy/utils.py convert_old_quants, comfy-kitchen layouts):
- the model's original key names (the adapter's name map), no ``model.diffusion_model.`` prefix;
- per quantized Linear ``<layer>.comfy_quant``: uint8 1-D tensor of the UTF-8 JSON ``{"format": ...}``
  (``"nvfp4"`` / ``"float8_e4m3fn"``, plus ``"full_precision_matrix_mult": true`` for weight-only), and the same
  per-layer JSON in the header entry ``_quantization_metadata`` = ``{"format_version": "1.0", "layers": {...}}``;
- NVFP4: ``weight`` uint8 ``[out, in/2]`` first element in the HIGH nibble; ``weight_scale`` float8_e4m3fn in the
  cuBLAS tiled layout ``[roundup(out,128), roundup(in/16,4)]``; ``weight_scale_2`` float32 ``[]``; ``input_scale``
  float32 ``[]``;
- NVFP4 smoothing (ComfyUI >= 0.30.0, ``comfy/ops.py`` mixed-precision ``Linear.forward``: ``input = input *
  pre_quant_scale.to(input.dtype)`` before quantizing or dequantizing; read for ``nvfp4`` layers only, the
  ``QUANT_ALGOS["nvfp4"]["parameters"]``): ``pre_quant_scale`` bfloat16 ``[in]``, the stored weight being
  ``W / pre_quant_scale`` per input column;
- FP8: ``weight`` float8_e4m3fn ``[out, in]``; ``weight_scale`` float32 ``[]`` (per tensor only: ComfyUI's FP8 layout
  is tensor-wise); ``input_scale`` float32 ``[]`` (without it ComfyUI quantizes activations with scale 1.0);
- int8 (``int8_tensorwise``): ``weight`` int8 ``[out, in]``; ``weight_scale`` float32 ``[]`` or ``[out, 1]``; no
  ``input_scale`` (activations are scaled per row at run time). ``int8_convrot``: the same format name with
  ``"convrot": true, "convrot_groupsize": 256`` in the layer JSON, the codes of the Hadamard-rotated weight and a
  per-row ``weight_scale`` ``[out, 1]``;
- MXFP8 (``mxfp8``): ``weight`` float8_e4m3fn ``[out, in]``; ``weight_scale`` uint8 E8M0 block scales (one per 32
  inputs) in the cuBLAS tiled layout ``[roundup(out,128), roundup(in/32,4)]``, stored as uint8 because ComfyUI's
  own safetensors reader (``comfy.utils.load_safetensors``, used with DynamicVRAM, the default on NVIDIA GPUs) has
  no ``F8_E8M0`` dtype; ComfyUI's layer loader views the bytes as float8_e8m0fnu; no ``input_scale`` (ComfyUI
  quantizes MXFP8 activations with their own block scales);
- unquantized tensors bf16 or float32;
- header ``config``: ``{"transformer": {...}}`` model-config override where ComfyUI's shape detection would build
  the model wrong (written by the model adapter, ``ModelAdapter.target_header``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ptq.algorithms.qlinear import CANONICAL_NIBBLE_ORDER, QuantizedLinearState
from ptq.export.base import (
    Exporter,
    ExportResult,
    KeyMap,
    UnsupportedExport,
    cast_unquantized,
    header_metadata,
    plain_tensors,
)
from ptq.export.roundtrip import (
    reference_decode_int8,
    reference_decode_mxfp8,
    reference_decode_nvfp4,
    reference_unrotate,
    reference_untile,
)
from ptq.export.safetensors_io import SAFETENSORS_DTYPES, save_safetensors
from ptq.formats import INT8_CONVROT
from ptq.formats import nvfp4 as nvfp4_fmt
from ptq.formats.nvfp4 import NibbleOrder

#: ptq format name -> the per-layer ``format`` ComfyUI's QUANT_ALGOS registers.
COMFY_FORMAT_NAMES = {"nvfp4": "nvfp4", "fp8": "float8_e4m3fn", "int8": "int8_tensorwise",
                      "int8_convrot": "int8_tensorwise", "mxfp8": "mxfp8"}
#: Extra per-layer JSON keys of a ptq format (ComfyUI comfy/ops.py reads ``convrot`` / ``convrot_groupsize``).
COMFY_LAYER_EXTRAS: dict[str, dict[str, Any]] = {
    "int8_convrot": {"convrot": True, "convrot_groupsize": INT8_CONVROT.group_size},
}
TARGET_NIBBLE_ORDER = NibbleOrder.HIGH_FIRST
#: safetensors dtypes ComfyUI's own reader decodes (``comfy/utils.py`` ``_TYPES``, ComfyUI 0.30.0): with DynamicVRAM
#: (the default on NVIDIA GPUs outside WSL) ``load_safetensors`` maps each header dtype through that table, and any
#: other dtype (e.g. ``F8_E8M0``) raises ``KeyError`` before a layer is built. The safetensors library, used on the
#: CPU and with DynamicVRAM off, reads more. A ComfyUI file holds these dtypes only.
READER_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3",
                           "F8_E5M2", "C64", "U64", "U32", "U16"})


def comfy_layer_config(state: QuantizedLinearState) -> dict[str, Any]:
    """The per-layer JSON ComfyUI reads from ``comfy_quant`` / ``_quantization_metadata``."""
    conf: dict[str, Any] = {"format": COMFY_FORMAT_NAMES[state.format]}
    if state.weight_only:
        conf["full_precision_matrix_mult"] = True
    conf.update(COMFY_LAYER_EXTRAS.get(state.format, {}))
    return conf


def encode_comfy_quant(conf: dict[str, Any]) -> torch.Tensor:
    """``comfy_quant`` tensor: uint8 1-D UTF-8 bytes of ``json.dumps(conf)`` (ComfyUI decodes with json.loads)."""
    return torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)


#: dtype of ``pre_quant_scale`` in the file (its values are exact in bf16 and fp16; ComfyUI casts it to the input
#: dtype at run time).
PRE_QUANT_SCALE_DTYPE = torch.bfloat16
#: ptq format names whose ComfyUI layers read ``pre_quant_scale``.
PRE_QUANT_SCALE_FORMATS = ("nvfp4",)


def _common(layer: str, state: QuantizedLinearState, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if state.pre_quant_scale is not None:
        if state.format not in PRE_QUANT_SCALE_FORMATS:
            raise UnsupportedExport(f"{layer}: ComfyUI reads pre_quant_scale only for "
                                    f"{', '.join(PRE_QUANT_SCALE_FORMATS)} layers, not {state.format}")
        out[f"{layer}.pre_quant_scale"] = state.pre_quant_scale.to(PRE_QUANT_SCALE_DTYPE).reshape(-1)
    if state.input_scale is not None:
        out[f"{layer}.input_scale"] = state.input_scale.float().reshape(())
    if state.bias is not None:
        out[f"{layer}.bias"] = cast_unquantized(state.bias, dtype)
    out[f"{layer}.comfy_quant"] = encode_comfy_quant(comfy_layer_config(state))
    return out


def write_nvfp4(layer: str, state: QuantizedLinearState, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    packed = state.weight
    if CANONICAL_NIBBLE_ORDER != TARGET_NIBBLE_ORDER:
        packed = nvfp4_fmt.pack_e2m1(nvfp4_fmt.unpack_e2m1(packed, CANONICAL_NIBBLE_ORDER), TARGET_NIBBLE_ORDER)
    return {f"{layer}.weight": packed, f"{layer}.weight_scale": nvfp4_fmt.to_tiled(state.weight_scale),
            f"{layer}.weight_scale_2": state.weight_scale_2.float().reshape(()), **_common(layer, state, dtype)}


def write_fp8(layer: str, state: QuantizedLinearState, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    if state.weight_scale.numel() != 1:
        raise UnsupportedExport(f"{layer}: per-channel FP8 weight scales are not supported by ComfyUI's FP8 layout "
                                "(tensor-wise only); set quant.weight.fp8_per_channel=false or "
                                "export.targets=[diffusers]")
    return {f"{layer}.weight": state.weight, f"{layer}.weight_scale": state.weight_scale.float().reshape(()),
            **_common(layer, state, dtype)}


def write_int8(layer: str, state: QuantizedLinearState, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """int8 and int8_convrot: codes as stored in memory, float32 scale ``[]`` or ``[out, 1]``. Weight-only int8 is
    refused: ComfyUI runs an int8_tensorwise layer as W8A8 even with ``full_precision_matrix_mult`` (the weight keeps
    its compute dtype, so comfy.ops never dequantizes it, and comfy-kitchen's int8 linear quantizes every input)."""
    if state.weight_only:
        raise UnsupportedExport(f"{layer}: ComfyUI runs int8_tensorwise layers as W8A8 (dynamic per-row activations) "
                                "even with full_precision_matrix_mult, so weight-only int8 cannot be exported for it; "
                                "use quant.activation=max (or dynamic)")
    scale = state.weight_scale.float()
    scale = scale.reshape(()) if scale.numel() == 1 and state.format == "int8" else scale.reshape(-1, 1)
    return {f"{layer}.weight": state.weight, f"{layer}.weight_scale": scale, **_common(layer, state, dtype)}


def write_mxfp8(layer: str, state: QuantizedLinearState, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """float8 codes, E8M0 block scales tiled and stored as uint8 (every ComfyUI reader path reads U8)."""
    tiled = nvfp4_fmt.to_tiled(state.weight_scale.view(torch.uint8))
    return {f"{layer}.weight": state.weight, f"{layer}.weight_scale": tiled,
            **_common(layer, state, dtype)}


def read_int8(get: Callable[[str], torch.Tensor], layer: str,
              state: QuantizedLinearState) -> tuple[torch.Tensor, set[str]]:
    w = reference_decode_int8(get(f"{layer}.weight"), get(f"{layer}.weight_scale"))
    if state.format == "int8_convrot":
        w = reference_unrotate(w, INT8_CONVROT.group_size)
    return w, {f"{layer}.weight", f"{layer}.weight_scale"}


def read_mxfp8(get: Callable[[str], torch.Tensor], layer: str,
               state: QuantizedLinearState) -> tuple[torch.Tensor, set[str]]:
    scales = reference_untile(get(f"{layer}.weight_scale"), state.out_features, state.in_features // 32)
    return reference_decode_mxfp8(get(f"{layer}.weight"), scales), {f"{layer}.weight", f"{layer}.weight_scale"}


def read_nvfp4(get: Callable[[str], torch.Tensor], layer: str,
               state: QuantizedLinearState) -> tuple[torch.Tensor, set[str]]:
    keys = {f"{layer}.weight", f"{layer}.weight_scale", f"{layer}.weight_scale_2"}
    scales = reference_untile(get(f"{layer}.weight_scale"), state.out_features, state.in_features // 16)
    w = reference_decode_nvfp4(get(f"{layer}.weight"), scales, get(f"{layer}.weight_scale_2"), high_first=True)
    return w, keys


def read_fp8(get: Callable[[str], torch.Tensor], layer: str,
             state: QuantizedLinearState) -> tuple[torch.Tensor, set[str]]:
    w, ws = get(f"{layer}.weight"), get(f"{layer}.weight_scale")
    return w.float() * ws.float(), {f"{layer}.weight", f"{layer}.weight_scale"}


class ComfyUIExporter(Exporter):
    """``<stem>_comfyui.safetensors``: the layout above."""

    name = "comfyui"
    readable_dtypes = READER_DTYPES
    writers = {"nvfp4": write_nvfp4, "fp8": write_fp8, "int8": write_int8, "int8_convrot": write_int8,
               "mxfp8": write_mxfp8}
    readers = {"nvfp4": read_nvfp4, "fp8": read_fp8, "int8": read_int8, "int8_convrot": read_int8,
               "mxfp8": read_mxfp8}

    def build(self, plain: Mapping[str, torch.Tensor], quant: Mapping[str, QuantizedLinearState],
              dtype: torch.dtype, key_map: KeyMap) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors by target key, per-layer quantization metadata)."""
        tensors = plain_tensors(plain, dtype, key_map)
        tensors.update(self.layer_tensors(quant, dtype, key_map))
        layers = {key_map(name): comfy_layer_config(state) for name, state in quant.items()}
        return tensors, {"format_version": "1.0", "layers": layers}

    def write(self, plain: Mapping[str, torch.Tensor], quant: Mapping[str, QuantizedLinearState], out_dir: Path,
              stem: str, *, dtype: torch.dtype, key_map: KeyMap, metadata: dict[str, Any],
              module_config: dict[str, Any], component: str = "transformer") -> ExportResult:
        tensors, qmeta = self.build(plain, quant, dtype, key_map)
        unreadable = self.check_dtypes({k: SAFETENSORS_DTYPES[t.dtype] for k, t in tensors.items()})
        if unreadable:  # nothing written: a file ComfyUI cannot read must not exist
            raise UnsupportedExport(f"{unreadable[0]} ({len(unreadable)} tensors)")
        path = out_dir / f"{stem}_comfyui.safetensors"
        size = save_safetensors(tensors, path, header_metadata({"_quantization_metadata": qmeta, **metadata}))
        return ExportResult(self.name, str(path), size, len(quant), len(tensors))

    def extra_checks(self, keys: set[str], get: Callable[[str], torch.Tensor], metadata: dict[str, str],
                     quant: Mapping[str, QuantizedLinearState], key_map: KeyMap) -> tuple[set[str], list[str]]:
        problems: list[str] = []
        used: set[str] = set()
        for name in quant:
            key = f"{key_map(name)}.comfy_quant"
            used.add(key)
            conf = json.loads(bytes(get(key).tolist()).decode()) if key in keys else None
            if not conf or conf.get("format") not in COMFY_FORMAT_NAMES.values():
                problems.append(f"{key}: missing or unreadable ({conf})")
        layers = json.loads(metadata.get("_quantization_metadata", "{}")).get("layers", {})
        want = {key_map(n) for n in quant}
        if set(layers) != want:
            problems.append(f"_quantization_metadata layers differ: {len(layers)} listed, {len(want)} quantized")
        problems += _config_problems(metadata)
        return used, problems


def _config_problems(metadata: Mapping[str, str]) -> list[str]:
    """Problems of the header ``config`` override ComfyUI reads (must be a JSON object with a "transformer"
    object), if the file has one."""
    if "config" not in metadata:
        return []
    try:
        conf = json.loads(metadata["config"])
    except ValueError as exc:
        return [f"header config is not JSON ({exc})"]
    if not isinstance(conf, dict) or not isinstance(conf.get("transformer"), dict):
        return [f"header config {metadata['config'][:80]!r}: expected {{\"transformer\": {{...}}}}"]
    return []
