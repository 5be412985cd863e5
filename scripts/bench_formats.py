#!/usr/bin/env python3
"""Benchmark the number-format layer (ptq.formats) against the memory-bandwidth floor.

Times, for bf16 weight matrices of WAN 2.2-5B's FFN/attention shapes (14336x3072, 3072x3072):

* ``fp8 weight``    -- ``quantize_fp8_weight`` (amax, checks, per-tensor quantize)
* ``nvfp4 weight``  -- ``nvfp4_global_scale(amax)`` + ``quantize_nvfp4`` (checks, codes, packing)
  + ``to_tiled`` (the cuBLAS scale layout ComfyUI stores)
* ``fp8 fake-q`` / ``nvfp4 fake-q`` -- ``fake_quantize_fp8`` / ``fake_quantize_nvfp4`` (static scale,
  bf16 in, bf16 out), the activation path used during calibration/evaluation

Each is warmed up, then timed ``--runs`` times; the median is reported beside the floor
``(bytes read + bytes written) / bandwidth`` counting one read of the input and one write of the
outputs (a strict lower bound: the real code makes several passes). The bandwidth is measured in the
same run by a large device-to-device ``copy_`` (counting read + write bytes) unless ``--bandwidth``
is given. ``--check`` (default on CUDA) also verifies that the device results equal the CPU results
bit for bit, and, where comfy-kitchen is importable, compares with each of its backends.

Usage: ``PYTHONPATH=. python3 scripts/bench_formats.py [--device cuda] [--runs 20]``
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ptq.formats import (  # noqa: E402
    FP8_MODES,
    NVFP4_DEQUANT_MODES,
    NibbleOrder,
    ScaleLayout,
    dequantize_fp8,
    dequantize_nvfp4,
    fake_quantize_fp8,
    fake_quantize_nvfp4,
    fp8_scale_from_amax,
    nvfp4_global_scale,
    quantize_fp8,
    quantize_fp8_weight,
    quantize_nvfp4,
    to_tiled,
)

DEFAULT_SHAPES = ((14336, 3072), (3072, 3072))
H100_BANDWIDTH = 3.0e12  # B/s, read + write, for reference only


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int, runs: int) -> list[float]:
    """Wall-clock seconds of ``fn`` per run (device synchronised before and after each run)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(runs):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def measure_bandwidth(device: torch.device, nbytes: int, runs: int) -> float:
    """Copy bandwidth in B/s counting bytes read + written (``dst.copy_(src)`` of ``nbytes``)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    t = statistics.median(time_fn(lambda: dst.copy_(src), device, warmup=2, runs=runs))
    return 2 * nbytes / t


def _nvfp4_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = nvfp4_global_scale(w.abs().amax())
    q, s = quantize_nvfp4(w, g, NibbleOrder.HIGH_FIRST, name="bench")
    return q, to_tiled(s), g


def bench(device: torch.device, shapes, warmup: int, runs: int, bandwidth: float) -> list[dict]:
    rows = []
    for shape in shapes:
        n = shape[0] * shape[1]
        gen = torch.Generator(device=device).manual_seed(0)
        w = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(torch.bfloat16)
        fp8_scale = fp8_scale_from_amax(w.abs().amax())
        nv_scale = nvfp4_global_scale(w.abs().amax())
        cases = [
            ("fp8 weight (per-tensor)", lambda w=w: quantize_fp8_weight(w), 2 * n + n),
            ("nvfp4 weight (+global, pack, tiled)", lambda w=w: _nvfp4_weight(w), 2 * n + n // 2 + n // 16),
            ("fp8 fake-quant bf16", lambda w=w, s=fp8_scale: fake_quantize_fp8(w, s), 4 * n),
            ("nvfp4 fake-quant bf16", lambda w=w, s=nv_scale: fake_quantize_nvfp4(w, s), 4 * n),
        ]
        for label, fn, nbytes in cases:
            t = time_fn(fn, device, warmup, runs)
            med = statistics.median(t)
            floor = nbytes / bandwidth
            rows.append(
                dict(
                    op=label,
                    shape=f"{shape[0]}x{shape[1]}",
                    median_ms=med * 1e3,
                    min_ms=min(t) * 1e3,
                    mbytes=nbytes / 1e6,
                    floor_ms=floor * 1e3,
                    ratio=med / floor,
                )
            )
            print(f"  {label:38s} {shape[0]:>5}x{shape[1]:<5} {med * 1e3:10.2f} ms", flush=True)
        del w
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict]) -> None:
    print("| op | shape | median ms | min ms | MB moved (floor) | floor ms | time/floor |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['op']} | {r['shape']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} | {r['mbytes']:.1f} | "
            f"{r['floor_ms']:.3f} | {r['ratio']:.1f} |"
        )


def _eq(a: torch.Tensor, b: torch.Tensor) -> str:
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if a.dtype in (torch.float8_e4m3fn,):
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    if b.dtype in (torch.float8_e4m3fn,):
        b = b.view(torch.uint8)
    if a.dtype != b.dtype:
        return f"dtype {a.dtype} vs {b.dtype}"
    diff = (a != b) if not a.is_floating_point() else ~((a == b) | (torch.isnan(a) & torch.isnan(b)))
    k = int(diff.sum())
    return "bit-exact" if k == 0 else f"{k} of {a.numel()} differ ({k / a.numel():.2e})"


def cross_check(device: torch.device) -> None:
    """Device results vs CPU results (ours), and vs comfy-kitchen's backends where importable."""
    print(f"\n## Cross-check on {device}")
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(3072, 3072, generator=gen)
    chi2 = -2.0 * torch.log(torch.rand(3072, 3072, generator=gen).clamp_min(1e-12))
    inputs = {"normal": torch.randn(3072, 3072, generator=gen), "student_t2": z / torch.sqrt(chi2 / 2.0)}
    results = {}
    for name, x32 in inputs.items():
        for dtype in (torch.float32, torch.bfloat16):
            x = x32.to(dtype)
            xd = x.to(device)
            s8 = fp8_scale_from_amax(x.abs().amax())
            g = nvfp4_global_scale(x.abs().amax())
            key = f"{name}/{str(dtype).removeprefix('torch.')}"
            q_cpu, q_dev = quantize_fp8(x, s8), quantize_fp8(xd, s8.to(device))
            n_cpu, n_dev = quantize_nvfp4(x, g), quantize_nvfp4(xd, g.to(device))
            print(
                f"{key:22s} ours {device} vs cpu: fp8 {_eq(q_dev, q_cpu)}; nvfp4 packed {_eq(n_dev[0], n_cpu[0])}, "
                f"scales {_eq(n_dev[1], n_cpu[1])}; fake-nvfp4 "
                f"{_eq(fake_quantize_nvfp4(xd, g.to(device)), fake_quantize_nvfp4(x, g))}"
            )
            results[key] = (x, xd, s8, g, q_cpu, n_cpu)
    try:
        import comfy_kitchen as ck  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        print(f"comfy-kitchen not importable here ({type(e).__name__}: {e}); skipping backend comparison")
        return
    try:
        from comfy_kitchen.registry import registry

        for bname, info in registry.list_backends().items():
            if bname in ("eager", "cuda", "triton"):
                print(
                    f"ck backend {bname}: available={info['available']} {info.get('unavailable_reason') or ''}"
                )
    except Exception as e:  # pragma: no cover
        print(f"ck registry: {type(e).__name__}: {e}")
    backends = {}
    try:
        from comfy_kitchen.backends.eager import quantization as ck_eager

        backends["eager"] = ck_eager
    except Exception as e:  # pragma: no cover
        print(f"ck eager backend unavailable: {e}")
    if device.type == "cuda":
        for bname, mod in (
            ("cuda", "comfy_kitchen.backends.cuda"),
            ("triton", "comfy_kitchen.backends.triton"),
        ):
            try:
                backends[bname] = __import__(mod, fromlist=["quantize_nvfp4"])
                if bname == "triton":
                    backends[bname] = __import__("comfy_kitchen.backends.triton.quantization", fromlist=["x"])
            except Exception as e:  # pragma: no cover
                print(f"ck {bname} backend unavailable: {type(e).__name__}: {e}")
    for bname, be in backends.items():
        for key, (x, xd, s8, g, _, n_cpu) in results.items():
            dev = device if bname != "eager" else torch.device("cpu")
            xx = xd if dev.type == device.type else x
            msg = []
            try:  # quantize: compare with each of our modes; dequantize: ck's own codes through both
                cq = be.quantize_per_tensor_fp8(xx.contiguous(), s8.to(dev))
                msg.append(
                    "fp8 q vs ours "
                    + ", ".join(f"{m}: {_eq(cq, quantize_fp8(x, s8, mode=m))}" for m in FP8_MODES)
                )
                for od in (torch.float32, torch.bfloat16):
                    cd = be.dequantize_per_tensor_fp8(cq, s8.to(dev), od)
                    ours = {m: dequantize_fp8(cq.cpu(), s8, od, mode=m) for m in ("float32", "ck_eager")}
                    msg.append(
                        f"fp8 dq->{str(od).removeprefix('torch.')} vs ours "
                        + ", ".join(f"{m}: {_eq(cd, v)}" for m, v in ours.items())
                    )
            except Exception as e:  # pragma: no cover
                msg.append(f"fp8 error {type(e).__name__}: {e}")
            try:
                cq, cs = be.quantize_nvfp4(xx.contiguous(), g.to(dev))
                msg.append(f"nvfp4 packed {_eq(cq, n_cpu[0])} scales {_eq(cs, to_tiled(n_cpu[1]))}")
                for od in (torch.float32, torch.bfloat16):
                    cd = be.dequantize_nvfp4(cq, g.to(dev), cs, od)
                    ours = {
                        m: dequantize_nvfp4(cq.cpu(), cs.cpu(), g, layout=ScaleLayout.TILED, dtype=od, mode=m)
                        for m in NVFP4_DEQUANT_MODES
                    }
                    msg.append(
                        f"nvfp4 dq->{str(od).removeprefix('torch.')} vs ours "
                        + ", ".join(f"{m}: {_eq(cd, v)}" for m, v in ours.items())
                    )
            except Exception as e:  # pragma: no cover
                msg.append(f"nvfp4 error {type(e).__name__}: {e}")
            print(f"ck[{bname}] {key}: " + "; ".join(msg))
        if bname != "eager":  # reference timings of comfy-kitchen's fused kernels on the same input
            _, xd, s8, g, _, _ = results["normal/bfloat16"]
            _time_backend(be, bname, xd.contiguous(), s8.to(device), g.to(device), device)


