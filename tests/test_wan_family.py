"""The WAN family's stored configs: every model built on the meta device, the diffusers <-> original name map over
every key in both directions (checked against diffusers' own single-file converter), the I2V models' extra layers,
and which spec a folder resolves to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ptq.algorithms.layers import LayerPlanner
from ptq.algorithms.recipe import QuantRecipe
from ptq.models.wan import WAN22_TI2V_5B_TRANSFORMER_CONFIG, WAN_LAYER_RULES, build_meta_transformer
from ptq.models.wan.family import get_spec, spec_for_folder, wan_models
from ptq.models.wan.names import convert_state_dict_keys, original_to_diffusers

NAMES = sorted(wan_models())


def test_every_published_model_has_a_spec() -> None:
    assert set(NAMES) == {"wan22_t2v_a14b", "wan22_i2v_a14b", "wan21_t2v_1_3b", "wan21_t2v_14b",
                          "wan21_i2v_14b_480p", "wan21_i2v_14b_720p", "wan22_ti2v_5b"}
    assert get_spec("wan22_ti2v_5b").transformer_kwargs() == {**WAN22_TI2V_5B_TRANSFORMER_CONFIG,
                                                              "pos_embed_seq_len": None}
    a14b = get_spec("wan22_t2v_a14b")
    assert a14b.experts == ("high_noise", "low_noise") and a14b.boundary_ratio == 0.875
    assert a14b.sample_defaults["guidance_scale"] == 4.0 and a14b.sample_defaults["guidance_scale_2"] == 3.0
    assert get_spec("wan22_i2v_a14b").boundary_ratio == 0.9
    assert [get_spec(n).conditioning for n in NAMES] == ["concat_clip", "concat_clip", "none", "none", "concat",
                                                         "none", "first_frame"]
    for spec in wan_models().values():
        assert spec.sources and spec.sample_defaults["negative_prompt"]


@pytest.fixture(scope="module", params=NAMES)
def meta_model(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module]:
    return request.param, build_meta_transformer(get_spec(request.param).transformer_kwargs())


def test_name_map_covers_every_key_both_ways(meta_model: tuple[str, torch.nn.Module]) -> None:
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    name, model = meta_model
    state = model.state_dict()
    orig = convert_state_dict_keys(state, "original")
    assert len(orig) == len(state)
    back = convert_state_dict_keys(orig, "diffusers")
    assert list(back) == list(state)
    for k, v in orig.items():
        assert v.shape == state[original_to_diffusers(k)].shape
    # diffusers' own original -> diffusers converter undoes the map exactly, for every key
    assert set(convert_wan_transformer_to_diffusers(dict(orig))) == set(state)
    cfg = get_spec(name).transformer
    assert state["patch_embedding.weight"].shape[1] == cfg["in_channels"]
    assert len([n for n in orig if n.endswith("self_attn.q.weight")]) == cfg["num_layers"]


def test_i2v_extra_layers_are_mapped_and_kept(meta_model: tuple[str, torch.nn.Module]) -> None:
    name, model = meta_model
    spec = get_spec(name)
    orig = set(convert_state_dict_keys(model.state_dict(), "original"))
    has_clip = spec.conditioning == "concat_clip"
    assert ("img_emb.proj.1.weight" in orig) == has_clip  # what ComfyUI's detection reads for WAN 2.1 I2V
    assert ("blocks.39.cross_attn.k_img.weight" in orig) == has_clip
    assert ("blocks.0.cross_attn.norm_k_img.weight" in orig) == has_clip
    layers = LayerPlanner.for_model(model, QuantRecipe(format="nvfp4"), WAN_LAYER_RULES).targets(model)
    assert not [n for n in layers if n.startswith(("condition_embedder.", "patch_embedding", "proj_out"))]
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    per_block = 12 if has_clip else 10
    assert len(layers) == per_block * spec.transformer["num_layers"]
    assert len(linears) - len(layers) == (8 if has_clip else 6)  # + the image embedder's two Linears


def test_comfyui_wan_detection_reads_the_right_head_count() -> None:
    """ComfyUI builds a WAN model with ``num_heads = head.modulation.shape[-1] // 128`` and ``out_dim =
    head.head.weight.shape[0] // 4`` (comfy/model_detection.py): right for every published model and for the small
    two-expert model (2 x 128), not for the 4 x 64 tiny model (which needs ComfyUI's ``config`` metadata)."""
    from ptq.models.tiny_wan import TINY_TRANSFORMER_CONFIG
    from ptq.models.tiny_wan.moe import TINY_MOE_TRANSFORMER_CONFIG

    for cfg in [s.transformer for s in wan_models().values()] + [TINY_MOE_TRANSFORMER_CONFIG]:
        orig = convert_state_dict_keys(build_meta_transformer(
            {**cfg, "patch_size": tuple(cfg["patch_size"])}).state_dict(), "original")
        assert orig["head.modulation"].shape[-1] // 128 == cfg["num_attention_heads"]
        assert orig["head.head.weight"].shape[0] // 4 == cfg["out_channels"]
        assert orig["patch_embedding.weight"].shape[1] == cfg["in_channels"]
    tiny = TINY_TRANSFORMER_CONFIG
    assert tiny["num_attention_heads"] * tiny["attention_head_dim"] // 128 != tiny["num_attention_heads"]


def test_two_experts_and_boundaries() -> None:
    for spec in wan_models().values():
        assert len(spec.experts) == (2 if spec.two_experts else 1)
        assert (spec.boundary_ratio is None) == (not spec.name.endswith("a14b"))


def _folder(tmp_path: Path, transformer: dict, index: dict) -> Path:
    (tmp_path / "transformer").mkdir(parents=True)
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(transformer))
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    return tmp_path


def test_spec_for_folder(tmp_path: Path) -> None:
    t14 = get_spec("wan21_t2v_14b").transformer
    assert spec_for_folder(_folder(tmp_path / "a", t14, {"boundary_ratio": 0.875})).name == "wan22_t2v_a14b"
    assert spec_for_folder(_folder(tmp_path / "b", t14, {})).name == "wan21_t2v_14b"
    assert spec_for_folder(tmp_path / "b", "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers").name == "wan21_i2v_14b_720p"
    assert spec_for_folder(tmp_path / "b", None, "wan21_t2v_1_3b").name == "wan21_t2v_1_3b"
    assert spec_for_folder(_folder(tmp_path / "c", {"in_channels": 3}, {})) is None
