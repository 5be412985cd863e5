"""Stock ComfyUI with every ComfyUI file ptq writes for WAN 2.2 TI2V-5B (real config, seeded random weights): does it
load, which kernels run, how far ComfyUI's output is from ptq's simulation of that GPU, how fast the diffusion
model's forward is at 1,560 / 3,510 / 27,280 tokens against the bf16 file, and the peak GPU memory, with ComfyUI's
DynamicVRAM on (its default on NVIDIA GPUs) and off (``--disable-dynamic-vram``).

Steps (``all`` = per variant: ``make`` it, one ``comfy`` process per DynamicVRAM setting, optionally delete it; then
the summary. Resumable: runs already in ``results.jsonl`` are skipped, ``--deadline`` stops between files):

* ``make``: ptq builds the random 5B on the GPU, calibrates it on two random forwards (1,560 tokens, t = 900 / 300),
  and writes one ComfyUI file per variant (``VARIANTS``: bf16, FP8 W8A8 and weight-only, NVFP4 W4A4, smoothed
  (``pre_quant_scale``) and weight-only, int8, int8 ConvRot, MXFP8), each verified bit for bit. For each it stores
  ptq's simulation of the GPU it runs on (``ptq.eval.runtimes``, the runtime named by ``--runtime``) on the probe
  input (``refs_<variant>.pt``).
* ``comfy FILE``: a fresh process imports ComfyUI from ``--comfyui`` the way its ``main.py`` starts (DynamicVRAM
  initialised through comfy-aimdo unless ``--no-dynamic-vram``), loads the file with ``comfy.sd.load_diffusion_model``
  (ComfyUI's own safetensors reader when DynamicVRAM is on), puts it on the GPU with ``load_models_gpu`` and times
  ``BaseModel.apply_model`` (what a sampler step calls; output = the raw model prediction) per token count:
  warm-ups, then CUDA-synchronised wall times, median. One forward per size under ``torch.profiler`` gives the
  GPU kernels and their busy time (wall time minus GPU busy time = time the GPU waited for the host). Peak memory:
  the device's used memory (``cudaMemGetInfo``, sampled every millisecond; DynamicVRAM allocates outside PyTorch's
  allocator) minus the process's start. Prints one JSON line.

The summary (``summary.md``, ``results.json`` in ``--work``) gives per file: loaded or the error, the GEMM kernels,
rel. L2 vs ptq's simulation, median ms per size and its ratio to the bf16 file's, peak GiB.

Needs a ComfyUI source tree (``--comfyui``; e.g. the fork ``silveroxides/ComfyUI``: never committed, never run from
CI), comfy-kitchen (its CUDA backend needs torch built for CUDA >= 13), comfy-aimdo, einops and torchsde.

    python scripts/bench_comfyui_gpu.py all --comfyui /tmp/comfyui --work /tmp/cbench
    python scripts/bench_comfyui_gpu.py all --comfyui /tmp/comfyui --work /tmp/cs --smoke   # CPU, tiny model
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
#: token count -> latent [frames, height, width] (patch 1x2x2): 480x832x13, 480x832x33, 704x1280x121
SIZES = {1560: (4, 30, 52), 3510: (9, 30, 52), 27280: (31, 44, 80)}
SMOKE_SIZES = {96: (3, 8, 16)}
#: (warm-up, timed) forwards per token count
REPS = {1560: (2, 6), 3510: (2, 5), 27280: (1, 2), 96: (1, 2)}
#: variant -> QuantRecipe keywords (None: the unquantized bf16 file)
VARIANTS: dict[str, dict[str, Any] | None] = {
    "bf16": None,
    "fp8": {"format": "fp8"},
    "fp8_weight_only": {"format": "fp8", "activation": "none"},
    "nvfp4": {"format": "nvfp4"},
    "nvfp4_smoothquant": {"format": "nvfp4", "smoothing": "smoothquant"},
    "nvfp4_weight_only": {"format": "nvfp4", "activation": "none"},
    "int8": {"format": "int8", "activation": "dynamic"},
    "int8_convrot": {"format": "int8_convrot", "activation": "dynamic"},
    "mxfp8": {"format": "mxfp8", "activation": "dynamic"},
}
TEXT_TOKENS = 512
SIGMA = 0.5  # ComfyUI's flow sigma; the model sees timestep 500


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def probe_input(tokens: int, sizes: dict[int, tuple[int, int, int]], in_ch: int, text_dim: int,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent ``[1, in_ch, f, h, w]`` and text embeddings ``[1, 512, text_dim]``, float32, seeded."""
    g = torch.Generator().manual_seed(seed + tokens)
    f, h, w = sizes[tokens]
    return torch.randn(1, in_ch, f, h, w, generator=g), torch.randn(1, TEXT_TOKENS, text_dim, generator=g)