def _time_backend(be, bname: str, x: torch.Tensor, s8: torch.Tensor, g: torch.Tensor, device) -> None:
    cases = (
        (f"ck[{bname}] quantize_per_tensor_fp8", lambda: be.quantize_per_tensor_fp8(x, s8)),
        (f"ck[{bname}] quantize_nvfp4 (tiled scales)", lambda: be.quantize_nvfp4(x, g)),
        ("ours quantize_fp8", lambda: quantize_fp8(x, s8)),
        ("ours quantize_nvfp4 + to_tiled", lambda: to_tiled(quantize_nvfp4(x, g)[1])),
    )
    for label, fn in cases:
        try:
            t = statistics.median(time_fn(fn, device, warmup=3, runs=20))
            print(f"  timing {tuple(x.shape)} {x.dtype}: {label}: {t * 1e3:.3f} ms")
        except Exception as e:  # pragma: no cover
            print(f"  timing {label}: {type(e).__name__}: {e}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--runs", type=int, default=None, help="timed runs (default 5 on cpu, 20 on cuda)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 1 on cpu, 3 on cuda)")
    p.add_argument(
        "--bandwidth",
        type=float,
        default=None,
        help=f"memory bandwidth in B/s (read+write) for the floor; default: measured by a copy "
        f"in this run (H100 reference ~{H100_BANDWIDTH:.1e})",
    )
    p.add_argument("--copy-mb", type=int, default=None, help="size of the bandwidth-probe copy (MB)")
    p.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in DEFAULT_SHAPES))
    p.add_argument(
        "--check",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="cross-check device vs CPU and comfy-kitchen (default: on for cuda)",
    )
    p.add_argument("--no-bench", action="store_true", help="skip the timings (only with --check)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 2
    is_cuda = device.type == "cuda"
    runs = args.runs or (20 if is_cuda else 5)
    warmup = args.warmup if args.warmup is not None else (3 if is_cuda else 1)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]

    name = torch.cuda.get_device_name(device) if is_cuda else (platform.processor() or platform.machine())
    print(
        f"# bench_formats: torch {torch.__version__}, device {device} ({name}), "
        f"threads {torch.get_num_threads()}, runs {runs}, warmup {warmup}"
    )
    if not args.no_bench:
        copy_mb = args.copy_mb or (2048 if is_cuda else 512)
        measured = measure_bandwidth(device, copy_mb * 2**20, runs=max(5, runs))
        bandwidth = args.bandwidth or measured
        print(
            f"copy bandwidth measured: {measured:.3e} B/s (read+write, {copy_mb} MB copy); "
            f"floor uses {bandwidth:.3e} B/s"
        )
        rows = bench(device, shapes, warmup, runs, bandwidth)
        print()
        print_table(rows)
    if args.check if args.check is not None else is_cuda:
        cross_check(device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
