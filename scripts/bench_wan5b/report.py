"""The Markdown table printed at the end of a run (the main figures of ``RESULTS``)."""

from __future__ import annotations

from bench_wan5b.common import RESULTS, RUN


def table() -> str:
    rows = ["| measurement | value |", "|---|---|"]

    def ms(x: float) -> str:
        return f"{x * 1e3:.1f} ms"

    h = RESULTS.get("hooks", {})
    for tok in map(str, sorted(RUN.latents)):
        if tok in h:
            r = h[tok]
            rows.append(f"| bf16 forward @{tok} tokens | {ms(r['bf16']['median_s'])} |")
            for k in ("empty_hook", "naive_amax", "observer_torch", "observer_triton", "triton_side_stream",
                      "triton_override", "bf16_graph", "observer_triton_graph", "triton_side_stream_graph"):
                if k in r:
                    rows.append(f"| {k} forward @{tok} | {ms(r[k]['median_s'])} ({r[k]['overhead_pct']:+.1f}%"
                                f"{' vs bf16_graph' if k.endswith('_graph') and k != 'bf16_graph' else ''}) |")
    for fmt, e in RESULTS.get("simfwd", {}).items():
        for tok in map(str, sorted(RUN.latents)):
            if tok in e:
                for k, v in e[tok].items():
                    if isinstance(v, dict) and k != "bf16":
                        rows.append(f"| {fmt} {k} @{tok} | {ms(v['median_s'])} (x{v['ratio_vs_bf16']:.2f} bf16) |")
        rows.append(f"| {fmt} quantize_ (GPU, {e['quantized_linears']} Linears) | {e['quantize_s']:.2f} s |")
        rows.append(f"| {fmt} rel L2 @1440: fast vs ref path / ref vs bf16 | {e['rel_l2_fast_vs_ref']:.2e} / "
                    f"{e['rel_l2_ref_vs_bf16']:.3f} |")
    for key in ("quant_export_gpu", "quant_export_cpu"):
        if key in RESULTS:
            e = RESULTS[key]
            q = e.get("quantize_s", RESULTS.get("simfwd", {}).get("nvfp4", {}).get("quantize_s", float("nan")))
            rows.append(f"| NVFP4 quantize + ComfyUI export ({key[-3:]}) | {q:.1f} s + {e['export_s']:.1f} s = "
                        f"{q + e['export_s']:.1f} s ({e['file_bytes'] / 1e9:.2f} GB) |")
    m = RESULTS.get("modelopt_5b")
    if m and "ptq" in m and "modelopt" in m:
        p, o = m["ptq"], m["modelopt"]
        rows.append(f"| calibrate+quantize 5B ({m['forward_loop']}): ptq | {p['total_s']:.2f} s, peak "
                    f"{p['peak_gib']:.2f} GiB |")
        rows.append(f"| same: Model Optimizer | {o['quantize_s']:.2f} s, peak {o['peak_gib']:.2f} GiB |")
        rows.append(f"| quantized forward @1440: ptq / Model Optimizer | {ms(p['fake_quant_forward_s'])} / "
                    f"{ms(o['fake_quant_forward_s'])} |")
    t = RESULTS.get("tiny")
    if t and "modelopt" in t:
        for key in ("final_rel_l2", "final_rel_l2_median_per_prompt", "teacher_forced_pred_rel_l2"):
            rows.append(f"| tiny {key} vs bf16 ({t['model']}): ptq / Model Optimizer | "
                        f"{t['ptq'][key]:.4f} / {t['modelopt'][key]:.4f} |")
    return "\n".join(rows)
