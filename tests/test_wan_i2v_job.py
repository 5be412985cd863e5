"""Image-to-video through the whole job on a small WAN 2.1 I2V-layout folder (36 input channels, CLIP image
embeddings, ``add_k_proj`` / ``add_v_proj``): the conditioning images of ``calib.images`` / ``eval.images`` reach the
model, the image embedder stays in high precision, the export verifies and ``ptq verify`` passes on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def i2v_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from ptq.models.tiny_wan import TINY_VOCAB, build_text_encoder, build_tokenizer

    root = tmp_path_factory.mktemp("models") / "wan21_i2v_small"
    torch.manual_seed(0)
    WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=36,
                          out_channels=16, text_dim=256, freq_dim=64, ffn_dim=128, num_layers=2, cross_attn_norm=True,
                          qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=48, added_kv_proj_dim=64,
                          rope_max_seq_len=64).to(torch.bfloat16).save_pretrained(root / "transformer")
    AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                     temperal_downsample=[False, True, True]).save_pretrained(root / "vae")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(root / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "image_processor")
    tok = build_tokenizer(TINY_VOCAB)
    tok.save_pretrained(root / "tokenizer")
    build_text_encoder(len(tok)).save_pretrained(root / "text_encoder")
    UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0).save_pretrained(
        root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoPipeline",
                                                       "expand_timesteps": False}))
    return root


def _cfg(root: Path, tmp: Path, images: list[str]):
    from ptq.pipeline.settings import RunConfig

    cfg = RunConfig()
    cfg.model.adapter, cfg.model.name, cfg.model.path, cfg.model.device = "wan", "", str(root), "cpu"
    cfg.progress = False
    for s in (cfg.calib, cfg.eval):
        s.height = s.width = 32
        s.num_frames, s.num_steps, s.images = 5, 3, images
    cfg.calib.num_prompts, cfg.eval.num_prompts, cfg.eval.decode = 2, 1, False
    cfg.export.targets = ["comfyui"]
    cfg.eval.cache_dir = str(tmp / "cache")
    return cfg


def test_i2v_job_conditions_on_the_images_and_exports(i2v_dir: Path, tmp_path: Path) -> None:
    from ptq.pipeline.job import run_job
    from ptq.tools.verify import verify_file

    a = run_job(_cfg(i2v_dir, tmp_path, ["tiny_image_0.png", "tiny_image_1.png"]), tmp_path / "a")
    b = run_job(_cfg(i2v_dir, tmp_path, ["tiny_image_2.png", "tiny_image_3.png"]), tmp_path / "b")
    fmt = {r["name"]: r["format"] for r in a["layers"]}
    assert fmt["blocks.0.attn2.add_k_proj"] == "nvfp4" and fmt["blocks.1.attn2.add_v_proj"] == "nvfp4"
    assert fmt["condition_embedder.image_embedder.ff.net.0.proj"] == "bf16"
    amax = {r["name"]: r["input_amax"] for r in b["layers"]}
    # the CLIP embeddings of other images give the image key/value projections other inputs
    assert all(r["input_amax"] != amax[r["name"]] for r in a["layers"] if "add_k_proj" in r["name"])
    assert a["exports"][0]["verified"]
    rep = verify_file(a["exports"][0]["path"], str(i2v_dir))
    assert rep.ok and rep.loads_into_diffusers, rep.problems
    assert {c.name for c in rep.layers} >= {"blocks.0.attn2.add_k_proj", "blocks.0.attn2.add_v_proj"}


@pytest.mark.parametrize("cfg,index,kind", [({"in_channels": 16, "out_channels": 16}, {"expand_timesteps": False}, "none"),
                                             ({"in_channels": 36, "out_channels": 16}, {"expand_timesteps": False}, "concat"),
                                             ({"in_channels": 36, "out_channels": 16, "image_dim": 1280},
                                              {"expand_timesteps": False},
                                              "concat_clip"),
                                             ({"in_channels": 48, "out_channels": 48}, {"expand_timesteps": True},
                                              "first_frame")])
def test_conditioning_kind_of_a_folder(tmp_path: Path, cfg: dict, index: dict, kind: str) -> None:
    from ptq.models.wan.adapter import WanAdapter

    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model_index.json").write_text(json.dumps({**index, "_class_name": "WanPipeline"}))
    adapter = WanAdapter(tmp_path)
    assert adapter.conditioning == kind
    if kind == "none":
        with pytest.raises(ValueError, match="text-to-video model: remove calib.images"):
            adapter.encode_condition(torch.zeros(3, 32, 32))
