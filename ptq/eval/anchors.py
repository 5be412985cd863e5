"""What a run's numbers mean: the explanation report.md gives, and the reference accuracies measured for the shipped
model (``ptq/data/anchors.json``, from ``docs/benchmarks.md``) to compare a run against."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

ANCHORS_FILE = Path(__file__).resolve().parents[1] / "data" / "anchors.json"

EXPLANATION = [
    "All errors compare the quantized model with the unquantized (bf16) model on the same held-out prompts and "
    "seeds, each following its own denoising trajectory.",
    "- **final-latent rel. L2** = ||z_q - z_bf16|| / ||z_bf16|| of the last latents (0 = identical). Lower is better. "
    "Small per-step errors compound along the trajectory, so a short schedule on a small model shows large "
    "absolute values: compare recipes with each other and with the reference numbers below rather than reading "
    "the value on its own.",
    "- **cosine** of the final latents (1 = same direction) and **PSNR** (dB, over the bf16 latents' range): higher "
    "is better.",
    "- **frame PSNR / SSIM** (when the latents are decoded): the decoded videos compared frame by frame.",
    "- **error over steps**: the latent rel. L2 after each denoising step; a curve that keeps rising means the "
    "trajectories drift apart, a flat one that the error is local.",
    "- **weight rel. err** (per layer): ||W_q - W|| / ||W|| of the weight as the loader dequantizes it.",
]


@cache
def _anchors() -> dict[str, Any]:
    try:
        return json.loads(ANCHORS_FILE.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def reference(model: str) -> dict[str, Any] | None:
    """The reference accuracies measured for ``model`` (e.g. ``"tiny_wan"``), or None."""
    return _anchors().get(model)


def meaning_markdown(model: str, recipe_name: str | None, rel_l2: float | None) -> list[str]:
    """The report section that says what the numbers mean and how this run compares with the references."""
    lines = ["", "## What the numbers mean", "", *EXPLANATION]
    ref = reference(model)
    if ref:
        table = ref["final_rel_l2"]
        lines += ["", f"Reference final-latent rel. L2 on the {ref['setting']} (docs/benchmarks.md):", "",
                  "| recipe | final-latent rel. L2 |", "|---|---:|"]
        lines += [f"| {'**' + k + '**' if k == recipe_name else k} | {v:.3f} |" for k, v in table.items()]
        if rel_l2 is not None and recipe_name in table:
            lines += ["", f"This run: {rel_l2:.3f} with recipe `{recipe_name}` (reference {table[recipe_name]:.3f}; "
                      "runs with fewer evaluation prompts scatter around it)."]
    else:
        lines += ["", "No reference accuracies are recorded for this model; on random weights the errors say nothing "
                  "about quality (they check that the pipeline runs)."]
    return lines
