"""The few lines ``ptq run`` prints when it finishes: accuracy, size, files and whether each was verified."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ptq.algorithms.recipe import KEEP
from ptq.eval.anchors import run_reference


def _short(dtype: str) -> str:
    return {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}.get(dtype, dtype)


def per_gpu_errors(runtimes: dict[str, Any]) -> str:
    """``blackwell 0.3661 (native), hopper = ada = ampere 0.2947 (dequantized), cpu 0.2948 (dequantized)``: one
    entry per distinct evaluation of the report's ``runtimes``."""
    parts = []
    for name, r in runtimes.items():
        if r.get("same_as"):
            continue
        names = " = ".join([name, *(n for n, o in runtimes.items() if o.get("same_as") == name)])
        hows = r.get("layers") or {}
        how = next(iter(hows.values())) if len(set(hows.values())) == 1 else \
            ", ".join(f"{f} {h}" for f, h in hows.items())
        err = (r.get("mean_final") or {}).get("rel_l2")
        parts.append(f"{names} {'-' if err is None else format(err, '.4f')}" + (f" ({how})" if how else ""))
    return ", ".join(parts)


def run_summary(report: dict[str, Any], out_dir: Path) -> str:
    """A short text summary of a finished run's report dict."""
    run = report["run"]
    name = run.get("recipe_name") or "custom recipe"
    lines = [f"ptq run finished: {run.get('preset', '')} / {name} ({run.get('recipe_title', '')})"]
    acc = (report.get("accuracy") or {}).get("mean_final")
    if acc:
        ref = run_reference(run)
        anchor = ""
        if ref:
            r = ref["final_rel_l2"]
            anchor = f"; reference on the trained tiny model: fp8 {r['fp8']:.2f}, nvfp4 {r['nvfp4']:.2f}"
            if name in r and name not in ("fp8", "nvfp4"):
                anchor += f", {name} {r[name]:.2f}"
        lines.append(f"  error vs bf16 ({run['eval_prompts']} eval prompts, final latents; every layer as the file "
                     f"specifies it, computed in {_short(run.get('dtype') or 'bfloat16')}): rel. L2 "
                     f"{acc['rel_l2']:.4f}, cosine {acc['cosine']:.4f}, PSNR {acc['psnr']:.1f} dB{anchor}")
    if report.get("runtimes"):
        lines.append(f"  per GPU in stock ComfyUI (simulated, final rel. L2): {per_gpu_errors(report['runtimes'])}")
    counts: dict[str, int] = {}
    for layer in report["layers"]:
        key = layer["format"] if layer["format"] != KEEP else f"kept {_short(layer.get('dtype') or KEEP)}"
        counts[key] = counts.get(key, 0) + 1
    per_format = ", ".join(f"{v} {k}" for k, v in sorted(counts.items(), key=lambda kv: (kv[0].startswith("kept"),
                                                                                          -kv[1])))
    lines.append(f"  layers: {per_format}; {report.get('bits_per_quantized_weight', 0.0):.2f} bits per weight over "
                 f"the quantized layers, {report['bits_per_weight']:.2f} over all Linears")
    for e in report["exports"]:
        if e["skipped"]:
            lines.append(f"  {e['target']}: skipped ({e['skipped']})")
        else:
            status = "verified bit-exact" if e["verified"] else ("NOT verified" if e["verified"] is False
                                                                 else "not verified (export.verify=false)")
            lines.append(f"  {e['target']}: {e['path']} ({e['bytes'] / 2**20:.1f} MiB, {status})")
    lines.append(f"  report: {out_dir / 'report.md'}")
    return "\n".join(lines)
