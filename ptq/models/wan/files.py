"""WAN checkpoints seen from their keys and shapes: diffusers vs original Wan / ComfyUI names, the architecture
(dim, layers, heads, text_dim, ...), the layers usually kept in high precision, and what ComfyUI's WAN detection
builds from a file (``num_heads = dim // 128``, ``text_dim`` 4096 unless the header ``config`` overrides them).

WAN names: diffusers (``blocks.0.attn1.to_q``) and original Wan / ComfyUI (``blocks.0.self_attn.q``) are a pure
rename (:mod:`ptq.models.wan.names`); :func:`to_original_name` / :func:`to_diffusers_name` convert either way.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from ptq.models.files import Architecture, FileFamily, Naming, ProblemFn, detect_prefix, strip_prefix
from ptq.models.wan.comfyui import (
    COMFYUI_CONFIG_KEY,
    COMFYUI_CONFIG_MIN_VERSION,
    COMFYUI_CONFIG_SECTION,
    COMFYUI_WAN_HEAD_DIM,
    COMFYUI_WAN_TEXT_DIM,
)
from ptq.models.wan.names import try_diffusers_to_original, try_original_to_diffusers

_ANCHOR_RE = re.compile(
    r"^(?P<prefix>(?:[^.]+\.)*?)(?:blocks\.\d+\.|patch_embedding\.|head\.head\.|head\.modulation|proj_out\.|"
    r"condition_embedder\.|text_embedding\.|time_embedding\.|time_projection\.|scale_shift_table)"
)
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
_LABELS = {
    "diffusers": "diffusers names (blocks.N.attn1.to_q, condition_embedder.*, proj_out)",
    "original": "original Wan / ComfyUI names (blocks.N.self_attn.q, text_embedding.*, head.head)",
    "unknown": "no WAN-specific names found",
}
#: (dim, layers, in_dim, ffn_dim) -> the published model of that size
_KNOWN_WAN = {
    (3072, 30, 48, 14336): "WAN 2.2 TI2V-5B",
    (1536, 30, 16, 8960): "WAN 2.1 T2V-1.3B-class",
    (5120, 40, 16, 13824): "WAN 14B-class (T2V)",
    (5120, 40, 36, 13824): "WAN 14B-class (I2V)",
}


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


def detect_naming(keys: Iterable[str]) -> Naming:
    """Detect prefix and diffusers-vs-original WAN naming from key names."""
    keys = list(keys)
    prefix = detect_prefix(keys, (_ANCHOR_RE,))
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
    style = "mixed" if n_diff and n_orig else "diffusers" if n_diff else "original" if n_orig else "unknown"
    labels = {**_LABELS, "mixed": f"MIXED diffusers ({n_diff} keys) and original ({n_orig} keys) names"}
    return Naming(style, prefix, prefixed, unprefixed, n_diff, n_orig, {"diffusers": diff_ex, "original": orig_ex},
                  labels)


def _shape(layers: Mapping[str, Mapping[str, list[int]]], name: str) -> list[int]:
    """Logical shape of layer ``name``'s weight ([] when absent)."""
    return list(layers.get(name, {}).get("weight", []))


