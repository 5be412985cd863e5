"""``ptq inspect``'s checks of what ComfyUI's loader does with a file (``comfy/ops.py`` mixed-precision loading,
``comfy/utils.py`` ``convert_old_quants`` / ``load_safetensors``, ``comfy/quant_ops.py`` ``QUANT_ALGOS``,
comfy-kitchen's layouts): one registered function per problem code (:func:`ptq.targets.inspection.register_check`),
plus the reader of the per-layer formats a file declares (``comfy_quant`` / ``_quantization_metadata``).

Checks about ComfyUI's metadata, names and layouts run whatever loader the file is judged against (a ModelOpt
file is still told what ComfyUI would read); the ones marked ``loaders=("comfyui",)`` only when judging for ComfyUI.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ptq.formats import FORMATS
from ptq.models.files import strip_prefix
from ptq.targets.comfyui import features
from ptq.targets.comfyui.layout import (
    COMFY_FORMATS,
    METADATA_KEY,
    OTHER_STORAGE_DTYPES,
    PRE_QUANT_SCALE_FORMATS,
    READER_DTYPES,
    QuantMetadata,
    parse_quant_metadata,
    short_format,
)
from ptq.targets.file_layout import (
    COMFY_READ_SUFFIXES,
    FOREIGN_SUFFIXES,
    LEGACY_SCALE_SUFFIXES,
    PER_TENSOR_SCALE_SUFFIXES,
    weight_suffix,
)
from ptq.targets.inspection import DECLARATION_READERS, FileView, LayerInfo, dynamic_format, register_check
from ptq.targets.safetensors_io import SAFETENSORS_DTYPES

_METADATA_FIX = (
    'add the header entry _quantization_metadata = {"format_version": "1.0", "layers": {"<layer>": {"format": '
    '"nvfp4"}}} (format "float8_e4m3fn" for FP8) listing every quantized layer by its full state-dict prefix, '
    'e.g. "blocks.0.self_attn.q"; with safetensors: save_file(tensors, path, metadata={"_quantization_metadata": '
    "json.dumps(meta)}) - or write <layer>.comfy_quant uint8 tensors holding the same per-layer JSON"
)


def required_dtype(fmt: str) -> str | None:
    """The weight dtype a per-layer format needs (ptq's formats: their storage dtype)."""
    if fmt in FORMATS:
        return SAFETENSORS_DTYPES[FORMATS[fmt].storage_dtype]
    return OTHER_STORAGE_DTYPES.get(fmt)


_QUANT_WEIGHT_DTYPES = ("U8", "F8_E4M3", "F8_E5M2", "I8", "F4")


def _roundup(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _power_of_4(n: int) -> bool:
    return n >= 4 and n & (n - 1) == 0 and (n.bit_length() - 1) % 2 == 0


# ------------------------------------------------------------------------------------ declared per-layer formats


@dataclass
class Declarations:
    """What a file declares to ComfyUI: per-layer configs (file layer -> JSON), ``comfy_quant`` tensors that are not
    a JSON object with a "format", the parsed header entry and the layers it names that have no weight."""

    confs: dict[str, dict[str, Any]] = field(default_factory=dict)
    bad_json: list[str] = field(default_factory=list)
    header: QuantMetadata = field(default_factory=lambda: QuantMetadata(False))
    missing: list[str] = field(default_factory=list)


def _read_comfy_quant(view: FileView, layer: str) -> Any:
    """A layer's ``comfy_quant`` JSON (``{"format": "?"}`` when values are not read, None when unreadable)."""
    conf: Any = {"format": "?"}
    if view.read_bytes is not None:
        t = view.load(view.groups[layer]["comfy_quant"].name)
        if t is not None:
            try:
                conf = json.loads(t.contiguous().view(torch.uint8).numpy().tobytes())
            except (ValueError, RuntimeError, TypeError):
                conf = None
    return conf


def read_declarations(view: FileView) -> tuple[Declarations, dict[str, dict[str, Any]], dict[str, str]]:
    """Per-layer quant configs as ComfyUI would see them (keyed by the layer name in the file), and their short
    format names."""
    dec = Declarations()
    for layer, group in view.groups.items():
        if "comfy_quant" not in group:
            continue
        conf = _read_comfy_quant(view, layer)
        if not isinstance(conf, dict) or not isinstance(conf.get("format"), str):
            dec.bad_json.append(layer)
            continue
        dec.confs[layer] = conf
    dec.header = parse_quant_metadata(view.metadata)
    if dec.header.present:
        prefix = view.naming.prefix
        for name, conf in dec.header.layers.items():
            candidates = [name, prefix + name, strip_prefix(name, prefix)]
            target = next((c for c in candidates if c in view.groups and weight_suffix(view.groups[c]) == "weight"),
                          None)
            if target is None:
                dec.missing.append(name)
                continue
            dec.confs[target] = dict(conf)
    elif any(k.rsplit(".", 1)[-1] == "scaled_fp8" for k in view.tensors):
        for layer, group in view.groups.items():  # ComfyUI's convert_old_quants legacy path
            if "scale_weight" in group and "weight" in group:
                dec.confs.setdefault(layer, {"format": "float8_e4m3fn", "_legacy": True})
    return dec, dec.confs, {layer: short_format(c) for layer, c in dec.confs.items()}


DECLARATION_READERS.append(read_declarations)


@register_check("invalid_quant_metadata", order=10)
def check_invalid_metadata(view: FileView) -> None:
    dec: Declarations = view.declared
    if dec.bad_json:
        view.problem(
            "invalid_quant_metadata", "error", dec.bad_json,
            '<layer>.comfy_quant tensors that are not a JSON object with a "format" string; ComfyUI\'s '
            "loader fails on json.loads / has no format for these layers.",
            'write each comfy_quant as torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()), '
            "dtype=torch.uint8)")
    if dec.header.error:
        view.problem(
            "invalid_quant_metadata", "error", [],
            f"{dec.header.error}. ComfyUI json.loads this entry at load time and fails or skips the layers.",
            _METADATA_FIX)


@register_check("metadata_layer_without_weight", order=11)
def check_metadata_without_weight(view: FileView) -> None:
    missing = view.declared.missing
    if not missing:
        return
    prefix = view.naming.prefix
    by_canon = {view.family.canonical_name(strip_prefix(layer, prefix), _bare(view)): layer for layer in view.groups}
    renamed = {m: by_canon[c] for m in missing
               if (c := view.family.canonical_name(strip_prefix(m, prefix), _bare(view))) in by_canon}
    hint = ""
    if renamed:
        first = next(iter(renamed.items()))
        hint = (f" {len(renamed)} of them exist under another naming convention or prefix (e.g. {first[0]!r} -> "
                f"{first[1]!r}).")
    view.problem(
        "metadata_layer_without_weight", "error", missing,
        "_quantization_metadata lists layers that have no <layer>.weight tensor in this file. ComfyUI "
        "attaches the per-layer format to <name>.comfy_quant; with no matching weight it is ignored, so the "
        "real layer (if it exists under another name) is loaded as plain bytes." + hint,
        "make the metadata layer names exactly the weight keys without the trailing '.weight' (same naming "
        "convention and prefix as the tensors)")


def _bare(view: FileView) -> Any:
    """A naming that renames stripped keys to the family's canonical names whatever their naming."""
    return replace(view.naming, prefix="", style="diffusers")


# ------------------------------------------------------------------------------------------------- metadata


@register_check("unknown_quant_format", order=20)
def check_unknown_format(view: FileView) -> None:
    unknown = [n for n, c in view.confs.items() if c.get("format") not in COMFY_FORMATS and c.get("format") != "?"]
    if unknown:
        fmts = sorted({str(view.confs[n].get("format")) for n in unknown})
        view.problem(
            "unknown_quant_format", "error", unknown,
            f"layer format(s) {fmts} are not in ComfyUI core's QUANT_ALGOS ({', '.join(COMFY_FORMATS)}); "
            "ComfyUI raises KeyError while loading (unless a custom node registers the format).",
            'use "nvfp4" for NVFP4 and "float8_e4m3fn" for FP8 E4M3')


@register_check("format_dtype_mismatch", order=21)
def check_format_dtype(view: FileView) -> None:
    mismatch: list[str] = []
    detail = ""
    for li in view.layers:
        req = required_dtype(li.metadata_format or "")
        if req and li.weight and li.weight.dtype != req:
            mismatch.append(li.name)
            detail = detail or f"e.g. {li.name}: format {li.metadata_format} but weight is {li.weight.dtype}"
    if mismatch:
        view.problem(
            "format_dtype_mismatch", "error", mismatch,
            f"declared format does not match the stored weight dtype ({detail}). ComfyUI converts the weight "
            "with .to(storage dtype) - a numeric cast, not a reinterpretation - so the codes become garbage.",
            "store NVFP4 weights as uint8 [out, in/2] (two E2M1 codes per byte) and FP8 weights as "
            "float8_e4m3fn, or fix the per-layer format")


def _undeclared(view: FileView) -> list[LayerInfo]:
    """Layers storing quantized weights that the file does not declare (FP8 weights with no scale at all are a
    plain "cast" checkpoint, which ComfyUI loads as such)."""
    layers = [li for li in view.layers if li.weight is not None and li.weight.name == "weight"
              and li.weight.dtype in _QUANT_WEIGHT_DTYPES and li.name not in view.confs]
    return [li for li in layers if li.weight.dtype == "U8" or len(li.scales) > 0]  # type: ignore[union-attr]


_UNDECLARED_WHAT = (
    "ComfyUI then loads the raw bytes as ordinary tensors: uint8 NVFP4 codes [out, in/2] are not "
    "dequantized (size-mismatch load error or garbage weights) and fp8 weights are used without their "
    "scales - the output is noise."
)


@register_check("missing_quant_metadata", order=22)
def check_missing_metadata(view: FileView) -> None:
    layers = _undeclared(view)
    if not layers or view.confs:
        return
    if view.target == "modelopt":
        return
    names = [li.name for li in layers]
    dts = ", ".join(sorted({li.weight.dtype for li in layers}))  # type: ignore[union-attr]
    legacy = (" (ComfyUI's legacy conversion only handles FP8 layers with a .scale_weight and a scaled_fp8 marker "
              "tensor)" if view.convention.name == "comfyui-scaled-fp8" else "")
    modelopt = (" (If the file is meant for diffusers' BFL / Model Optimizer style loaders, not ComfyUI, inspect it "
                "with --target modelopt.)" if view.convention.name == "modelopt" else "")
    view.problem(
        "missing_quant_metadata", "error", names,
        f"{len(names)} layers store quantized weights ({dts}) but the file has no _quantization_metadata "
        f"header entry and no <layer>.comfy_quant tensors{legacy}. {_UNDECLARED_WHAT}" + modelopt,
        _METADATA_FIX)


@register_check("quantized_layer_not_in_metadata", order=22)
def check_layer_not_in_metadata(view: FileView) -> None:
    layers = _undeclared(view)
    if not layers or not view.confs:
        return
    names = [li.name for li in layers]
    dts = ", ".join(sorted({li.weight.dtype for li in layers}))  # type: ignore[union-attr]
    view.problem(
        "quantized_layer_not_in_metadata", "error", names,
        f"{len(names)} layers store quantized weights ({dts}) but are not listed in the quantization "
        f"metadata / have no comfy_quant tensor. {_UNDECLARED_WHAT}",
        "add these layers to _quantization_metadata (or write their <layer>.comfy_quant tensors)")


# ---------------------------------------------------------------------------------------------------- names


@register_check("unread_scale_name", order=30)
def check_unread_scale_names(view: FileView) -> None:
    qm_present = METADATA_KEY in view.metadata
    legacy_read = any(k.rsplit(".", 1)[-1] == "scaled_fp8" for k in view.tensors) and not qm_present
    legacy, foreign, amax, ws_in_legacy, torchao = [], [], [], [], []
    for layer, group in view.groups.items():
        for s in group:
            if s in LEGACY_SCALE_SUFFIXES and not (legacy_read and "weight" in group):
                legacy.append(layer)
            elif s in FOREIGN_SUFFIXES or s == "weight_packed":
                foreign.append(layer)
            elif s.endswith("._amax"):
                amax.append(layer)
            elif s.startswith(("_weight_", "_bias_")):
                torchao.append(layer)
        if legacy_read and "weight_scale" in group and "scale_weight" not in group and layer not in view.confs:
            ws_in_legacy.append(layer)
    if legacy:
        why = ("the file has _quantization_metadata, so ComfyUI skips its legacy conversion" if qm_present
               else "the file has no scaled_fp8 marker tensor, so ComfyUI never converts them")
        view.problem(
            "unread_scale_name", "error", legacy,
            ".scale_weight / .scale_input are the legacy (Kijai-style) FP8 names. ComfyUI renames them to "
            ".weight_scale / .input_scale only in files with a scaled_fp8 marker and no _quantization_metadata, "
            f"and only as FP8; here {why}: these scales are ignored and the layers run without them.",
            "rename <layer>.scale_weight -> <layer>.weight_scale and <layer>.scale_input -> <layer>.input_scale, "
            "and declare the layers in _quantization_metadata (format nvfp4 / float8_e4m3fn)")
    if ws_in_legacy:
        view.problem(
            "unread_scale_name", "error", ws_in_legacy,
            "legacy scaled_fp8 file (scale_weight naming) in which these layers use .weight_scale instead: "
            "ComfyUI's legacy conversion only registers layers that have .scale_weight, so these weights load "
            "unscaled.",
            "use one convention: either all .scale_weight with the scaled_fp8 marker, or .weight_scale with "
            "_quantization_metadata (recommended)")
    if foreign:
        view.problem(
            "unread_scale_name", "error", foreign,
            "compressed-tensors names (weight_packed / weight_global_scale / input_global_scale / zero points) "
            "are not read by ComfyUI, which looks for <layer>.weight, .weight_scale, .weight_scale_2 and "
            ".input_scale (layers without .weight are left uninitialised).",
            "rename weight_packed -> weight; store weight_scale_2 = 1/weight_global_scale and input_scale = "
            "1/input_global_scale (compressed-tensors stores reciprocal global scales); add "
            "_quantization_metadata; check nibble order and block-scale layout with ptq verify")
    if torchao:
        view.problem(
            "unread_scale_name", "error", torchao,
            "torchao tensor-subclass keys (<module>._weight_qdata, ._weight_scale, ...) are not read by "
            "ComfyUI (it looks for <layer>.weight / .weight_scale / .weight_scale_2 / .input_scale).",
            "re-export with ComfyUI names (ptq run writes them) or convert: _weight_qdata -> weight, "
            "_weight_scale -> weight_scale, _weight_per_tensor_scale -> weight_scale_2, plus metadata")
    if amax:
        view.problem(
            "unread_scale_name", "warning", amax,
            "TensorRT Model Optimizer *_quantizer._amax tensors are ignored by ComfyUI; calibrated activation "
            "ranges in them are lost unless converted to input_scale.",
            "write input_scale = input_quantizer._amax / (6*448) for NVFP4 (/448 for FP8) as a float32 scalar "
            "and drop the _amax tensors")


@register_check("orphan_scale", order=31)
def check_orphan_scales(view: FileView) -> None:
    orphans = [layer for layer, group in view.groups.items() if weight_suffix(group) is None
               and any(s in COMFY_READ_SUFFIXES or s in LEGACY_SCALE_SUFFIXES or s in FOREIGN_SUFFIXES for s in group)]
    if orphans:
        view.problem(
            "orphan_scale", "warning", orphans,
            "scale / comfy_quant tensors for layers that have no weight tensor; no loader uses them (often a "
            "renaming or prefix mistake).",
            "rename them to the layer their weight uses, or drop them")


@register_check("diffusers_naming", order=33, loaders=("comfyui",))
def check_diffusers_naming(view: FileView) -> None:
    if view.naming.style == "diffusers" and view.convention.name == "comfyui":
        view.problem(
            "diffusers_naming", "warning", [],
            "ComfyUI-style quantization metadata with diffusers key names. ComfyUI detects WAN and applies "
            "per-layer formats using original Wan names (head.modulation, blocks.N.self_attn.q, ...), which is "
            "what files in models/diffusion_models use.",
            "rename keys and metadata layer names to original Wan names (pure rename, shared/README.md)")


@register_check("prefixed_quantized_file", order=35, loaders=("comfyui",))
def check_prefixed_quantized_file(view: FileView) -> None:
    prefix = view.naming.prefix
    if not prefix or not (view.convention.name == "comfyui" or METADATA_KEY in view.metadata):
        return
    names = list(parse_quant_metadata(view.metadata).layers)
    prefixed = sum(n.startswith(prefix) for n in names)
    where = ("prefixed, so they only match when loaded as a full checkpoint" if prefixed > len(names) // 2
             else "unprefixed, so they only match in Load Diffusion Model (which strips the prefix first)")
    view.problem(
        "prefixed_quantized_file", "warning", [],
        f"keys carry the prefix {prefix!r}. ComfyUI's Load Diffusion Model strips it before applying "
        "_quantization_metadata (metadata names must then be unprefixed) while full-checkpoint loading "
        f"keeps it (names must be prefixed). Metadata names here are {where}.",
        "write diffusion-model files without the prefix, with unprefixed metadata layer names")


# --------------------------------------------------------------------------------------- scales (static formats)


@dataclass
class ScaleSurvey:
    """One pass over the quantized layers of static-activation formats (NVFP4, FP8): what each scale check
    reports."""

    missing_ws: list[str] = field(default_factory=list)
    missing_in: list[str] = field(default_factory=list)
    bad_shape: list[str] = field(default_factory=list)
    shape_detail: str = ""
    rowmajor: list[str] = field(default_factory=list)
    tiled: list[str] = field(default_factory=list)
    same_layout: int = 0
    u8_scale: list[str] = field(default_factory=list)
    bad_dtype: list[str] = field(default_factory=list)
    not_scalar: list[str] = field(default_factory=list)
    fp8_channel: list[str] = field(default_factory=list)
    not_f32: list[str] = field(default_factory=list)


def _survey_weight_scales(view: FileView, li: LayerInfo, g: dict, sv: ScaleSurvey) -> None:
    """Weight-scale and input-scale presence, per-tensor scales, FP8 per-channel scales."""
    fmt, block = li.format, g.get("weight_scale") or g.get("scale_weight")
    if fmt == "nvfp4":
        if block is None and "_weight_scale" not in g:
            sv.missing_ws.append(li.name)
        elif not {"weight_scale_2", "weight_global_scale", "_weight_per_tensor_scale"} & set(g):
            sv.missing_ws.append(li.name)
    elif fmt in ("fp8", "fp8_e5m2") and block is None and (li.name in view.confs or li.scales):
        sv.missing_ws.append(li.name)
    if fmt in ("nvfp4", "fp8", "fp8_e5m2", "mxfp8") and not (
            {"input_scale", "scale_input", "input_global_scale", "_weight_act_per_tensor_scale"} & set(g)):
        weight_only = bool(view.confs.get(li.name, {}).get("full_precision_matrix_mult"))
        if (li.name in view.confs or li.scales) and not weight_only:
            sv.missing_in.append(li.name)
    for s in PER_TENSOR_SCALE_SUFFIXES:
        if s in g:
            if g[s].numel != 1:
                sv.not_scalar.append(li.name)
            elif g[s].dtype != "F32":
                sv.not_f32.append(li.name)
    if fmt in ("fp8", "fp8_e5m2") and block is not None:
        if block.numel != 1 and view.target == "comfyui":
            sv.fp8_channel.append(li.name)
        elif block.dtype != "F32":
            sv.not_f32.append(li.name)


def _survey_block_scales(li: LayerInfo, block: Any, sv: ScaleSurvey) -> None:
    """NVFP4 block scales: shape against the packed weight, row-major vs tiled layout, dtype."""
    wshape = li.weight.shape  # type: ignore[union-attr]
    if len(wshape) != 2 or len(block.shape) != 2:
        sv.bad_shape.append(li.name)
        sv.shape_detail = sv.shape_detail or f"{li.name}: weight {wshape}, block scale {list(block.shape)}"
        return
    out_f, in_f = wshape[0], wshape[1] * 2
    rm, tl, bs = [out_f, in_f // 16], [_roundup(out_f, 128), _roundup(in_f // 16, 4)], list(block.shape)
    if in_f % 16 or bs not in (rm, tl):
        sv.bad_shape.append(li.name)
        sv.shape_detail = sv.shape_detail or (
            f"{li.name}: weight U8 {wshape} (= [{out_f}, {in_f}] logical) needs a block scale "
            f"[{out_f}, {in_f // 16}] (row-major) or {tl} (cuBLAS tiled), found {bs}")
        return
    if rm == tl:
        sv.same_layout += 1
    elif bs == rm:
        sv.rowmajor.append(li.name)
    else:
        sv.tiled.append(li.name)
    if block.dtype == "U8":
        sv.u8_scale.append(li.name)
    elif block.dtype != "F8_E4M3":
        sv.bad_dtype.append(li.name)


def scale_survey(view: FileView) -> ScaleSurvey:
    """The :class:`ScaleSurvey` of ``view`` (computed once)."""
    if "scales" not in view.cache:
        sv = ScaleSurvey()
        for li in view.layers:
            if not li.quantized or li.weight is None or dynamic_format(li.format):
                continue
            g = view.groups[li.name]
            _survey_weight_scales(view, li, g, sv)
            block = g.get("weight_scale") or g.get("scale_weight")
            if li.format == "nvfp4" and block is not None and li.weight.dtype == "U8":
                _survey_block_scales(li, block, sv)
        view.cache["scales"] = sv
    return view.cache["scales"]


@register_check("missing_weight_scale", order=40)
def check_missing_weight_scale(view: FileView) -> None:
    sv, dyn = scale_survey(view), dynamic_survey(view)
    if sv.missing_ws:
        view.problem(
            "missing_weight_scale", "error", sv.missing_ws,
            "quantized layers without their weight scales (NVFP4 needs .weight_scale [out, in/16] float8_e4m3fn "
            "and .weight_scale_2 float32 scalar; FP8 needs .weight_scale). ComfyUI raises 'Missing NVFP4 scales' "
            "or dequantizes without the scale.",
            "write the missing scales (ptq run exports weight_scale, weight_scale_2 and input_scale per layer)")
    if dyn.missing_ws:
        view.problem(
            "missing_weight_scale", "error", dyn.missing_ws,
            "int8_tensorwise / mxfp8 layers without .weight_scale: ComfyUI raises 'Missing INT8 weight "
            "scale' / 'Missing MXFP8 block scales' while loading.",
            "write .weight_scale (int8: float32 [] or [out, 1]; mxfp8: E8M0 block scales)")


@register_check("missing_input_scale", order=41)
def check_missing_input_scale(view: FileView) -> None:
    missing = scale_survey(view).missing_in
    if missing:
        view.problem(
            "missing_input_scale", "warning", missing,
            "quantized layers without a static .input_scale. W4A4 / W8A8 kernels quantize the activation with "
            "it; without it ComfyUI's nvfp4/float8 linear computes a per-tensor activation scale from each "
            "input's amax at run time (an extra reduction per call, and not the calibrated range the checkpoint "
            "was validated with), and loaders that need static scales (TensorRT / Model Optimizer style) refuse "
            "the layer or fall back to weight-only.",
            "calibrate and write <layer>.input_scale as a float32 scalar: amax(X)/(6*448) for NVFP4, "
            "amax(X)/448 for FP8 (ptq run calibrates over the whole sampling schedule); for intentional "
            'weight-only layers set "full_precision_matrix_mult": true in the layer\'s metadata')


@register_check("block_scale_shape_mismatch", order=42)
def check_block_scale_shape(view: FileView) -> None:
    sv = scale_survey(view)
    if sv.bad_shape:
        view.problem(
            "block_scale_shape_mismatch", "error", sv.bad_shape,
            f"NVFP4 block-scale shape does not match the packed weight ({sv.shape_detail}). One scale per 16 "
            "input elements is required; a mismatch means the weight was packed/padded differently from its "
            "scales, and dequantization reads the wrong scales (or fails).",
            "pack weights as uint8 [out, in/2] with block scales [out, in/16] (ModelOpt / compressed-tensors) "
            "or to_blocked() tiled [roundup(out,128), roundup(in/16,4)] (ComfyUI)")


@register_check("block_scale_layout", order=43, loaders=("comfyui",))
def check_block_scale_layout(view: FileView) -> None:
    rowmajor = scale_survey(view).rowmajor
    if rowmajor:
        view.problem(
            "block_scale_layout", "error", rowmajor,
            "block scales are row-major [out, in/16] but ComfyUI (comfy-kitchen TensorCoreNVFP4Layout) reads "
            "the cuBLAS tiled layout padded to [roundup(out,128), roundup(in/16,4)]: the scales are applied "
            "to the wrong blocks.",
            "convert with comfy-kitchen's to_blocked(scales) (pads to 128x4 tiles) before saving")


@register_check("note:block_scale_layout", order=43.5)
def note_layout_unknown(view: FileView) -> None:
    same = scale_survey(view).same_layout
    if same:
        view.notes.append(
            f"block-scale layout (row-major vs cuBLAS tiled) is not checkable from the header for {same} "
            "layer(s) whose two layouts have the same shape; run `ptq verify FILE --model ...`")


@register_check("scale_dtype", order=44)
def check_scale_dtype(view: FileView) -> None:
    sv = scale_survey(view)
    if sv.bad_dtype:
        view.problem(
            "scale_dtype", "error", sv.bad_dtype,
            "NVFP4 block scales must be float8_e4m3fn; ComfyUI views the stored bytes as float8_e4m3fn, so any "
            "other dtype is reinterpreted byte-wise (wrong values and shape).",
            "store block scales as float8_e4m3fn (clamped to 448 before the cast)")
    if sv.u8_scale:
        view.problem(
            "scale_dtype", "warning", sv.u8_scale,
            "NVFP4 block scales stored as uint8. ComfyUI views them as float8_e4m3fn (works), but loaders that "
            "cast instead of view read numbers 0..255.",
            "store block scales with dtype float8_e4m3fn")


@register_check("scale_not_scalar", order=45)
def check_scale_not_scalar(view: FileView) -> None:
    sv = scale_survey(view)
    if sv.not_scalar:
        view.problem(
            "scale_not_scalar", "error", sv.not_scalar,
            "per-tensor scales (weight_scale_2 / input_scale / global scales) with more than one element; the "
            "NVFP4 and FP8 layouts use one float32 value per tensor.",
            "store a single float32 value (shape [] or [1])")
    if sv.fp8_channel:
        view.problem(
            "scale_not_scalar", "warning", sv.fp8_channel,
            "FP8 weight_scale is per-channel; ComfyUI's float8_e4m3fn layout is per-tensor (a single float32), "
            "per-channel scales only broadcast in the dequantize fallback.",
            "use one per-tensor float32 weight_scale = amax(W)/448")


@register_check("scale_not_float32", order=46)
def check_scale_not_float32(view: FileView) -> None:
    sv, dyn = scale_survey(view), dynamic_survey(view)
    if sv.not_f32:
        view.problem(
            "scale_not_float32", "warning", sv.not_f32,
            "per-tensor scales stored in a 16-bit dtype; loaders upcast them to float32, but the value has "
            "already lost precision (bf16 keeps 8 mantissa bits) and fp16 under/overflows small amax/(6*448).",
            "store per-tensor scales as float32")
    if dyn.not_f32:
        view.problem(
            "scale_not_float32", "warning", dyn.not_f32,
            "int8 / int4 weight scales stored in a 16-bit dtype; comfy-kitchen multiplies in float32, but the "
            "value has already lost precision.", "store int8 / int4 weight scales as float32")


# -------------------------------------------------------------------- formats with run-time activation scales


@dataclass
class DynamicSurvey:
    """One pass over int8_tensorwise (with or without ConvRot) and MXFP8 layers, as ComfyUI's loader and
    comfy-kitchen's layouts read them (no input_scale: activations are scaled at run time)."""

    missing_ws: list[str] = field(default_factory=list)
    bad_int8: list[str] = field(default_factory=list)
    bad_group: list[str] = field(default_factory=list)
    bad_mx: list[str] = field(default_factory=list)
    not_f32: list[str] = field(default_factory=list)
    unused_in: list[str] = field(default_factory=list)
    fp_ignored: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    detail: dict[str, str] = field(default_factory=lambda: {"int8": "", "mx": "", "group": ""})


def _survey_dynamic_layer(view: FileView, li: LayerInfo, sv: DynamicSurvey) -> None:
    g = view.groups[li.name]
    fmt = FORMATS.get(li.format)
    out_f, in_f = li.weight.shape  # type: ignore[union-attr]
    in_f *= fmt.codes_per_element if fmt is not None else 1
    ws = g.get("weight_scale")
    if "input_scale" in g:
        sv.unused_in.append(li.name)
    if li.format != "mxfp8" and view.confs.get(li.name, {}).get("full_precision_matrix_mult"):
        sv.fp_ignored.append(li.name)
    if ws is None:
        sv.missing_ws.append(li.name)
        return
    if li.format == "mxfp8":
        want = [_roundup(out_f, 128), _roundup(in_f // 32, 4)]
        if in_f % 32 or out_f % 32 or list(ws.shape) != want or ws.dtype not in ("F8_E8M0", "U8"):
            sv.bad_mx.append(li.name)
            sv.detail["mx"] = sv.detail["mx"] or (f"{li.name}: weight [{out_f}, {in_f}], weight_scale {ws.dtype} "
                                                  f"{list(ws.shape)}, expected U8 {want}")
        return
    if fmt is not None and fmt.codes_per_element == 2:  # packed int4 (ConvRot W4A4): float32 scales [out]
        shape_ok = list(ws.shape) in ([out_f], [out_f, 1])
    else:  # int8: per tensor [] or per row [out, 1]
        shape_ok = ws.numel == 1 or list(ws.shape) == [out_f, 1]
    if not shape_ok:
        sv.bad_int8.append(li.name)
        sv.detail["int8"] = sv.detail["int8"] or f"{li.name}: weight [{out_f}, {in_f}], weight_scale {list(ws.shape)}"
    elif ws.dtype != "F32":
        sv.not_f32.append(li.name)
    if fmt is not None and fmt.rotated_codes:
        gs = view.confs.get(li.name, {}).get("convrot_groupsize", 256)
        if not isinstance(gs, int) or not _power_of_4(gs) or in_f % gs:
            sv.bad_group.append(li.name)
            sv.detail["group"] = sv.detail["group"] or f"{li.name}: convrot_groupsize {gs!r}, in_features {in_f}"


def dynamic_survey(view: FileView) -> DynamicSurvey:
    """The :class:`DynamicSurvey` of ``view`` (computed once)."""
    if "dynamic" not in view.cache:
        sv = DynamicSurvey()
        for li in view.layers:
            if not dynamic_format(li.format) or li.weight is None or len(li.weight.shape) != 2:
                continue
            sv.counts[li.format] = sv.counts.get(li.format, 0) + 1
            _survey_dynamic_layer(view, li, sv)
        view.cache["dynamic"] = sv
    return view.cache["dynamic"]


@register_check("int8_scale_shape", order=50)
def check_int8_scale_shape(view: FileView) -> None:
    sv = dynamic_survey(view)
    if sv.bad_int8:
        view.problem(
            "int8_scale_shape", "error", sv.bad_int8,
            f"int8 / int4 weight_scale of the wrong shape ({sv.detail['int8']}): int8_tensorwise needs a scalar or "
            "[out, 1] (comfy-kitchen dequantizes as code * scale: a 1-D [out] scale broadcasts along the input "
            "dimension), convrot_w4a4 one scale per output row ([out]).",
            "store float32 scales: [] or [out, 1] for int8, [out] for convrot_w4a4")


@register_check("convrot_group", order=51)
def check_convrot_group(view: FileView) -> None:
    sv = dynamic_survey(view)
    if sv.bad_group:
        view.problem(
            "convrot_group", "error", sv.bad_group,
            f"ConvRot group size is not a power of 4 dividing in_features ({sv.detail['group']}); "
            "comfy-kitchen builds the Hadamard matrix from it and fails or rotates the wrong inputs.",
            'write "convrot_groupsize": 256 (the default) for in_features divisible by 256')


@register_check("mxfp8_scale_layout", order=52)
def check_mxfp8_scale_layout(view: FileView) -> None:
    sv = dynamic_survey(view)
    if sv.bad_mx:
        view.problem(
            "mxfp8_scale_layout", "error", sv.bad_mx,
            f"MXFP8 block scales do not have the layout ComfyUI reads ({sv.detail['mx']}): one E8M0 "
            "scale per 32 inputs in the cuBLAS tiled layout [roundup(out,128), roundup(in/32,4)], "
            "weights a multiple of 32 in both dimensions.",
            "tile the [out, in/32] E8M0 scales with comfy-kitchen's to_blocked and store their bytes "
            "as uint8")


@register_check("int8_weight_only_ignored", order=53)
def check_int8_weight_only(view: FileView) -> None:
    sv = dynamic_survey(view)
    if sv.fp_ignored:
        view.problem(
            "int8_weight_only_ignored", "warning", sv.fp_ignored,
            'int8_tensorwise layers with "full_precision_matrix_mult": true: ComfyUI still runs them as '
            "W8A8 with dynamic per-row activations (the weight keeps the compute dtype, so comfy.ops "
            "never dequantizes it and comfy-kitchen's int8 linear quantizes the input), not as W8A16.",
            "drop the flag (what ComfyUI computes anyway), or store the layer in bf16 / another format "
            "for weight-only precision")


@register_check("note:dynamic_formats", order=54)
def note_dynamic_formats(view: FileView) -> None:
    """The input_scale these layers carry for nothing, and what ComfyUI computes for each dynamic format."""
    sv = dynamic_survey(view)
    if sv.unused_in:
        view.notes.append(f"{len(sv.unused_in)} int8/mxfp8 layer(s) carry an input_scale, which ComfyUI does not "
                          "use for these formats (activations are scaled at run time)")
    for name, n in sorted(sv.counts.items()):
        fmt = FORMATS[name]
        if fmt.runtime_note:
            view.notes.append(f"{n} {name} layer(s): {fmt.runtime_note}")
            continue
        cc = ".".join(map(str, fmt.native_min_capability)) if fmt.native_min_capability else "?"
        where = ("; on CPU comfy-kitchen's eager kernel computes the same W8A8"
                 if fmt.portable_kernel else "; below that ComfyUI dequantizes the weight (W8A16 numerics)")
        view.notes.append(f"{n} {name} layer(s): W8A8 with activation scales computed at run time, native on "
                          f"CUDA compute capability >= {cc}{where}")


# ----------------------------------------------------------------------------------- ComfyUI's reader, build


@register_check("unreadable_dtype", order=80, loaders=("comfyui",))
def check_reader_dtypes(view: FileView) -> None:
    """Tensors whose safetensors dtype ComfyUI's own reader has no entry for."""
    bad = [info for info in view.tensors.values() if info.dtype not in READER_DTYPES]
    if not bad:
        return
    dtypes = ", ".join(sorted({info.dtype for info in bad}))
    view.problem(
        "unreadable_dtype", "error", [info.name for info in bad],
        f"{len(bad)} tensors are stored as {dtypes}, a dtype missing from ComfyUI's own safetensors reader "
        "(comfy/utils.py _TYPES). With DynamicVRAM, the default on NVIDIA GPUs outside WSL, 'Load Diffusion "
        f"Model' fails with KeyError: '{bad[0].dtype}'; the same file loads on the CPU or with "
        "--disable-dynamic-vram (read by the safetensors library).",
        "store the bytes in a dtype ComfyUI reads (E8M0 block scales as uint8: ComfyUI's loader views them as "
        "float8_e8m0fnu); ptq writes them so")


@register_check("comfyui_wan_misbuilt", order=81, loaders=("comfyui",))
def check_model_build(view: FileView) -> None:
    """What ComfyUI's own model detection builds from the file (the family's rules; it also reports
    ``invalid_config_override`` for an unreadable header override)."""
    view.family.check_build("comfyui", view.arch, view.metadata, view.problem)


@register_check("unread_pre_quant_scale", order=82, loaders=("comfyui",))
def check_pre_quant_scales(view: FileView) -> None:
    """``pre_quant_scale`` tensors ComfyUI does not read (layer format other than nvfp4), of the wrong shape, or
    with non-positive / non-finite values (checked when values are read)."""
    unread, bad_shape, bad_values = [], [], []
    for layer, group in view.groups.items():
        info = group.get("pre_quant_scale")
        if info is None:
            continue
        if view.layer_formats.get(layer) not in PRE_QUANT_SCALE_FORMATS:
            unread.append(layer)
            continue
        w = group.get("weight")
        in_features = 2 * w.shape[-1] if w is not None and w.dtype == "U8" else (w.shape[-1] if w else None)
        if list(info.shape) != [in_features]:
            bad_shape.append(layer)
            continue
        t = view.load(info.name) if view.read_bytes is not None else None
        if t is not None and not bool((torch.isfinite(t.float()) & (t.float() > 0)).all()):
            bad_values.append(layer)
    if unread:
        view.problem(
            "unread_pre_quant_scale", "error", unread,
            f"pre_quant_scale on layers whose format ComfyUI does not smooth (it reads it for "
            f"{', '.join(PRE_QUANT_SCALE_FORMATS)} only): the stored weight is W / pre_quant_scale, so these "
            "layers compute wrong.",
            "fold the scale back into the weight (W * pre_quant_scale per input column) or use nvfp4 layers")
    if bad_shape:
        view.problem("unread_pre_quant_scale", "error", bad_shape,
                     "pre_quant_scale must have one value per input channel ([in_features]); ComfyUI multiplies the "
                     "input by it (broadcast over the last dim).", "store a 1-D [in_features] tensor")
    if bad_values:
        view.problem("unread_pre_quant_scale", "error", bad_values,
                     "pre_quant_scale holds zero, negative, NaN or Inf values (the layer's input is multiplied by "
                     "it).", "re-export the layer")


@register_check("note:comfyui_release", order=83, loaders=("comfyui",))
def note_comfyui_release(view: FileView) -> None:
    """The first ComfyUI release with every feature the file uses (report fields and notes)."""
    family = {k: features.ComfyFeature(**v) for k, v in view.family.features("comfyui", view.metadata).items()}
    used, table = features.features_used(view.metadata, view.groups, view.confs, view.layer_formats, family)
    version, rows, notes = features.version_notes(used, table)
    view.notes += notes
    view.report_fields.update(comfyui_min_version=version, comfyui_features=rows)


@register_check("note:judged_loader", order=100.5, loaders=("comfyui",))
def note_judged_loader(view: FileView) -> None:
    view.notes.append("problems are judged against ComfyUI's loader (the deployment target; --target modelopt "
                      "for diffusers' BFL / Model Optimizer style loaders)")
