"""Name map between diffusers' ``WanTransformer3DModel`` and the original Wan / ComfyUI state-dict keys.

A pure rename (no reshape). The one trap: diffusers' ``blocks.N.norm2`` (the affine cross-attention norm) is the
original ``blocks.N.norm3``; diffusers' ``norm1``/``norm3`` have no parameters, so nothing maps to original ``norm2``.
Functions accept full keys (``blocks.3.attn1.to_q.weight``) and module prefixes (``blocks.3.attn1.to_q``) alike.
"""

from __future__ import annotations

import re

# (diffusers regex, original template) on module paths; order matters only for readability (patterns are disjoint).
_DIFFUSERS_TO_ORIGINAL: list[tuple[str, str]] = [
    (r"condition_embedder\.text_embedder\.linear_1", "text_embedding.0"),
    (r"condition_embedder\.text_embedder\.linear_2", "text_embedding.2"),
    (r"condition_embedder\.time_embedder\.linear_1", "time_embedding.0"),
    (r"condition_embedder\.time_embedder\.linear_2", "time_embedding.2"),
    (r"condition_embedder\.time_proj", "time_projection.1"),
    (r"proj_out", "head.head"),
    (r"scale_shift_table", "head.modulation"),
    (r"blocks\.(\d+)\.attn1\.to_q", r"blocks.\1.self_attn.q"),
    (r"blocks\.(\d+)\.attn1\.to_k", r"blocks.\1.self_attn.k"),
    (r"blocks\.(\d+)\.attn1\.to_v", r"blocks.\1.self_attn.v"),
    (r"blocks\.(\d+)\.attn1\.to_out\.0", r"blocks.\1.self_attn.o"),
    (r"blocks\.(\d+)\.attn1\.norm_(q|k)", r"blocks.\1.self_attn.norm_\2"),
    (r"blocks\.(\d+)\.attn2\.to_q", r"blocks.\1.cross_attn.q"),
    (r"blocks\.(\d+)\.attn2\.to_k", r"blocks.\1.cross_attn.k"),
    (r"blocks\.(\d+)\.attn2\.to_v", r"blocks.\1.cross_attn.v"),
    (r"blocks\.(\d+)\.attn2\.to_out\.0", r"blocks.\1.cross_attn.o"),
    (r"blocks\.(\d+)\.attn2\.norm_(q|k)", r"blocks.\1.cross_attn.norm_\2"),
    (r"blocks\.(\d+)\.norm2", r"blocks.\1.norm3"),
    (r"blocks\.(\d+)\.ffn\.net\.0\.proj", r"blocks.\1.ffn.0"),
    (r"blocks\.(\d+)\.ffn\.net\.2", r"blocks.\1.ffn.2"),
    (r"blocks\.(\d+)\.scale_shift_table", r"blocks.\1.modulation"),
    (r"patch_embedding", "patch_embedding"),
]

_ORIGINAL_TO_DIFFUSERS: list[tuple[str, str]] = [
    (r"text_embedding\.0", "condition_embedder.text_embedder.linear_1"),
    (r"text_embedding\.2", "condition_embedder.text_embedder.linear_2"),
    (r"time_embedding\.0", "condition_embedder.time_embedder.linear_1"),
    (r"time_embedding\.2", "condition_embedder.time_embedder.linear_2"),
    (r"time_projection\.1", "condition_embedder.time_proj"),
    (r"head\.head", "proj_out"),
    (r"head\.modulation", "scale_shift_table"),
    (r"blocks\.(\d+)\.self_attn\.q", r"blocks.\1.attn1.to_q"),
    (r"blocks\.(\d+)\.self_attn\.k", r"blocks.\1.attn1.to_k"),
    (r"blocks\.(\d+)\.self_attn\.v", r"blocks.\1.attn1.to_v"),
    (r"blocks\.(\d+)\.self_attn\.o", r"blocks.\1.attn1.to_out.0"),
    (r"blocks\.(\d+)\.self_attn\.norm_(q|k)", r"blocks.\1.attn1.norm_\2"),
    (r"blocks\.(\d+)\.cross_attn\.q", r"blocks.\1.attn2.to_q"),
    (r"blocks\.(\d+)\.cross_attn\.k", r"blocks.\1.attn2.to_k"),
    (r"blocks\.(\d+)\.cross_attn\.v", r"blocks.\1.attn2.to_v"),
    (r"blocks\.(\d+)\.cross_attn\.o", r"blocks.\1.attn2.to_out.0"),
    (r"blocks\.(\d+)\.cross_attn\.norm_(q|k)", r"blocks.\1.attn2.norm_\2"),
    (r"blocks\.(\d+)\.norm3", r"blocks.\1.norm2"),
    (r"blocks\.(\d+)\.ffn\.0", r"blocks.\1.ffn.net.0.proj"),
    (r"blocks\.(\d+)\.ffn\.2", r"blocks.\1.ffn.net.2"),
    (r"blocks\.(\d+)\.modulation", r"blocks.\1.scale_shift_table"),
    (r"patch_embedding", "patch_embedding"),
]

# A key is a module path plus an optional parameter suffix (weight, bias, weight_scale, input_scale, comfy_quant...).
_SUFFIX = r"(?P<suffix>\.[A-Za-z_][A-Za-z0-9_]*)?"
_COMPILED_D2O = [(re.compile(rf"^{p}{_SUFFIX}$"), t) for p, t in _DIFFUSERS_TO_ORIGINAL]
_COMPILED_O2D = [(re.compile(rf"^{p}{_SUFFIX}$"), t) for p, t in _ORIGINAL_TO_DIFFUSERS]


class NameMapError(KeyError):
    """A key has no counterpart in the other naming convention."""


def _convert(key: str, rules: list[tuple[re.Pattern[str], str]], direction: str) -> str:
    for pattern, template in rules:
        m = pattern.match(key)
        if m is not None:
            return m.expand(template) + (m.group("suffix") or "")
    raise NameMapError(f"no {direction} name for key {key!r}")


def diffusers_to_original(key: str) -> str:
    """``blocks.0.attn1.to_q.weight`` -> ``blocks.0.self_attn.q.weight`` (also for module prefixes)."""
    return _convert(key, _COMPILED_D2O, "original Wan")


def original_to_diffusers(key: str) -> str:
    """``blocks.0.self_attn.q.weight`` -> ``blocks.0.attn1.to_q.weight`` (also for module prefixes)."""
    return _convert(key, _COMPILED_O2D, "diffusers")


def convert_state_dict_keys(state: dict, to: str) -> dict:
    """Rename every key of ``state`` to ``to`` = "original" or "diffusers"; raises NameMapError on an unknown key."""
    if to not in {"original", "diffusers"}:
        raise ValueError(f"to must be 'original' or 'diffusers', got {to!r}")
    fn = diffusers_to_original if to == "original" else original_to_diffusers
    out = {}
    for k, v in state.items():
        new = fn(k)
        if new in out:
            raise NameMapError(f"two keys map to {new!r}")
        out[new] = v
    return out
