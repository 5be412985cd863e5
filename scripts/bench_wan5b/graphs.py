"""Part ``graphs``: what ``ptq run`` does on CUDA. ``CudaGraphForward`` replays of the bf16 forward, of the forward
with ``LinearInputObserver`` hooks (batched launches; one launch per tensor; GELU tap) and of the simulated NVFP4 /
FP8 forwards, vs the eager and the graphed bf16 forward; a GPU kernel profile; checks that replays equal eager
outputs and that graphed statistics equal eager ones."""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from bench_wan5b.common import (
    RESULTS,
    RUN,
    InputRounds,
    block_targets,
    free,
    log,
    median,
    peak_gib,
    reset_peak,
    rounds,
    save,
    sync,
    timed,
)
from ptq.algorithms.qlinear import kernel_options
from ptq.algorithms.quantize import quantize_
from ptq.algorithms.recipe import QuantRecipe
from ptq.calibration.observers import LinearInputObserver, LinearInputStats


def part_graphs(model: nn.Module, reps: dict[int, int], simfwd: bool = True) -> None:
    """ptq's CUDA-graph calibration and evaluation (``CudaGraphForward``, what ``ptq run`` uses on CUDA) vs the
    eager and the graphed bf16 forward: observer (fused, shared launches, device-side step) and the simulated
    NVFP4 / FP8 forwards. Checks: graphed observer statistics == eager ones; replayed outputs == eager outputs."""
    res: dict[str, Any] = RESULTS.setdefault("graphs", {})
    names = block_targets(model, QuantRecipe(format="nvfp4"))
    for tokens, n in reps.items():
        _graphs_at(model, names, tokens, n, res, simfwd)
        free()
        save()


def profile_kernels(fns: dict[str, Callable[[], Any]], calls: int = 3) -> dict[str, Any]:
    """GPU kernel time per call of each function (torch.profiler, CUDA graph kernels included): total, and the
    12 largest kernel names (us per call)."""
    from torch.profiler import ProfilerActivity, profile

    out: dict[str, Any] = {}
    for name, fn in fns.items():
        fn()
        sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            sync()
        per: dict[str, float] = {}
        for ev in prof.key_averages():
            t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
            if t:
                per[ev.key] = per.get(ev.key, 0.0) + t / calls
        top = sorted(per.items(), key=lambda kv: -kv[1])[:12]
        out[name] = {"total_us": sum(per.values()), "kernels": len(per),
                     "top_us": {k[:90]: round(v, 1) for k, v in top},
                     "amax_us": round(sum(v for k, v in per.items() if "amax" in k), 1)}
        log(f"profile {name}: total {out[name]['total_us'] / 1e3:.2f} ms GPU, amax kernels {out[name]['amax_us']} us")
    return out


# ----------------------------------------------------------------------------------------- calibration hooks

#: the graphed observers by variant name: their options besides ``num_steps=8``
OBSERVERS = {"observer_graph": {},  # batched launches (defaults)
             "observer_graph_gelu_tap": {"fuse_producers": True},
             "observer_graph_unbatched": {"amax_batch": 1, "fuse_producers": False}}


def _graphs_at(model: nn.Module, names: list[str], tokens: int, n: int, res: dict[str, Any],
               simfwd: bool = True) -> None:
    """The observer variants at ``tokens`` (``res["hooks_<tokens>"]``), then the simulated forwards."""
    from ptq.calibration.cuda_graph import CudaGraphForward

    rr = InputRounds(tokens, 4)
    bf16_graph = CudaGraphForward(model)
    obs_eager = LinearInputObserver(model, names, num_steps=8)
    observers = {k: LinearInputObserver(model, names, num_steps=8, **kw) for k, kw in OBSERVERS.items()}
    runners = {k: CudaGraphForward(model) for k in OBSERVERS}
    gelu_taps = 0
    for k, obs in observers.items():
        with obs:  # captured with the hooks; the graph keeps their kernels after detach
            obs.step = 0
            runners[k](**rr.inputs[0])
            runners[k](**rr.inputs[0])
            if k == "observer_graph_gelu_tap":
                gelu_taps = _patched_gelus(model)
    bf16_graph(**rr.inputs[0])
    y_eager = model(**rr.inputs[1])[0]
    y_graph = bf16_graph(**rr.inputs[1])[0]
    row: dict[str, Any] = {"bf16_graph_equals_eager": bool(torch.equal(y_eager, y_graph))}
    del y_eager, y_graph

    def observed_eager() -> float:
        with obs_eager:
            obs_eager.step = rr.calibration_step()
            return timed(lambda: model(**rr.current()))

    variants = {"bf16": lambda: timed(lambda: model(**rr.current())),
                "bf16_graph": lambda: timed(lambda: bf16_graph(**rr.current())),
                "observer": observed_eager,
                **{k: _observed_replay(observers[k], runners[k], rr) for k in OBSERVERS}}
    reset_peak()
    t = rounds(variants, reps=n, warmup=2, state=rr.state)
    graph_stats = _hooks_row(row, t, obs_eager, observers)
    row["gelu_taps"] = gelu_taps
    row["observer_graph_replays"] = runners["observer_graph"].replays
    if tokens == min(RUN.latents) and not RUN.smoke:
        row["kernel_profile"] = profile_kernels({"bf16_graph": lambda: bf16_graph(**rr.current()),
                                                 **{k: partial(_call, runners[k], rr) for k in OBSERVERS}})
    runners["observer_graph_unbatched"].release()
    runners["observer_graph_gelu_tap"].release()
    res[f"hooks_{tokens}"] = row
    _log_hooks(row, tokens)
    runners["observer_graph"].release()
    save()
    for fmt, gemms in (("nvfp4", ("bf16",)), ("fp8", ("bf16", "scaled_mm"))) if simfwd else ():
        res[f"simfwd_{fmt}_{tokens}"] = _graphs_simfwd(model, graph_stats, fmt, gemms, rr, bf16_graph, n, tokens)
        free()
        save()
    bf16_graph.release()


