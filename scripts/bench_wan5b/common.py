"""What every part shares: the run's settings and results, logging, timing (synchronized forwards, interleaved
rounds, CUDA-graph replays), inputs, the random 5B, stand-in statistics and memory readings."""

from __future__ import annotations

import contextlib
import gc
import json
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptq.algorithms.layers import LayerPlanner
from ptq.algorithms.recipe import QuantRecipe
from ptq.calibration.observers import LinearInputStats

REPO = Path(__file__).resolve().parents[2]
GIB = 2**30


@dataclass
class Settings:
    """The run's settings; ``__main__`` sets them from the command line before any part runs."""

    #: where the GPU flow runs ("cpu" under ``smoke``)
    device: str = "cuda"
    #: ``--smoke``: the whole GPU flow on CPU with a 2-block model and tiny inputs (checks the script, not speed)
    smoke: bool = False
    #: tokens -> latent (frames, height, width) with patch (1, 2, 2)
    latents: dict[int, tuple[int, int, int]] = field(
        default_factory=lambda: {1440: (9, 20, 32), 27280: (31, 44, 80)})
    #: text tokens, text_dim
    text: tuple[int, int] = (512, 4096)
    #: folder of ``bench_wan5b.json`` (None: not written)
    out: Path | None = None

    def use_smoke(self) -> None:
        self.smoke, self.device = True, "cpu"
        self.latents, self.text = {64: (1, 16, 16), 128: (2, 16, 16)}, (16, 256)


RUN = Settings()
#: everything measured, by part (written to ``RUN.out / "bench_wan5b.json"`` by :func:`save`)
RESULTS: dict[str, Any] = {}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def save() -> None:
    if RUN.out is not None:
        (RUN.out / "bench_wan5b.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def guarded(key: str, fn: Callable[[], Any]) -> Any:
    """``fn()``; on an exception its traceback is stored as ``RESULTS[key + "_error"]`` and None returned, so one
    failing part keeps the other parts' numbers."""
    try:
        return fn()
    except Exception:  # noqa: BLE001 - report, go on
        RESULTS[f"{key}_error"] = traceback.format_exc()
        log(RESULTS[f"{key}_error"])
        return None


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


class InputRounds:
    """``count`` random inputs at ``tokens`` tokens (seeds ``seed``, ``seed + 1``, ...) cycled over the timing
    rounds: pass :attr:`state` to :func:`rounds`; :meth:`current` is the round's input."""

    def __init__(self, tokens: int, count: int, seed: int = 0) -> None:
        self.inputs = [make_inputs(tokens, RUN.device, seed + s) for s in range(count)]
        self.state = {"round": 0}

    def current(self) -> dict[str, Any]:
        return self.inputs[self.state["round"] % len(self.inputs)]

    def calibration_step(self) -> int:
        """The observer step of this round (8 steps)."""
        return self.state["round"] % 8


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

    def timed_replay(self, rr: InputRounds) -> Callable[[], float]:
        """A :func:`rounds` variant: the replay on the round's input, timed."""
        return lambda: timed(lambda: self.replay(rr.current()))


def make_inputs(tokens: int, device: str, seed: int) -> dict[str, Any]:
    """Random bf16 latent / text embeddings and a per-token timestep (as the TI2V pipeline passes it)."""
    f, h, w = RUN.latents[tokens]
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(1, 48, f, h, w, generator=g).to(device, torch.bfloat16)
    seq = f * (h // 2) * (w // 2)
    assert seq == tokens
    t = 999.0 * ((seed % 8) + 1) / 8
    ts = torch.full((1, seq), t, dtype=torch.float32, device=device)
    enc = torch.randn(1, *RUN.text, generator=g).to(device, torch.bfloat16)
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
    return torch.cuda.max_memory_allocated() / GIB if RUN.device == "cuda" else float("nan")


def allocated_gib() -> float:
    return torch.cuda.memory_allocated() / GIB if RUN.device == "cuda" else float("nan")


def reset_peak() -> None:
    sync()
    if RUN.device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def build_5b() -> nn.Module:
    """The WAN 2.2 TI2V-5B transformer with seeded random bf16 weights on ``RUN.device`` (2 small blocks under
    ``--smoke``)."""
    from ptq.models.wan import WAN22_TI2V_5B_TRANSFORMER_CONFIG, build_random_transformer

    config = dict(WAN22_TI2V_5B_TRANSFORMER_CONFIG)
    if RUN.smoke:
        config.update(num_layers=2, num_attention_heads=2, attention_head_dim=64, ffn_dim=512, text_dim=RUN.text[1])
    t0 = time.perf_counter()
    model = build_random_transformer(config, seed=0, device=RUN.device)
    sync()
    log(f"built random 5B on {RUN.device} in {time.perf_counter() - t0:.1f}s")
    return model


def loop_one(model: nn.Module, inp: dict[str, Any]) -> None:
    with torch.no_grad():
        model(**inp)
