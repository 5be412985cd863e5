"""Name map between diffusers' ``WanTransformer3DModel`` and the original Wan / ComfyUI state-dict keys.

A pure rename (no reshape). The one trap: diffusers' ``blocks.N.norm2`` (the affine cross-attention norm) is the
original ``blocks.N.norm3``; diffusers' ``norm1``/``norm3`` have no parameters, so nothing maps to original ``norm2``.
Functions accept full keys (``blocks.3.attn1.to_q.weight``) and module prefixes (``blocks.3.attn1.to_q``) alike.
"""

from __future__ import annotations

import re

# diffusers <-> original Wan module paths (a pure rename). {n} is a block index. The image-embedder / k_img rows
# only occur in image-conditioned WAN variants (not the TI2V-5B).
NAME_PAIRS: tuple[tuple[str, str], ...] = (
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.image_embedder.norm1", "img_emb.proj.0"),
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
    ("condition_embedder.image_embedder.norm2", "img_emb.proj.4"),
    ("proj_out", "head.head"),
    ("scale_shift_table", "head.modulation"),
    ("patch_embedding", "patch_embedding"),
    ("blocks.{n}.attn1.to_q", "blocks.{n}.self_attn.q"),
    ("blocks.{n}.attn1.to_k", "blocks.{n}.self_attn.k"),
    ("blocks.{n}.attn1.to_v", "blocks.{n}.self_attn.v"),
    ("blocks.{n}.attn1.to_out.0", "blocks.{n}.self_attn.o"),
    ("blocks.{n}.attn1.norm_q", "blocks.{n}.self_attn.norm_q"),
    ("blocks.{n}.attn1.norm_k", "blocks.{n}.self_attn.norm_k"),
    ("blocks.{n}.attn2.to_q", "blocks.{n}.cross_attn.q"),
    ("blocks.{n}.attn2.to_k", "blocks.{n}.cross_attn.k"),
    ("blocks.{n}.attn2.to_v", "blocks.{n}.cross_attn.v"),
    ("blocks.{n}.attn2.to_out.0", "blocks.{n}.cross_attn.o"),
    ("blocks.{n}.attn2.norm_q", "blocks.{n}.cross_attn.norm_q"),
    ("blocks.{n}.attn2.norm_k", "blocks.{n}.cross_attn.norm_k"),
    ("blocks.{n}.attn2.add_k_proj", "blocks.{n}.cross_attn.k_img"),
    ("blocks.{n}.attn2.add_v_proj", "blocks.{n}.cross_attn.v_img"),
    ("blocks.{n}.attn2.norm_added_k", "blocks.{n}.cross_attn.norm_k_img"),
    ("blocks.{n}.ffn.net.0.proj", "blocks.{n}.ffn.0"),
    ("blocks.{n}.ffn.net.2", "blocks.{n}.ffn.2"),
    ("blocks.{n}.norm2", "blocks.{n}.norm3"),
    ("blocks.{n}.scale_shift_table", "blocks.{n}.modulation"),
)

# A key is a module path plus an optional parameter suffix (weight, bias, weight_scale, input_scale, comfy_quant...).
_SUFFIX = r"(?P<suffix>\.[A-Za-z_][A-Za-z0-9_]*)?$"


def _compile(src: str, dst: str) -> tuple[re.Pattern[str], str]:
    pattern = "^" + re.escape(src).replace(re.escape("{n}"), r"(\d+)") + _SUFFIX
    return re.compile(pattern), dst.replace("{n}", r"\1")


_COMPILED_D2O = [_compile(d, o) for d, o in NAME_PAIRS]
_COMPILED_O2D = [_compile(o, d) for d, o in NAME_PAIRS]


class NameMapError(KeyError):
    """A key has no counterpart in the other naming convention."""


def _try_convert(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in rules:
        m = pattern.match(key)
        if m is not None:
            return m.expand(template) + (m.group("suffix") or "")
    return None


def _convert(key: str, rules: list[tuple[re.Pattern[str], str]], direction: str) -> str:
    out = _try_convert(key, rules)
    if out is None:
        raise NameMapError(f"no {direction} name for key {key!r}")
    return out


def try_diffusers_to_original(key: str) -> str | None:
    """Like :func:`diffusers_to_original`, but None for a key that is not a diffusers WAN key."""
    return _try_convert(key, _COMPILED_D2O)


def try_original_to_diffusers(key: str) -> str | None:
    """Like :func:`original_to_diffusers`, but None for a key that is not an original-Wan key."""
    return _try_convert(key, _COMPILED_O2D)


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
