"""Decode one quantized layer of a file that ptq may not have written (``ptq verify``), per format, into what its
loader computes and what ptq's simulation runs: :class:`FileLayer`.

The decoders are independent of the quantizers (table-driven, :mod:`ptq.targets.decoders`) and diagnose layouts:
an NVFP4 weight is decoded under every (nibble order, block-scale layout) its shapes allow and the one closest to the
bf16 weight is kept, so a file whose best packing differs from what its loader reads is named (``expected``: the
file target's packing, e.g. ``high_first/tiled`` for ComfyUI). :data:`FILE_DECODERS` is keyed by format; each
target registers the decoders of the layouts it defines.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ptq.algorithms.qlinear import CANONICAL_NIBBLE_ORDER, QuantizedLinearState
from ptq.formats import nvfp4 as nvfp4_fmt
from ptq.formats.fp8 import FP8_DTYPE
from ptq.formats.nvfp4 import NibbleOrder
from ptq.targets.decoders import reference_decode_nvfp4, reference_untile

#: Scale names of a weight: ComfyUI / ModelOpt, and the legacy Kijai-style FP8 name.
SCALE_NAMES = ("weight_scale", "scale_weight")


@dataclass
class FileLayer:
    """One quantized layer as its loader reads it: ``state`` in ptq's in-memory layout (for the simulated kernel;
    None when it cannot be decoded), ``weight`` float32 ``[out, in]`` the loader computes (``pre_quant_scale``
    folded in), the detected ``packing``, ``input_scale`` (float32 ``[]``) and ``per_channel`` weight scales,
    ``problems`` found while decoding, and ``readable`` (False: nothing can be compared)."""

    format: str
    state: QuantizedLinearState | None = None
    weight: torch.Tensor | None = None
    packing: str = ""
    input_scale: torch.Tensor | None = None
    per_channel: bool = False
    problems: list[str] = field(default_factory=list)
    readable: bool = True


#: ``decode(tensors by suffix, layer JSON, out, in, bf16 weight float32 [out, in], expected packing, device)``
FileDecoder = Callable[[dict[str, torch.Tensor], dict[str, Any], int, int, torch.Tensor, str, str], FileLayer]
FILE_DECODERS: dict[str, FileDecoder] = {}


def register_file_decoder(*formats: str) -> Callable[[FileDecoder], FileDecoder]:
    """Decorator: ``fn`` decodes file layers of ``formats``."""

    def deco(fn: FileDecoder) -> FileDecoder:
        for f in formats:
            FILE_DECODERS[f] = fn
        return fn

    return deco


def guess_format(g: Mapping[str, torch.Tensor]) -> str | None:
    """A quantized layer's format from its tensors: uint8 weights NVFP4, float8 weights FP8 (MXFP8 with E8M0 or 2-D
    uint8 block scales), int8 weights int8; None for a float weight."""
    w, scale = g["weight"], g.get("weight_scale")
    if w.dtype == torch.uint8:
        return "nvfp4"
    if w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        mx = scale is not None and (scale.dtype == torch.float8_e8m0fnu or (scale.dtype == torch.uint8
                                                                           and scale.dim() == 2))
        return "mxfp8" if mx else "fp8"
    return "int8" if w.dtype == torch.int8 else None


def _rel_err(ref: torch.Tensor, x: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (the packing choice)."""
    r, t = ref.double(), x.double()
    return float((t - r).norm() / r.norm().clamp_min(1e-30))