# ------------------------------------------------------------------------------------------------------- make


def _recipe(spec: dict[str, Any]):  # noqa: ANN202
    from dataclasses import replace

    from ptq.algorithms.recipe import SMOOTHING_METHODS, QuantRecipe

    spec = dict(spec)
    smoothing = replace(SMOOTHING_METHODS[spec.pop("smoothing", "none")], alphas=[0.25, 0.5], rows=512)
    return QuantRecipe(smoothing=smoothing, **spec)


def _calibrate(model: torch.nn.Module, recipes: list, sizes: dict, device: str):  # noqa: ANN202
    """One observer over every layer any recipe quantizes: amax and 256 rows per call, two forwards."""
    from ptq.algorithms.layers import LayerPlanner
    from ptq.calibration.observers import LinearInputObserver

    names = sorted({n for r in recipes for n in LayerPlanner.for_model(model, r).targets(model)})
    tokens = min(sizes)
    x, ctx = probe_input(tokens, sizes, model.config.in_channels, model.config.text_dim, seed=100)
    with LinearInputObserver(model, names, rows_per_call=256) as obs, torch.no_grad():
        for t in (900.0, 300.0):
            model(hidden_states=x.to(device, torch.bfloat16), timestep=torch.tensor([t], device=device),
                  encoder_hidden_states=ctx.to(device, torch.bfloat16), return_dict=False)
    return obs.stats()


def _simulated(model: torch.nn.Module, runtime: str, sizes: dict, device: str) -> dict[int, torch.Tensor]:
    """ptq's simulation of ComfyUI on ``runtime``: the model's prediction for each probe input (float32, CPU)."""
    from ptq.eval.runtimes import get_runtime, simulate

    rt = get_runtime(runtime)
    out = {}
    tokens = min(sizes)
    x, ctx = probe_input(tokens, sizes, model.config.in_channels, model.config.text_dim)
    with simulate(model, rt), torch.no_grad():
        y = model(hidden_states=x.to(device, rt.compute_dtype), timestep=torch.tensor([1000 * SIGMA], device=device),
                  encoder_hidden_states=ctx.to(device, rt.compute_dtype), return_dict=False)[0]
    out[tokens] = y.float().cpu()
    return out


