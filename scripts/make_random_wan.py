"""Write a diffusers folder of any WAN family model with its REAL configs (ptq/models/wan/model_configs/*.json) and
seeded random weights, for measuring the full-size pipeline where the real weights cannot be downloaded.

Transformer(s) in bf16 with diffusers' fp32 modules (A14B: ``transformer/`` high-noise and ``transformer_2/``
low-noise expert, ``boundary_ratio`` in ``model_index.json``), UMT5-XXL encoder (5.7B, bf16), the spec's scheduler,
a word-level stand-in tokenizer (UMT5's sentencepiece model cannot be downloaded here), and for image-to-video
models a random ``AutoencoderKLWan`` of the spec's VAE (and, WAN 2.1 I2V, a random CLIP ViT-H/14 vision model with
a default CLIP image processor). ``--vae`` adds the VAE to text-to-video models too.

    python scripts/make_random_wan.py --model wan22_t2v_a14b --out /tmp/wan22_t2v_a14b_random [--device cuda]

Disk: A14B ~69 GB (2 x 28.6 GB experts + 11.4 GB encoder), WAN 2.1 14B ~40 GB, 1.3B ~14 GB, I2V +0.3-1.3 GB.
``--experts-share-weights`` hard-links the low-noise expert to the high-noise one (A14B in ~40 GB; both experts
then hold the same random weights: fine for time and memory, which is what these folders measure), and
``--link-from DIR`` hard-links every component of DIR whose config equals this model's (WAN 2.1 T2V 14B and an
A14B expert share the transformer config; every family member shares the UMT5-XXL encoder) instead of writing it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ptq.models.tiny_wan import build_tokenizer  # noqa: E402
from ptq.models.wan import UMT5_XXL_ENCODER_CONFIG, build_random_transformer  # noqa: E402
from ptq.models.wan.family import get_spec, wan_models  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: AutoencoderKLWan kwargs of the two WAN VAEs (diffusers' defaults are the WAN 2.1 VAE).
VAE_KWARGS = {16: {}, 48: {"base_dim": 160, "decoder_base_dim": 256, "z_dim": 48, "is_residual": True,
                           "in_channels": 12, "out_channels": 12, "patch_size": 2, "scale_factor_spatial": 16,
                           "temperal_downsample": [False, True, True], "dim_mult": [1, 2, 4, 4]}}


def _free() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def link_component(src: Path, dst: Path) -> None:
    """Hard-link every file of the component folder ``src`` into ``dst`` (same bytes, no disk)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and not (dst / f.name).exists():
            os.link(f, dst / f.name)
    print(f"{dst.name}: hard-linked from {src}", flush=True)


def linkable_transformer(link_from: Path | None, spec) -> Path | None:
    """A transformer folder of ``link_from`` whose config has this spec's transformer settings, if any."""
    if link_from is None:
        return None
    want = json.loads(json.dumps(spec.transformer_kwargs()))
    for sub in ("transformer", "transformer_2"):
        cfg = link_from / sub / "config.json"
        if cfg.is_file() and all(json.loads(cfg.read_text()).get(k) == v for k, v in want.items()):
            return link_from / sub
    return None


def write_transformers(spec, out: Path, device: str, seed: int, *, share: bool = False,
                       link_from: Path | None = None) -> None:
    for k, sub in enumerate(["transformer", "transformer_2"][: len(spec.experts)]):
        source = out / "transformer" if share and k else linkable_transformer(link_from, spec)
        if source is not None:
            link_component(source, out / sub)
            continue
        t0 = time.perf_counter()
        model = build_random_transformer(spec.transformer_kwargs(), seed=seed + 10 * k, device=device)
        model.save_pretrained(out / sub, safe_serialization=True, max_shard_size="10GB")
        n = sum(p.numel() for p in model.parameters())
        del model
        _free()
        print(f"{sub}: {n:,} params, {time.perf_counter() - t0:.1f}s", flush=True)


def write_text_encoder(out: Path, device: str, seed: int, *, link_from: Path | None = None) -> None:
    from transformers import UMT5Config, UMT5EncoderModel

    if link_from is not None and (link_from / "text_encoder" / "config.json").is_file():
        for sub in ("text_encoder", "tokenizer"):
            link_component(link_from / sub, out / sub)
        return
    torch.manual_seed(seed + 1)
    with torch.device(device):
        te = UMT5EncoderModel(UMT5Config(**UMT5_XXL_ENCODER_CONFIG)).to(torch.bfloat16)
    te.save_pretrained(out / "text_encoder", safe_serialization=True, max_shard_size="10GB")
    del te
    _free()
    words = set()
    for f in ("wan_calib.txt", "wan_eval.txt"):
        words |= {w.lower() for w in re.findall(r"\w+", (REPO / "ptq" / "data" / f).read_text())}
    build_tokenizer(sorted(words), model_max_length=512).save_pretrained(out / "tokenizer")


def write_image_parts(spec, out: Path, seed: int) -> None:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed + 2)
    AutoencoderKLWan(**VAE_KWARGS[spec.vae["z_dim"]]).save_pretrained(out / "vae")
    if spec.image_encoder:
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        c = spec.image_encoder
        cfg = CLIPVisionConfig(hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                               num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
                               image_size=c["image_size"], patch_size=c["patch_size"])
        CLIPVisionModel(cfg).save_pretrained(out / "image_encoder", safe_serialization=True)
        CLIPImageProcessor(size={"shortest_edge": c["image_size"]},
                           crop_size={"height": c["image_size"], "width": c["image_size"]}).save_pretrained(
            out / "image_processor")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, choices=sorted(wan_models()))
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vae", action="store_true", help="also write a random VAE for a text-to-video model")
    ap.add_argument("--experts-share-weights", action="store_true",
                    help="A14B: hard-link the low-noise expert to the high-noise one (same random weights, "
                         "half the disk)")
    ap.add_argument("--link-from", type=Path, default=None,
                    help="hard-link the components of this folder whose configs match instead of writing them")
    args = ap.parse_args()
    spec = get_spec(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    write_transformers(spec, out, args.device, args.seed, share=args.experts_share_weights,
                       link_from=args.link_from)
    write_text_encoder(out, args.device, args.seed, link_from=args.link_from)
    if args.vae or spec.conditioning != "none":
        write_image_parts(spec, out, args.seed)
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(spec.scheduler, indent=2))
    index = {"_class_name": spec.pipeline, "_note": f"random weights, real configs of {spec.hub_id} "
             "(ptq scripts/make_random_wan.py)", "expand_timesteps": spec.expand_timesteps}
    if spec.two_experts:
        index["boundary_ratio"] = spec.boundary_ratio
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    print(f"done in {time.perf_counter() - t0:.1f}s -> {out}", flush=True)


if __name__ == "__main__":
    main()
