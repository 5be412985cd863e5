"""Detect a checkpoint's quantization convention, naming, and (WAN) architecture from names, dtypes and shapes.

Works on header entries only (:class:`~ptq.targets.safetensors_header.TensorInfo`), so it needs no tensor data.
Conventions recognised:

- ``comfyui``: ComfyUI mixed precision: ``_quantization_metadata`` header JSON or ``<layer>.comfy_quant`` tensors,
  with ``weight`` / ``weight_scale`` / ``weight_scale_2`` / ``input_scale``.
- ``comfyui-scaled-fp8``: legacy ComfyUI / Kijai FP8: ``scaled_fp8`` marker and ``<layer>.scale_weight`` /
  ``scale_input`` (ComfyUI converts these only when the marker is present and no header metadata exists).
- ``modelopt``: TensorRT Model Optimizer HF export: same tensor names as ComfyUI but no ComfyUI metadata
  (``weight_scale_2``, ``input_scale``, ``*_quantizer._amax``, a ``quantization_config``-like header entry).
- ``compressed-tensors``: ``weight_packed`` / ``weight_global_scale`` / ``input_global_scale``.
- ``torchao``: ``<module>._weight_qdata`` tensors and a ``tensor_names`` header entry.
- ``plain``: unquantized bf16 / fp16 / fp32 (or unscaled fp8 weights).

WAN names: diffusers (``blocks.0.attn1.to_q``) and original Wan / ComfyUI (``blocks.0.self_attn.q``) are a pure
rename (table in shared/README.md); :func:`to_original_name` / :func:`to_diffusers_name` convert either way.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ptq.models.wan.names import try_diffusers_to_original, try_original_to_diffusers
from ptq.targets.safetensors_header import DTYPE_BITS, TensorInfo

__all__ = [
    "COMFY_FORMATS",
    "KNOWN_PREFIXES",
    "Architecture",
    "Convention",
    "Naming",
    "QuantMetadata",
    "detect_architecture",
    "detect_convention",
    "detect_naming",
    "group_layers",
    "is_packed_fp4",
    "logical_numel",
    "parse_quant_metadata",
    "sensitive_layer_kind",
    "split_key",
    "strip_prefix",
    "tensor_infos_from_state_dict",
    "to_diffusers_name",
    "to_original_name",
    "weight_suffix",
]

KNOWN_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "transformer.", "module.")
"""Prefixes seen in front of diffusion-model keys (ComfyUI full checkpoints use ``model.diffusion_model.``)."""

COMFY_FORMATS = {
    "float8_e4m3fn": "fp8",
    "float8_e5m2": "fp8_e5m2",
    "nvfp4": "nvfp4",
    "mxfp8": "mxfp8",
    "int8_tensorwise": "int8",
}
"""Per-layer ``format`` names in ComfyUI core's ``QUANT_ALGOS`` and the short names used in reports."""

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

_TORCHAO_RE = re.compile(r"^(?P<layer>.+)\.(?P<suffix>_(?:weight|bias)_[A-Za-z0-9_]+)$")
_AMAX_RE = re.compile(r"^(?P<layer>.+)\.(?P<suffix>[A-Za-z0-9_]+_quantizer\._amax)$")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")

def _rename(name: str, to: str) -> tuple[str, bool]:
    """(renamed, True) when ``name`` is a WAN key of the other convention and changes; (name, False) otherwise."""
    out = try_diffusers_to_original(name) if to == "original" else try_original_to_diffusers(name)
    if out is None or out == name:
        return name, False
    return out, True


def to_original_name(name: str) -> str:
    """Rename a diffusers WAN key (without prefix) to original Wan / ComfyUI naming; others are unchanged."""
    return _rename(name, "original")[0]


def to_diffusers_name(name: str) -> str:
    """Rename an original Wan / ComfyUI key (without prefix) to diffusers naming; others are unchanged."""
    return _rename(name, "diffusers")[0]


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


# --------------------------------------------------------------------------------------------- key structure


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


def _is_aux(suffix: str) -> bool:
    return suffix in AUX_SUFFIXES or suffix.endswith("._amax")


# --------------------------------------------------------------------------------------------- naming


