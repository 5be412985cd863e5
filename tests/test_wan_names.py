"""The diffusers <-> original Wan name map over all 825 keys of the real 5B config (built on the meta device)."""

from __future__ import annotations

import re

import pytest
import torch

from ptq.models.wan import WAN22_TI2V_5B_PARAMS, build_meta_transformer
from ptq.models.wan.names import (
    NameMapError,
    convert_state_dict_keys,
    diffusers_to_original,
    original_to_diffusers,
)


@pytest.fixture(scope="module")
def meta_state() -> dict[str, torch.Tensor]:
    return build_meta_transformer().state_dict()


def test_real_5b_config_shapes(meta_state: dict[str, torch.Tensor]) -> None:
    model = build_meta_transformer()
    assert len(meta_state) == 825
    assert sum(v.numel() for v in meta_state.values()) == WAN22_TI2V_5B_PARAMS
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 306
    assert meta_state["blocks.0.ffn.net.0.proj.weight"].shape == (14336, 3072)
    assert meta_state["proj_out.weight"].shape == (192, 3072)


def test_all_825_keys_round_trip(meta_state: dict[str, torch.Tensor]) -> None:
    orig = convert_state_dict_keys(meta_state, "original")
    assert len(orig) == 825
    back = convert_state_dict_keys(orig, "diffusers")
    assert list(back) == list(meta_state)
    for k, v in orig.items():
        assert v.shape == meta_state[original_to_diffusers(k)].shape  # pure rename, no reshape


def test_matches_diffusers_single_file_converter(meta_state: dict[str, torch.Tensor]) -> None:
    """diffusers' own original->diffusers converter must undo our map exactly."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    orig = convert_state_dict_keys(meta_state, "original")
    assert set(convert_wan_transformer_to_diffusers(dict(orig))) == set(meta_state)


def test_original_names_are_comfyui_names(meta_state: dict[str, torch.Tensor]) -> None:
    orig = set(convert_state_dict_keys(meta_state, "original"))
    # what ComfyUI's WAN detection reads
    for key in ("head.modulation", "head.head.weight", "blocks.0.ffn.0.weight", "patch_embedding.weight",
                "text_embedding.0.weight", "time_embedding.2.bias", "time_projection.1.weight"):
        assert key in orig
    assert "blocks.29.norm3.weight" in orig and "blocks.29.norm2.weight" not in orig  # the norm2 <-> norm3 swap
    assert not any(re.search(r"attn[12]|to_q|condition_embedder|proj_out|scale_shift_table|ffn\.net", k)
                   for k in orig)
    assert sum(1 for k in orig if k.startswith("blocks.7.")) == 27


@pytest.mark.parametrize("key", ["blocks.0.attn3.to_q.weight", "foo.bar", "blocks.x.attn1.to_q.weight"])
def test_unknown_keys_raise(key: str) -> None:
    with pytest.raises(NameMapError, match="no original Wan name"):
        diffusers_to_original(key)


def test_module_prefixes_and_suffixes() -> None:
    assert diffusers_to_original("blocks.3.attn2.to_out.0") == "blocks.3.cross_attn.o"
    assert diffusers_to_original("blocks.3.ffn.net.0.proj.input_scale") == "blocks.3.ffn.0.input_scale"
    assert original_to_diffusers("blocks.12.self_attn.k.comfy_quant") == "blocks.12.attn1.to_k.comfy_quant"
