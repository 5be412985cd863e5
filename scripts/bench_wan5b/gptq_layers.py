"""Part ``gptq``: GPTQ time per 5B layer shape (NVFP4 "mse" / "four_over_six" scales, FP8), extrapolated to the 300
block Linears."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from bench_wan5b.common import RESULTS, RUN, log, median, save, timed

#: 5B layer shapes: (rows, cols, Linears of that shape per block)
SHAPES = {"3072x3072": (3072, 3072, 8), "ffn0_14336x3072": (14336, 3072, 1), "ffn2_3072x14336": (3072, 14336, 1)}


def part_gptq(reps: int = 2) -> None:
    """GPTQ weight quantization time per 5B layer shape (random W, Hessian from 4,096 random correlated tokens),
    NVFP4 with "mse" and "four_over_six" scales and FP8, extrapolated to the 300 block Linears (per block: 8 x
    [3072, 3072], ffn.net.0 [14336, 3072], ffn.net.2 [3072, 14336])."""
    from ptq.algorithms import gptq

    res: dict[str, Any] = {}
    g = torch.Generator(device=RUN.device).manual_seed(0)
    for key, (rows, cols, per_block) in SHAPES.items():
        if RUN.smoke:
            rows, cols = rows // 48, cols // 48 // 16 * 16
        w = (torch.randn(rows, cols, device=RUN.device, generator=g) * 0.02).to(torch.bfloat16)
        x = torch.randn(4096, cols, device=RUN.device, generator=g)
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
        res[name]["total_300_linears_s"] = 30 * sum(res[name][k] * SHAPES[k][2] for k in SHAPES)
        log(f"gptq {name}: ~{res[name]['total_300_linears_s']:.0f} s for the 300 block Linears")
    RESULTS["gptq_5b"] = res
    save()
