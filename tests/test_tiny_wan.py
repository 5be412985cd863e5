"""Tests of the tiny WAN model (ptq/models/tiny_wan.py): CPU, fast."""

from __future__ import annotations

import torch

from ptq.models.tiny_wan import (
    TINY_TRANSFORMER_CONFIG,
    SpaceToDepthVAE,
    build_random_tiny_wan,
    encode_prompts,
    expand_timestep,
    load_tiny_wan,
    save_tiny_wan,
)


def test_random_build_save_load_forward(tmp_path):
    comps = build_random_tiny_wan(seed=0)
    path = save_tiny_wan(comps, tmp_path / "tiny")
    for sub in ("transformer", "text_encoder", "tokenizer", "scheduler", "vae", "model_index.json"):
        assert (path / sub).exists()
    loaded = load_tiny_wan(path)
    assert loaded.transformer.dtype == torch.bfloat16
    emb = encode_prompts(loaded, ["a red circle moving left on a blue background", ""])
    assert emb.shape == (2, 32, TINY_TRANSFORMER_CONFIG["text_dim"])
    assert emb[1, 1:].abs().sum() == 0  # zero-padded past the prompt's length, as WanPipeline does
    x = torch.randn(2, 48, 3, 16, 16)
    ts = expand_timestep(torch.tensor([250.0, 750.0]), x)
    assert ts.shape == (2, 3 * 8 * 8)
    out = loaded.transformer(
        hidden_states=x.bfloat16(), timestep=ts, encoder_hidden_states=emb.bfloat16(), return_dict=False
    )[0]
    assert out.shape == x.shape
    assert torch.isfinite(out.float()).all()


def test_random_build_deterministic():
    a = build_random_tiny_wan(seed=3).transformer.state_dict()
    b = build_random_tiny_wan(seed=3).transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_vae_round_trip_exact(tmp_path):
    vae = SpaceToDepthVAE()
    assert vae.z_dim == 48
    video = torch.rand(2, 3, 5, 64, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    lat = vae.encode(video)
    assert lat.shape == (2, 48, 5, 16, 8)
    assert torch.equal(vae.decode(lat), video)
    vae.save_pretrained(tmp_path / "vae")
    again = SpaceToDepthVAE.from_pretrained(tmp_path / "vae")
    assert again.config.spatial_factor == 4 and torch.equal(again.encode(video), lat)
