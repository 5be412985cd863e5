"""Accuracy report of one run: ``report.json``, ``report.md`` and PNG plots in the run directory."""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ptq.algorithms.recipe import KEEP
from ptq.eval.anchors import meaning_markdown
from ptq.eval.experts import experts_markdown
from ptq.eval.metrics import latent_metrics, psnr, ssim
from ptq.eval.plotting import pyplot
from ptq.eval.runtimes import runtime_markdown

#: How a kept layer's dtype is shown.
_DTYPE_NAMES = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def compare_runs(baseline: list[dict[str, Any]], quantized: list[dict[str, Any]]) -> dict[str, Any]:
    """Per prompt: final-latent metrics and per-step rel_l2/cosine; plus the means over prompts."""
    prompts = []
    for b, q in zip(baseline, quantized):
        final = latent_metrics(b["final"], q["final"])
        steps = [latent_metrics(bs, qs) for bs, qs in zip(b["steps"], q["steps"])]
        prompts.append({"final": final, "steps_rel_l2": [s["rel_l2"] for s in steps],
                        "steps_cosine": [s["cosine"] for s in steps]})
    n = len(prompts)
    mean = {k: sum(p["final"][k] for p in prompts) / n for k in ("rel_l2", "cosine", "psnr")} if n else {}
    steps_mean = [sum(p["steps_rel_l2"][i] for p in prompts) / n for i in range(len(prompts[0]["steps_rel_l2"]))] \
        if n else []
    return {"prompts": prompts, "mean_final": mean, "mean_steps_rel_l2": steps_mean}


def bits_per_weight(records: list[Any]) -> float:
    """Average storage bits per Linear weight element (kept layers count at their dtype's width)."""
    total = sum(r.in_features * r.out_features for r in records)
    bits = sum(r.bits_per_weight * r.in_features * r.out_features for r in records)
    return bits / total if total else 0.0


