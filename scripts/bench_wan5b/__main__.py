"""Command line of the WAN 5B benchmark (the parts: the package docstring): arguments, part selection, the results
JSON and table. ``python scripts/bench_wan5b.py``, ``python scripts/bench_wan5b`` and ``python -m bench_wan5b``
(``scripts/`` on ``PYTHONPATH``) are the same command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # ``python scripts/bench_wan5b``: Python put this folder, not scripts/, on sys.path
    sys.path[0] = str(SCRIPTS)
sys.path.insert(0, str(SCRIPTS.parent))  # this checkout's ptq

import torch  # noqa: E402
from torch import nn  # noqa: E402

import bench_wan5b  # noqa: E402
from bench_wan5b import scale  # noqa: E402
from bench_wan5b.amax import part_amax_batch, part_amax_kernel  # noqa: E402
from bench_wan5b.common import (  # noqa: E402
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
from bench_wan5b.cpu_export import part_quant_export_cpu  # noqa: E402
from bench_wan5b.gptq_layers import part_gptq  # noqa: E402
from bench_wan5b.graphs import part_graphs  # noqa: E402
from bench_wan5b.hooks import part_hooks, part_overhead  # noqa: E402
from bench_wan5b.report import table  # noqa: E402
from bench_wan5b.simfwd import part_simfwd  # noqa: E402
from bench_wan5b.tiny import part_tiny  # noqa: E402
from bench_wan5b.vs_modelopt import part_modelopt_5b, part_ptq_memory  # noqa: E402
from ptq.algorithms.qlinear import kernel_options  # noqa: E402
from ptq.algorithms.recipe import QuantRecipe  # noqa: E402

#: ``--part all``
DEFAULT_PARTS = {"hooks", "simfwd", "quant_export", "modelopt", "tiny"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=bench_wan5b.__doc__.splitlines()[0])
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
    return ap.parse_args(argv)


def configure(args: argparse.Namespace) -> set[str]:
    """Set ``RUN`` and the run's environment from ``args``; returns the selected parts."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.smoke:
        RUN.use_smoke()
    RUN.out = Path(args.out)
    RUN.out.mkdir(parents=True, exist_ok=True)
    RESULTS["env"] = {"torch": torch.__version__, "device": args.device, "argv": sys.argv[1:],
                      "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    torch.set_grad_enabled(False)
    return set(DEFAULT_PARTS) if args.part == "all" else set(args.part.split(","))


def run_gpu_parts(parts: set[str], args: argparse.Namespace, export_dir: Path) -> None:
    """The parts of the GPU flow (on CPU under ``--smoke``), in a fixed order; the kernel searches first, so the
    parts after them use the chosen launch shapes."""
    small, large = sorted(RUN.latents)
    reps = {small: args.reps_small, **({large: args.reps_large} if args.reps_large > 0 else {})}
    if "amax_batch" in parts:
        guarded("amax_batch", lambda: part_amax_batch(small))
    if "amax_kernel" in parts:
        guarded("amax_kernel", lambda: part_amax_kernel(small))
    if "graphs" in parts:
        model = build_5b()
        guarded("graphs", lambda: part_graphs(model, reps, simfwd=not args.graphs_hooks_only))
        del model
        free()
    if parts & {"hooks", "simfwd", "quant_export"}:
        model = build_5b()
        run_model_parts(model, parts, reps, export_dir)
        del model
        free()
    for name, fn in (("tiny", lambda: part_tiny(8)), ("modelopt", lambda: part_modelopt_5b(args.calib_forwards, 3)),
                     ("ptqmem", lambda: part_ptq_memory(args.calib_forwards, 3)), ("gptq", part_gptq)):
        if name in parts:
            guarded(name, fn)


def run_model_parts(model: nn.Module, parts: set[str], reps: dict[int, int], export_dir: Path) -> None:
    """``hooks``, then ``simfwd`` / ``quant_export`` on one 5B: the simulated forwards use the statistics the
    hooks part calibrated, stand-ins when it did not run."""

    def hooks() -> dict:
        part_overhead()
        return part_hooks(model, reps)

    stats = guarded("hooks", hooks) if "hooks" in parts else None
    if not stats:
        stats = synthetic_stats(model, block_targets(model, QuantRecipe()))
    if parts & {"simfwd", "quant_export"}:
        guarded("simfwd", lambda: part_simfwd(model, stats, reps if "simfwd" in parts else {},
                                              "quant_export" in parts, export_dir))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    parts = configure(args)
    export_dir = Path(args.export_dir)
    if parts & scale.PARTS:
        scale.run_scale_parts(parts, args, export_dir)
        parts -= scale.PARTS
        if not parts:
            return
    if args.device == "cpu" and not RUN.smoke:
        if parts - {"quant_export"}:
            log(f"on CPU only quant_export runs; skipping {sorted(parts - {'quant_export'})}")
        if "quant_export" in parts:
            part_quant_export_cpu(export_dir)
        print(table())
        return
    with kernel_options(fast_path=True):
        run_gpu_parts(parts, args, export_dir)
    save()
    print(table())


if __name__ == "__main__":
    main()
