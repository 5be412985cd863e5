"""Write a WAN 2.2 TI2V-5B diffusers folder with the REAL configs and seeded random weights.

For measuring time and memory of the full-size pipeline where the real weights cannot be downloaded:
transformer (5.0B, bf16 with diffusers' fp32 modules), UMT5-XXL encoder (5.7B, bf16), the 5B's UniPC scheduler and
a word-level stand-in tokenizer (UMT5's sentencepiece model cannot be downloaded here; token ids only index the
random embedding). No VAE (the wan_* presets evaluate latents; pass --vae to add a random AutoencoderKLWan).

    python scripts/make_random_wan5b.py --out /tmp/wan5b_random [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from ptq.models.tiny_wan import build_tokenizer
from ptq.models.wan import (
    UMT5_XXL_ENCODER_CONFIG,
    WAN22_TI2V_5B_SCHEDULER_CONFIG,
    build_random_transformer,
)

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    model = build_random_transformer(seed=args.seed, device=args.device)
    model.save_pretrained(out / "transformer", safe_serialization=True, max_shard_size="20GB")
    n = sum(p.numel() for p in model.parameters())
    del model
    print(f"transformer: {n:,} params, {time.perf_counter() - t0:.1f}s", flush=True)

    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(args.seed + 1)
    with torch.device(args.device):
        te = UMT5EncoderModel(UMT5Config(**UMT5_XXL_ENCODER_CONFIG)).to(torch.bfloat16)
    te.save_pretrained(out / "text_encoder", safe_serialization=True, max_shard_size="20GB")
    n = sum(p.numel() for p in te.parameters())
    del te
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"text_encoder: {n:,} params, {time.perf_counter() - t0:.1f}s", flush=True)

    words = set()
    for f in ("wan_calib.txt", "wan_eval.txt"):
        p = REPO / "ptq" / "data" / f
        if p.exists():
            words |= {w.lower() for w in re.findall(r"\w+", p.read_text())}
    build_tokenizer(sorted(words), model_max_length=512).save_pretrained(out / "tokenizer")
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(WAN22_TI2V_5B_SCHEDULER_CONFIG, indent=2))
    (out / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "_note": "random weights, real configs (ptq scripts/make_random_wan5b.py)",
        "expand_timesteps": True}, indent=2))
    print(f"done in {time.perf_counter() - t0:.1f}s -> {out}", flush=True)


if __name__ == "__main__":
    main()