def detect_architecture(layers: Mapping[str, Mapping[str, list[int]]], params: int,
                        heads: int | None = None) -> Architecture:
    """WAN's sizes from its parameter shapes (``layers``: canonical layer -> suffix -> logical shape; see
    :meth:`ptq.models.files.FileFamily.architecture`); family "unknown" without patch_embedding + modulation.
    ``heads``: the head count a header override sets (shapes cannot tell it; ComfyUI's rule is dim // 128)."""
    root, head = layers.get("", {}), layers.get("head", {})
    block_ids = sorted({int(m.group(1)) for name in layers if (m := _BLOCK_RE.match(name + "."))})
    patch = _shape(layers, "patch_embedding")
    first_block = layers.get(f"blocks.{block_ids[0]}", {}) if block_ids else {}
    has_mod = "modulation" in head or "scale_shift_table" in root
    block_mod = "modulation" in first_block or "scale_shift_table" in first_block
    if not (patch and (has_mod or block_mod)):
        return Architecture("unknown", "unknown architecture (no patch_embedding + head.modulation)", params=params)
    dim, in_dim = patch[0], (patch[1] if len(patch) > 1 else None)
    psize = patch[2:] if len(patch) > 2 else None
    ffn = _shape(layers, f"blocks.{block_ids[0]}.ffn.0")[:1] if block_ids else []
    text, freq, head_w = (_shape(layers, n) for n in ("text_embedding.0", "time_embedding.0", "head.head"))
    out_dim = head_w[0] // math.prod(psize) if head_w and psize and math.prod(psize) else None
    missing = sorted(set(range(block_ids[-1] + 1)) - set(block_ids)) if block_ids else []
    arch = Architecture("wan", "", dim=dim, in_dim=in_dim, out_dim=out_dim, ffn_dim=ffn[0] if ffn else None,
                        num_layers=len(block_ids),
                        num_heads=heads or (dim // COMFYUI_WAN_HEAD_DIM if dim % COMFYUI_WAN_HEAD_DIM == 0 else None),
                        text_dim=text[1] if len(text) > 1 else None, freq_dim=freq[1] if len(freq) > 1 else None,
                        patch_size=list(psize) if psize else None, params=params, missing_blocks=missing)
    arch.known_model = _KNOWN_WAN.get((dim, len(block_ids), in_dim or 0, arch.ffn_dim or 0))
    heads_s = f", heads={arch.num_heads}" if arch.num_heads else ""
    if heads:
        heads_s += f" (header config; ComfyUI's shape rule alone: {dim // COMFYUI_WAN_HEAD_DIM})"
    sizes = f"dim={dim}, layers={len(block_ids)}{heads_s}, in_dim={in_dim}, ffn_dim={arch.ffn_dim}"
    arch.description = f"{arch.known_model} ({sizes})" if arch.known_model else f"WAN-architecture, {sizes}"
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


def check_comfyui_build(arch: Architecture, metadata: Mapping[str, str], problem: ProblemFn) -> dict[str, Any]:
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


class WanFileFamily(FileFamily):
    """WAN's checkpoints (every WAN adapter shares it)."""

    name = "wan"
    anchors = (_ANCHOR_RE,)

    def naming(self, keys: Iterable[str]) -> Naming:
        return detect_naming(keys)

    def canonical_name(self, key: str, naming: Naming) -> str:
        bare = strip_prefix(key, naming.prefix)
        return to_original_name(bare) if naming.style in ("diffusers", "mixed") else bare

    def architecture(self, layers: Mapping[str, Mapping[str, list[int]]], params: int,
                     metadata: Mapping[str, str] | None = None) -> Architecture:
        """WAN's sizes from shapes; the head count is the one ComfyUI builds: the header ``config`` override's
        when the file has one (the description then also says what ComfyUI's shape rule alone gives)."""
        heads = config_override(metadata or {}, lambda *a: None).get("num_heads")
        return detect_architecture(layers, params, heads if isinstance(heads, int) and heads > 0 else None)

    def sensitive_layer_kind(self, canonical: str, arch: Architecture) -> str | None:
        return sensitive_layer_kind(canonical, arch.num_layers) if arch.family == "wan" else None

    def check_build(self, target: str, arch: Architecture, metadata: Mapping[str, str],
                    problem: ProblemFn) -> dict[str, Any]:
        return check_comfyui_build(arch, metadata, problem) if target == "comfyui" else {}

    def features(self, target: str, metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
        if target != "comfyui" or COMFYUI_CONFIG_KEY not in metadata:
            return {}
        return {"config_override": {"what": "header `config` override of the detected WAN config",
                                    "version": COMFYUI_CONFIG_MIN_VERSION, "date": "2026-02-26",
                                    "commit": "907e5dcb", "silent": True}}


WAN_FILES = WanFileFamily()

__all__ = ["WAN_FILES", "WanFileFamily", "check_comfyui_build", "config_override", "detect_architecture",
           "detect_naming", "sensitive_layer_kind", "to_diffusers_name", "to_original_name"]
