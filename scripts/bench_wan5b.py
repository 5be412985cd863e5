"""Full-size WAN 2.2 TI2V-5B (real config, seeded random bf16 weights): speed and memory of ptq vs bf16 and vs
TensorRT Model Optimizer, every ratio measured in the same run.

Parts (``--part``, comma-separated; default all that the device supports):

* ``hooks``: bf16 forward vs the same forward with calibration hooks on the 300 block Linears, at 1,440 tokens
  (latent [1,48,9,20,32]) and 27,280 tokens ([1,48,31,44,80]): an empty hook (Python dispatch only), naive
  per-Linear ``x.abs().amax()`` hooks, ``LinearInputObserver`` with the torch and the fused Triton amax path.
* ``simfwd``: the model after ``quantize_`` (NVFP4 W4A4, FP8 W8A8): the fused CUDA path (Triton activation
  quantization + one GEMM; FP8 via ``torch._scaled_mm`` and via bf16 ``addmm``), and the reference path.
* ``graphs``: what ``ptq run`` does on CUDA: ``CudaGraphForward`` replays of the bf16 forward, of the forward
  with ``LinearInputObserver`` hooks (batched launches; one launch per tensor; GELU tap) and of the simulated
  NVFP4 / FP8 forwards, vs the eager and the graphed bf16 forward; GPU kernel profile; checks that replays equal
  eager outputs and that graphed statistics equal eager ones (``--graphs-hooks-only``: skip the quantized part).
* ``amax_kernel`` / ``amax_batch``: launch-shape searches for the per-tensor / batched amax kernels (cold L2),
  the fastest is used for the rest of the run.
* ``quant_export``: ``quantize_`` of the 300 block Linears to NVFP4 + ComfyUI export (safetensors write). On CPU
  the weights are generated and quantized block by block (the whole bf16 model plus its quantized copy would
  not fit in 24 GB at once).
* ``modelopt``: ``mtq.quantize(model, NVFP4_DEFAULT_CFG, forward_loop)`` vs ptq (observer + ``quantize_``) on the
  same forward loop (8 forwards at 1,440 tokens): time and peak GPU memory, each on a freshly built 5B; and
  Model Optimizer's fake-quant forward.
* ``ptqmem``: the ptq half of ``modelopt`` alone (no Model Optimizer needed): calibrate + ``quantize_`` on a
  freshly built 5B, peak and held GPU memory, simulated forward.
* ``gptq``: GPTQ time per 5B layer shape (NVFP4 "mse" / "four_over_six" scales, FP8), extrapolated to the 300
  block Linears.
* ``gptq_batched``, ``e2e``, ``export``, ``dist``: issue 15's scale measurements (``scripts/bench_scale.py``):
  batched vs per-layer GPTQ on the 300 block Linears, the best recipes end to end on ``--wan5b-dir`` (peak GPU and
  host memory, export + verify time), both exports + verification alone, 1 vs 2 processes.
* ``tiny``: final-latent rel. L2 vs bf16 of Model Optimizer's and ptq's NVFP4 results on the tiny WAN model
  (``ptq/assets/tiny_wan`` if present, else a random tiny model: reported as such); 16 calibration prompts x 8
  steps with CFG, 4 eval prompts.

Timing: warm-up, then interleaved rounds (every variant once per round), synchronize + perf_counter around each
forward, medians. Peak memory: ``torch.cuda.max_memory_allocated`` (GiB = 2**30 bytes).

    PYTHONPATH=. python scripts/bench_wan5b.py --out /tmp/bench             # GPU, all parts
    PYTHONPATH=. python scripts/bench_wan5b.py --device cpu --part quant_export
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import random
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ptq.algorithms.layers import LayerPlanner  # noqa: E402
from ptq.algorithms.qlinear import QuantLinear  # noqa: E402
from ptq.algorithms.quantize import quantize_  # noqa: E402
from ptq.algorithms.recipe import QuantRecipe  # noqa: E402
from ptq.calibration.observers import LinearInputObserver, LinearInputStats  # noqa: E402

#: tokens -> latent (frames, height, width) with patch (1, 2, 2)
LATENTS = {1440: (9, 20, 32), 27280: (31, 44, 80)}
GIB = 2**30
#: ``--smoke``: the whole GPU flow on CPU with a 2-block model and tiny inputs (checks the script, not speed).
SMOKE = False
DEVICE = "cuda"
TEXT = (512, 4096)  # text tokens, text_dim
RESULTS: dict[str, Any] = {}
OUT: Path | None = None


# ------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def save() -> None:
    if OUT is not None:
        (OUT / "bench_wan5b.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed(fn: Callable[[], Any]) -> float:
    """Seconds of ``fn()`` with the device synchronized before and after (Python's cyclic GC paused)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0
    finally:
        if enabled:
            gc.enable()


class Graphed:
    """One forward captured in a CUDA graph (hooks attached during capture are recorded in it: their kernels
    replay, their Python does not). ``ctx``: a context manager active during warm-up and capture."""

    def __init__(self, model: nn.Module, inputs: dict[str, Any], ctx: Any = None) -> None:
        self.static = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        self.graph = torch.cuda.CUDAGraph()
        with contextlib.ExitStack() as stack:
            if ctx is not None:
                stack.enter_context(ctx)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(2):
                    model(**self.static)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(self.graph), torch.no_grad():
                self.out = model(**self.static)
                if hasattr(ctx, "join"):
                    ctx.join()  # side-stream work must rejoin the capture stream

    def replay(self, inputs: dict[str, Any] | None = None) -> None:
        if inputs is not None:
            for k, v in inputs.items():
                if isinstance(v, torch.Tensor):
                    self.static[k].copy_(v)
        self.graph.replay()


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def rounds(variants: dict[str, Callable[[], float]], reps: int, warmup: int,
           state: dict[str, int] | None = None) -> dict[str, list[float]]:
    """Each variant returns the seconds it measured; ``warmup`` untimed rounds, then ``reps`` interleaved ones.
    ``state["round"]`` is set before each round (variants pick their input from it: every variant of a round sees
    the same input)."""
    state = state if state is not None else {}
    for r in range(warmup):
        state["round"] = r
        for fn in variants.values():
            fn()
    out: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(reps):
        state["round"] = warmup + r
        gc.collect()
        for k, fn in variants.items():
            out[k].append(fn())
    return out


def make_inputs(tokens: int, device: str, seed: int) -> dict[str, Any]:
    """Random bf16 latent / text embeddings and a per-token timestep (as the TI2V pipeline passes it)."""
    f, h, w = LATENTS[tokens]
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(1, 48, f, h, w, generator=g).to(device, torch.bfloat16)
    seq = f * (h // 2) * (w // 2)
    assert seq == tokens
    t = 999.0 * ((seed % 8) + 1) / 8
    ts = torch.full((1, seq), t, dtype=torch.float32, device=device)
    enc = torch.randn(1, *TEXT, generator=g).to(device, torch.bfloat16)
    return {"hidden_states": hs, "timestep": ts, "encoder_hidden_states": enc, "return_dict": False}


def block_targets(model: nn.Module, recipe: QuantRecipe) -> list[str]:
    return LayerPlanner.for_model(model, recipe).targets(model)


def synthetic_stats(model: nn.Module, names: list[str], amax: float = 8.0) -> dict[str, LinearInputStats]:
    """Stand-in calibration statistics (the weight path's time does not depend on them)."""
    mods = dict(model.named_modules())
    out = {}
    for n in names:
        k = mods[n].in_features
        dev = mods[n].weight.device
        out[n] = LinearInputStats(torch.tensor(amax, device=dev), torch.full((k,), amax, device=dev), calls=1)
    return out


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / GIB if DEVICE == "cuda" else float("nan")


def allocated_gib() -> float:
    return torch.cuda.memory_allocated() / GIB if DEVICE == "cuda" else float("nan")


def reset_peak() -> None:
    sync()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def build_5b() -> nn.Module:
    from ptq.models.wan import WAN22_TI2V_5B_TRANSFORMER_CONFIG, build_random_transformer

    device = DEVICE
    config = dict(WAN22_TI2V_5B_TRANSFORMER_CONFIG)
    if SMOKE:
        config.update(num_layers=2, num_attention_heads=2, attention_head_dim=64, ffn_dim=512, text_dim=TEXT[1])
    t0 = time.perf_counter()
    model = build_random_transformer(config, seed=0, device=device)
    sync()
    log(f"built random 5B on {device} in {time.perf_counter() - t0:.1f}s")
    return model


# ------------------------------------------------------------------------------------------------------------
# hooks
# ------------------------------------------------------------------------------------------------------------


class _Hooks:
    """Attach/detach a set of forward pre-hooks (empty or naive amax) around each timed forward."""

    def __init__(self, model: nn.Module, names: list[str], kind: str) -> None:
        mods = dict(model.named_modules())
        self.mods = [mods[n] for n in names]
        self.kind = kind
        dev = next(model.parameters()).device
        self.amax = {n: torch.zeros((), device=dev) for n in names}
        self.names = names
        self.handles: list[Any] = []

    def __enter__(self) -> _Hooks:
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


class _FusedAmax:
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

    def __enter__(self) -> _FusedAmax:
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
    x = torch.randn(16, 64, device=DEVICE, dtype=torch.bfloat16)
    ch, st = torch.zeros(64, device=DEVICE), torch.zeros(8, device=DEVICE)
    lin = nn.Linear(64, 64, device=DEVICE, dtype=torch.bfloat16)
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
    recipe = QuantRecipe(format="nvfp4")
    names = block_targets(model, recipe)
    log(f"hooks: {len(names)} target Linears")
    res: dict[str, Any] = {"targets": len(names)}
    stats: dict[str, LinearInputStats] = {}
    for tokens, n in reps.items():
        inputs = [make_inputs(tokens, DEVICE, s) for s in range(4)]
        state = {"round": 0}

        def fwd(inputs: list = inputs, state: dict = state) -> None:
            with torch.no_grad():
                model(**inputs[state["round"] % len(inputs)])

        observers = {b: LinearInputObserver(model, names, num_steps=8, amax_backend="auto" if SMOKE and b == "triton"
                                            else b) for b in ("torch", "triton")}

        def with_ctx(ctx: Any, fwd: Callable[[], None] = fwd, state: dict = state) -> Callable[[], float]:
            def run() -> float:
                with ctx:
                    if isinstance(ctx, (LinearInputObserver, _FusedAmax)):
                        ctx.step = state["round"] % 8
                    return timed(fwd)

            return run

        variants = {
            "bf16": lambda fwd=fwd: timed(fwd),
            "empty_hook": with_ctx(_Hooks(model, names, "empty")),
            "naive_amax": with_ctx(_Hooks(model, names, "naive")),
            "observer_torch": with_ctx(observers["torch"]),
            "observer_triton": with_ctx(observers["triton"]),
        }
        extra: dict[str, _FusedAmax] = {}
        if not SMOKE:
            extra = {"triton_side_stream": _FusedAmax(model, names, "side_stream"),
                     "triton_override": _FusedAmax(model, names, "override")}
            for k, ctx in extra.items():
                variants[k] = with_ctx(ctx)
            if tokens == min(reps):  # CUDA graphs: what the GPU itself spends (hooks' Python not replayed)
                graph_obs = LinearInputObserver(model, names, num_steps=8, amax_backend="triton")
                for k, ctx in (("bf16_graph", None), ("observer_triton_graph", graph_obs),
                               ("triton_side_stream_graph", _FusedAmax(model, names, "side_stream"))):
                    try:
                        g = Graphed(model, inputs[0], ctx)
                        variants[k] = lambda g=g, inputs=inputs, state=state: timed(
                            lambda: g.replay(inputs[state["round"] % len(inputs)]))
                    except Exception as exc:  # noqa: BLE001 - report, keep the eager numbers
                        res[f"{k}_error"] = repr(exc)[:500]
                        log(f"{k}: capture failed: {exc!r}"[:300])
        reset_peak()
        t = rounds(variants, reps=n, warmup=2, state=state)
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
        res[str(tokens)] = row
        log(f"hooks @{tokens}: " + ", ".join(f"{k} {row[k]['median_s'] * 1e3:.1f} ms ({row[k]['overhead_pct']:+.1f}%)"
                                             for k in variants) + f"; identical={row['observer_paths_identical']}")
        if tokens == min(LATENTS):
            stats = st_f
        inputs.clear()
        free()
    RESULTS["hooks"] = res
    save()
    return stats


# ------------------------------------------------------------------------------------------------------------
# CUDA graphs: ptq's CudaGraphForward for calibration and evaluation
# ------------------------------------------------------------------------------------------------------------

#: amax kernel launch shapes tried by ``--part amax_kernel`` (the best by GPU time per forward is then used).
AMAX_CANDIDATES = {
    "64x64_w4_p8_s1": {"bm": 64, "bk": 64, "num_warps": 4, "programs_per_sm": 8, "stages": 1},
    "64x64_w4_p8_s3": {"bm": 64, "bk": 64, "num_warps": 4, "programs_per_sm": 8, "stages": 3},
    "32x128_w4_p4_s1": {"bm": 32, "bk": 128, "num_warps": 4, "programs_per_sm": 4, "stages": 1},
    "32x128_w4_p2_s3": {"bm": 32, "bk": 128, "num_warps": 4, "programs_per_sm": 2, "stages": 3},
    "32x128_w4_p4_s3": {"bm": 32, "bk": 128, "num_warps": 4, "programs_per_sm": 4, "stages": 3},
    "64x128_w8_p2_s3": {"bm": 64, "bk": 128, "num_warps": 8, "programs_per_sm": 2, "stages": 3},
    "16x256_w4_p2_s4": {"bm": 16, "bk": 256, "num_warps": 4, "programs_per_sm": 2, "stages": 4},
    "128x64_w8_p4_s2": {"bm": 128, "bk": 64, "num_warps": 8, "programs_per_sm": 4, "stages": 2},
    "32x64_w2_p8_s3": {"bm": 32, "bk": 64, "num_warps": 2, "programs_per_sm": 8, "stages": 3},
    "16x128_w4_p8_s1": {"bm": 16, "bk": 128, "num_warps": 4, "programs_per_sm": 8, "stages": 1},
}


def part_amax_kernel(tokens: int, launches: int = 48, reps: int = 10, buffers: int = 12) -> dict[str, int]:
    """GPU time of one fused amax launch per 5B input shape and launch configuration, with a cold L2 (each launch
    reads another of ``buffers`` inputs, > L2 in all): ``launches`` launches captured in one CUDA graph, replayed
    ``reps`` times. Weighted by how often each shape runs in one forward with sibling sharing (per block: qkv
    (3 destinations), to_out, attn2 to_q, ffn.net.0.proj, attn2.to_out at [tokens, 3072]; attn2 to_k/to_v
    (2 destinations) at [512, 3072]; ffn.net.2 at [tokens, 14336])."""
    from ptq.formats import triton_quant

    blocks = 30
    shapes = {"x3072_3dest": ((tokens, 3072), 3, blocks), "x3072": ((tokens, 3072), 1, 4 * blocks),
              "text_2dest": ((TEXT[0], 3072), 2, blocks), "x14336": ((tokens, 14336), 1, blocks)}
    saved = dict(triton_quant.AMAX_CONFIG)
    res: dict[str, Any] = {"tokens": tokens, "launches_per_graph": launches, "buffers": buffers}
    best, best_us = saved, float("inf")
    xs = {s: [(torch.randn(shape, device=DEVICE) * 3).to(torch.bfloat16) for _ in range(buffers)]
          for s, (shape, _, _) in shapes.items()}
    for cname, cfg in AMAX_CANDIDATES.items():
        triton_quant.AMAX_CONFIG.clear()
        triton_quant.AMAX_CONFIG.update(cfg)
        row: dict[str, Any] = {}
        total = 0.0
        try:
            for sname, (shape, n_dest, count) in shapes.items():
                dests = [(torch.zeros(shape[-1], device=DEVICE), torch.zeros(9, device=DEVICE))
                         for _ in range(n_dest)]
                idx = torch.tensor([2], device=DEVICE)

                def launch(x: torch.Tensor, dests: list = dests, idx: torch.Tensor = idx) -> None:
                    triton_quant.amax_update_(x, dests[0][0], dests[0][1], idx, more=dests[1:])

                for x in xs[sname]:
                    launch(x)
                sync()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for i in range(launches):
                        launch(xs[sname][i % buffers])
                g.replay()
                ts = [timed(g.replay) for _ in range(reps)]
                us = median(ts) / launches * 1e6
                ref = torch.stack([x.float().abs().amax(0) for x in xs[sname]]).amax(0)
                ok = torch.equal(dests[-1][0], ref)
                row[sname] = {"us_per_launch": us, "gb_per_s": xs[sname][0].numel() * 2 / (us * 1e-6) / 1e9,
                              "correct": ok}
                total += us * count
                del g
            row["us_per_forward"] = total
            if total < best_us and all(v["correct"] for v in row.values() if isinstance(v, dict)):
                best, best_us = cfg, total
        except Exception as exc:  # noqa: BLE001 - a launch shape a GPU cannot take
            row["error"] = repr(exc)[:300]
        res[cname] = row
        log(f"amax kernel {cname}: " + ", ".join(f"{k} {v['us_per_launch']:.1f} us" for k, v in row.items()
                                                   if isinstance(v, dict)) + f"; per forward {total / 1e3:.2f} ms"
            + ("" if "error" not in row else f" ERROR {row['error'][:200]}"))
    triton_quant.AMAX_CONFIG.clear()
    triton_quant.AMAX_CONFIG.update(best)
    res["chosen"] = best
    RESULTS["amax_kernel"] = res
    save()
    log(f"amax kernel: chose {best} ({best_us / 1e3:.2f} ms per forward)")
    return best


AMAX_BATCH_CANDIDATES = [  # (rows_per_program, bm, bk, num_warps, stages)
    (480, 32, 64, 2, 3), (480, 32, 128, 4, 3), (960, 32, 64, 2, 3), (240, 32, 64, 2, 3), (480, 64, 64, 4, 3),
    (480, 16, 128, 2, 4), (480, 32, 256, 8, 3), (1440, 32, 64, 2, 4), (480, 32, 64, 4, 2), (320, 32, 128, 4, 3),
    (960, 32, 128, 4, 4), (480, 32, 64, 1, 3),
]


def part_amax_batch(tokens: int, reps: int = 10) -> dict[str, int]:
    """The batched amax launches of one whole 5B calibration forward (the observer's queue: sibling sharing, up
    to ``AMAX_BATCH_ITEMS`` tensors / ``AMAX_BATCH_BYTES`` per launch) over distinct buffers for all 30 blocks
    (a cold L2, as in the model), captured in one CUDA graph; GPU ms per forward for each launch configuration.
    The fastest is kept for the rest of the run."""
    from ptq.calibration.observers import AMAX_BATCH_BYTES
    from ptq.formats import triton_quant

    def t(shape: tuple[int, int]) -> torch.Tensor:
        return (torch.randn(shape, device=DEVICE) * 3).to(torch.bfloat16)

    groups = []  # (x, destinations) in forward order
    text = t((TEXT[0], 3072))
    for _ in range(30):
        for shape, nd in (((tokens, 3072), 3), ((tokens, 3072), 1), ((tokens, 3072), 1), (None, 2),
                          ((tokens, 3072), 1), ((tokens, 3072), 1), ((tokens, 14336), 1)):
            x = text if shape is None else t(shape)
            groups.append((x, [(torch.zeros(x.shape[-1], device=DEVICE), torch.zeros(9, device=DEVICE))
                               for _ in range(nd)]))
    launches, cur, nbytes = [], [], 0
    for x, d in groups:
        b = x.numel() * 2
        if cur and (len(cur) >= triton_quant.AMAX_BATCH_ITEMS or nbytes + b > AMAX_BATCH_BYTES):
            launches.append(cur)
            cur, nbytes = [], 0
        cur.append((x, d))
        nbytes += b
    launches.append(cur)
    idx = torch.tensor([2], device=DEVICE)
    saved = dict(triton_quant.AMAX_BATCH_CONFIG)
    res: dict[str, Any] = {"tokens": tokens, "launches_per_forward": len(launches),
                           "bytes_per_forward": sum(x.numel() * 2 for x, _ in groups)}
    best, best_ms = saved, float("inf")
    for rows, bm, bk, warps, stages in AMAX_BATCH_CANDIDATES:
        cfg = {"bm": bm, "bk": bk, "num_warps": warps, "stages": stages, "rows_per_program": rows}
        name = f"r{rows}_{bm}x{bk}_w{warps}_s{stages}"
        triton_quant.AMAX_BATCH_CONFIG.clear()
        triton_quant.AMAX_BATCH_CONFIG.update(cfg)
        try:
            for items in launches:
                triton_quant.amax_update_batch_(items, idx)
            sync()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for items in launches:
                    triton_quant.amax_update_batch_(items, idx)
            g.replay()
            ms = median([timed(g.replay) for _ in range(reps)]) * 1e3
            ok = all(torch.equal(d[0][0], x.float().abs().amax(0)) for x, d in groups[:7])
            res[name] = {"ms_per_forward": ms, "tb_per_s": res["bytes_per_forward"] / (ms * 1e-3) / 1e12,
                         "correct": ok}
            del g
            if ok and ms < best_ms:
                best, best_ms = cfg, ms
            log(f"amax batch {name}: {ms:.3f} ms per forward ({res[name]['tb_per_s']:.2f} TB/s), correct={ok}")
        except Exception as exc:  # noqa: BLE001
            res[name] = {"error": repr(exc)[:300]}
            log(f"amax batch {name}: ERROR {exc!r}"[:300])
    triton_quant.AMAX_BATCH_CONFIG.clear()
    triton_quant.AMAX_BATCH_CONFIG.update(best)
    res["chosen"] = best
    RESULTS["amax_batch"] = res
    save()
    log(f"amax batch: chose {best} ({best_ms:.3f} ms per forward, {len(launches)} launches)")
    return best


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


def _graphs_at(model: nn.Module, names: list[str], tokens: int, n: int, res: dict[str, Any],
               simfwd: bool = True) -> None:
    from ptq.calibration.cuda_graph import CudaGraphForward

    inputs = [make_inputs(tokens, DEVICE, s) for s in range(4)]
    state = {"round": 0}

    def cur() -> dict[str, Any]:
        return inputs[state["round"] % len(inputs)]

    bf16_graph = CudaGraphForward(model)
    obs_eager = LinearInputObserver(model, names, num_steps=8)
    obs_graph = LinearInputObserver(model, names, num_steps=8)  # batched launches (defaults)
    obs_batch = LinearInputObserver(model, names, num_steps=8, fuse_producers=True)  # + GELU tap
    obs_serial = LinearInputObserver(model, names, num_steps=8, amax_batch=1, fuse_producers=False)
    obs_runner, batch_runner, serial_runner = CudaGraphForward(model), CudaGraphForward(model), CudaGraphForward(model)
    for obs, runner in ((obs_graph, obs_runner), (obs_batch, batch_runner), (obs_serial, serial_runner)):
        with obs:  # captured with the hooks; the graph keeps their kernels after detach
            obs.step = 0
            runner(**inputs[0])
            runner(**inputs[0])
    bf16_graph(**inputs[0])
    y_eager = model(**inputs[1])[0]
    y_graph = bf16_graph(**inputs[1])[0]
    row: dict[str, Any] = {"bf16_graph_equals_eager": bool(torch.equal(y_eager, y_graph))}
    del y_eager, y_graph

    def observed_eager() -> float:
        with obs_eager:
            obs_eager.step = state["round"] % 8
            return timed(lambda: model(**cur()))

    def observed_graph() -> float:
        obs_graph.step = state["round"] % 8
        return timed(lambda: obs_runner(**cur()))

    def observed_batch() -> float:
        obs_batch.step = state["round"] % 8
        return timed(lambda: batch_runner(**cur()))

    def observed_serial() -> float:
        obs_serial.step = state["round"] % 8
        return timed(lambda: serial_runner(**cur()))

    variants = {"bf16": lambda: timed(lambda: model(**cur())),
                "bf16_graph": lambda: timed(lambda: bf16_graph(**cur())),
                "observer": observed_eager, "observer_graph": observed_graph,
                "observer_graph_gelu_tap": observed_batch, "observer_graph_unbatched": observed_serial}
    reset_peak()
    t = rounds(variants, reps=n, warmup=2, state=state)
    base, gbase = median(t["bf16"]), median(t["bf16_graph"])
    for k, v in t.items():
        row[k] = {"median_s": median(v), "all_s": v, "vs_bf16_eager_pct": 100 * (median(v) / base - 1),
                  "vs_bf16_graph_pct": 100 * (median(v) / gbase - 1)}
    row["peak_gib"] = peak_gib()
    a, b = obs_eager.stats(), obs_graph.stats()
    row["observer_graph_stats_identical"] = all(set(a) == set(o) and all(
        torch.equal(a[k].channel_amax, o[k].channel_amax) and torch.equal(a[k].step_amax, o[k].step_amax)
        for k in a) for o in (b, obs_batch.stats(), obs_serial.stats()))
    row["gelu_taps"] = len(obs_batch._patched)
    row["observer_graph_replays"] = obs_runner.replays
    if tokens == min(LATENTS) and not SMOKE:
        row["kernel_profile"] = profile_kernels({"bf16_graph": lambda: bf16_graph(**cur()),
                                                 "observer_graph": lambda: obs_runner(**cur()),
                                                 "observer_graph_gelu_tap": lambda: batch_runner(**cur()),
                                                 "observer_graph_unbatched": lambda: serial_runner(**cur())})
    serial_runner.release()
    batch_runner.release()
    res[f"hooks_{tokens}"] = row
    log(f"graphs hooks @{tokens}: " + ", ".join(
        f"{k} {row[k]['median_s'] * 1e3:.1f} ms ({row[k]['vs_bf16_graph_pct']:+.1f}% vs bf16 graph, "
        f"{row[k]['vs_bf16_eager_pct']:+.1f}% vs eager)" for k in variants)
        + f"; stats identical={row['observer_graph_stats_identical']}, "
          f"bf16 replay exact={row['bf16_graph_equals_eager']}")
    obs_runner.release()
    save()
    for fmt, gemms in (("nvfp4", ("bf16",)), ("fp8", ("bf16", "scaled_mm"))) if simfwd else ():
        res[f"simfwd_{fmt}_{tokens}"] = _graphs_simfwd(model, b, fmt, gemms, inputs, state, bf16_graph, n, tokens)
        free()
        save()
    bf16_graph.release()


def _graphs_simfwd(model: nn.Module, stats: dict[str, LinearInputStats], fmt: str, gemms: tuple[str, ...],
                   inputs: list[dict[str, Any]], state: dict[str, int], bf16_graph: Any, n: int,
                   tokens: int) -> dict[str, Any]:
    from ptq.calibration.cuda_graph import CudaGraphForward

    def cur() -> dict[str, Any]:
        return inputs[state["round"] % len(inputs)]

    qm = copy.deepcopy(model)
    quantize_(qm, QuantRecipe(format=fmt), stats, progress=False)
    runners = {}
    qrow: dict[str, Any] = {}
    for gemm in gemms:
        QuantLinear.fast_path, QuantLinear.fp8_gemm = True, gemm
        r = runners[gemm] = CudaGraphForward(qm)
        r(**inputs[0])
        y_e = qm(**inputs[1])[0]
        y_g = r(**inputs[1])[0]
        qrow[f"{gemm}_graph_equals_eager"] = bool(torch.equal(y_e, y_g))
        del y_e, y_g

    def q_eager(gemm: str) -> float:
        QuantLinear.fp8_gemm = gemm
        return timed(lambda: qm(**cur()))

    def q_graph(gemm: str) -> float:
        return timed(lambda: runners[gemm](**cur()))

    qvariants = {"bf16": lambda: timed(lambda: model(**cur())),
                 "bf16_graph": lambda: timed(lambda: bf16_graph(**cur()))}
    for gemm in gemms:
        qvariants[f"{fmt}_{gemm}"] = partial(q_eager, gemm)
        qvariants[f"{fmt}_{gemm}_graph"] = partial(q_graph, gemm)
    reset_peak()
    t = rounds(qvariants, reps=n, warmup=2, state=state)
    base, gbase = median(t["bf16"]), median(t["bf16_graph"])
    for k, v in t.items():
        qrow[k] = {"median_s": median(v), "all_s": v, "ratio_vs_bf16_eager": median(v) / base,
                   "ratio_vs_bf16_graph": median(v) / gbase}
    qrow["peak_gib"] = peak_gib()
    log(f"graphs simfwd {fmt} @{tokens}: " + ", ".join(
        f"{k} {qrow[k]['median_s'] * 1e3:.1f} ms (x{qrow[k]['ratio_vs_bf16_graph']:.3f} vs bf16 graph, "
        f"x{qrow[k]['ratio_vs_bf16_eager']:.3f} vs eager)" for k in qvariants)
        + "; replay exact: " + str({g: qrow[f"{g}_graph_equals_eager"] for g in gemms}))
    QuantLinear.fp8_gemm = "bf16"
    for r in runners.values():
        r.release()
    return qrow


# ------------------------------------------------------------------------------------------------------------
# simulated-quantized forward (+ GPU quantize/export)
# ------------------------------------------------------------------------------------------------------------


def export_comfyui(model: nn.Module, out_dir: Path) -> dict[str, Any]:
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


def layer_diagnostics(qm: nn.Module, inp: dict[str, Any]) -> dict[str, Any]:
    """On real 5B inputs of a few layers: Triton activation quantization vs the torch reference (bits), and the
    layer's fast-path output vs its reference-path output (fraction of bf16 outputs that differ, max diff)."""
    from ptq.formats import fp8 as fp8_fmt
    from ptq.formats import nvfp4 as nvfp4_fmt
    from ptq.formats import triton_quant

    names = ("blocks.0.attn1.to_q", "blocks.0.ffn.net.2", "blocks.15.attn2.to_k", "blocks.29.ffn.net.0.proj")
    mods = dict(qm.named_modules())
    captured: dict[str, torch.Tensor] = {}
    handles = [mods[n].register_forward_pre_hook(
        lambda m, a, n=n: captured.setdefault(n, a[0].detach().clone())) for n in names if n in mods]
    QuantLinear.fast_path = False
    with torch.no_grad():
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
            QuantLinear._act_cache = None
            QuantLinear.fast_path = True
            yf = m(x)
            QuantLinear.fast_path = False
            yr = m(x)
        out[n] = {"act_bit_exact": bool(torch.equal(a, b)), "out_frac_differ": float((yf != yr).float().mean()),
                  "out_max_diff_rel": float((yf.float() - yr.float()).abs().max() / yr.float().abs().max())}
    QuantLinear.fast_path = True
    return out


def part_simfwd(model: nn.Module, stats: dict[str, LinearInputStats], reps: dict[int, int], do_export: bool,
                export_dir: Path) -> None:
    res: dict[str, Any] = RESULTS.setdefault("simfwd", {})
    for fmt in ("nvfp4", "fp8"):
        if fmt == "fp8" and not reps:
            break
        recipe = QuantRecipe(format=fmt)
        qm = copy.deepcopy(model)
        sync()
        reset_peak()
        t_q = timed(lambda qm=qm, recipe=recipe: quantize_(qm, recipe, stats, progress=False))
        nq = sum(isinstance(m, QuantLinear) for m in qm.modules())
        entry: dict[str, Any] = {"quantize_s": t_q, "quantized_linears": nq, "quantize_peak_gib": peak_gib()}
        log(f"simfwd {fmt}: quantize_ {nq} Linears in {t_q:.2f}s")
        if fmt == "nvfp4" and do_export:
            ex = export_comfyui(qm, export_dir)
            ex["quantize_plus_export_s"] = t_q + ex["export_s"]
            RESULTS["quant_export_gpu"] = ex
            save()
            log(f"quant+export GPU: quantize {t_q:.2f}s + export {ex['export_s']:.2f}s "
                f"({ex['file_bytes'] / 1e9:.2f} GB, {ex['write_gb_per_s']:.2f} GB/s)")
        # accuracy sanity at 1,440 tokens: fast path vs reference path vs bf16
        inp = make_inputs(min(LATENTS), DEVICE, 100)
        with torch.no_grad():
            y_bf16 = model(**inp)[0]
            QuantLinear.fast_path = True
            QuantLinear.fp8_gemm = "scaled_mm"
            y_fast = qm(**inp)[0]
            QuantLinear.fp8_gemm = "bf16"
            y_fast_bf16 = qm(**inp)[0]
            QuantLinear.fast_path = False
            y_ref = qm(**inp)[0]
        entry["rel_l2_fast_vs_bf16"] = rel_l2(y_fast, y_bf16)
        entry["rel_l2_ref_vs_bf16"] = rel_l2(y_ref, y_bf16)
        entry["rel_l2_fast_vs_ref"] = rel_l2(y_fast, y_ref)
        entry["rel_l2_fast_bf16gemm_vs_ref"] = rel_l2(y_fast_bf16, y_ref)
        entry["scaled_mm_fallbacks"] = sum(bool(getattr(m, "_no_scaled_mm", False)) for m in qm.modules())
        try:
            entry["layers"] = layer_diagnostics(qm, inp)
            log(f"simfwd {fmt} per-layer fast vs reference: {entry['layers']}")
        except Exception as exc:  # noqa: BLE001
            entry["layers_error"] = repr(exc)[:500]
        del y_bf16, y_fast, y_ref, y_fast_bf16
        for tokens, n in reps.items():
            inputs = [make_inputs(tokens, DEVICE, s) for s in range(3)]
            state = {"round": 0}

            def fwd(m: nn.Module, fast: bool, gemm: str = "scaled_mm", inputs: list = inputs,
                    state: dict = state) -> float:
                inp = inputs[state["round"] % len(inputs)]
                QuantLinear.fast_path, QuantLinear.fp8_gemm = fast, gemm

                def go() -> None:
                    with torch.no_grad():
                        m(**inp)

                return timed(go)

            variants: dict[str, Callable[[], float]] = {"bf16": lambda fwd=fwd: fwd(model, False)}
            fast = {"sim_fast": "bf16"} if fmt == "nvfp4" else {"sim_fast_scaled_mm": "scaled_mm",
                                                                 "sim_fast_bf16_gemm": "bf16"}
            for k, gemm in fast.items():
                variants[k] = lambda fwd=fwd, qm=qm, gemm=gemm: fwd(qm, True, gemm)
            if not SMOKE and tokens == min(reps):  # CUDA-graph replays: the GPU-side cost alone
                try:
                    graphs = {"bf16_graph": Graphed(model, inputs[0])}
                    for k, gemm in fast.items():
                        QuantLinear.fast_path, QuantLinear.fp8_gemm = True, gemm
                        graphs[f"{k}_graph"] = Graphed(qm, inputs[0])
                    for k, g in graphs.items():
                        variants[k] = lambda g=g, inputs=inputs, state=state: timed(
                            lambda: g.replay(inputs[state["round"] % len(inputs)]))
                except Exception as exc:  # noqa: BLE001
                    entry["graph_error"] = repr(exc)[:500]
                    log(f"simfwd graphs failed: {exc!r}"[:300])
            reset_peak()
            t = rounds(variants, reps=n, warmup=2, state=state)
            gbase = median(t["bf16_graph"]) if "bf16_graph" in t else float("nan")
            row = {k: {"median_s": median(v), "all_s": v,
                       "ratio_vs_bf16": median(v) / (gbase if k.endswith("_graph") else median(t["bf16"]))}
                   for k, v in t.items()}
            row["peak_gib"] = peak_gib()
            if tokens == min(LATENTS):  # the reference (pre-fast-path) simulation, for scale
                ref_t = [fwd(qm, False) for _ in range(3)]
                row["sim_reference"] = {"median_s": median(ref_t), "all_s": ref_t,
                                        "ratio_vs_bf16": median(ref_t) / median(t["bf16"])}
            entry[str(tokens)] = row
            log(f"simfwd {fmt} @{tokens}: " + ", ".join(
                f"{k} {v['median_s'] * 1e3:.1f} ms (x{v['ratio_vs_bf16']:.2f})" for k, v in row.items()
                if isinstance(v, dict)))
            inputs.clear()
            free()
        QuantLinear.fast_path, QuantLinear.fp8_gemm = True, "scaled_mm"
        res[fmt] = entry
        save()
        qm = None
        free()


# ------------------------------------------------------------------------------------------------------------
# quantize + export on CPU (block by block)
# ------------------------------------------------------------------------------------------------------------


def _materialize_(module: nn.Module, prefix: str, keep: set[str], gen: torch.Generator,
                  dtype: torch.dtype = torch.bfloat16, recurse: bool = True) -> None:
    """Replace meta parameters/buffers of ``module`` (and its children if ``recurse``) by seeded random CPU
    tensors (fp32 for diffusers' keep-in-fp32 modules), one tensor at a time."""
    subs = module.named_modules(prefix=prefix) if recurse else [(prefix, module)]
    for name, sub in subs:
        for pname, p in list(sub.named_parameters(recurse=False)):
            if not p.is_meta:
                continue
            full = f"{name}.{pname}" if name else pname
            dt = torch.float32 if any(part in keep for part in full.split(".")) else dtype
            t = torch.empty(p.shape, dtype=dt)
            bound = 1.0 / math.sqrt(p[0].numel()) if p.dim() >= 2 else 0.02
            t.uniform_(-bound, bound, generator=gen)
            sub._parameters[pname] = nn.Parameter(t, requires_grad=False)
        for bname, b in list(sub.named_buffers(recurse=False)):
            if b is not None and b.is_meta:
                sub._buffers[bname] = torch.zeros(b.shape, dtype=b.dtype)


def part_quant_export_cpu(export_dir: Path) -> None:
    from ptq.models.wan import build_meta_transformer

    torch.set_grad_enabled(False)
    model = build_meta_transformer()
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    gen = torch.Generator().manual_seed(0)
    recipe = QuantRecipe(format="nvfp4")
    targets = set(block_targets(model, recipe))
    t_gen = time.perf_counter()
    for name, sub in model.named_children():
        if name != "blocks":
            _materialize_(sub, name, keep, gen)
    _materialize_(model, "", keep, gen, recurse=False)  # top-level parameters (scale_shift_table)
    gen_s = time.perf_counter() - t_gen
    quant_s = 0.0
    n_q = 0
    for i, block in enumerate(model.blocks):
        t0 = time.perf_counter()
        _materialize_(block, f"blocks.{i}", keep, gen)
        gen_s += time.perf_counter() - t0
        local = [n for n, m in block.named_modules() if isinstance(m, nn.Linear) and f"blocks.{i}.{n}" in targets]
        stats = synthetic_stats(block, local)
        t0 = time.perf_counter()
        recs = quantize_(block, recipe, stats, progress=False)
        quant_s += time.perf_counter() - t0
        n_q += sum(r.format == "nvfp4" for r in recs)
        if i % 5 == 4:
            log(f"cpu: blocks 0-{i} quantized (quantize {quant_s:.1f}s, generate {gen_s:.1f}s)")
    ex = export_comfyui(model, export_dir)
    ex.update({"quantize_s": quant_s, "generate_weights_s": gen_s, "quantized_linears": n_q,
               "quantize_plus_export_s": quant_s + ex["export_s"], "threads": torch.get_num_threads()})
    RESULTS["quant_export_cpu"] = ex
    save()
    log(f"quant+export CPU: quantize {quant_s:.1f}s + export {ex['export_s']:.1f}s = "
        f"{ex['quantize_plus_export_s']:.1f}s ({n_q} Linears, {ex['file_bytes'] / 1e9:.2f} GB)")


# ------------------------------------------------------------------------------------------------------------
# TensorRT Model Optimizer side by side
# ------------------------------------------------------------------------------------------------------------

_MTQ_EXCLUDE = ("*patch_embedding*", "*condition_embedder*", "*proj_out*")


def modelopt_cfg() -> dict[str, Any]:
    """NVFP4_DEFAULT_CFG with the same layers kept in bf16 as ptq's default recipe."""
    import modelopt.torch.quantization as mtq

    cfg = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    qc = cfg["quant_cfg"]
    # disabled, with an 8-bit attribute config: a disabled quantizer that still carries the NVFP4 config makes
    # modelopt's QuantConv3d take its NVFP4 implicit-GEMM CUDA kernel (and compile it) for patch_embedding
    off = {"num_bits": 8, "axis": None}
    if isinstance(qc, list):
        qc.extend({"quantizer_name": p, "cfg": off, "enable": False} for p in _MTQ_EXCLUDE)
    else:  # older dict format
        qc.update({p: {**off, "enable": False} for p in _MTQ_EXCLUDE})
    return cfg


def count_modelopt_quantized(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        wq = getattr(m, "weight_quantizer", None)
        if wq is not None and getattr(wq, "is_enabled", False):
            n += 1
    return n


def _ptq_5b(inputs: list[dict[str, Any]], reps: int) -> dict[str, Any]:
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
    QuantLinear.fast_path = True
    t_f = [timed(lambda: loop_one(model, inputs[0])) for _ in range(reps + 1)][1:]
    out["fake_quant_forward_s"] = median(t_f)
    log(f"ptq 5B: calibrate {t_cal:.2f}s + quantize {t_q:.2f}s, peak {out['peak_gib']:.2f} GiB "
        f"(model {base:.2f}), held after quantize_ {out['after_quantize_gib']:.2f} GiB (observer still alive); "
        f"sim forward {median(t_f) * 1e3:.1f} ms")
    model = obs = None  # free before the next build
    return out


def part_ptq_memory(n_forwards: int, reps: int) -> None:
    """The ptq half of the Model Optimizer comparison alone (no modelopt needed): time and GPU memory."""
    inputs = [make_inputs(min(LATENTS), DEVICE, 200 + s) for s in range(n_forwards)]
    RESULTS["ptq_memory_5b"] = {"forward_loop": f"{n_forwards} forwards at 1,440 tokens", **_ptq_5b(inputs, reps)}
    save()


def part_gptq(reps: int = 2) -> None:
    """GPTQ weight quantization time per 5B layer shape (random W, Hessian from 4,096 random correlated tokens),
    NVFP4 with "mse" and "four_over_six" scales and FP8, extrapolated to the 300 block Linears (per block: 8 x
    [3072, 3072], ffn.net.0 [14336, 3072], ffn.net.2 [3072, 14336])."""
    from ptq.algorithms import gptq

    shapes = {"3072x3072": (3072, 3072, 8), "ffn0_14336x3072": (14336, 3072, 1), "ffn2_3072x14336": (3072, 14336, 1)}
    res: dict[str, Any] = {}
    g = torch.Generator(device=DEVICE).manual_seed(0)
    for key, (rows, cols, per_block) in shapes.items():
        if SMOKE:
            rows, cols = rows // 48, cols // 48 // 16 * 16
        w = (torch.randn(rows, cols, device=DEVICE, generator=g) * 0.02).to(torch.bfloat16)
        x = torch.randn(4096, cols, device=DEVICE, generator=g)
        x = x + 0.5 * x.roll(1, dims=1)
        h = x.t() @ x / x.shape[0]
        del x
        for name, fn, scales in (("nvfp4_mse", gptq.gptq_nvfp4, "mse"),
                                 ("nvfp4_four_over_six", gptq.gptq_nvfp4, "four_over_six"),
                                 ("fp8_mse", gptq.gptq_fp8, "mse")):
            t = median([timed(partial(fn, w, h, scales=scales)) for _ in range(reps)])
            res.setdefault(name, {})[key] = t
            log(f"gptq {name} {key}: {t:.2f} s")
        res.setdefault("per_block_count", {})[key] = per_block
    for name in ("nvfp4_mse", "nvfp4_four_over_six", "fp8_mse"):
        res[name]["total_300_linears_s"] = 30 * sum(res[name][k] * shapes[k][2] for k in shapes)
        log(f"gptq {name}: ~{res[name]['total_300_linears_s']:.0f} s for the 300 block Linears")
    RESULTS["gptq_5b"] = res
    save()


def part_modelopt_5b(n_forwards: int, reps: int) -> None:
    import modelopt.torch.quantization as mtq

    res: dict[str, Any] = {"forward_loop": f"{n_forwards} forwards at 1,440 tokens"}
    inputs = [make_inputs(min(LATENTS), DEVICE, 200 + s) for s in range(n_forwards)]

    def loop(m: nn.Module) -> None:
        with torch.no_grad():
            for inp in inputs:
                m(**inp)

    res["ptq"] = _ptq_5b(inputs, reps)
    free()
    # Model Optimizer
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


def loop_one(model: nn.Module, inp: dict[str, Any]) -> None:
    with torch.no_grad():
        model(**inp)


def _tiny_prompts(n: int, seed: int, file: Path) -> list[str]:
    from ptq.models import tiny_wan

    if file.is_file():
        lines = [ln.strip() for ln in file.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        if len(lines) >= n:
            return lines[:n]
    rng = random.Random(seed)
    return [tiny_wan.scene_to_prompt(tiny_wan.sample_scene(rng)) for _ in range(n)]


def _cast_keep_fp32(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not any(part in keep for part in f"{name}.{pname}".split(".")):
                p.data = p.data.to(dtype)
    return model


def part_tiny(calib_steps: int, n_eval: int = 16) -> None:
    """ptq vs Model Optimizer NVFP4 on the tiny WAN: final-latent error (one seed per prompt; chaotic for a strongly
    perturbed model) and teacher-forced per-step error (each step's CFG prediction on the bf16 trajectory's latents,
    robust to trajectory divergence)."""
    import modelopt.torch.quantization as mtq

    from ptq.models import tiny_wan

    trained = (tiny_wan.TINY_WAN_PATH / "model_index.json").is_file()
    if trained:
        comps = tiny_wan.load_tiny_wan(tiny_wan.TINY_WAN_PATH, dtype=torch.bfloat16, device="cpu")
    else:
        comps = tiny_wan.build_random_tiny_wan(seed=0)
        comps.transformer = _cast_keep_fp32(comps.transformer, torch.bfloat16)
    base = comps.transformer.to(DEVICE).eval().requires_grad_(False)
    calib = _tiny_prompts(16, 1, REPO / "ptq" / "data" / "tiny_calib.txt")
    evalp = _tiny_prompts(n_eval, 2, REPO / "ptq" / "data" / "tiny_eval.txt")
    emb_c, emb_e = tiny_wan.encode_prompts(comps, calib), tiny_wan.encode_prompts(comps, evalp)
    neg_c = tiny_wan.encode_prompts(comps, [""] * len(calib))
    neg_e = tiny_wan.encode_prompts(comps, [""] * len(evalp))
    d = comps.sample_defaults

    def sample(model: nn.Module, emb: torch.Tensor, neg: torch.Tensor, steps: int, seed: int,
               forced: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list, list]:
        """WAN's denoising loop; returns (final latents, per-step inputs, per-step CFG predictions). ``forced``:
        feed these per-step latents instead of the model's own (teacher forcing)."""
        from ptq.models.base import SampleSpec
        from ptq.models.wan.loading import WanComponents
        from ptq.models.wan.sampling import denoise

        comps_m = WanComponents(model, comps.scheduler, comps.vae, None, None,
                                defaults={**d, "vae_scale_factor_spatial": comps.vae.config.spatial_factor,
                                          "vae_scale_factor_temporal": 1})
        spec = SampleSpec(d["height"], d["width"], d["num_frames"], steps, float(d["guidance_scale"]), seed)
        inputs: list[torch.Tensor] = []
        preds: list[torch.Tensor] = []

        def forward(**kw: Any) -> Any:  # records each step's input (cond forward, then uncond)
            inputs.append(kw["hidden_states"])
            return model(**kw)

        latents = denoise(comps_m, emb, neg, spec, forward=forward,
                          latents_at=None if forced is None else forced.__getitem__,
                          on_prediction=lambda i, p: preds.append(p))
        return latents, inputs[::2], preds

    steps = int(d["num_inference_steps"])
    ref, ref_xs, ref_preds = sample(base, emb_e, neg_e, steps, 123)

    def errors(model: nn.Module) -> dict[str, float]:
        lat, _, _ = sample(model, emb_e, neg_e, steps, 123)
        _, _, preds = sample(model, emb_e, neg_e, steps, 123, forced=ref_xs)
        per = [rel_l2(lat[i], ref[i]) for i in range(lat.shape[0])]
        return {"final_rel_l2": rel_l2(lat, ref), "final_rel_l2_mean_per_prompt": statistics.mean(per),
                "final_rel_l2_median_per_prompt": median(per),
                "teacher_forced_pred_rel_l2": statistics.mean(rel_l2(p, r) for p, r in zip(preds, ref_preds))}

    res: dict[str, Any] = {"model": "ptq/assets/tiny_wan (trained)" if trained else "random tiny WAN (untrained)",
                           "calibration": f"16 prompts x {calib_steps} steps, CFG",
                           "eval": f"{len(evalp)} prompts x {steps} steps, CFG {d['guidance_scale']}"}
    # ptq
    qm = copy.deepcopy(base)
    recipe = QuantRecipe(format="nvfp4")
    names = block_targets(qm, recipe)
    obs = LinearInputObserver(qm, names, num_steps=calib_steps, amax_backend="auto")

    def ptq_calib() -> None:
        with obs:
            sample(qm, emb_c, neg_c, calib_steps, 7)
        quantize_(qm, recipe, obs.stats(), progress=False)

    t_ptq = timed(ptq_calib)
    QuantLinear.fast_path = True
    res["ptq"] = {**errors(qm), "calibrate_quantize_s": t_ptq, "quantized_linears": len(names)}
    QuantLinear.fast_path = False
    res["ptq_torch_cuda_reference_path"] = errors(qm)
    QuantLinear.fast_path = True
    # Model Optimizer
    mm = copy.deepcopy(base)
    t_mo = timed(lambda: mtq.quantize(mm, modelopt_cfg(), forward_loop=lambda m: sample(m, emb_c, neg_c,
                                                                                        calib_steps, 7)))
    res["modelopt"] = {**errors(mm), "calibrate_quantize_s": t_mo, "quantized_linears": count_modelopt_quantized(mm)}
    RESULTS["tiny"] = res
    save()
    log(f"tiny ({res['model']}): " + "; ".join(
        f"{k}: final {v['final_rel_l2']:.4f} (per-prompt median {v['final_rel_l2_median_per_prompt']:.4f}), "
        f"teacher-forced {v['teacher_forced_pred_rel_l2']:.4f}"
        for k, v in res.items() if isinstance(v, dict)))
    comps.transformer = base
    qm = mm = None
    free()


# ------------------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------------------


def table() -> str:
    rows = ["| measurement | value |", "|---|---|"]

    def ms(x: float) -> str:
        return f"{x * 1e3:.1f} ms"

    h = RESULTS.get("hooks", {})
    for tok in map(str, sorted(LATENTS)):
        if tok in h:
            r = h[tok]
            rows.append(f"| bf16 forward @{tok} tokens | {ms(r['bf16']['median_s'])} |")
            for k in ("empty_hook", "naive_amax", "observer_torch", "observer_triton", "triton_side_stream",
                      "triton_override", "bf16_graph", "observer_triton_graph", "triton_side_stream_graph"):
                if k in r:
                    rows.append(f"| {k} forward @{tok} | {ms(r[k]['median_s'])} ({r[k]['overhead_pct']:+.1f}%"
                                f"{' vs bf16_graph' if k.endswith('_graph') and k != 'bf16_graph' else ''}) |")
    for fmt, e in RESULTS.get("simfwd", {}).items():
        for tok in map(str, sorted(LATENTS)):
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


SCALE_PARTS = {"gptq_batched", "e2e", "export", "dist"}


def run_scale_parts(parts: set[str], args: argparse.Namespace, export_dir: Path) -> None:
    """Issue 15's parts (``scripts/bench_scale.py``), each guarded so one failure keeps the others' numbers."""
    import bench_scale as sc

    assert OUT is not None
    jobs: dict[str, Callable[[], Any]] = {
        "gptq_batched": lambda: sc.part_gptq_batched(DEVICE, old_blocks=args.gptq_old_blocks,
                                                     batch_gib=args.batch_gib, smoke=SMOKE),
        "export_5b": lambda: sc.part_export(*_quantizable_5b(), export_dir),
        "dist": lambda: sc.part_dist(OUT),
        "e2e": lambda: sc.part_e2e(args.wan5b_dir, OUT, prompts=args.e2e_prompts,
                                   recipes=args.e2e_recipes.split(","), batch_gib=args.e2e_batch_gib),
    }
    for key, fn in jobs.items():
        if (key if key != "export_5b" else "export") not in parts:
            continue
        try:
            RESULTS[key] = fn()
        except Exception:  # noqa: BLE001
            RESULTS[f"{key}_error"] = traceback.format_exc()
            log(RESULTS[f"{key}_error"])
        free()
        save()
    print(sc.table(RESULTS))


def _quantizable_5b() -> tuple[nn.Module, dict[str, LinearInputStats]]:
    model = build_5b()
    return model, synthetic_stats(model, block_targets(model, QuantRecipe()))


def main() -> None:
    global OUT, SMOKE, DEVICE, LATENTS, TEXT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--part", default="all",
                    help="hooks,simfwd,quant_export,modelopt,tiny,ptqmem,gptq,amax_kernel,amax_batch,graphs,"
                         "gptq_batched,e2e,export,dist or all")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/bench_wan5b"))
    ap.add_argument("--export-dir", default="/tmp/bench_wan5b_export")
    ap.add_argument("--reps-small", type=int, default=20, help="timed rounds at 1,440 tokens")
    ap.add_argument("--reps-large", type=int, default=5, help="timed rounds at 27,280 tokens (0: skip)")
    ap.add_argument("--calib-forwards", type=int, default=8)
    ap.add_argument("--graphs-hooks-only", action="store_true", help="part graphs: skip the simulated forwards")
    ap.add_argument("--smoke", action="store_true", help="run the GPU flow on CPU with a 2-block model")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--wan5b-dir", default="/tmp/wan5b", help="part e2e: scripts/make_random_wan5b.py output")
    ap.add_argument("--e2e-prompts", type=int, default=4, help="part e2e: calibration prompts (x 8 steps x CFG)")
    ap.add_argument("--e2e-recipes", default="nvfp4_gptq_4o6_act_mse,nvfp4_mixed")
    ap.add_argument("--batch-gib", type=float, default=0.0, help="batched GPTQ memory per batch (0: auto)")
    ap.add_argument("--e2e-batch-gib", type=float, default=4.0, help="part e2e: quant.weight.batch_gib")
    ap.add_argument("--gptq-old-blocks", type=int, default=1, help="part gptq_batched: blocks timed per layer")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.smoke:
        SMOKE, DEVICE, LATENTS, TEXT = True, "cpu", {64: (1, 16, 16), 128: (2, 16, 16)}, (16, 256)
    OUT = Path(args.out)
    OUT.mkdir(parents=True, exist_ok=True)
    export_dir = Path(args.export_dir)
    parts = {"hooks", "simfwd", "quant_export", "modelopt", "tiny"} if args.part == "all" else set(
        args.part.split(","))
    RESULTS["env"] = {"torch": torch.__version__, "device": args.device, "argv": sys.argv[1:],
                      "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    torch.set_grad_enabled(False)
    if parts & SCALE_PARTS:
        run_scale_parts(parts, args, export_dir)
        parts -= SCALE_PARTS
        if not parts:
            return
    if args.device == "cpu" and not SMOKE:
        if parts - {"quant_export"}:
            log(f"on CPU only quant_export runs; skipping {sorted(parts - {'quant_export'})}")
        if "quant_export" in parts:
            part_quant_export_cpu(export_dir)
        print(table())
        return
    small, large = sorted(LATENTS)
    reps = {small: args.reps_small, **({large: args.reps_large} if args.reps_large > 0 else {})}
    QuantLinear.fast_path = True
    stats: dict[str, LinearInputStats] = {}
    if "amax_batch" in parts:
        try:
            part_amax_batch(small)
        except Exception:  # noqa: BLE001
            RESULTS["amax_batch_error"] = traceback.format_exc()
            log(RESULTS["amax_batch_error"])
    if "amax_kernel" in parts:
        try:
            part_amax_kernel(small)
        except Exception:  # noqa: BLE001
            RESULTS["amax_kernel_error"] = traceback.format_exc()
            log(RESULTS["amax_kernel_error"])
    if "graphs" in parts:
        model = build_5b()
        try:
            part_graphs(model, reps, simfwd=not args.graphs_hooks_only)
        except Exception:  # noqa: BLE001
            RESULTS["graphs_error"] = traceback.format_exc()
            log(RESULTS["graphs_error"])
        del model
        free()
    if parts & {"hooks", "simfwd", "quant_export"}:
        model = build_5b()
        if "hooks" in parts:
            try:
                part_overhead()
                stats = part_hooks(model, reps)
            except Exception:  # noqa: BLE001 - keep the other parts' numbers
                RESULTS["hooks_error"] = traceback.format_exc()
                log(RESULTS["hooks_error"])
        if not stats:
            stats = synthetic_stats(model, block_targets(model, QuantRecipe()))
        if parts & {"simfwd", "quant_export"}:
            try:
                part_simfwd(model, stats, reps if "simfwd" in parts else {}, "quant_export" in parts, export_dir)
            except Exception:  # noqa: BLE001
                RESULTS["simfwd_error"] = traceback.format_exc()
                log(RESULTS["simfwd_error"])
        del model
        free()
    for name, fn in (("tiny", lambda: part_tiny(8)), ("modelopt", lambda: part_modelopt_5b(args.calib_forwards, 3)),
                     ("ptqmem", lambda: part_ptq_memory(args.calib_forwards, 3)), ("gptq", part_gptq)):
        if name in parts:
            try:
                fn()
            except Exception:  # noqa: BLE001
                RESULTS[f"{name}_error"] = traceback.format_exc()
                log(RESULTS[f"{name}_error"])
    save()
    print(table())


if __name__ == "__main__":
    main()
