"""Part ``simfwd`` (and ``quant_export`` on the GPU): the model after ``quantize_`` (NVFP4 W4A4, FP8 W8A8) on the
fused CUDA path (Triton activation quantization + one GEMM; FP8 via ``torch._scaled_mm`` and via bf16 ``addmm``) and
on the reference path: time, accuracy vs bf16, per-layer fast vs reference diagnostics; the NVFP4 model's ComfyUI
export."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from bench_wan5b.common import (
    RESULTS,
    RUN,
    Graphed,
    InputRounds,
    free,
    log,
    loop_one,
    make_inputs,
    median,
    peak_gib,
    rel_l2,
    reset_peak,
    rounds,
    save,
    sync,
    timed,
)
from ptq.algorithms.qlinear import QuantLinear, kernel_options
from ptq.algorithms.quantize import quantize_
from ptq.algorithms.recipe import QuantRecipe
from ptq.calibration.observers import LinearInputStats

#: layers of :func:`layer_diagnostics` (those the model has)
DIAGNOSED = ("blocks.0.attn1.to_q", "blocks.0.ffn.net.2", "blocks.15.attn2.to_k", "blocks.29.ffn.net.0.proj")


def part_simfwd(model: nn.Module, stats: dict[str, LinearInputStats], reps: dict[int, int], do_export: bool,
                export_dir: Path) -> None:
    """NVFP4 then FP8 (FP8 only when ``reps`` times anything): quantize, accuracy, timings per token count;
    ``do_export``: the NVFP4 model's ComfyUI export (``RESULTS["quant_export_gpu"]``)."""
    res: dict[str, Any] = RESULTS.setdefault("simfwd", {})
    for fmt in ("nvfp4", "fp8"):
        if fmt == "fp8" and not reps:
            break
        qm, entry = _quantized(model, fmt, stats)
        if fmt == "nvfp4" and do_export:
            _export_gpu(qm, entry["quantize_s"], export_dir)
        _accuracy(model, qm, fmt, entry)
        for tokens, n in reps.items():
            entry[str(tokens)] = _simfwd_at(model, qm, fmt, tokens, n, graphs=tokens == min(reps), entry=entry)
            free()
        res[fmt] = entry
        save()
        qm = None
        free()


def _quantized(model: nn.Module, fmt: str, stats: dict[str, LinearInputStats]) -> tuple[nn.Module, dict[str, Any]]:
    """A copy of ``model`` quantized to ``fmt`` and its entry (``quantize_`` time and peak memory)."""
    recipe = QuantRecipe(format=fmt)
    qm = copy.deepcopy(model)
    sync()
    reset_peak()
    t_q = timed(lambda: quantize_(qm, recipe, stats, progress=False))
    nq = sum(isinstance(m, QuantLinear) for m in qm.modules())
    log(f"simfwd {fmt}: quantize_ {nq} Linears in {t_q:.2f}s")
    return qm, {"quantize_s": t_q, "quantized_linears": nq, "quantize_peak_gib": peak_gib()}


def export_comfyui(model: nn.Module, out_dir: Path) -> dict[str, Any]:
    """Time of the ComfyUI export of ``model`` (the file is deleted afterwards)."""
    from ptq.targets import export_model

    cfg = SimpleNamespace(targets=["comfyui"], verify=False, filename="wan5b_nvfp4", unquantized_dtype="bfloat16")
    t0 = time.perf_counter()
    res = export_model(model, cfg, out_dir, progress=False)
    dt = time.perf_counter() - t0
    size = res[0].bytes
    for r in res:
        if r.path and os.path.exists(r.path):
            os.unlink(r.path)
    return {"export_s": dt, "file_bytes": size, "write_gb_per_s": size / dt / 1e9}


def _export_gpu(qm: nn.Module, quantize_s: float, export_dir: Path) -> None:
    ex = export_comfyui(qm, export_dir)
    ex["quantize_plus_export_s"] = quantize_s + ex["export_s"]
    RESULTS["quant_export_gpu"] = ex
    save()
    log(f"quant+export GPU: quantize {quantize_s:.2f}s + export {ex['export_s']:.2f}s "
        f"({ex['file_bytes'] / 1e9:.2f} GB, {ex['write_gb_per_s']:.2f} GB/s)")


def _accuracy(model: nn.Module, qm: nn.Module, fmt: str, entry: dict[str, Any]) -> None:
    """Accuracy sanity at the smallest token count: fast path (each FP8 GEMM) vs reference path vs bf16, and the
    per-layer diagnostics."""
    inp = make_inputs(min(RUN.latents), RUN.device, 100)
    with torch.no_grad():
        y_bf16 = model(**inp)[0]
        with kernel_options(fast_path=True, fp8_gemm="scaled_mm"):
            y_fast = qm(**inp)[0]
        with kernel_options(fast_path=True, fp8_gemm="bf16"):
            y_fast_bf16 = qm(**inp)[0]
        with kernel_options(fast_path=False, fp8_gemm="bf16"):
            y_ref = qm(**inp)[0]
    entry["rel_l2_fast_vs_bf16"] = rel_l2(y_fast, y_bf16)
    entry["rel_l2_ref_vs_bf16"] = rel_l2(y_ref, y_bf16)
    entry["rel_l2_fast_vs_ref"] = rel_l2(y_fast, y_ref)
    entry["rel_l2_fast_bf16gemm_vs_ref"] = rel_l2(y_fast_bf16, y_ref)
    entry["scaled_mm_fallbacks"] = sum(isinstance(m, QuantLinear) and m.native_gemm_failed for m in qm.modules())
    try:
        entry["layers"] = layer_diagnostics(qm, inp)
        log(f"simfwd {fmt} per-layer fast vs reference: {entry['layers']}")
    except Exception as exc:  # noqa: BLE001
        entry["layers_error"] = repr(exc)[:500]


