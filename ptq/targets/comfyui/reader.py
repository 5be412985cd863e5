"""Independent decoders of ComfyUI's layout, per ptq format: ``(get tensor by key, layer key, expected state) ->
(float32 weight [out, in], keys read)`` for round-trip verification, built on :mod:`ptq.targets.decoders` (no
quantizer code), and the file-layer decoders ``ptq verify`` uses for the formats whose layout only this target
defines (int8, int8 ConvRot, MXFP8; NVFP4 and FP8: :mod:`ptq.targets.file_decoders`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ptq.algorithms.qlinear import QuantizedLinearState
from ptq.formats import CONVROT_W4A4, FORMATS, INT8_CONVROT
from ptq.formats.nvfp4 import NibbleOrder
from ptq.targets.comfyui.layout import NIBBLE_ORDER, short_format
from ptq.targets.decoders import (
    reference_decode_int4,
    reference_decode_int8,
    reference_decode_mxfp8,
    reference_decode_nvfp4,
    reference_unrotate,
    reference_untile,
)
from ptq.targets.file_decoders import FileLayer, register_file_decoder

Get = Callable[[str], torch.Tensor]


def read_int8(get: Get, layer: str, state: QuantizedLinearState) -> tuple[torch.Tensor, set[str]]:
    w = reference_decode_int8(get(f"{layer}.weight"), get(f"{layer}.weight_scale"))
    if state.format == "int8_convrot":
        w = reference_unrotate(w, INT8_CONVROT.group_size)
    return w, {f"{layer}.weight", f"{layer}.weight_scale"}


def read_convrot_w4a4(get: Get, layer: str, state: QuantizedLinearState) -> tuple[torch.Tensor, set[str]]:
    w = reference_decode_int4(get(f"{layer}.weight"), get(f"{layer}.weight_scale"))
    return reference_unrotate(w, CONVROT_W4A4.group_size), {f"{layer}.weight", f"{layer}.weight_scale"}


def read_mxfp8(get: Get, layer: str, state: QuantizedLinearState) -> tuple[torch.Tensor, set[str]]:
    scales = reference_untile(get(f"{layer}.weight_scale"), state.out_features, state.in_features // 32)
    return reference_decode_mxfp8(get(f"{layer}.weight"), scales), {f"{layer}.weight", f"{layer}.weight_scale"}


def read_nvfp4(get: Get, layer: str, state: QuantizedLinearState) -> tuple[torch.Tensor, set[str]]:
    keys = {f"{layer}.weight", f"{layer}.weight_scale", f"{layer}.weight_scale_2"}
    scales = reference_untile(get(f"{layer}.weight_scale"), state.out_features, state.in_features // 16)
    w = reference_decode_nvfp4(get(f"{layer}.weight"), scales, get(f"{layer}.weight_scale_2"),
                               high_first=NIBBLE_ORDER == NibbleOrder.HIGH_FIRST)
    return w, keys


def read_fp8(get: Get, layer: str, state: QuantizedLinearState) -> tuple[torch.Tensor, set[str]]:
    w, ws = get(f"{layer}.weight"), get(f"{layer}.weight_scale")
    return w.float() * ws.float(), {f"{layer}.weight", f"{layer}.weight_scale"}


READERS = {"nvfp4": read_nvfp4, "fp8": read_fp8, "int8": read_int8, "int8_convrot": read_int8, "mxfp8": read_mxfp8,
           "convrot_w4a4": read_convrot_w4a4, "convrot_w4a8": read_convrot_w4a4}
#: The formats whose layers this target decodes with run-time activation scales (their ``ptq verify`` decoder).
RUNTIME_SCALED = ("int8", "int8_convrot", "mxfp8", "convrot_w4a4", "convrot_w4a8")


# ------------------------------------------------------------------- file layers (``ptq verify``): run-time scales


def _file_state(fmt: str, g: dict[str, torch.Tensor], conf: dict[str, Any], inp: int, out: int,
                bias: torch.Tensor | None) -> QuantizedLinearState:
    """A ComfyUI-layout int8 / int8_convrot / MXFP8 layer in ptq's in-memory layout: int8 codes with their float32
    scale, MXFP8 codes with untiled uint8 E8M0 scales; weight-only as ComfyUI runs it (MXFP8 with
    ``full_precision_matrix_mult``; int8 never: ComfyUI ignores the flag for int8)."""
    weight_only = bool(conf.get("full_precision_matrix_mult")) and fmt == "mxfp8"
    if fmt == "mxfp8":
        codes = reference_untile(g["weight_scale"].view(torch.uint8), out, inp // 32).contiguous()
        return QuantizedLinearState("mxfp8", g["weight"], codes, None, None, bias, inp, out, not weight_only)
    scale = g["weight_scale"].float()
    scale = scale.reshape(()) if scale.numel() == 1 and fmt == "int8" else scale.reshape(-1, 1)
    return QuantizedLinearState(fmt, g["weight"], scale, None, None, bias, inp, out, not weight_only)


@register_file_decoder(*RUNTIME_SCALED)
def decode_runtime_scaled(g: dict[str, torch.Tensor], conf: dict[str, Any], out: int, inp: int, ref: torch.Tensor,
                          expected: str, device: str) -> FileLayer:
    """int8 (with or without ConvRot) and MXFP8 in ComfyUI's layout, decoded by this target's readers."""
    fmt = _runtime_format(g, conf)
    layer = FileLayer(fmt)
    if "weight_scale" not in g:
        layer.problems.append("no weight_scale tensor")
        layer.readable = False
        return layer
    group = getattr(FORMATS[fmt], "group_size", None) if FORMATS[fmt].rotated_codes else None
    if group is not None and int(conf.get("convrot_groupsize", 256)) != group:
        layer.problems.append(f"convrot_groupsize {conf.get('convrot_groupsize')}: ptq simulates ConvRot groups of "
                              f"{group} only")
        layer.readable = False
        return layer
    bias = g.get("bias")
    try:
        layer.state = _file_state(fmt, g, conf, inp, out, None if bias is None else bias.to(device))
        layer.weight, _ = READERS[fmt](lambda k: g[k.rpartition(".")[2]], "layer", layer.state)
    except (RuntimeError, ValueError, KeyError) as exc:
        layer.problems.append(f"cannot be decoded as {fmt} ({type(exc).__name__}: {exc})")
        layer.readable = False
        layer.state = None
        return layer
    layer.per_channel = layer.state.weight_scale.numel() > 1
    layer.packing = "e8m0/tiled" if fmt == "mxfp8" else "per-channel" if layer.per_channel else "per-tensor"
    return layer


def _runtime_format(g: dict[str, torch.Tensor], conf: dict[str, Any]) -> str:
    """int8 / int8_convrot / mxfp8 from the layer JSON, else from the weight dtype and scale shape."""
    short = short_format(conf) if conf else None
    if short in RUNTIME_SCALED:
        return short
    return "int8" if g["weight"].dtype == torch.int8 else "mxfp8"
