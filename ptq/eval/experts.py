"""The report's sections for a model with several experts (WAN 2.2 A14B): per expert, what was quantized and the
latent error over the steps it serves (and where its stage ends); the combined end-to-end error is the report's
final-latent accuracy."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ptq.algorithms.recipe import KEEP
from ptq.eval.metrics import latent_metrics


def expert_records(records: dict[str, list[Any]]) -> list[Any]:
    """Every expert's layer records, named ``<expert>/<layer>``, in schedule order."""
    return [dataclasses.replace(r, name=f"{name}/{r.name}") for name, recs in records.items() for r in recs]


def _bits_per_weight(records: list[Any]) -> float:
    total = sum(r.in_features * r.out_features for r in records)
    return sum(r.bits_per_weight * r.in_features * r.out_features for r in records) / total if total else 0.0


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def expert_sections(run_info: dict[str, Any], records: dict[str, list[Any]], analyses: dict[str, Any],
                    baseline: list[dict[str, Any]] | None, quantized: list[dict[str, Any]] | None
                    ) -> dict[str, dict[str, Any]]:
    """Per expert: its timesteps and evaluation steps, quantized layers, bits per weight, mean weight error, the
    mean latent rel. L2 over its steps and at its last step (vs bf16, over the evaluation prompts), and its
    sensitivity analysis when one was run."""
    info = run_info.get("experts") or {}
    steps = info.get("eval_steps") or {}
    out = {}
    for name, recs in records.items():
        q = [r for r in recs if r.format != KEEP]
        errs = [r.weight_rel_error for r in q if r.weight_rel_error is not None]
        sec: dict[str, Any] = {"timesteps": (info.get("timesteps") or {}).get(name), "eval_steps": steps.get(name),
                               "quantized_layers": len(q), "linear_layers": len(recs),
                               "bits_per_weight": _bits_per_weight(recs), "mean_weight_rel_error": _mean(errs)}
        own = steps.get(name) or []
        if baseline is not None and quantized is not None and own:
            per_step = [[latent_metrics(b["steps"][i], qq["steps"][i])["rel_l2"] for i in own]
                        for b, qq in zip(baseline, quantized)]
            sec["mean_rel_l2_over_its_steps"] = _mean([v for p in per_step for v in p])
            sec["rel_l2_at_its_last_step"] = _mean([p[-1] for p in per_step])
        if name in analyses:
            sec["sensitivity"] = analyses[name]
        out[name] = sec
    return out


def experts_markdown(report: dict[str, Any], sensitivity_markdown: Callable[..., list[str]]) -> list[str]:
    """Markdown lines: the calibration trajectory used, then one section per expert (its sensitivity analysis
    rendered by ``sensitivity_markdown(analysis, layers)``)."""
    experts = report.get("experts") or {}
    info = report["run"].get("experts") or {}
    if not experts:
        return []

    def f(v: float | None, spec: str = ".4f") -> str:
        return "" if v is None else format(v, spec)

    lines = ["", "## Experts", "", f"Calibration: {info.get('calibration', '')}. The end-to-end error of both "
             "experts together is the final-latent table above.", ""]
    for name, sec in experts.items():
        lo_hi = sec.get("timesteps")
        span = "every step" if not lo_hi else f"timesteps [{lo_hi[0]:.0f}, {lo_hi[1]:.0f})"
        lines += [f"### {name}", "", f"- serves {span}; evaluation steps {sec.get('eval_steps')}",
                  f"- quantized Linears: {sec['quantized_layers']} / {sec['linear_layers']}, "
                  f"{sec['bits_per_weight']:.2f} bits per Linear weight, mean weight rel. error "
                  f"{f(sec['mean_weight_rel_error'])}"]
        if "mean_rel_l2_over_its_steps" in sec:
            lines.append(f"- latent rel. L2 vs bf16: mean over its steps {f(sec['mean_rel_l2_over_its_steps'])}, "
                         f"at its last step {f(sec['rel_l2_at_its_last_step'])}")
        if sec.get("sensitivity"):
            lines += sensitivity_markdown(sec["sensitivity"], [r for r in report["layers"]
                                                               if r["name"].startswith(f"{name}/")])
        lines.append("")
    return lines
