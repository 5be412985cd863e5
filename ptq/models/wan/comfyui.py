"""How stock ComfyUI builds a WAN transformer from a file, and the header ``config`` override that corrects it.

ComfyUI detects WAN from the state dict's shapes (``comfy/model_detection.py`` ``detect_unet_config``, branch
``head.modulation``): ``dim`` / ``in_dim`` / ``out_dim`` / ``ffn_dim`` / ``num_layers`` from shapes,
``num_heads = dim // 128`` and fixed ``patch_size=(1, 2, 2)``, ``freq_dim=256``, ``qk_norm=True``,
``cross_attn_norm=True``, ``eps=1e-6``; ``text_dim`` is never detected (``WanModel`` defaults it to 4096). Since
ComfyUI v0.15.1 (2026-02-26, commit 907e5dcb "initial FlowRVS support") the WAN branch then applies
``dit_config.update(json.loads(metadata["config"]).get("transformer", {}))``: a safetensors header entry ``config``
holding JSON ``{"transformer": {<WanModel kwarg>: value}}`` overrides what detection got wrong. Older ComfyUI ignores
it (the model is then built from the detected values).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

#: Header key ComfyUI reads the override from, and the section of it the diffusion model uses.
COMFYUI_CONFIG_KEY = "config"
COMFYUI_CONFIG_SECTION = "transformer"
#: First ComfyUI release whose WAN detection applies the header ``config`` override.
COMFYUI_CONFIG_MIN_VERSION = "0.15.1"
#: ComfyUI's fixed head width for WAN (``num_heads = dim // 128``) and WanModel's default ``text_dim``.
COMFYUI_WAN_HEAD_DIM = 128
COMFYUI_WAN_TEXT_DIM = 4096
#: What ComfyUI's WAN detection sets without looking at the file (or, for text_dim, leaves at WanModel's default).
COMFYUI_WAN_FIXED: dict[str, Any] = {"patch_size": [1, 2, 2], "freq_dim": 256, "qk_norm": True,
                                     "cross_attn_norm": True, "eps": 1e-6, "text_dim": COMFYUI_WAN_TEXT_DIM}


def comfyui_wan_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ComfyUI ``WanModel`` constructor values of a diffusers ``WanTransformer3DModel`` config (the ones
    detection fixes or derives from a head width): num_heads, text_dim, patch_size, freq_dim, qk_norm,
    cross_attn_norm, eps."""
    heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
    return {"num_heads": heads, "text_dim": int(config["text_dim"]),
            "patch_size": [int(p) for p in config.get("patch_size", (1, 2, 2))],
            "freq_dim": int(config.get("freq_dim", 256)), "qk_norm": bool(config.get("qk_norm")),
            "cross_attn_norm": bool(config.get("cross_attn_norm", False)), "eps": float(config.get("eps", 1e-6)),
            "_dim": heads * head_dim}


def comfyui_detected(dim: int) -> dict[str, Any]:
    """What ComfyUI's WAN detection assumes for a model of hidden size ``dim`` (besides the sizes it reads)."""
    return {"num_heads": dim // COMFYUI_WAN_HEAD_DIM, **COMFYUI_WAN_FIXED}


def comfyui_config_override(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``{"transformer": {...}}`` entries ComfyUI needs to build this diffusers WAN config correctly: every
    WanModel kwarg whose true value differs from what detection assumes ({} when detection is right)."""
    want = comfyui_wan_kwargs(config)
    detected = comfyui_detected(want.pop("_dim"))
    diff = {k: v for k, v in want.items() if detected.get(k) != v}
    return {COMFYUI_CONFIG_SECTION: diff} if diff else {}


def comfyui_header_metadata(config: Mapping[str, Any]) -> dict[str, str]:
    """Header entries of a ComfyUI WAN file: ``{"config": json}`` when detection would build the model wrong."""
    override = comfyui_config_override(config)
    return {COMFYUI_CONFIG_KEY: json.dumps(override, sort_keys=True)} if override else {}
