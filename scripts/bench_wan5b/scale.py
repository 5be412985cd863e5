"""Parts ``gptq_batched``, ``e2e``, ``export``, ``dist`` (issue 15's scale measurements): batched vs per-layer GPTQ on
the 5B's 300 block Linears, the best recipes end to end on the real 5B config (peak GPU memory, host memory, export +
verify time), export + verification time alone, and 1 vs 2 processes giving the same bytes.

* ``gptq_batched``: seeded random bf16 weights of the 300 block Linears (per block 8 x [3072, 3072],
  ``ffn.net.0`` [14336, 3072], ``ffn.net.2`` [3072, 14336]), one synthetic Hessian per distinct input of each block
  (q/k/v share one, cross-attention k/v share one: 7 per block) from 4,096 random correlated tokens. Times
  ``gptq_quantize_many`` on all 300 (CUDA graphs on, and off for one recipe) for NVFP4 "mse", NVFP4
  Four-over-Six and FP8 "mse", and the per-layer ``gptq.quantize_gptq`` on the first ``--gptq-old-blocks`` blocks
  (x 30 / that: the old path's time for 300); on those layers also how far the two agree (equal weights, ratio of
  layer-output errors ``trace((W-Q) H (W-Q)^T)``). Target: <= 60 s per recipe for the 300.
* ``e2e``: ``python -m ptq run config=wan_nvfp4 quant=RECIPE model.path=--wan5b-dir`` for the all-NVFP4 best recipe
  (``nvfp4_gptq_4o6_act_mse``) and the mixed-precision one (``nvfp4_mixed``), Hessians in host memory; reads the
  report (peak GPU memory overall and per phase, phase times incl. export + verification of both files) and the
  child's peak host RSS. Target: peak GPU memory <= 24 GB.
* ``export``: the random 5B quantized to NVFP4 (max), both exports written and verified (``export_model``), write
  and verify timed apart. Target: <= 15 s for both with verification.
* ``dist``: the random tiny model, GPTQ + MSE recipe, ``python -m ptq run`` vs ``torchrun --nproc-per-node 2``
  (gloo when the ranks share one GPU): export sha256s, report accuracy and per-layer input scales compared.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from bench_wan5b.common import (
    GIB,
    REPO,
    RESULTS,
    RUN,
    block_targets,
    build_5b,
    free,
    guarded,
    log,
    save,
    synthetic_stats,
)
from ptq.algorithms.recipe import QuantRecipe

#: (layer, rows, cols, Hessian group) of one 5B block; the group names the input the layer reads.
BLOCK_LAYERS = [("attn1.to_q", 3072, 3072, "x1"), ("attn1.to_k", 3072, 3072, "x1"), ("attn1.to_v", 3072, 3072, "x1"),
                ("attn1.to_out.0", 3072, 3072, "o1"), ("attn2.to_q", 3072, 3072, "x2"),
                ("attn2.to_k", 3072, 3072, "txt"), ("attn2.to_v", 3072, 3072, "txt"),
                ("attn2.to_out.0", 3072, 3072, "o2"), ("ffn.net.0.proj", 14336, 3072, "f0"),
                ("ffn.net.2", 3072, 14336, "f2")]
GPTQ_RECIPES = {"nvfp4_mse": ("nvfp4", "mse"), "nvfp4_four_over_six": ("nvfp4", "four_over_six"),
                "fp8_mse": ("fp8", "mse")}


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


# ---------------------------------------------------------------------------------------------------------------
# batched GPTQ
# ---------------------------------------------------------------------------------------------------------------


def synthetic_5b_layers(blocks: int, device: str, scale: int = 1) -> tuple[dict[str, torch.Tensor],
                                                                          dict[str, torch.Tensor]]:
    """Weights and Hessians of ``blocks`` 5B blocks (dimensions divided by ``scale`` for smoke runs); layers of
    one group share one Hessian tensor object, as the observer hands them out."""
    g = torch.Generator(device=device).manual_seed(0)
    weights, hessians = {}, {}
    for b in range(blocks):
        groups: dict[str, torch.Tensor] = {}
        for name, rows, cols, group in BLOCK_LAYERS:
            rows, cols = rows // scale, cols // scale // 16 * 16
            key = f"blocks.{b}.{name}"
            weights[key] = (torch.randn(rows, cols, device=device, generator=g) * 0.02).to(torch.bfloat16)
            if group not in groups:
                x = torch.randn(4096 // scale, cols, device=device, generator=g)
                x = x + 0.5 * x.roll(1, dims=1)
                groups[group] = x.t() @ x / x.shape[0]
                del x
            hessians[key] = groups[group]
    return weights, hessians


def _agreement(fmt: Any, w: torch.Tensor, h: torch.Tensor, a: Any, b: Any) -> tuple[float, float]:
    from ptq.algorithms import gptq

    qa, qb = fmt.dequantize_weight(a), fmt.dequantize_weight(b)
    ea, eb = gptq.layer_output_error(w, qa, h), gptq.layer_output_error(w, qb, h)
    return float((qa == qb).float().mean()), eb / ea if ea > 0 else 1.0


def part_gptq_batched(device: str, *, old_blocks: int = 1, batch_gib: float = 0.0, smoke: bool = False
                      ) -> dict[str, Any]:
    from ptq.algorithms import gptq
    from ptq.algorithms.gptq_batched import gptq_quantize_many
    from ptq.algorithms.recipe import GPTQWeight
    from ptq.algorithms.weight_quant import WeightContext
    from ptq.formats import get_format

    blocks = 2 if smoke else 30
    t_gen, (weights, hessians) = _timed(lambda: synthetic_5b_layers(blocks, device, 16 if smoke else 1))
    log(f"gptq_batched: {len(weights)} Linears, {len({id(h) for h in hessians.values()})} Hessians in {t_gen:.1f}s")
    max_bytes = int(batch_gib * GIB) if batch_gib > 0 else None
    old_names = [n for n in weights if int(n.split(".")[1]) < old_blocks]
    res: dict[str, Any] = {"linears": len(weights), "blocks": blocks, "batch_gib": batch_gib or "auto",
                           "old_path_blocks": old_blocks}
    for label, (fmt_name, scales) in GPTQ_RECIPES.items():
        fmt, cfg = get_format(fmt_name), GPTQWeight(scales=scales)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t_new, new = _timed(lambda fmt=fmt, cfg=cfg: gptq_quantize_many(weights, hessians, fmt, cfg,
                                                                        max_bytes=max_bytes))
        peak = torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else float("nan")
        entry: dict[str, Any] = {"batched_s": t_new, "batched_peak_gib": peak}
        if label == "nvfp4_four_over_six":
            t_eager, _ = _timed(lambda fmt=fmt, cfg=cfg: gptq_quantize_many(weights, hessians, fmt, cfg,
                                                                            max_bytes=max_bytes, cuda_graphs=False))
            entry["batched_eager_s"] = t_eager
        old: dict[str, Any] = {}
        t_old = 0.0
        for n in old_names:
            dt, old[n] = _timed(lambda n=n, fmt=fmt, cfg=cfg: gptq.quantize_gptq(
                weights[n], fmt, cfg, WeightContext(n, hessian=hessians[n])))
            t_old += dt
        agree = [_agreement(fmt, weights[n], hessians[n], old[n], new[n]) for n in old_names]
        entry.update(old_path_measured_s=t_old, old_path_300_s=t_old * blocks / max(old_blocks, 1),
                     equal_weights_min=min(a for a, _ in agree), error_ratio_max=max(abs(r - 1) for _, r in agree) + 1,
                     bit_identical_layers=sum(a == 1.0 for a, _ in agree), compared_layers=len(agree))
        res[label] = entry
        log(f"gptq {label}: batched {t_new:.1f}s (peak {peak:.1f} GiB) vs per-layer ~{entry['old_path_300_s']:.0f}s"
             f"; {entry['bit_identical_layers']}/{len(agree)} layers identical, min equal "
             f"{entry['equal_weights_min']:.4f}, worst error ratio {entry['error_ratio_max']:.4f}")
        del new, old
    return res


# ---------------------------------------------------------------------------------------------------------------
# end to end, export, processes
# ---------------------------------------------------------------------------------------------------------------


def _ptq_run(args: list[str], out: Path, *, launcher: list[str] | None = None, env: dict[str, str] | None = None,
             timeout: int = 3000) -> tuple[subprocess.CompletedProcess, float, float]:
    """(process, wall seconds, peak RSS GiB of the largest child so far) of one ``python -m ptq run``."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    full_env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", **(env or {})}
    cmd = [*(launcher or [sys.executable]), "-m", "ptq", "run", *args, f"hydra.run.dir={out}", "progress=false"]
    log(" ".join(cmd))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=out.parent)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    if proc.returncode != 0:
        log(f"FAILED ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc, wall, rss


def part_e2e(wan5b_dir: str, out_root: Path, *, prompts: int, recipes: list[str], batch_gib: float
             ) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for recipe in recipes:
        out = out_root / f"e2e_{recipe}"
        args = ["config=wan_nvfp4", f"quant={recipe}", f"model.path={wan5b_dir}", f"calib.num_prompts={prompts}",
                "calib.hessian_storage=host", f"quant.weight.batch_gib={batch_gib}",
                "calib.checkpoint_every=0",  # a 5B GPTQ checkpoint holds 31.5 GB of Hessians: not on a 64 GB disk
                f"eval.cache_dir={out_root / 'cache'}"]
        if recipe == "nvfp4_mixed":
            args.append("quant.mixed.sensitivity_inputs=1")  # memory, not quality: one recorded forward
        proc, wall, rss = _ptq_run(args, out)
        entry: dict[str, Any] = {"args": args, "returncode": proc.returncode, "wall_s": wall,
                                 "max_child_rss_gib_so_far": rss}
        if proc.returncode == 0:
            rep = json.loads((out / "report.json").read_text())
            run = rep["run"]
            entry.update(peak_gpu_gib=run.get("peak_gpu_gib"), peak_gpu_gib_by_phase=run.get("peak_gpu_gib_by_phase"),
                         timings_s=rep["timings_s"], exports=[(e["target"], e["bytes"], e["verified"])
                                                              for e in rep["exports"]],
                         accuracy=rep["accuracy"]["mean_final"])
            log(f"e2e {recipe}: peak GPU {entry['peak_gpu_gib']:.2f} GiB, export+verify "
                 f"{entry['timings_s'].get('export', float('nan')):.1f}s, wall {wall:.0f}s, host RSS <= {rss:.1f} GiB")
        res[recipe] = entry
    return res


def part_export(model: torch.nn.Module, stats: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """``model`` (the random 5B) quantized to NVFP4 (max, ``stats``: stand-in statistics), both exports written
    and verified, write and verify timed apart."""
    from ptq.algorithms.quantize import quantize_
    from ptq.targets import export_model

    quantize_(model, QuantRecipe(format="nvfp4"), stats, progress=False)
    out: dict[str, Any] = {}
    for verify in (False, True):
        cfg = SimpleNamespace(targets=["comfyui", "diffusers"], verify=verify, filename="wan5b_nvfp4",
                              unquantized_dtype="bfloat16")
        dt, results = _timed(lambda cfg=cfg: export_model(model, cfg, out_dir, progress=False))
        out["write_and_verify_s" if verify else "write_s"] = dt
        out["files"] = [(r.target, r.bytes, r.verified) for r in results]
    out["verify_s"] = out["write_and_verify_s"] - out["write_s"]
    log(f"export: write {out['write_s']:.1f}s, write + verify {out['write_and_verify_s']:.1f}s ({out['files']})")
    for f in out_dir.rglob("*.safetensors"):
        f.unlink()
    return out


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def part_dist(out_root: Path) -> dict[str, Any]:
    """N=1 vs N=2 processes on the random tiny model (device: the GPU if there is one)."""
    from ptq.models.tiny_wan import build_random_tiny_wan, save_tiny_wan

    model_dir = out_root / "tiny_random"
    if not model_dir.exists():
        save_tiny_wan(build_random_tiny_wan(seed=0), model_dir)
    args = ["config=tiny_nvfp4", "quant=nvfp4_gptq_4o6_act_mse", "export.filename=model", f"model.path={model_dir}",
            "calib.num_prompts=5",
            "calib.num_steps=4", "eval.num_prompts=3", "eval.num_steps=4", "eval.decode=false"]
    gpus = torch.cuda.device_count()
    env = {} if gpus >= 2 else {"PTQ_DIST_BACKEND": "gloo"}
    runs = {}
    for n in (1, 2):
        out = out_root / f"dist_n{n}"
        launcher = None if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        "--nproc-per-node", str(n)]
        proc, wall, _ = _ptq_run([*args, f"eval.cache_dir={out_root / f'dist_cache{n}'}"], out, launcher=launcher,
                                 env={**env, "OMP_NUM_THREADS": "1"})
        runs[n] = (proc.returncode, wall, out)
    res: dict[str, Any] = {"backend": "nccl" if gpus >= 2 else "gloo", "wall_s": {n: r[1] for n, r in runs.items()}}
    if all(r[0] == 0 for r in runs.values()):
        files = ["model_comfyui.safetensors", "model_diffusers/transformer/diffusion_pytorch_model_bfl.safetensors"]
        a, b = runs[1][2], runs[2][2]
        ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
        res.update(identical_exports=all(_digest(a / f) == _digest(b / f) for f in files),
                   identical_accuracy=ra["accuracy"] == rb["accuracy"],
                   identical_input_scales=[r["input_scale"] for r in ra["layers"]] == [r["input_scale"] for r in
                                                                                      rb["layers"]])
    log(f"dist: {res}")
    return res


def table(results: dict[str, Any]) -> str:
    rows = ["| measurement | value | target |", "|---|---|---|"]
    g = results.get("gptq_batched", {})
    for label in GPTQ_RECIPES:
        if label in g:
            e = g[label]
            eager = f", eager {e['batched_eager_s']:.1f} s" if "batched_eager_s" in e else ""
            rows.append(f"| GPTQ {label}, {g['linears']} Linears: batched / per-layer | {e['batched_s']:.1f} s{eager} / "
                        f"~{e['old_path_300_s']:.0f} s ({e['bit_identical_layers']}/{e['compared_layers']} layers "
                        f"identical, worst error ratio {e['error_ratio_max']:.4f}) | <= 60 s |")
    for recipe, e in results.get("e2e", {}).items():
        if e.get("returncode") == 0:
            rows.append(f"| {recipe} end to end: peak GPU / export+verify / wall | {e['peak_gpu_gib']:.2f} GiB / "
                        f"{e['timings_s'].get('export', float('nan')):.1f} s / {e['wall_s']:.0f} s | <= 24 GB |")
    x = results.get("export_5b")
    if x:
        rows.append(f"| 5B NVFP4 both exports: write / write+verify | {x['write_s']:.1f} s / "
                    f"{x['write_and_verify_s']:.1f} s | <= 15 s |")
    d = results.get("dist")
    if d and "identical_exports" in d:
        rows.append(f"| N=1 vs N=2 ({d['backend']}): exports / accuracy / input scales identical | "
                    f"{d['identical_exports']} / {d['identical_accuracy']} / {d['identical_input_scales']} | all "
                    "True |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------------------------
# the parts from the command line
# ---------------------------------------------------------------------------------------------------------------

PARTS = {"gptq_batched", "e2e", "export", "dist"}


def run_scale_parts(parts: set[str], args: argparse.Namespace, export_dir: Path) -> None:
    """The selected parts, each guarded so one failure keeps the others' numbers; prints their table."""
    assert RUN.out is not None
    out = RUN.out
    jobs: dict[str, Callable[[], Any]] = {
        "gptq_batched": lambda: part_gptq_batched(RUN.device, old_blocks=args.gptq_old_blocks,
                                                  batch_gib=args.batch_gib, smoke=RUN.smoke),
        "export_5b": lambda: part_export(*_quantizable_5b(), export_dir),
        "dist": lambda: part_dist(out),
        "e2e": lambda: part_e2e(args.wan5b_dir, out, prompts=args.e2e_prompts,
                                recipes=args.e2e_recipes.split(","), batch_gib=args.e2e_batch_gib),
    }
    for key, fn in jobs.items():
        if (key if key != "export_5b" else "export") not in parts:
            continue

        def store(key: str = key, fn: Callable[[], Any] = fn) -> None:
            RESULTS[key] = fn()

        guarded(key, store)
        free()
        save()
    print(table(RESULTS))


def _quantizable_5b() -> tuple[torch.nn.Module, dict[str, Any]]:
    model = build_5b()
    return model, synthetic_stats(model, block_targets(model, QuantRecipe()))
