"""The small two-expert WAN model (WAN 2.2 A14B's layout at tiny size): a high-noise and a low-noise
``WanTransformer3DModel`` switching at ``boundary_ratio``, 2 heads x 128 (head_dim 128, so ComfyUI's WAN detection,
``num_heads = dim / 128``, builds it right without extra metadata), 2 blocks each, sharing the tiny model's text
encoder, tokenizer, VAE and scheduler. Every weight shape equals a weight of the tiny model (4 heads x 64 has the
same shapes), so the trained tiny model can start both experts (:func:`init_from_tiny`).

The trained weights ship in :data:`TINY_MOE_PATH` once ``scripts/train_tiny_wan.py train-moe`` was run on a GPU;
:func:`build_random_tiny_moe` makes the same architecture with random weights (same save format).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel

from ptq.models.tiny_wan.model import (
    TINY_SAMPLE_DEFAULTS,
    TINY_TRANSFORMER_CONFIG,
    TINY_WAN_PATH,
    TinyWanComponents,
    build_random_tiny_wan,
    build_transformer,
    save_tiny_wan,
)

TINY_MOE_PATH: Path = TINY_WAN_PATH.parent / "tiny_wan_moe"
#: Same as WAN 2.2 T2V-A14B: the high-noise expert serves timesteps >= 875.
TINY_MOE_BOUNDARY_RATIO = 0.875
#: kwargs of each expert: the tiny model's layout with 2 heads x 128 and 2 blocks.
TINY_MOE_TRANSFORMER_CONFIG: dict[str, Any] = {**TINY_TRANSFORMER_CONFIG, "num_attention_heads": 2,
                                               "attention_head_dim": 128, "num_layers": 2}
#: Blocks of the tiny model that start the experts' blocks 0 and 1.
TINY_INIT_BLOCKS = (0, 4)


@dataclass
class TinyWanMoEComponents:
    """The tiny components (``base``: text encoder, tokenizer, scheduler, VAE, sample defaults; its transformer is
    the high-noise expert) plus the low-noise expert."""

    base: TinyWanComponents
    transformer_2: WanTransformer3DModel
    boundary_ratio: float = TINY_MOE_BOUNDARY_RATIO

    @property
    def transformer(self) -> WanTransformer3DModel:
        return self.base.transformer


def build_random_tiny_moe(seed: int = 0) -> TinyWanMoEComponents:
    """Random-weight two-expert tiny WAN (float32), deterministic for ``seed``."""
    base = build_random_tiny_wan(seed)
    base.transformer = build_transformer(seed, TINY_MOE_TRANSFORMER_CONFIG)
    return TinyWanMoEComponents(base, build_transformer(seed + 100, TINY_MOE_TRANSFORMER_CONFIG))


def init_from_tiny(tiny: TinyWanComponents, blocks: tuple[int, ...] = TINY_INIT_BLOCKS) -> TinyWanMoEComponents:
    """Both experts started from the trained tiny model: its embeddings, head and the blocks ``blocks`` (same
    shapes; the attention is regrouped into 2 heads x 128). The text encoder, tokenizer, scheduler and VAE are the
    tiny model's (shared by both experts, as A14B's experts share UMT5)."""
    src = {k: v.float() for k, v in tiny.transformer.state_dict().items()}
    state = {}
    for k, v in src.items():
        if k.startswith("blocks."):
            idx = int(k.split(".")[1])
            if idx in blocks:
                state[k.replace(f"blocks.{idx}.", f"blocks.{blocks.index(idx)}.", 1)] = v
        else:
            state[k] = v
    experts = []
    for seed in (0, 1):
        model = build_transformer(seed, TINY_MOE_TRANSFORMER_CONFIG)
        model.load_state_dict(state, strict=True)
        experts.append(model)
    base = TinyWanComponents(experts[0], tiny.text_encoder, tiny.tokenizer, tiny.scheduler, tiny.vae,
                             dict(tiny.sample_defaults or TINY_SAMPLE_DEFAULTS))
    return TinyWanMoEComponents(base, experts[1])


def save_tiny_moe(components: TinyWanMoEComponents, path: str | Path,
                  weights_dtype: torch.dtype = torch.bfloat16, extra_index: dict[str, Any] | None = None) -> Path:
    """Write a diffusers-style two-expert folder (``transformer/``, ``transformer_2/``, the tiny components,
    ``model_index.json`` with ``boundary_ratio``), atomically (temp dir, then rename)."""
    import copy

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.moe", dir=path.parent))
    try:
        folder = save_tiny_wan(components.base, tmp / "m", weights_dtype)
        low = copy.deepcopy(components.transformer_2).cpu()
        for t in (*low.parameters(), *low.buffers()):
            if t.is_floating_point():
                t.data = t.data.to(weights_dtype)
        low.save_pretrained(folder / "transformer_2", safe_serialization=True)
        index = json.loads((folder / "model_index.json").read_text())
        index.update({"_ptq_model": "tiny_wan_moe", "transformer_2": ["diffusers", "WanTransformer3DModel"],
                      "boundary_ratio": components.boundary_ratio, **(extra_index or {})})
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        if path.exists():
            shutil.rmtree(path)
        folder.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