def make_files(work: Path, device: str, runtime: str, smoke: bool, variants: list[str],
               keep_base_on_gpu: bool = True) -> Iterator[tuple[str, dict[str, Any]]]:
    """Write and verify one ComfyUI file per variant, in order, yielding ``(variant, file info)`` after each (the
    caller may run and delete it before the next is written: the 5B's files together need about 50 GiB of disk).
    Stores ptq's simulation of ``runtime`` per variant in ``refs_<variant>.pt`` (and ``refs_unquantized.pt``)."""
    from ptq.algorithms.quantize import quantize_
    from ptq.models.wan import build_random_transformer
    from ptq.targets import export_model

    sizes = SMOKE_SIZES if smoke else SIZES
    config = json.loads((REPO / "ptq/assets/tiny_wan/transformer/config.json").read_text()) if smoke else None
    if config:
        config = {k: v for k, v in config.items() if not k.startswith("_")}
    t0 = time.perf_counter()
    base = build_random_transformer(config, seed=0, device=device)
    log(f"random model built ({sum(p.numel() for p in base.parameters()) / 1e9:.2f}B params, "
        f"{time.perf_counter() - t0:.0f} s)")
    recipes = {name: _recipe(VARIANTS[name]) for name in variants if VARIANTS[name] is not None}
    stats = _calibrate(base, list(recipes.values()), sizes, device) if recipes else None
    torch.save(_simulated(base, runtime, sizes, device), work / "refs_unquantized.pt")
    cfg = SimpleNamespace(targets=["comfyui"], unquantized_dtype="bfloat16", verify=True)
    for name in variants:
        t0 = time.perf_counter()
        base.to(device)
        model = base if VARIANTS[name] is None else copy.deepcopy(base)
        if model is not base:
            quantize_(model, recipes[name], stats, progress=False)
        (res,) = export_model(model, SimpleNamespace(**vars(cfg), filename=f"wan5b_{name}"), work, progress=False)
        if model is not base:
            torch.save(_simulated(model, runtime, sizes, device), work / f"refs_{name}.pt")
            del model
        info = {"path": res.path, "bytes": res.bytes, "verified": res.verified}
        log(f"{name}: {res.bytes / GIB:.2f} GiB, verified {res.verified} ({time.perf_counter() - t0:.0f} s)")
        gc.collect()
        if device == "cuda":
            if not keep_base_on_gpu:
                base.to("cpu")  # ComfyUI's process gets the GPU to itself
            torch.cuda.empty_cache()
        yield name, info
        if name == "mxfp8":  # the layout ptq wrote before: the same bytes with the E8M0 scales typed F8_E8M0
            old = _e8m0_copy(Path(info["path"]))
            (work / "refs_mxfp8_as_f8_e8m0.pt").write_bytes((work / "refs_mxfp8.pt").read_bytes())
            yield "mxfp8_as_f8_e8m0", old


def _e8m0_copy(path: Path) -> dict[str, Any]:
    """A copy of an MXFP8 file with its uint8 block scales stored as float8_e8m0fnu (ptq's layout before it was
    found that ComfyUI's own reader has no F8_E8M0)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    old = {k: v.view(torch.float8_e8m0fnu) if k.endswith("weight_scale") else v for k, v in tensors.items()}
    dest = path.with_name(path.name.replace("wan5b_mxfp8_", "wan5b_mxfp8_as_f8_e8m0_"))
    save_file(old, str(dest), metadata=meta)
    return {"path": str(dest), "bytes": dest.stat().st_size, "verified": None}


# ------------------------------------------------------------------------------------------------ ComfyUI side


def _import_comfyui(root: str, dynamic_vram: bool, cpu: bool) -> None:
    """Import ComfyUI as its ``main.py`` starts it: argument parsing, comfy-aimdo's DynamicVRAM init."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:  # ComfyUI imports it for other models; WAN needs none
        sys.path.insert(0, str(REPO / "scripts"))
        from comfyui_crosscheck import StubFinder

        sys.meta_path.insert(0, StubFinder())
    sys.argv = [sys.argv[0]] + (["--cpu"] if cpu else []) + ([] if dynamic_vram else ["--disable-dynamic-vram"])
    sys.path.insert(0, root)
    import comfy.options

    comfy.options.enable_args_parsing()
    from comfy.cli_args import args, enables_dynamic_vram

    if dynamic_vram:
        import comfy_aimdo.control

        if enables_dynamic_vram():
            comfy_aimdo.control.init(simple_vram_headroom=None, nvml_pressure=not args.disable_nvml_pressure)
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher

    if dynamic_vram and mm.is_nvidia():
        import comfy_aimdo.control

        ok = comfy_aimdo.control.init_devices((d.index, int(args.vram_headroom * GIB))
                                              for d in mm.get_all_torch_devices())
        if not ok:
            raise SystemExit("comfy-aimdo did not initialise: DynamicVRAM unavailable")
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True


