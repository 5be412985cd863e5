"""Parts ``modelopt`` and ``ptqmem``: ``mtq.quantize(model, NVFP4_DEFAULT_CFG, forward_loop)`` (TensorRT Model
Optimizer) vs ptq (observer + ``quantize_``) on the same forward loop, each on a freshly built 5B: time, peak and
held GPU memory, the quantized forward. ``ptqmem`` is the ptq half alone (no Model Optimizer needed)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from bench_wan5b.common import (
    RESULTS,
    RUN,
    allocated_gib,
    block_targets,
    build_5b,
    free,
    log,
    loop_one,
    make_inputs,
    median,
    peak_gib,
    reset_peak,
    save,
    timed,
)
from ptq.algorithms.qlinear import QuantLinear, kernel_options
from ptq.algorithms.quantize import quantize_
from ptq.algorithms.recipe import QuantRecipe
from ptq.calibration.observers import LinearInputObserver

#: layers Model Optimizer leaves in bf16: those ptq's default recipe keeps
MTQ_EXCLUDE = ("*patch_embedding*", "*condition_embedder*", "*proj_out*")


def modelopt_cfg() -> dict[str, Any]:
    """NVFP4_DEFAULT_CFG with the same layers kept in bf16 as ptq's default recipe."""
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    qc = cfg["quant_cfg"]
    # disabled, with an 8-bit attribute config: a disabled quantizer that still carries the NVFP4 config makes
    # modelopt's QuantConv3d take its NVFP4 implicit-GEMM CUDA kernel (and compile it) for patch_embedding
    off = {"num_bits": 8, "axis": None}
    if isinstance(qc, list):
        qc.extend({"quantizer_name": p, "cfg": off, "enable": False} for p in MTQ_EXCLUDE)
    else:  # older dict format
        qc.update({p: {**off, "enable": False} for p in MTQ_EXCLUDE})
    return cfg


def count_modelopt_quantized(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        wq = getattr(m, "weight_quantizer", None)
        if wq is not None and getattr(wq, "is_enabled", False):
            n += 1
    return n


def calibration_inputs(n_forwards: int) -> list[dict[str, Any]]:
    """The forward loop both tools calibrate on: ``n_forwards`` inputs at the smallest token count."""
    return [make_inputs(min(RUN.latents), RUN.device, 200 + s) for s in range(n_forwards)]


def ptq_5b(inputs: list[dict[str, Any]], reps: int) -> dict[str, Any]:
    """ptq on a freshly built 5B: calibrate over ``inputs``, ``quantize_``; time, peak and held GPU memory."""
    free()
    model = build_5b()
    recipe = QuantRecipe(format="nvfp4")
    names = block_targets(model, recipe)
    reset_peak()
    base = allocated_gib()
    obs = LinearInputObserver(model, names, num_steps=len(inputs), amax_backend="auto")

    def calib() -> None:
        with obs:
            for i, inp in enumerate(inputs):
                obs.step = i
                with torch.no_grad():
                    model(**inp)

    t_cal = timed(calib)
    peak_cal = peak_gib()
    t_q = timed(lambda: quantize_(model, recipe, obs.stats(), progress=False))
    out = {"calibrate_s": t_cal, "quantize_s": t_q, "total_s": t_cal + t_q, "peak_gib": peak_gib(),
           "calibrate_peak_gib": peak_cal, "model_gib": base, "after_quantize_gib": allocated_gib(),
           "quantized_linears": sum(isinstance(m, QuantLinear) for m in model.modules())}
    with kernel_options(fast_path=True):
        t_f = [timed(lambda: loop_one(model, inputs[0])) for _ in range(reps + 1)][1:]
    out["fake_quant_forward_s"] = median(t_f)
    log(f"ptq 5B: calibrate {t_cal:.2f}s + quantize {t_q:.2f}s, peak {out['peak_gib']:.2f} GiB "
        f"(model {base:.2f}), held after quantize_ {out['after_quantize_gib']:.2f} GiB (observer still alive); "
        f"sim forward {median(t_f) * 1e3:.1f} ms")
    model = obs = None  # free before the next build
    return out


def part_ptq_memory(n_forwards: int, reps: int) -> None:
    """The ptq half of the Model Optimizer comparison alone (no modelopt needed): time and GPU memory."""
    inputs = calibration_inputs(n_forwards)
    RESULTS["ptq_memory_5b"] = {"forward_loop": f"{n_forwards} forwards at 1,440 tokens", **ptq_5b(inputs, reps)}
    save()


def part_modelopt_5b(n_forwards: int, reps: int) -> None:
    """ptq, then Model Optimizer, each on a freshly built 5B over the same forward loop."""
    import modelopt.torch.quantization as mtq

    res: dict[str, Any] = {"forward_loop": f"{n_forwards} forwards at 1,440 tokens"}
    inputs = calibration_inputs(n_forwards)

    def loop(m: nn.Module) -> None:
        with torch.no_grad():
            for inp in inputs:
                m(**inp)

    res["ptq"] = ptq_5b(inputs, reps)
    free()
    model = build_5b()
    reset_peak()
    base = allocated_gib()
    cfg = modelopt_cfg()
    t_mo = timed(lambda: mtq.quantize(model, cfg, forward_loop=loop))
    res["modelopt"] = {"quantize_s": t_mo, "peak_gib": peak_gib(), "model_gib": base,
                       "after_quantize_gib": allocated_gib(),
                       "quantized_linears": count_modelopt_quantized(model)}
    t_f = [timed(lambda: loop_one(model, inputs[0])) for _ in range(reps + 1)][1:]
    res["modelopt"]["fake_quant_forward_s"] = median(t_f)
    log(f"modelopt 5B: quantize {t_mo:.2f}s, peak {res['modelopt']['peak_gib']:.2f} GiB (model {base:.2f}), "
        f"{res['modelopt']['quantized_linears']} quantized; fake-quant forward {median(t_f) * 1e3:.1f} ms")
    model = None
    free()
    RESULTS["modelopt_5b"] = res
    save()
