"""The per-GPU evaluation: the quantized model as stock ComfyUI computes it on one runtime (the facts of each runtime:
:mod:`ptq.targets.comfyui.runtime`), which runtimes compute the same, and whether float16 overflows.

The simulation runs ptq's diffusers model, not ComfyUI's graph: the Linear numerics are exact, the rest of the
model runs in the compute dtype with diffusers' own float32 upcasts (norms, modulation), where ComfyUI's WAN computes
in the compute dtype throughout. :class:`ActivationRange` records whether float16 overflows anywhere.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ptq.algorithms.qlinear import QuantLinear
from ptq.formats import get_format
from ptq.targets.comfyui.runtime import EAGER_SUFFIX, RUNTIMES, Runtime, get_runtime

FP16_MAX = 65504.0


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def layer_formats(model: nn.Module) -> dict[str, tuple[str, bool]]:
    """Name -> (format, weight-only) of every QuantLinear of ``model``."""
    return {n: (m.format, m.weight_only) for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def numerics_key(rt: Runtime, model: nn.Module) -> tuple:
    """What decides the simulated numerics of ``model`` on ``rt``: runtimes with equal keys compute the same."""
    formats = sorted(set(layer_formats(model).values()))
    runs = tuple((f, wo or not rt.native(f)) for f, wo in formats)
    dequantized = any(d for _, d in runs)
    backend_native = any(get_format(f).backend_arithmetic and not d for f, d in runs)
    variants = tuple(get_format(f).runtime_variant(rt.capability) for f, d in runs if not d)
    return (rt.compute_dtype, runs, rt.fp8_act_mode if backend_native else None,
            rt.dequant_float32 if dequantized else None, variants)


def how_layers_run(rt: Runtime, model: nn.Module) -> dict[str, str]:
    """Per format of ``model`` (``"<fmt> weight-only"`` for weight-only layers): "native" or "dequantized" on
    ``rt``."""
    out: dict[str, str] = {}
    for fmt, weight_only in sorted(set(layer_formats(model).values())):
        key = f"{fmt} weight-only" if weight_only else fmt
        out[key] = "dequantized" if weight_only or not rt.native(fmt) else "native"
    return out


@contextlib.contextmanager
def simulate(model: nn.Module, rt: Runtime) -> Iterator[nn.Module]:
    """``model`` as ComfyUI computes it on ``rt`` (see the module docstring), restored on exit: every floating
    parameter cast to the compute dtype, every QuantLinear set to run natively or dequantized with the runtime's
    arithmetic. Quantization buffers (codes, scales) are untouched."""
    saved: list[tuple[nn.Parameter, torch.Tensor]] = []
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    try:
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != rt.compute_dtype and p.element_size() >= 2:
                saved.append((p, p.data))
                p.data = p.data.to(rt.compute_dtype)
        for m in layers:
            m.run_dequantized = not m.weight_only and not rt.native(m.format)
            m.fp8_act_mode = rt.fp8_act_mode
            m.dequant_float32 = rt.dequant_float32
            m.kernel_variant = m.fmt.runtime_variant(rt.capability)
            m.refresh_cache()
        yield model
    finally:
        for p, data in saved:
            p.data = data
        for m in layers:
            for attr in ("run_dequantized", "fp8_act_mode", "dequant_float32", "kernel_variant"):
                m.__dict__.pop(attr, None)
            m.refresh_cache()


class ActivationRange:
    """Forward hooks on every module of ``model`` recording the largest |output| (inf once it overflowed) and the
    number of calls with non-finite outputs; device-side accumulators, no host sync per call."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._amax: dict[str, torch.Tensor] = {}
        self._bad: dict[str, torch.Tensor] = {}
        self._order: list[str] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, name: str):
        def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
            t = out[0] if isinstance(out, (tuple, list)) and out else out
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
                return
            a = t.detach().abs().amax().float()
            if name not in self._amax:
                self._order.append(name)
                self._amax[name] = torch.zeros((), dtype=torch.float32, device=t.device)
                self._bad[name] = torch.zeros((), dtype=torch.int64, device=t.device)
            a = torch.nan_to_num(a, nan=math.inf, posinf=math.inf)
            torch.maximum(self._amax[name], a, out=self._amax[name])
            self._bad[name] += (~torch.isfinite(a)).long()

        return hook

    def __enter__(self) -> ActivationRange:
        for name, module in self.model.named_modules():
            if name:
                self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def summary(self) -> dict[str, Any]:
        """max_abs (largest finite |output|), max_module, headroom (FP16_MAX / max_abs), nonfinite_calls and
        first_nonfinite (the first module in call order whose output overflowed, None if none)."""
        amax = {n: float(self._amax[n]) for n in self._order}
        bad = {n: int(self._bad[n]) for n in self._order}
        finite = {n: v for n, v in amax.items() if math.isfinite(v)}
        top = max(finite, key=finite.get) if finite else None
        first_bad = next((n for n in self._order if bad[n]), None)
        max_abs = finite[top] if top else None
        return {"max_abs": max_abs, "max_module": top, "headroom": FP16_MAX / max_abs if max_abs else None,
                "nonfinite_calls": sum(bad.values()), "first_nonfinite": first_bad,
                "overflow": first_bad is not None or (max_abs is not None and max_abs > FP16_MAX)}


def _num(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def runtime_markdown(runtimes: dict[str, Any]) -> list[str]:
    """Markdown lines of the report section "ComfyUI per target GPU"."""
    lines = ["", "## ComfyUI per target GPU", "",
             "What stock ComfyUI computes with this file on each GPU (`eval.runtimes`; `ptq.eval.runtimes`): native "
             "kernels or dequantized weights, ComfyUI's compute dtype, comfy-kitchen's rounding. Errors vs the bf16 "
             "model on its own trajectory (mean over prompts); \"unquantized\" is the unquantized model in the same "
             "compute dtype (the floor of that runtime).", "",
             "| runtime | GPUs | compute | layers run | final rel. L2 | cosine | PSNR dB | unquantized rel. L2 | "
             "max \\|activation\\| (fp16 headroom) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in runtimes.items():
        m = r.get("mean_final") or {}
        u = (r.get("unquantized") or {}).get("mean_final") or {}
        rng = r.get("activation_range") or {}
        if rng.get("overflow"):
            range_s = f"**overflow** (first at `{rng.get('first_nonfinite')}`)"
        elif rng.get("max_abs") is not None:
            range_s = f"{rng['max_abs']:.4g} at `{rng['max_module']}` ({rng['headroom']:.0f}x)"
        else:
            range_s = "-"
        runs = ", ".join(f"{f}: {how}" for f, how in r["layers"].items())
        same = f" (= {r['same_as']})" if r.get("same_as") else ""
        lines.append(f"| {name}{same} | {r['gpus']} | {r['compute_dtype']} | {runs} | {_num(m.get('rel_l2'), '.4f')} "
                     f"| {_num(m.get('cosine'), '.5f')} | {_num(m.get('psnr'), '.2f')} | "
                     f"{_num(u.get('rel_l2'), '.4f')} | {range_s} |")
    return lines


__all__ = ["EAGER_SUFFIX", "FP16_MAX", "RUNTIMES", "ActivationRange", "Runtime",
           "dtype_name", "get_runtime", "how_layers_run", "layer_formats", "numerics_key", "runtime_markdown",
           "simulate"]