def _patched_gelus(model: nn.Module) -> int:
    """GELU modules whose ``gelu`` an attached observer replaced (``fuse_producers``: the GELU taps)."""
    return sum("gelu" in vars(m) for m in model.modules())


def _call(runner: Any, rr: InputRounds) -> Any:
    return runner(**rr.current())


def _observed_replay(obs: LinearInputObserver, runner: Any, rr: InputRounds) -> Callable[[], float]:
    """A :func:`rounds` variant: the graphed observed forward at the round's step, timed."""

    def run() -> float:
        obs.step = rr.calibration_step()
        return timed(lambda: runner(**rr.current()))

    return run


def _hooks_row(row: dict[str, Any], t: dict[str, list[float]], obs_eager: LinearInputObserver,
               observers: dict[str, LinearInputObserver]) -> dict[str, LinearInputStats]:
    """Medians vs the eager and the graphed bf16 forward, peak memory, and whether every graphed observer found
    the eager one's statistics; returns those of ``observer_graph`` (the simulated forwards' calibration)."""
    base, gbase = median(t["bf16"]), median(t["bf16_graph"])
    for k, v in t.items():
        row[k] = {"median_s": median(v), "all_s": v, "vs_bf16_eager_pct": 100 * (median(v) / base - 1),
                  "vs_bf16_graph_pct": 100 * (median(v) / gbase - 1)}
    row["peak_gib"] = peak_gib()
    a = obs_eager.stats()
    graphed = {k: obs.stats() for k, obs in observers.items()}
    row["observer_graph_stats_identical"] = all(set(a) == set(o) and all(
        torch.equal(a[k].channel_amax, o[k].channel_amax) and torch.equal(a[k].step_amax, o[k].step_amax)
        for k in a) for o in graphed.values())
    return graphed["observer_graph"]


def _log_hooks(row: dict[str, Any], tokens: int) -> None:
    log(f"graphs hooks @{tokens}: " + ", ".join(
        f"{k} {v['median_s'] * 1e3:.1f} ms ({v['vs_bf16_graph_pct']:+.1f}% vs bf16 graph, "
        f"{v['vs_bf16_eager_pct']:+.1f}% vs eager)" for k, v in row.items() if isinstance(v, dict) and "median_s" in v)
        + f"; stats identical={row['observer_graph_stats_identical']}, "
          f"bf16 replay exact={row['bf16_graph_equals_eager']}")


# ---------------------------------------------------------------------------------------- simulated forwards


def _graphs_simfwd(model: nn.Module, stats: dict[str, LinearInputStats], fmt: str, gemms: tuple[str, ...],
                   rr: InputRounds, bf16_graph: Any, n: int, tokens: int) -> dict[str, Any]:
    """The model quantized to ``fmt`` with the graphed observer's statistics: eager and graphed forwards per GEMM
    (``QuantLinear.fp8_gemm``) vs the eager and the graphed bf16 forward; replay == eager checks."""
    from ptq.calibration.cuda_graph import CudaGraphForward

    qm = copy.deepcopy(model)
    quantize_(qm, QuantRecipe(format=fmt), stats, progress=False)
    runners = {}
    qrow: dict[str, Any] = {}
    for gemm in gemms:
        with kernel_options(fast_path=True, fp8_gemm=gemm):
            r = runners[gemm] = CudaGraphForward(qm)
            r(**rr.inputs[0])
            y_e = qm(**rr.inputs[1])[0]
            y_g = r(**rr.inputs[1])[0]
        qrow[f"{gemm}_graph_equals_eager"] = bool(torch.equal(y_e, y_g))
        del y_e, y_g

    def q_timed(fwd: Callable[..., Any], gemm: str) -> float:
        with kernel_options(fast_path=True, fp8_gemm=gemm):
            return timed(lambda: fwd(**rr.current()))

    qvariants = {"bf16": lambda: timed(lambda: model(**rr.current())),
                 "bf16_graph": lambda: timed(lambda: bf16_graph(**rr.current()))}
    for gemm in gemms:
        qvariants[f"{fmt}_{gemm}"] = partial(q_timed, qm, gemm)
        qvariants[f"{fmt}_{gemm}_graph"] = partial(q_timed, runners[gemm], gemm)
    reset_peak()
    t = rounds(qvariants, reps=n, warmup=2, state=rr.state)
    base, gbase = median(t["bf16"]), median(t["bf16_graph"])
    for k, v in t.items():
        qrow[k] = {"median_s": median(v), "all_s": v, "ratio_vs_bf16_eager": median(v) / base,
                   "ratio_vs_bf16_graph": median(v) / gbase}
    qrow["peak_gib"] = peak_gib()
    log(f"graphs simfwd {fmt} @{tokens}: " + ", ".join(
        f"{k} {qrow[k]['median_s'] * 1e3:.1f} ms (x{qrow[k]['ratio_vs_bf16_graph']:.3f} vs bf16 graph, "
        f"x{qrow[k]['ratio_vs_bf16_eager']:.3f} vs eager)" for k in qvariants)
        + "; replay exact: " + str({g: qrow[f"{g}_graph_equals_eager"] for g in gemms}))
    for r in runners.values():
        r.release()
    return qrow