def nvfp4_candidates(w: torch.Tensor, scales: torch.Tensor, ts: torch.Tensor, out: int, inp: int
                     ) -> dict[str, torch.Tensor]:
    """Decodings of one NVFP4 weight under each (nibble order, scale layout) the shapes allow."""
    cands, layouts = {}, {}
    if scales.shape == (out, inp // 16):
        layouts["row_major"] = scales
    tiled_numel = nvfp4_fmt.tiled_shape(out, inp // 16)
    if scales.numel() == tiled_numel[0] * tiled_numel[1]:
        layouts["tiled"] = reference_untile(scales, out, inp // 16)
    for layout, s in layouts.items():
        for order in ("high_first", "low_first"):
            cands[f"{order}/{layout}"] = reference_decode_nvfp4(w, s.view(torch.float8_e4m3fn), ts,
                                                                high_first=order == "high_first")
    return cands


def _packing_problem(best: str, expected: str, errs: dict[str, float]) -> str | None:
    """What is wrong when the closest packing is not the one the loader reads (and clearly closer)."""
    if best == expected or errs[best] >= 0.8 * errs.get(expected, float("inf")):
        return None
    (order, layout), (want_order, want_layout) = best.split("/"), expected.split("/")
    what = []
    if order != want_order:
        what.append(f"nibble order is {order} but the loader reads {want_order}")
    if layout != want_layout:
        what.append(f"block scales are {layout} but the loader reads {want_layout}")
    return "; ".join(what) + (f" (weight error {errs[best]:.3f} as stored vs "
                              f"{errs.get(expected, float('nan')):.3f} as the loader will read it)")


def _static_scales(g: dict[str, torch.Tensor], layer: FileLayer) -> torch.Tensor | None:
    """The weight scale (naming problems recorded), or None when there is none."""
    scale_key = next((s for s in SCALE_NAMES if s in g), None)
    if scale_key is None:
        layer.problems.append("no weight_scale (or scale_weight) tensor")
        layer.readable = False
        return None
    if scale_key == "scale_weight":
        layer.problems.append("scale named `scale_weight` (Kijai FP8 naming): ComfyUI's quantized loader reads "
                              "`weight_scale`")
    return g[scale_key]


def _pre_quant_scale(g: dict[str, torch.Tensor], layer: FileLayer, device: str, smoothed: bool
                     ) -> torch.Tensor | None:
    pqs = g.get("pre_quant_scale")
    if pqs is not None and not smoothed:
        layer.problems.append("pre_quant_scale on a non-nvfp4 layer: ComfyUI does not apply it")
        return None
    return None if pqs is None else pqs.to(device)


def _input_scale(g: dict[str, torch.Tensor], device: str) -> torch.Tensor | None:
    t = g.get("input_scale")
    return None if t is None else t.float().reshape(()).to(device)


@register_file_decoder("nvfp4")
def decode_nvfp4(g: dict[str, torch.Tensor], conf: dict[str, Any], out: int, inp: int, ref: torch.Tensor,
                 expected: str, device: str) -> FileLayer:
    """NVFP4 under the packing closest to ``ref`` (the problem named when the loader reads another one)."""
    layer = FileLayer("nvfp4")
    scales = _static_scales(g, layer)
    if scales is None:
        return layer
    layer.input_scale = _input_scale(g, device)
    ts = g.get("weight_scale_2")
    if ts is None:
        layer.problems.append("no weight_scale_2 (NVFP4 global scale)")
        layer.readable = False
        return layer
    cands = nvfp4_candidates(g["weight"], scales, ts.float(), out, inp)
    errs = {k: _rel_err(ref, v) for k, v in cands.items()}
    layer.packing = min(errs, key=errs.get)
    layer.weight = cands[layer.packing]
    problem = _packing_problem(layer.packing, expected, errs)
    if problem:
        layer.problems.append(problem)
    pqs = _pre_quant_scale(g, layer, device, smoothed=True)
    if pqs is not None:  # the stored weight is W / pre_quant_scale (ComfyUI multiplies the input by it)
        layer.weight = layer.weight * pqs.float().reshape(1, -1)
    order, scale_layout = layer.packing.split("/")
    s = reference_untile(scales, out, inp // 16) if scale_layout == "tiled" else scales
    packed = g["weight"]
    if NibbleOrder(order) != CANONICAL_NIBBLE_ORDER:
        packed = nvfp4_fmt.pack_e2m1(nvfp4_fmt.unpack_e2m1(packed, NibbleOrder(order)), CANONICAL_NIBBLE_ORDER)
    bias = g.get("bias")
    layer.state = QuantizedLinearState("nvfp4", packed, s.view(torch.float8_e4m3fn).contiguous(),
                                       ts.float().reshape(()), layer.input_scale,
                                       None if bias is None else bias.to(device), inp, out, pre_quant_scale=pqs)
    return layer


@register_file_decoder("fp8")
def decode_fp8(g: dict[str, torch.Tensor], conf: dict[str, Any], out: int, inp: int, ref: torch.Tensor,
               expected: str, device: str) -> FileLayer:
    """FP8 E4M3 with a per-tensor or per-row float scale (either scale name)."""
    layer = FileLayer("fp8")
    scales = _static_scales(g, layer)
    if scales is None:
        return layer
    layer.input_scale = _input_scale(g, device)
    layer.per_channel = scales.numel() > 1
    layer.weight = g["weight"].float() * scales.float().reshape(-1, 1 if layer.per_channel else 1)
    layer.packing = "per-channel" if layer.per_channel else "per-tensor"
    _pre_quant_scale(g, layer, device, smoothed=False)
    scale = scales.float()
    scale = scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1, 1)
    bias = g.get("bias")
    layer.state = QuantizedLinearState("fp8", g["weight"].to(FP8_DTYPE), scale, None, layer.input_scale,
                                       None if bias is None else bias.to(device), inp, out)
    return layer


__all__ = ["FILE_DECODERS", "SCALE_NAMES", "FileDecoder", "FileLayer", "decode_fp8", "decode_nvfp4", "guess_format",
           "nvfp4_candidates", "register_file_decoder"]