@dataclass
class Naming:
    """Key naming of a WAN state dict."""

    style: str  # "diffusers" | "original" | "mixed" | "unknown"
    prefix: str  # common prefix such as "model.diffusion_model." ("" when none)
    prefixed_keys: int
    unprefixed_keys: int
    diffusers_keys: int
    original_keys: int
    examples: dict[str, list[str]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """One-line description."""
        names = {
            "diffusers": "diffusers names (blocks.N.attn1.to_q, condition_embedder.*, proj_out)",
            "original": "original Wan / ComfyUI names (blocks.N.self_attn.q, text_embedding.*, head.head)",
            "mixed": f"MIXED diffusers ({self.diffusers_keys} keys) and original ({self.original_keys} keys) names",
            "unknown": "no WAN-specific names found",
        }[self.style]
        if self.prefix:
            extra = f", {self.unprefixed_keys} keys without it" if self.unprefixed_keys else ""
            return f"{names}; prefix {self.prefix!r} on {self.prefixed_keys} keys{extra}"
        return f"{names}; no prefix"


_ANCHOR_RE = re.compile(
    r"^(?P<prefix>(?:[^.]+\.)*?)(?:blocks\.\d+\.|patch_embedding\.|head\.head\.|head\.modulation|proj_out\.|"
    r"condition_embedder\.|text_embedding\.|time_embedding\.|time_projection\.|scale_shift_table)"
)


def _detect_prefix(keys: list[str]) -> str:
    counts: Counter[str] = Counter()
    for key in keys:
        m = _ANCHOR_RE.match(key)
        if m:
            counts[m.group("prefix")] += 1
    if counts:
        return counts.most_common(1)[0][0]
    for prefix in KNOWN_PREFIXES:
        if keys and sum(k.startswith(prefix) for k in keys) > len(keys) // 2:
            return prefix
    return ""


def strip_prefix(key: str, prefix: str) -> str:
    """``key`` without ``prefix`` (unchanged when it does not start with it)."""
    return key[len(prefix) :] if prefix and key.startswith(prefix) else key


def detect_naming(keys: Iterable[str]) -> Naming:
    """Detect prefix and diffusers-vs-original WAN naming from key names."""
    keys = list(keys)
    prefix = _detect_prefix(keys)
    prefixed = sum(k.startswith(prefix) for k in keys) if prefix else len(keys)
    unprefixed = len(keys) - prefixed if prefix else 0
    diff_ex: list[str] = []
    orig_ex: list[str] = []
    n_diff = n_orig = 0
    for key in keys:
        bare = strip_prefix(key, prefix)
        if _rename(bare, "original")[1]:
            n_diff += 1
            if len(diff_ex) < 3:
                diff_ex.append(key)
        elif _rename(bare, "diffusers")[1]:
            n_orig += 1
            if len(orig_ex) < 3:
                orig_ex.append(key)
    if n_diff and n_orig:
        style = "mixed"
    elif n_diff:
        style = "diffusers"
    elif n_orig:
        style = "original"
    else:
        style = "unknown"
    return Naming(
        style, prefix, prefixed, unprefixed, n_diff, n_orig, {"diffusers": diff_ex, "original": orig_ex}
    )


def canonical_name(key: str, naming: Naming) -> str:
    """``key`` without the detected prefix, renamed to original Wan naming when it uses diffusers names."""
    bare = strip_prefix(key, naming.prefix)
    return to_original_name(bare) if naming.style in ("diffusers", "mixed") else bare


# --------------------------------------------------------------------------------------------- metadata


@dataclass
class QuantMetadata:
    """ComfyUI ``_quantization_metadata`` as parsed from the header (``layers``: layer -> per-layer config)."""

    present: bool
    layers: dict[str, dict[str, object]] = field(default_factory=dict)
    format_version: str | None = None
    error: str | None = None


def parse_quant_metadata(metadata: Mapping[str, str]) -> QuantMetadata:
    """Parse ``_quantization_metadata``; a malformed entry is reported in ``error`` rather than raised."""
    raw = metadata.get("_quantization_metadata")
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


# --------------------------------------------------------------------------------------------- convention


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


# --------------------------------------------------------------------------------------------- architecture


@dataclass
class Architecture:
    """Model architecture derived from shapes."""

    family: str  # "wan" | "unknown"
    description: str
    dim: int | None = None
    in_dim: int | None = None
    out_dim: int | None = None
    ffn_dim: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    text_dim: int | None = None
    freq_dim: int | None = None
    patch_size: list[int] | None = None
    params: int = 0
    known_model: str | None = None
    missing_blocks: list[int] = field(default_factory=list)


_KNOWN_WAN = {
    # (dim, layers, in_dim, ffn_dim): name
    (3072, 30, 48, 14336): "WAN 2.2 TI2V-5B",
    (1536, 30, 16, 8960): "WAN 2.1 T2V-1.3B-class",
    (5120, 40, 16, 13824): "WAN 14B-class (T2V)",
    (5120, 40, 36, 13824): "WAN 14B-class (I2V)",
}


def _logical_shape(
    group: Mapping[str, TensorInfo], layer_formats: Mapping[str, str], layer: str
) -> list[int]:
    ws = weight_suffix(group)
    if ws is None:
        return []
    info = group[ws]
    shape = list(info.shape)
    if shape and is_packed_fp4(group, layer_formats.get(layer)):
        shape[-1] *= 8 if info.dtype == "I32" else 2
    return shape


def detect_architecture(
    tensors: Mapping[str, TensorInfo],
    naming: Naming | None = None,
    layer_formats: Mapping[str, str] | None = None,
) -> Architecture:
    """Detect WAN and derive its sizes; ``params`` is the logical count (an NVFP4 byte counts as 2 weights).

    ``layer_formats`` maps file layer names to short formats (``nvfp4``...) when metadata is known.
    """
    naming = naming or detect_naming(tensors)
    layer_formats = layer_formats or {}
    groups = group_layers(tensors.values())
    canon: dict[str, tuple[str, dict[str, TensorInfo]]] = {}
    params = 0
    for layer, group in groups.items():
        packed = is_packed_fp4(group, layer_formats.get(layer))
        for suffix, info in group.items():
            if _is_aux(suffix) or suffix == "scaled_fp8":
                continue
            params += logical_numel(info, packed and suffix in WEIGHT_SUFFIXES)
        canon[canonical_name(layer, naming) if layer else ""] = (layer, group)

    def shape_of(name: str) -> list[int]:
        if name not in canon:
            return []
        layer, group = canon[name]
        return _logical_shape(group, layer_formats, layer)

    root = canon.get("", ("", {}))[1]
    head = canon.get("head", ("", {}))[1]
    has_mod = "modulation" in head or "scale_shift_table" in root
    block_ids = sorted({int(m.group(1)) for name in canon if (m := _BLOCK_RE.match(name + "."))})
    patch = shape_of("patch_embedding")
    first_block = canon.get(f"blocks.{block_ids[0]}", ("", {}))[1] if block_ids else {}
    block_mod = "modulation" in first_block or "scale_shift_table" in first_block
    is_wan = bool(patch) and (has_mod or block_mod)
    if not is_wan:
        return Architecture(
            "unknown", "unknown architecture (no patch_embedding + head.modulation)", params=params
        )
    dim, in_dim = patch[0], (patch[1] if len(patch) > 1 else None)
    psize = patch[2:] if len(patch) > 2 else None
    ffn = shape_of(f"blocks.{block_ids[0]}.ffn.0")[:1] if block_ids else []
    text = shape_of("text_embedding.0")
    freq = shape_of("time_embedding.0")
    head_w = shape_of("head.head")
    out_dim = head_w[0] // math.prod(psize) if head_w and psize and math.prod(psize) else None
    n_layers = len(block_ids)
    missing = sorted(set(range(block_ids[-1] + 1)) - set(block_ids)) if block_ids else []
    arch = Architecture(
        "wan",
        "",
        dim=dim,
        in_dim=in_dim,
        out_dim=out_dim,
        ffn_dim=ffn[0] if ffn else None,
        num_layers=n_layers,
        num_heads=dim // 128 if dim % 128 == 0 else None,
        text_dim=text[1] if len(text) > 1 else None,
        freq_dim=freq[1] if len(freq) > 1 else None,
        patch_size=list(psize) if psize else None,
        params=params,
        missing_blocks=missing,
    )
    arch.known_model = _KNOWN_WAN.get((dim, n_layers, in_dim or 0, arch.ffn_dim or 0))
    heads = f", heads={arch.num_heads}" if arch.num_heads else ""
    sizes = f"dim={dim}, layers={n_layers}{heads}, in_dim={in_dim}, ffn_dim={arch.ffn_dim}"
    if arch.known_model:
        arch.description = f"{arch.known_model} ({sizes})"
    else:
        arch.description = f"WAN-architecture, {sizes}"
    return arch


def sensitive_layer_kind(canonical: str, num_layers: int | None) -> str | None:
    """Why a layer (original naming, no prefix) is usually kept in high precision, or ``None``."""
    if canonical == "patch_embedding":
        return "patch embedding"
    if canonical.startswith(("text_embedding.", "time_embedding.", "time_projection.", "img_emb.")):
        return "condition embedding"
    if canonical == "head.head":
        return "output head"
    m = _BLOCK_RE.match(canonical + ".")
    if m:
        idx = int(m.group(1))
        if idx == 0:
            return "first block"
        if num_layers and idx == num_layers - 1:
            return "last block"
    return None