def _plot_steps(path: Path, cmp: dict[str, Any], title: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, p in enumerate(cmp["prompts"]):
        ax.plot(range(1, len(p["steps_rel_l2"]) + 1), p["steps_rel_l2"], alpha=0.4, label=f"prompt {i}")
    ax.plot(range(1, len(cmp["mean_steps_rel_l2"]) + 1), cmp["mean_steps_rel_l2"], "k-", lw=2, label="mean")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("latent rel. L2 vs bf16")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_layers(path: Path, records: list[Any], max_labels: int = 120) -> None:
    """Bar chart of the per-layer weight error, one bar per quantized Linear in model order, named below (every
    k-th name beyond ``max_labels`` layers)."""
    plt = pyplot()

    q = [r for r in records if r.weight_rel_error is not None]
    if not q:
        return
    step = math.ceil(len(q) / max_labels)
    fig, ax = plt.subplots(figsize=(min(max(8.0, 0.14 * len(q) / step + 2), 24.0), 5.0))
    ax.bar(range(len(q)), [r.weight_rel_error for r in q], color="tab:blue")
    ticks = list(range(0, len(q), step))
    ax.set_xticks(ticks)
    ax.set_xticklabels([q[i].name for i in ticks], rotation=90, fontsize=6)
    ax.set_xlim(-0.6, len(q) - 0.4)
    ax.set_xlabel("quantized Linear (model order)" + (f", every {step}th named" if step > 1 else ""))
    ax.set_ylabel("weight rel. L2 error")
    ax.set_title("per-layer weight quantization error")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _frames_png(path: Path, ref: torch.Tensor, test: torch.Tensor, *, prompt: str = "", label: str = "quantized",
                max_frames: int = 5, diff_gain: float = 4.0) -> None:
    """A labelled grid: the bf16 frames, the quantized ones (``[F, H, W, 3]`` in [0, 1]) and their absolute
    difference times ``diff_gain`` (black = equal), the frame index above each column and the whole prompt as
    title (wrapped)."""
    plt = pyplot()

    idx = torch.linspace(0, ref.shape[0] - 1, min(max_frames, ref.shape[0])).round().long().tolist()
    title = textwrap.wrap(prompt, 95) or [""]
    rows = ((ref, "bf16"), (test, label), ((test - ref).abs() * diff_gain, f"|difference| x {diff_gain:g}"))
    fig, axes = plt.subplots(3, len(idx), figsize=(1.9 * len(idx) + 0.8, 6.0 + 0.2 * len(title)), squeeze=False)
    for col, i in enumerate(idx):
        for row, (video, name) in enumerate(rows):
            ax = axes[row][col]
            ax.imshow(video[i].clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"frame {i}", fontsize=9)
            if col == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle("\n".join(title), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out_dir: Path, *, run_info: dict[str, Any], records: list[Any],
                 baseline: list[dict[str, Any]] | None, quantized: list[dict[str, Any]] | None,
                 exports: list[Any], timings: dict[str, float],
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 eval_prompts: list[str] | None = None, sensitivity: dict[str, Any] | None = None,
                 experts: dict[str, dict[str, Any]] | None = None,
                 runtimes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write report.json / report.md / PNGs; returns the JSON dict. ``decode``: latents -> frames ``[F, H, W, 3]``
    in [0, 1] (the model adapter's decoder) for the frame metrics and images; ``sensitivity``: the dict of
    ``ptq.algorithms.mixed_precision.analyse_and_plan`` (per-layer / per-block output errors, mixed-precision plan);
    ``experts``: per-expert sections of a model with several experts (:func:`ptq.eval.experts.expert_sections`);
    ``runtimes``: per ComfyUI runtime, the evaluation of ``ptq.pipeline.runtime_eval.evaluate_runtimes``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"run": run_info, "timings_s": timings, "bits_per_weight": bits_per_weight(records),
                              "layers": [r.to_dict() for r in records], "exports": [asdict(e) for e in exports]}
    quantized_records = [r for r in records if r.format != KEEP]
    report["num_quantized_layers"] = len(quantized_records)
    report["bits_per_quantized_weight"] = bits_per_weight(quantized_records)
    report["num_linear_layers"] = len(records)
    images: list[str] = []
    if baseline is not None and quantized is not None:
        cmp = compare_runs(baseline, quantized)
        report["accuracy"] = cmp
        _plot_steps(out_dir / "error_over_steps.png", cmp, f"{run_info.get('recipe', {}).get('format', '')} vs bf16")
        images.append("error_over_steps.png")
        if decode is not None:
            frames = []
            label = run_info.get("recipe_title") or "quantized"
            for i, (b, q) in enumerate(zip(baseline, quantized)):
                fb, fq = decode(b["final"]), decode(q["final"])
                frames.append({"psnr": _finite(psnr(fb, fq, data_range=1.0)), "ssim": ssim(fb, fq)})
                name = f"frames_prompt{i}.png"
                prompt = (eval_prompts or [""] * (i + 1))[i]
                _frames_png(out_dir / name, fb, fq, prompt=f"prompt {i}: {prompt}", label=label)
                images.append(name)
            report["frames"] = frames
            vals = [f["psnr"] for f in frames if f["psnr"] is not None]
            report["frames_mean"] = {"psnr": sum(vals) / len(vals) if vals else None,
                                     "ssim": sum(f["ssim"] for f in frames) / len(frames)}
    _plot_layers(out_dir / "layer_weight_error.png", records)
    if quantized_records:
        images.append("layer_weight_error.png")
    if sensitivity is not None:
        report["sensitivity"] = _json_safe(sensitivity)
    if experts is not None:
        report["experts"] = _json_safe(experts)
    if runtimes is not None:
        report["runtimes"] = _json_safe(runtimes)
    report["images"] = images
    report["eval_prompts"] = eval_prompts or []
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out_dir / "report.md").write_text(render_markdown(report))
    return report


def render_markdown(report: dict[str, Any]) -> str:
    """Human-readable report."""
    run = report["run"]
    recipe = run.get("recipe", {})
    name = run.get("recipe_name")
    title = run.get("recipe_title") or recipe.get("format")
    lines = [f"# ptq report: {run.get('preset', '')} / {name or title}", ""]
    lines += [f"- model: `{run.get('source_model') or run['model']}` ({run['dtype']} on {run['device']})",
              f"- recipe: `{name or 'custom'}` = {title} (format={recipe.get('format')} "
              f"weight={recipe.get('weight')} activation={recipe.get('activation')}"
              f"{', weight-only' if recipe.get('weight_only') else ''})",
              f"- quantized Linears: {report['num_quantized_layers']} of {report['num_linear_layers']}; storage "
              f"{report.get('bits_per_quantized_weight', 0.0):.2f} bits per weight over the quantized layers (codes + "
              f"scales), {report['bits_per_weight']:.2f} over all Linear layers (kept layers at their dtype's width)",
              f"- calibration: {run['calib_prompts']} prompts, {spec_text(run['calib_spec'])}",
              f"- evaluation: {run['eval_prompts']} held-out prompts, {spec_text(run['eval_spec'])}"]
    if run.get("peak_gpu_gib") is not None:
        by_phase = ", ".join(f"{k} {v:.1f}" for k, v in (run.get("peak_gpu_gib_by_phase") or {}).items())
        lines.append(f"- peak GPU memory: {run['peak_gpu_gib']:.2f} GiB (by phase, GiB: {by_phase})")
    lines.append("- time: " + ", ".join(f"{k} {v:.1f}s" for k, v in report["timings_s"].items()))
    acc = report.get("accuracy")
    if acc:
        m = acc["mean_final"]
        lines += ["", "## Final latents vs bf16 (mean over prompts)", "",
                  f"The quantized model with every layer as the file specifies it (the format's kernels, activations "
                  f"quantized where the file says so), computed in {run['dtype']}. What stock ComfyUI computes with "
                  "the file on each GPU (which may dequantize the weights, in float16) is in \"ComfyUI per target "
                  "GPU\" below." if report.get("runtimes") else
                  f"The quantized model with every layer as the file specifies it, computed in {run['dtype']}.", "",
                  "| rel. L2 | cosine | PSNR (dB) |", "|---|---|---|",
                  f"| {m['rel_l2']:.4f} | {m['cosine']:.5f} | {m['psnr']:.2f} |", "",
                  "| prompt | rel. L2 | cosine | PSNR (dB) |", "|---|---|---|---|"]
        for i, p in enumerate(acc["prompts"]):
            f = p["final"]
            lines.append(f"| {i} | {f['rel_l2']:.4f} | {f['cosine']:.5f} | {f['psnr']:.2f} |")
        lines += ["", "![error over steps](error_over_steps.png)"]
    if report.get("frames"):
        fm = report["frames_mean"]
        fpsnr = "n/a (no finite value)" if fm["psnr"] is None else f"{fm['psnr']:.2f} dB"
        lines += ["", "## Decoded frames", "", f"mean frame PSNR {fpsnr}, SSIM {fm['ssim']:.4f} "
                  "(in each image: top row bf16, middle row quantized, bottom row their difference |quantized - bf16| "
                  "x 4 per pixel; frame index above each column)", ""]
        lines += [f"![prompt {i}](frames_prompt{i}.png)" for i in range(len(report["frames"]))]
    if acc:
        lines += meaning_markdown(run, name, acc["mean_final"]["rel_l2"])
    if report.get("runtimes"):
        lines += runtime_markdown(report["runtimes"])
    if report.get("sensitivity"):
        lines += sensitivity_markdown(report["sensitivity"], report["layers"])
    lines += experts_markdown(report, sensitivity_markdown)
    lines += ["", "## Exports", "", "| target | file | MiB | verified |", "|---|---|---|---|"]
    for e in report["exports"]:
        if e["skipped"]:
            lines.append(f"| {e['target']} | skipped: {e['skipped']} | | |")
        else:
            lines.append(f"| {e['target']} | `{Path(e['path']).name}` | {e['bytes'] / 2**20:.2f} | "
                         f"{verified_text(e)} |")
    lines += ["", "## Layers", "", "| layer | format | weight rel. err | input amax | clip ratio | input_scale | "
              "bits/w | note |", "|---|---|---|---|---|---|---|---|"]

    def fmt(v: Any, spec: str) -> str:
        return "" if v is None else format(v, spec)

    for r in report["layers"]:
        shown = _DTYPE_NAMES.get(r.get("dtype") or "", r["format"]) if r["format"] == KEEP else r["format"]
        lines.append(f"| {r['name']} | {shown}{' (W only)' if r['weight_only'] else ''} | "
                     f"{fmt(r['weight_rel_error'], '.4f')} | {fmt(r['input_amax'], '.3g')} | "
                     f"{fmt(r['clip_ratio'], '.3f')} | {fmt(r['input_scale'], '.3g')} | "
                     f"{r['bits_per_weight']:.2f} | {r['reason']} |")
    lines += ["", "![per-layer weight error](layer_weight_error.png)", ""]
    return "\n".join(lines)


def spec_text(spec: dict[str, Any] | None) -> str:
    """``64x64, 9 frames, 10 steps, CFG 3.0, seed 0`` for a sampling spec's dict (height x width)."""
    if not spec:
        return "-"
    cfg = f"CFG {spec.get('guidance_scale')}"
    if spec.get("guidance_scale_2") is not None:
        cfg += f" / {spec['guidance_scale_2']} (second expert)"
    return (f"{spec.get('height')}x{spec.get('width')}, {spec.get('num_frames')} frames, {spec.get('num_steps')} "
            f"steps, {cfg}, seed {spec.get('seed')}")


def verified_text(export: dict[str, Any]) -> str:
    """The Exports table's verification cell: ``yes: <detail>``, ``NO: <detail>`` or ``not run``."""
    detail = export.get("verify_detail") or ""
    if export.get("verified") is None:
        return "not run (export.verify=false)"
    return f"{'yes' if export['verified'] else '**NO**'}{': ' + detail if detail else ''}"


def _json_safe(obj: Any) -> Any:
    """inf / nan -> None, recursively (strict JSON)."""
    if isinstance(obj, float):
        return _finite(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def sensitivity_markdown(analysis: dict[str, Any], layers: list[dict[str, Any]] | None = None) -> list[str]:
    """Markdown lines of the sensitivity section: per-block and per-layer output error (rel. L2 of the transformer
    output with only that block / layer quantized), and the mixed-precision plan when there is one."""
    sens = analysis["sensitivity"]
    base = analysis.get("base_format", "nvfp4")

    def rel(v: float | None) -> str:
        return "" if v is None else f"{v ** 0.5:.4f}"

    fmts = sorted({f for e in sens["layer_error"].values() for f in e if f != KEEP},
                  key=lambda f: (f != base, f))
    chosen = {r["name"]: r["format"] for r in layers or []}
    lines = ["", "## Sensitivity", "",
             f"Output error of the transformer (rel. L2 of its prediction vs bf16, root of the mean squared relative "
             f"error over {sens['inputs']} recorded calibration inputs) with only one block / layer quantized "
             f"(weight method `{analysis.get('weight')}`); measured in {sens['seconds']:.1f} s.", ""]
    plan = analysis.get("plan")
    if plan:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(plan["counts"].items()))
        lines += [f"**Mixed precision**: budget {plan['budget']:.3f} bits per weight over "
                  f"{'all Linears' if plan['scope'] == 'all' else 'the quantized layers'}, achieved "
                  f"{plan['bits_per_weight']:.4f}; layers: {counts}; predicted output error (sum of the chosen "
                  f"layers' squared errors) {plan['predicted_error'] ** 0.5:.4f} rel. L2.", ""]
    if sens["block_error"]:
        lines += ["| block | " + " | ".join(fmts) + " |", "|---" * (len(fmts) + 1) + "|"]
        for b, e in sens["block_error"].items():
            lines.append(f"| {b} | " + " | ".join(rel(e.get(f)) for f in fmts) + " |")
        lines.append("")
    order = sorted(sens["layer_error"], key=lambda n: -(sens["layer_error"][n].get(base) or 0.0))
    lines += ["| layer | weights | " + " | ".join(fmts) + " | chosen |", "|---" * (len(fmts) + 3) + "|"]
    for n in order:
        e = sens["layer_error"][n]
        lines.append(f"| {n} | {sens['numel'].get(n, 0)} | " + " | ".join(rel(e.get(f)) for f in fmts)
                     + f" | {chosen.get(n, '')} |")
    return lines
