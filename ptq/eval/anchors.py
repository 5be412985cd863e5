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
    "- **input amax** (per layer): the largest |input| the layer saw over the calibration prompts and steps; "
    "**input_scale** the static activation scale written to the file (the clip / the format's largest value: 448 "
    "for FP8, 6 x 448 for NVFP4); **clip ratio** = the clip / input amax (1 = no clipping; below 1 the largest "
    "inputs saturate at the clip, in exchange for finer steps for the rest).",
    "- **fp16 headroom** (per ComfyUI runtime): 65504 (float16's largest value) / the largest |activation| seen in "
    "the float16 run; below 1 float16 overflows and ComfyUI's output turns to inf / NaN.",
]


@cache
def _anchors() -> dict[str, Any]:
    try:
        return json.loads(ANCHORS_FILE.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def reference(source_sha256: str | None) -> dict[str, Any] | None:
    """The reference accuracies measured for the model whose transformer files hash to ``source_sha256`` (what
    exports record as ``ptq_source_sha256``; the shipped tiny model wherever it is copied), or None."""
    if not source_sha256:
        return None
    return next((v for v in _anchors().values() if isinstance(v, dict) and v.get("sha256") == source_sha256), None)


def run_reference(run: dict[str, Any]) -> dict[str, Any] | None:
    """The reference accuracies for a run's ``run_info``: by its ``source_sha256``, none when LoRAs were merged into
    the weights (another model)."""
    return None if run.get("loras") else reference(run.get("source_sha256"))


def meaning_markdown(run: dict[str, Any], recipe_name: str | None, rel_l2: float | None) -> list[str]:
    """The report section that says what the numbers mean and how this run (its ``run_info``) compares with the
    references."""
    lines = ["", "## What the numbers mean", "", *EXPLANATION]
    ref = run_reference(run)
    if ref:
        table = ref["final_rel_l2"]
        lines += ["", f"Reference final-latent rel. L2 on the {ref['setting']} (docs/benchmarks.md):", "",
                  "| recipe | final-latent rel. L2 |", "|---|---:|"]
        lines += [f"| {'**' + k + '**' if k == recipe_name else k} | {v:.3f} |" for k, v in table.items()]
        if rel_l2 is not None and recipe_name in table:
            lines += ["", f"This run: {rel_l2:.3f} with recipe `{recipe_name}` (reference {table[recipe_name]:.3f}; "
                      "runs with fewer evaluation prompts scatter around it)."]
    else:
        lines += ["", "No reference accuracies are recorded for this model: compare recipes with each other on it "
                  "(same prompts and seeds; `ptq compare` ranks a sweep's runs). On a model with random weights "
                  "the errors check that the pipeline runs, not quality."]
    return lines
