"""The trained two-expert tiny model shipped in ptq/assets/tiny_wan_moe (skipped until it is trained on a GPU:
``python scripts/train_tiny_wan.py train-moe --install``): size, ComfyUI-compatible head size, and each expert
serving its own noise range better than the other expert does."""

from __future__ import annotations

import json

import pytest
import torch

from ptq.models.tiny_wan.moe import TINY_MOE_BOUNDARY_RATIO, TINY_MOE_PATH

pytestmark = pytest.mark.skipif(not (TINY_MOE_PATH / "model_index.json").is_file(),
                                reason=f"the trained two-expert tiny model is not shipped yet ({TINY_MOE_PATH}); "
                                       "train it: python scripts/train_tiny_wan.py train-moe --install")


def test_asset_size_and_layout() -> None:
    size = sum(f.stat().st_size for f in TINY_MOE_PATH.rglob("*") if f.is_file())
    assert size <= 16 * 2**20
    index = json.loads((TINY_MOE_PATH / "model_index.json").read_text())
    assert index["boundary_ratio"] == TINY_MOE_BOUNDARY_RATIO
    for sub in ("transformer", "transformer_2"):
        cfg = json.loads((TINY_MOE_PATH / sub / "config.json").read_text())
        assert cfg["attention_head_dim"] == 128 and cfg["num_attention_heads"] * 128 == 256


def test_each_expert_is_better_on_its_own_range() -> None:
    from ptq.models.tiny_wan import flow_matching_loss, heldout_batch, load_tiny_wan, read_prompts
    from ptq.models.tiny_wan.model import encode_prompts
    from ptq.models.wan.loading import load_transformer
    from ptq.pipeline.prompts import resolve_data_path

    comps = load_tiny_wan(TINY_MOE_PATH)
    experts = {"high": comps.transformer, "low": load_transformer(TINY_MOE_PATH, subfolder="transformer_2")}
    prompts, x0, noise, _ = heldout_batch(read_prompts(resolve_data_path("tiny_eval.txt"))[:8], repeats=1)
    emb = encode_prompts(comps, prompts)
    ranges = {"high": (TINY_MOE_BOUNDARY_RATIO + 0.99) / 2, "low": TINY_MOE_BOUNDARY_RATIO / 2}
    with torch.no_grad():
        loss = {(e, r): float(flow_matching_loss(m, x0, emb, torch.full((len(prompts),), s), noise))
            for e, m in experts.items() for r, s in ranges.items()}
    assert loss[("high", "high")] < loss[("low", "high")]
    assert loss[("low", "low")] < loss[("high", "low")]