class _PeakSampler:
    """Largest device memory in use (``cudaMemGetInfo``) while active, sampled every millisecond."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            time.sleep(0.001)

    def __enter__(self) -> _PeakSampler:
        if torch.cuda.is_available():
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _kernels(prof: torch.profiler.profile) -> dict[str, Any]:
    """GPU busy time and the kernels / ops taking the most of it, from one profiled forward."""
    kernels: dict[str, float] = {}
    ops: dict[str, float] = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0)
        if t <= 0:
            continue
        if e.key.startswith(("aten::", "comfy", "ck::", "triton")) or "::" in e.key:
            ops[e.key] = ops.get(e.key, 0.0) + t
        else:
            kernels[e.key] = kernels.get(e.key, 0.0) + t
    busy = sum(kernels.values()) / 1000
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:10]
    return {"gpu_busy_ms": busy, "kernels": [(k[:120], round(v / 1000, 3)) for k, v in top],
            "ops": [(k, round(v / 1000, 3)) for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:10]]}


def comfy_run(args: argparse.Namespace) -> None:
    """One file in one fresh ComfyUI process: a JSON line on stdout."""
    cpu = not torch.cuda.is_available()
    out: dict[str, Any] = {"file": Path(args.file).name, "dynamic_vram": args.dynamic_vram,
                           "gpu": torch.cuda.get_device_name() if not cpu else "cpu"}
    base_used = 0
    sampler = _PeakSampler()
    try:
        _import_comfyui(args.comfyui, args.dynamic_vram, cpu)  # before any CUDA call, as ComfyUI's main.py
        if not cpu:
            free, total = torch.cuda.mem_get_info()
            base_used = total - free
        sampler.__enter__()
        import comfy.memory_management
        import comfy.model_management as mm
        import comfy.sd

        out["aimdo_enabled"] = bool(comfy.memory_management.aimdo_enabled)
        t0 = time.perf_counter()
        patcher = comfy.sd.load_diffusion_model(args.file)
        mm.load_models_gpu([patcher])
        out["load_s"] = round(time.perf_counter() - t0, 2)
    except Exception as exc:  # noqa: BLE001 - the point is to report what ComfyUI raises
        out["loaded"] = False
        out["error"] = f"{type(exc).__name__}: {exc}"[:400]
        sampler.__exit__()
        print(json.dumps(out), flush=True)
        return
    out["loaded"] = True
    model = patcher.model
    model.model_sampling.calculate_denoised = lambda sigma, model_output, x: model_output  # the raw prediction
    out["compute_dtype"] = str(model.get_dtype_inference()).removeprefix("torch.")
    out["comfy_patcher"] = type(patcher).__name__
    dm = model.diffusion_model
    quantized = [m for m in dm.modules() if getattr(m, "quant_format", None)]
    out["quantized_layers"] = len(quantized)
    out["formats_run_full_precision"] = sorted({m.quant_format for m in quantized if m._full_precision_mm})
    sizes = SMOKE_SIZES if args.smoke else SIZES
    refs = _refs_for(Path(args.work), Path(args.file))
    dev = mm.get_torch_device()
    sigma = torch.tensor([SIGMA], device=dev)
    out["sizes"] = {}
    for tokens in sizes:
        x, ctx = probe_input(tokens, sizes, dm.patch_embedding.in_channels, ctx_dim(dm))
        x, ctx = x.to(dev), ctx.to(dev)

        def fwd(x: torch.Tensor = x, ctx: torch.Tensor = ctx) -> torch.Tensor:
            return model.apply_model(x, sigma, c_crossattn=ctx)

        warm, timed = REPS[tokens]
        res: dict[str, Any] = {}
        with torch.inference_mode():
            if not cpu:
                with contextlib.suppress(RuntimeError):  # DynamicVRAM's allocator may not keep these statistics
                    torch.cuda.reset_peak_memory_stats()
            y = fwd()
            for _ in range(warm - 1):
                fwd()
            _sync()
            times = []
            for _ in range(timed):
                t0 = time.perf_counter()
                fwd()
                _sync()
                times.append((time.perf_counter() - t0) * 1000)
            res["median_ms"] = round(statistics.median(times), 2)
            res["min_ms"] = round(min(times), 2)
            activities = [torch.profiler.ProfilerActivity.CPU] + ([] if cpu else [torch.profiler.ProfilerActivity.CUDA])
            with torch.profiler.profile(activities=activities) as prof:
                t0 = time.perf_counter()
                fwd()
                _sync()
            res["profiled_wall_ms"] = round((time.perf_counter() - t0) * 1000, 2)
            if not cpu:
                res.update(_kernels(prof))
                res["torch_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        if tokens in refs.get("variant", {}):
            r = refs["variant"][tokens]
            res["rel_l2_vs_ptq"] = float((y.float().cpu() - r).norm() / r.norm())
        if tokens in refs.get("unquantized", {}):
            r = refs["unquantized"][tokens]
            res["rel_l2_vs_unquantized_sim"] = float((y.float().cpu() - r).norm() / r.norm())
        out["sizes"][tokens] = res
    sampler.__exit__()
    out["peak_device_gib"] = round((sampler.peak - base_used) / GIB, 2) if not cpu else None
    print(json.dumps(out), flush=True)


def _refs_for(work: Path, file: Path) -> dict[str, dict[int, torch.Tensor]]:
    """ptq's simulated outputs for ``file`` (``variant``) and for the unquantized model, where stored."""
    refs = {}
    name = file.name.removeprefix("wan5b_").split("_comfyui")[0]
    for key, path in (("variant", work / f"refs_{name}.pt"), ("unquantized", work / "refs_unquantized.pt")):
        if path.exists():
            refs[key] = torch.load(path)
    return refs