def layer_diagnostics(qm: nn.Module, inp: dict[str, Any]) -> dict[str, Any]:
    """On real 5B inputs of a few layers: Triton activation quantization vs the torch reference (bits), and the
    layer's fast-path output vs its reference-path output (fraction of bf16 outputs that differ, max diff)."""
    from ptq.formats import fp8 as fp8_fmt
    from ptq.formats import nvfp4 as nvfp4_fmt
    from ptq.formats import triton_quant

    mods = dict(qm.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = [mods[n].register_forward_pre_hook(
        lambda m, a, n=n: captured.setdefault(n, a[0].detach().clone())) for n in DIAGNOSED if n in mods]
    with torch.no_grad(), kernel_options(fast_path=False, fp8_gemm="bf16"):
        qm(**inp)
    for h in handles:
        h.remove()
    out: dict[str, Any] = {}
    for n, x in captured.items():
        m = mods[n]
        x2 = x.reshape(-1, x.shape[-1])
        if m.format == "nvfp4":
            a = triton_quant.nvfp4_activation_values(x2, m.input_scale).view(torch.int16)
            b = nvfp4_fmt.quantize_nvfp4_activation(x2, m.input_scale).to(torch.bfloat16).view(torch.int16)
        else:
            a = triton_quant.fp8_activation_codes(x2, m.input_scale).view(torch.uint8)
            b = fp8_fmt.quantize_fp8(x2, m.input_scale, validate=False).view(torch.uint8)
        with torch.no_grad():
            with kernel_options(fast_path=True, fp8_gemm="bf16"):
                yf = m(x)
            with kernel_options(fast_path=False, fp8_gemm="bf16"):
                yr = m(x)
        out[n] = {"act_bit_exact": bool(torch.equal(a, b)), "out_frac_differ": float((yf != yr).float().mean()),
                  "out_max_diff_rel": float((yf.float() - yr.float()).abs().max() / yr.float().abs().max())}
    return out


def _simfwd_at(model: nn.Module, qm: nn.Module, fmt: str, tokens: int, n: int, graphs: bool,
               entry: dict[str, Any]) -> dict[str, Any]:
    """bf16 vs the fast simulated forwards at ``tokens`` (ratios to bf16; replays to the bf16 replay), and the
    reference path at the smallest token count; ``graphs``: add CUDA-graph replays (not under ``--smoke``)."""
    rr = InputRounds(tokens, 3)

    def fwd(m: nn.Module, fast: bool, gemm: str = "scaled_mm") -> float:
        inp = rr.current()
        with kernel_options(fast_path=fast, fp8_gemm=gemm):
            return timed(lambda: loop_one(m, inp))

    variants: dict[str, Callable[[], float]] = {"bf16": partial(fwd, model, False)}
    fast = {"sim_fast": "bf16"} if fmt == "nvfp4" else {"sim_fast_scaled_mm": "scaled_mm",
                                                         "sim_fast_bf16_gemm": "bf16"}
    for k, gemm in fast.items():
        variants[k] = partial(fwd, qm, True, gemm)
    if not RUN.smoke and graphs:  # CUDA-graph replays: the GPU-side cost alone
        variants.update(_graphed_variants(model, qm, fast, rr, entry))
    reset_peak()
    t = rounds(variants, reps=n, warmup=2, state=rr.state)
    gbase = median(t["bf16_graph"]) if "bf16_graph" in t else float("nan")
    row = {k: {"median_s": median(v), "all_s": v,
               "ratio_vs_bf16": median(v) / (gbase if k.endswith("_graph") else median(t["bf16"]))}
           for k, v in t.items()}
    row["peak_gib"] = peak_gib()
    if tokens == min(RUN.latents):  # the reference (pre-fast-path) simulation, for scale
        ref_t = [fwd(qm, False) for _ in range(3)]
        row["sim_reference"] = {"median_s": median(ref_t), "all_s": ref_t,
                                "ratio_vs_bf16": median(ref_t) / median(t["bf16"])}
    log(f"simfwd {fmt} @{tokens}: " + ", ".join(
        f"{k} {v['median_s'] * 1e3:.1f} ms (x{v['ratio_vs_bf16']:.2f})" for k, v in row.items()
        if isinstance(v, dict)))
    rr.inputs.clear()
    return row


def _graphed_variants(model: nn.Module, qm: nn.Module, fast: dict[str, str], rr: InputRounds,
                      entry: dict[str, Any]) -> dict[str, Callable[[], float]]:
    """Replays of the bf16 forward and of each fast variant (none when a capture fails: reported in ``entry``)."""
    try:
        graphs = {"bf16_graph": Graphed(model, rr.inputs[0])}
        for k, gemm in fast.items():
            with kernel_options(fast_path=True, fp8_gemm=gemm):
                graphs[f"{k}_graph"] = Graphed(qm, rr.inputs[0])
    except Exception as exc:  # noqa: BLE001
        entry["graph_error"] = repr(exc)[:500]
        log(f"simfwd graphs failed: {exc!r}"[:300])
        return {}
    return {k: g.timed_replay(rr) for k, g in graphs.items()}
