"""The ComfyUI file target: one ``<stem>_comfyui.safetensors`` that stock ComfyUI's "Load Diffusion Model" reads as
quantized (the layout: :mod:`ptq.targets.comfyui.layout`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ptq.algorithms.qlinear import QuantizedLinearState
from ptq.formats import FORMATS
from ptq.targets.base import (
    ExportResult,
    FileTarget,
    KeyMap,
    UnsupportedExport,
    header_metadata,
    plain_tensors,
)
from ptq.targets.comfyui.layout import (
    COMFY_FORMATS,
    LAYER_FORMATS,
    METADATA_KEY,
    METADATA_VERSION,
    NIBBLE_ORDER,
    READER_DTYPES,
    decode_comfy_quant,
    layer_config,
    short_format,
)
from ptq.targets.comfyui.reader import READERS
from ptq.targets.comfyui.writer import WRITERS
from ptq.targets.safetensors_io import SAFETENSORS_DTYPES, save_safetensors


class ComfyUITarget(FileTarget):
    """``<stem>_comfyui.safetensors``: the layout above."""

    name = "comfyui"
    readable_dtypes = READER_DTYPES
    writers = WRITERS
    readers = READERS
    nvfp4_packing = f"{NIBBLE_ORDER.value}/tiled"

    def register_format(self, fmt: str, writer: Any, reader: Any, *, decoder: Any = None, comfy_name: str = "",
                        extra: dict[str, Any] | None = None, **layout: Any) -> None:
        """:meth:`FileTarget.register_format`, plus the per-layer ``format`` name ComfyUI reads the layers under
        (``comfy_name``: one its ``QUANT_ALGOS`` knows) and the extra keys of their layer JSON."""
        super().register_format(fmt, writer, reader, decoder=decoder, **layout)
        LAYER_FORMATS[fmt] = (comfy_name or fmt, dict(extra or {}))
        COMFY_FORMATS.setdefault(comfy_name or fmt, fmt)

    def unregister_format(self, fmt: str) -> None:
        super().unregister_format(fmt)
        name, _ = LAYER_FORMATS.pop(fmt, (None, None))
        if COMFY_FORMATS.get(name) == fmt:
            del COMFY_FORMATS[name]

    def claims(self, metadata: Mapping[str, str], keys: Iterable[str], convention: str) -> bool:
        return ("comfy" in convention.lower() or METADATA_KEY in metadata
                or any(k.endswith(".comfy_quant") for k in keys))

    def layer_declaration(self, tensors: Mapping[str, torch.Tensor], layer: str,
                          metadata: Mapping[str, str]) -> dict[str, Any]:
        """The layer's JSON: its ``comfy_quant`` tensor, else the header ``_quantization_metadata`` entry, or {}."""
        t = tensors.get(f"{layer}.comfy_quant")
        if t is not None:
            return decode_comfy_quant(t)
        try:
            layers = json.loads(metadata.get(METADATA_KEY, "{}")).get("layers", {})
        except (ValueError, AttributeError):
            return {}
        conf = layers.get(layer, {}) if isinstance(layers, dict) else {}
        return conf if isinstance(conf, dict) else {}

    def weight_only_declared(self, tensors: Mapping[str, torch.Tensor], layer: str) -> bool:
        t = tensors.get(f"{layer}.comfy_quant")
        return t is not None and bool(decode_comfy_quant(t).get("full_precision_matrix_mult"))

    def file_layer_format(self, g: Mapping[str, torch.Tensor], conf: Mapping[str, Any]) -> str | None:
        """The declared format (of layers whose activations are scaled at run time, or whose weight has the
        format's storage dtype), else the format the tensors' dtypes say."""
        short = short_format(conf) if conf.get("format") else None
        if short in FORMATS and (FORMATS[short].dynamic_activations
                                 or g["weight"].dtype == FORMATS[short].storage_dtype):
            return short
        return super().file_layer_format(g, conf)

    def build(self, plain: Mapping[str, torch.Tensor], quant: Mapping[str, QuantizedLinearState],
              dtype: torch.dtype, key_map: KeyMap) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors by target key, per-layer quantization metadata)."""
        tensors = plain_tensors(plain, dtype, key_map)
        tensors.update(self.layer_tensors(quant, dtype, key_map))
        layers = {key_map(name): layer_config(state) for name, state in quant.items()}
        return tensors, {"format_version": METADATA_VERSION, "layers": layers}

    def write(self, plain: Mapping[str, torch.Tensor], quant: Mapping[str, QuantizedLinearState], out_dir: Path,
              stem: str, *, dtype: torch.dtype, key_map: KeyMap, metadata: dict[str, Any],
              module_config: dict[str, Any], component: str = "transformer") -> ExportResult:
        tensors, qmeta = self.build(plain, quant, dtype, key_map)
        unreadable = self.check_dtypes({k: SAFETENSORS_DTYPES[t.dtype] for k, t in tensors.items()})
        if unreadable:  # nothing written: a file ComfyUI cannot read must not exist
            raise UnsupportedExport(f"{unreadable[0]} ({len(unreadable)} tensors)")
        path = out_dir / f"{stem}_comfyui.safetensors"
        size = save_safetensors(tensors, path, header_metadata({METADATA_KEY: qmeta, **metadata}))
        return ExportResult(self.name, str(path), size, len(quant), len(tensors))

    def extra_checks(self, keys: set[str], get: Callable[[str], torch.Tensor], metadata: dict[str, str],
                     quant: Mapping[str, QuantizedLinearState], key_map: KeyMap) -> tuple[set[str], list[str]]:
        problems: list[str] = []
        used: set[str] = set()
        for name in quant:
            key = f"{key_map(name)}.comfy_quant"
            used.add(key)
            conf = json.loads(bytes(get(key).tolist()).decode()) if key in keys else None
            if not conf or conf.get("format") not in {name for name, _ in LAYER_FORMATS.values()}:
                problems.append(f"{key}: missing or unreadable ({conf})")
        layers = json.loads(metadata.get(METADATA_KEY, "{}")).get("layers", {})
        want = {key_map(n) for n in quant}
        if set(layers) != want:
            problems.append(f"_quantization_metadata layers differ: {len(layers)} listed, {len(want)} quantized")
        return used, problems