def ctx_dim(dm: torch.nn.Module) -> int:
    """text_dim of ComfyUI's WAN model (its text embedding's input features)."""
    return dm.text_embedding[0].in_features


# ------------------------------------------------------------------------------------------------------ summary


def summarize(work: Path, results: list[dict[str, Any]]) -> str:
    """The markdown table of ``results`` (one row per file and DynamicVRAM setting)."""
    base = {r["dynamic_vram"]: r for r in results if r["file"].endswith("wan5b_bf16_comfyui.safetensors")
            and r.get("loaded")}
    sizes = sorted({int(t) for r in results if r.get("loaded") for t in r["sizes"]})
    head = ("| file | DynamicVRAM | loaded | GEMM kernels (top, at the largest size) | rel. L2 vs ptq sim. | "
            + " | ".join(f"ms @ {t:,} (x bf16)" for t in sizes) + " | GPU busy ms @ smallest | peak GiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        name = r["file"].removeprefix("wan5b_").removesuffix("_comfyui.safetensors")
        if not r.get("loaded"):
            lines.append(f"| {name} | {r['dynamic_vram']} | **no**: {r.get('error', '?')[:90]} |"
                         + " |" * (head.count("|") - 4))
            continue
        s = {int(k): v for k, v in r["sizes"].items()}
        b = base.get(r["dynamic_vram"])
        cells = []
        for t in sizes:
            ms = s[t]["median_ms"]
            ratio = "" if not b else f" ({ms / b['sizes'][str(t) if str(t) in b['sizes'] else t]['median_ms']:.2f}x)"
            cells.append(f"{ms:.1f}{ratio}")
        big = s[max(sizes)]
        gemms = ", ".join(k.split("(")[0][:40] for k, _ in big.get("kernels", [])[:2]) or "-"
        err = s[min(sizes)].get("rel_l2_vs_ptq", s[min(sizes)].get("rel_l2_vs_unquantized_sim"))
        lines.append(f"| {name} | {r['dynamic_vram']} | yes | {gemms} | "
                     f"{'-' if err is None else f'{err:.2e}'} | " + " | ".join(cells)
                     + f" | {s[min(sizes)].get('gpu_busy_ms', float('nan')):.1f} | {r.get('peak_device_gib')} |")
    return "\n".join(lines)


def _comfy_process(args: argparse.Namespace, path: str, dyn: bool) -> dict[str, Any]:
    """Run ``comfy`` for one file and DynamicVRAM setting in a fresh process; its JSON line (or the failure)."""
    cmd = [sys.executable, __file__, "comfy", path, "--comfyui", args.comfyui, "--work", args.work]
    cmd += (["--smoke"] if args.smoke else []) + ([] if dyn else ["--no-dynamic-vram"])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")), None)
    res = json.loads(line) if line else {"file": Path(path).name, "dynamic_vram": dyn, "loaded": False,
                                         "error": f"process rc {proc.returncode}: {proc.stderr[-300:]}"}
    res["process_s"] = round(time.perf_counter() - t0, 1)
    return res


def run_all(args: argparse.Namespace) -> None:
    """make -> comfy per file and DynamicVRAM setting -> summary. Resumable: runs already in ``results.jsonl`` are
    skipped; with ``--deadline`` no new file is started past that many seconds; ``--delete-files`` removes each
    file once its runs are done."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    device = "cpu" if args.smoke and not torch.cuda.is_available() else "cuda"
    log_path = work / "results.jsonl"
    results = [json.loads(ln) for ln in log_path.read_text().splitlines()] if log_path.exists() else []
    done = {(r["file"], r["dynamic_vram"]) for r in results}
    modes = [False] if device == "cpu" else [True, False]

    def wanted(name: str) -> list[bool]:
        if device == "cpu":
            return modes
        return [d for d in modes if d or args.off_variants is None or name in args.off_variants]

    def pending(name: str) -> bool:
        return any((f"wan5b_{name}_comfyui.safetensors", d) not in done for d in wanted(name))

    order = list(args.variants or VARIANTS)
    todo = [v for v in order if pending(v) or (v == "mxfp8" and pending("mxfp8_as_f8_e8m0"))]
    files = json.loads((work / "files.json").read_text()) if (work / "files.json").exists() else {}
    if todo:
        for name, info in make_files(work, device, args.runtime, args.smoke, todo, keep_base_on_gpu=False):
            files[name] = info
            (work / "files.json").write_text(json.dumps(files, indent=1))
            for dyn in wanted(name):
                if (Path(info["path"]).name, dyn) in done:
                    continue
                res = _comfy_process(args, info["path"], dyn)
                results.append(res)
                log(f"{name} dynamic_vram={dyn}: loaded {res.get('loaded')} ({res['process_s']} s)")
                with open(log_path, "a") as fh:
                    fh.write(json.dumps(res) + "\n")
            if args.delete_files and name != "mxfp8":  # the old-style MXFP8 copy is made from it next
                Path(info["path"]).unlink(missing_ok=True)
                if name == "mxfp8_as_f8_e8m0":
                    Path(files["mxfp8"]["path"]).unlink(missing_ok=True)
            if args.deadline and time.monotonic() - t_start > args.deadline:
                log(f"deadline of {args.deadline} s passed: stopping; run the same command again to go on")
                break
    (work / "results.json").write_text(json.dumps({"files": files, "runs": results}, indent=1))
    table = summarize(work, results)
    (work / "summary.md").write_text(table + "\n")
    print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("all", "make", "comfy"):
        p = sub.add_parser(name)
        if name == "comfy":
            p.add_argument("file")
            p.add_argument("--no-dynamic-vram", dest="dynamic_vram", action="store_false")
        p.add_argument("--comfyui", required=name != "make", help="a ComfyUI source tree")
        p.add_argument("--work", required=True, help="folder for the files, references and results")
        p.add_argument("--runtime", default=None, help="ptq runtime the references simulate (default: hopper; "
                       "cpu with --smoke on a machine without a GPU)")
        p.add_argument("--smoke", action="store_true", help="the tiny model's config on the CPU (checks the flow)")
        p.add_argument("--variants", nargs="*", default=None, choices=list(VARIANTS),
                       help="files to write and run (default: all)")
        p.add_argument("--off-variants", nargs="*", default=None,
                       help="variants also run with DynamicVRAM off (default: all)")
        p.add_argument("--deadline", type=float, default=None,
                       help="all: start no new file after this many seconds (run again to go on)")
        p.add_argument("--delete-files", action="store_true",
                       help="all: delete each file once its runs are done (the 5B's files need ~50 GiB together)")
    args = ap.parse_args()
    args.runtime = args.runtime or ("cpu" if args.smoke and not torch.cuda.is_available() else "hopper")
    sys.path.insert(0, str(REPO))
    if args.cmd == "all":
        run_all(args)
    elif args.cmd == "make":
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        files = dict(make_files(work, "cpu" if args.smoke else "cuda", args.runtime, args.smoke,
                                args.variants or list(VARIANTS)))
        (work / "files.json").write_text(json.dumps(files, indent=1))
    else:
        comfy_run(args)


if __name__ == "__main__":
    main()
