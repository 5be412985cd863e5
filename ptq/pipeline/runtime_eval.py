"""The evaluation per ComfyUI runtime (``eval.runtimes``, :mod:`ptq.eval.runtimes`): the unquantized model in each
runtime's compute dtype (cached like the bf16 baseline) and the quantized model as each runtime computes it, both
against the bf16 baseline. Runtimes whose simulated numerics are identical share one evaluation."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from ptq.eval.report import compare_runs
from ptq.eval.runtimes import (
    ActivationRange,
    Runtime,
    dtype_name,
    get_runtime,
    how_layers_run,
    numerics_key,
    simulate,
)
from ptq.models.base import ModelAdapter
from ptq.pipeline import stages
from ptq.pipeline.sampling import PromptSet, sample_prompts

log = logging.getLogger("ptq")


def runtime_list(names: list[str]) -> list[Runtime]:
    """The runtimes named in ``eval.runtimes`` (ValueError for an unknown or repeated name)."""
    if len(set(names)) != len(names):
        raise ValueError(f"eval.runtimes={list(names)}: a runtime is listed twice")
    return [get_runtime(n) for n in names]


@contextlib.contextmanager
def _simulated(adapter: ModelAdapter, rt: Runtime, monitor: bool):
    """Every target of ``adapter`` simulated on ``rt``; yields an ActivationRange per target when ``monitor``."""
    with contextlib.ExitStack() as stack:
        ranges = {}
        for name, target in adapter.targets().items():
            stack.enter_context(simulate(target.module, rt))
            if monitor:
                ranges[name] = stack.enter_context(ActivationRange(target.module))
        yield ranges


def unquantized_references(adapter: ModelAdapter, ps: PromptSet, runtimes: list[Runtime], *, model_dtype: str,
                           payload: dict[str, Any], cache_dir: str | Path, progress: bool, cuda_graphs: bool
                           ) -> dict[str, list[dict[str, Any]]]:
    """Compute dtype -> outputs of the (still unquantized) model run in that dtype, for every compute dtype of
    ``runtimes`` other than ``model_dtype`` (whose reference is the baseline itself); cached on disk."""
    out: dict[str, list[dict[str, Any]]] = {}
    for rt in runtimes:
        name = dtype_name(rt.compute_dtype)
        if name == model_dtype or name in out:
            continue
        cache = stages.baseline_cache_file(cache_dir, {**payload, "compute_dtype": name}, prefix=f"reference_{name}")
        with _simulated(adapter, rt, monitor=False):
            out[name], _ = stages.bf16_baseline(adapter, ps, cache, progress=progress, cuda_graphs=cuda_graphs,
                                                desc=f"unquantized ({name})")
    return out


def evaluate_runtimes(adapter: ModelAdapter, ps: PromptSet, runtimes: list[Runtime],
                      baseline: list[dict[str, Any]], references: dict[str, list[dict[str, Any]]], *,
                      model_dtype: str, progress: bool) -> dict[str, Any]:
    """Runtime name -> its report entry (GPUs, compute dtype, how each format's layers run, final-latent metrics
    and per-step errors vs ``baseline``, the unquantized reference's metrics, the float16 activation range)."""
    module = next(iter(adapter.targets().values())).module
    done: dict[tuple, tuple[str, dict[str, Any]]] = {}
    report: dict[str, Any] = {}
    for rt in runtimes:
        key = tuple(numerics_key(rt, t.module) for t in adapter.targets().values())
        entry: dict[str, Any] = {"gpus": rt.gpus, "capability": rt.capability,
                                 "compute_dtype": dtype_name(rt.compute_dtype), "fp8_activation": rt.fp8_act_mode,
                                 "layers": how_layers_run(rt, module), "same_as": None}
        if key in done:
            entry["same_as"], measured = done[key]
        else:
            monitor = dtype_name(rt.compute_dtype) == "float16"
            # eager forwards: the range monitor's hooks are not captured in CUDA graphs
            with _simulated(adapter, rt, monitor) as ranges:
                results = sample_prompts(adapter, ps, desc=f"eval ({rt.name})", progress=progress, keep_steps=True,
                                         cuda_graphs=False)
            cmp = compare_runs(baseline, results)
            measured = {"mean_final": cmp["mean_final"], "mean_steps_rel_l2": cmp["mean_steps_rel_l2"],
                        "prompts_final_rel_l2": [p["final"]["rel_l2"] for p in cmp["prompts"]],
                        "activation_range": _merge_ranges(ranges)}
            done[key] = (rt.name, measured)
        entry.update(measured)
        ref = references.get(entry["compute_dtype"]) if entry["compute_dtype"] != model_dtype else baseline
        entry["unquantized"] = None if ref is None else {"mean_final": compare_runs(baseline, ref)["mean_final"]}
        report[rt.name] = entry
        log.info("runtime %s: final rel. L2 %.4f%s", rt.name, entry["mean_final"]["rel_l2"],
                 f" (= {entry['same_as']})" if entry["same_as"] else "")
    return report


def _merge_ranges(ranges: dict[str, ActivationRange]) -> dict[str, Any] | None:
    """One activation-range summary over all targets (the worst one), None when nothing was monitored."""
    if not ranges:
        return None
    summaries = [r.summary() for r in ranges.values()]
    return max(summaries, key=lambda s: (s["overflow"], s["max_abs"] or 0.0))
