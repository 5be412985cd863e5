"""Part ``hooks``: the bf16 forward vs the same forward with calibration hooks on the block Linears (an empty hook,
naive per-Linear amax hooks, ``LinearInputObserver`` on its torch and its fused Triton path, and two experiments
around the fused amax kernel), eager and replayed from CUDA graphs; plus the host cost of one op, launch and hook."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bench_wan5b.common import (
    RESULTS,
    RUN,
    Graphed,
    InputRounds,
    block_targets,
    free,
    log,
    loop_one,
    median,
    peak_gib,
    reset_peak,
    rounds,
    save,
    timed,
)
from ptq.algorithms.recipe import QuantRecipe
from ptq.calibration.observers import LinearInputObserver, LinearInputStats


class ForwardPreHooks:
    """Attach/detach a set of forward pre-hooks (``kind``: "empty" or "naive" amax) around each timed forward."""

    def __init__(self, model: nn.Module, names: list[str], kind: str) -> None:
        mods = dict(model.named_modules())
        self.mods = [mods[n] for n in names]
        self.kind = kind
        dev = next(model.parameters()).device
        self.amax = {n: torch.zeros((), device=dev) for n in names}
        self.names = names
        self.handles: list[Any] = []

    def __enter__(self) -> ForwardPreHooks:
        for n, m in zip(self.names, self.mods):
            if self.kind == "empty":
                self.handles.append(m.register_forward_pre_hook(lambda mod, args: None))
            else:
                acc = self.amax[n]

                def hook(mod: nn.Module, args: tuple, acc: torch.Tensor = acc) -> None:
                    torch.maximum(acc, args[0].detach().abs().amax().float(), out=acc)

                self.handles.append(m.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class FusedAmax:
    """Experiments around the fused amax kernel, with their own accumulators:

    * ``side_stream``: forward pre-hooks that launch it on a side CUDA stream (may overlap the GEMMs);
    * ``override``: no hooks at all; each Linear's ``forward`` is wrapped (skips ``nn.Module``'s hook dispatch).
    """

    def __init__(self, model: nn.Module, names: list[str], mode: str) -> None:
        mods = dict(model.named_modules())
        self.mods = [(n, mods[n]) for n in names]
        self.dev = next(model.parameters()).device
        self.acc = {n: (torch.zeros(mods[n].in_features, device=self.dev), torch.zeros(8, device=self.dev))
                    for n in names}
        self.mode = mode
        self.stream = torch.cuda.Stream(self.dev) if mode == "side_stream" else None
        self.handles: list[Any] = []
        self.step = 0

    def __enter__(self) -> FusedAmax:
        from ptq.formats import triton_quant

        for n, m in self.mods:
            ch, st = self.acc[n]
            if self.mode == "override":
                orig = type(m).forward

                def forward(x: torch.Tensor, m: nn.Module = m, ch: torch.Tensor = ch, st: torch.Tensor = st,
                            orig: Callable = orig) -> torch.Tensor:
                    triton_quant.amax_update_(x, ch, st, self.step)
                    return orig(m, x)

                m.forward = forward
                continue

            def hook(mod: nn.Module, args: tuple, ch: torch.Tensor = ch, st: torch.Tensor = st) -> None:
                x = args[0]
                self.stream.wait_stream(torch.cuda.current_stream(self.dev))
                with torch.cuda.stream(self.stream):
                    triton_quant.amax_update_(x, ch, st, self.step)
                x.record_stream(self.stream)

            self.handles.append(m.register_forward_pre_hook(hook))
        return self

    def join(self) -> None:
        if self.stream is not None:
            torch.cuda.current_stream(self.dev).wait_stream(self.stream)

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for _, m in self.mods:
            m.__dict__.pop("forward", None)
        self.join()


def part_overhead() -> None:
    """Host cost of one small torch op, one fused-amax Triton launch, and one empty forward pre-hook (us)."""
    from ptq.formats import triton_quant

    n = 2000
    x = torch.randn(16, 64, device=RUN.device, dtype=torch.bfloat16)
    ch, st = torch.zeros(64, device=RUN.device), torch.zeros(8, device=RUN.device)
    lin = nn.Linear(64, 64, device=RUN.device, dtype=torch.bfloat16)
    res: dict[str, float] = {}

    def per_call(fn: Callable[[], Any]) -> float:
        for _ in range(50):
            fn()
        return timed(lambda: [fn() for _ in range(n)]) / n * 1e6

    res["torch_op_us"] = per_call(lambda: torch.maximum(ch, ch, out=ch))
    if triton_quant.triton_available(x.device):
        res["triton_amax_launch_us"] = per_call(lambda: triton_quant.amax_update_(x, ch, st, 1))
    with torch.no_grad():
        res["linear_us"] = per_call(lambda: lin(x))
        h = lin.register_forward_pre_hook(lambda mod, args: None)
        res["linear_with_empty_hook_us"] = per_call(lambda: lin(x))
        h.remove()
    RESULTS["host_overhead"] = res
    save()
    log("host overhead per call: " + ", ".join(f"{k} {v:.1f}" for k, v in res.items()))


def part_hooks(model: nn.Module, reps: dict[int, int]) -> dict[str, LinearInputStats]:
    """Every hook variant at each token count (``reps``: tokens -> timed rounds); returns the fused observer's
    statistics at the smallest token count (the calibration the simulated forwards use)."""
    names = block_targets(model, QuantRecipe(format="nvfp4"))
    log(f"hooks: {len(names)} target Linears")
    res: dict[str, Any] = {"targets": len(names)}
    stats: dict[str, LinearInputStats] = {}
    for tokens, n in reps.items():
        row, st_fused = _hooks_at(model, names, tokens, n, graphs=tokens == min(reps), res=res)
        res[str(tokens)] = row
        log(f"hooks @{tokens}: " + ", ".join(f"{k} {v['median_s'] * 1e3:.1f} ms ({v['overhead_pct']:+.1f}%)"
                                             for k, v in row.items() if isinstance(v, dict))
            + f"; identical={row['observer_paths_identical']}")
        if tokens == min(RUN.latents):
            stats = st_fused
        free()
    RESULTS["hooks"] = res
    save()
    return stats


def _hooks_at(model: nn.Module, names: list[str], tokens: int, n: int, graphs: bool,
              res: dict[str, Any]) -> tuple[dict[str, Any], dict[str, LinearInputStats]]:
    """(timings row, fused observer statistics) at ``tokens``; ``graphs``: add the CUDA-graph replays (not under
    ``--smoke``)."""
    rr = InputRounds(tokens, 4)

    def fwd() -> None:
        loop_one(model, rr.current())

    observers = {b: LinearInputObserver(model, names, num_steps=8,
                                        amax_backend="auto" if RUN.smoke and b == "triton" else b)
                 for b in ("torch", "triton")}
    variants = {
        "bf16": lambda: timed(fwd),
        "empty_hook": _timed_under(ForwardPreHooks(model, names, "empty"), fwd, rr),
        "naive_amax": _timed_under(ForwardPreHooks(model, names, "naive"), fwd, rr),
        "observer_torch": _timed_under(observers["torch"], fwd, rr),
        "observer_triton": _timed_under(observers["triton"], fwd, rr),
    }
    extra: dict[str, FusedAmax] = {}
    if not RUN.smoke:
        extra = {"triton_side_stream": FusedAmax(model, names, "side_stream"),
                 "triton_override": FusedAmax(model, names, "override")}
        for k, ctx in extra.items():
            variants[k] = _timed_under(ctx, fwd, rr)
        if graphs:  # CUDA graphs: what the GPU itself spends (hooks' Python not replayed)
            variants.update(_graphed_variants(model, names, rr, res))
    reset_peak()
    t = rounds(variants, reps=n, warmup=2, state=rr.state)
    row, st_fused = _hooks_row(t, observers, extra)
    rr.inputs.clear()
    return row, st_fused


def _timed_under(ctx: Any, fwd: Callable[[], None], rr: InputRounds) -> Callable[[], float]:
    """A :func:`rounds` variant: ``fwd`` timed with ``ctx`` attached (observers at the round's step)."""

    def run() -> float:
        with ctx:
            if isinstance(ctx, (LinearInputObserver, FusedAmax)):
                ctx.step = rr.calibration_step()
            return timed(fwd)

    return run


def _graphed_variants(model: nn.Module, names: list[str], rr: InputRounds,
                      res: dict[str, Any]) -> dict[str, Callable[[], float]]:
    """Replays of the bf16 forward and of the forward with the fused observer / side-stream amax captured in it;
    a capture that fails is reported in ``res`` and left out."""
    graph_obs = LinearInputObserver(model, names, num_steps=8, amax_backend="triton")
    out: dict[str, Callable[[], float]] = {}
    for k, ctx in (("bf16_graph", None), ("observer_triton_graph", graph_obs),
                   ("triton_side_stream_graph", FusedAmax(model, names, "side_stream"))):
        try:
            out[k] = Graphed(model, rr.inputs[0], ctx).timed_replay(rr)
        except Exception as exc:  # noqa: BLE001 - report, keep the eager numbers
            res[f"{k}_error"] = repr(exc)[:500]
            log(f"{k}: capture failed: {exc!r}"[:300])
    return out


def _hooks_row(t: dict[str, list[float]], observers: dict[str, LinearInputObserver],
               extra: dict[str, FusedAmax]) -> tuple[dict[str, Any], dict[str, LinearInputStats]]:
    """Medians and overheads (graph replays vs the bf16 replay, eager vs eager bf16), peak memory, and whether the
    observer paths and the experiments found the same channel maxima."""
    base = median(t["bf16"])
    gbase = median(t["bf16_graph"]) if "bf16_graph" in t else float("nan")
    row = {k: {"median_s": median(v), "all_s": v,
               "overhead_pct": 100 * (median(v) / (gbase if k.endswith("_graph") else base) - 1),
               "vs_eager_bf16_pct": 100 * (median(v) / base - 1)} for k, v in t.items()}
    row["peak_gib"] = peak_gib()
    # the two observer paths must agree exactly
    st_t, st_f = observers["torch"].stats(), observers["triton"].stats()
    row["observer_paths_identical"] = all(torch.equal(st_t[k].channel_amax, st_f[k].channel_amax)
                                          for k in st_t) and set(st_t) == set(st_f)
    for k, ctx in extra.items():
        row[f"{k}_identical"] = all(torch.equal(ctx.acc[n][0], st_t[n].channel_amax) for n in st_t)
    return row, st_f
