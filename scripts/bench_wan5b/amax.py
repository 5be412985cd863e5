"""Parts ``amax_kernel`` / ``amax_batch``: launch-shape searches for the per-tensor and the batched fused amax kernels
on the 5B's calibration inputs (cold L2, launches captured in one CUDA graph); the fastest correct configuration is
installed in ``ptq.formats.triton_quant`` for the rest of the run."""

from __future__ import annotations

from typing import Any

import torch

from bench_wan5b.common import RESULTS, RUN, log, median, save, sync, timed

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

AMAX_BATCH_CANDIDATES = [  # (rows_per_program, bm, bk, num_warps, stages)
    (480, 32, 64, 2, 3), (480, 32, 128, 4, 3), (960, 32, 64, 2, 3), (240, 32, 64, 2, 3), (480, 64, 64, 4, 3),
    (480, 16, 128, 2, 4), (480, 32, 256, 8, 3), (1440, 32, 64, 2, 4), (480, 32, 64, 4, 2), (320, 32, 128, 4, 3),
    (960, 32, 128, 4, 4), (480, 32, 64, 1, 3),
]


# ------------------------------------------------------------------------------------------- per-tensor kernel


def part_amax_kernel(tokens: int, launches: int = 48, reps: int = 10, buffers: int = 12) -> dict[str, int]:
    """GPU time of one fused amax launch per 5B input shape and launch configuration, with a cold L2 (each launch
    reads another of ``buffers`` inputs, > L2 in all): ``launches`` launches captured in one CUDA graph, replayed
    ``reps`` times. Weighted by how often each shape runs in one forward with sibling sharing (per block: qkv
    (3 destinations), to_out, attn2 to_q, ffn.net.0.proj, attn2.to_out at [tokens, 3072]; attn2 to_k/to_v
    (2 destinations) at [512, 3072]; ffn.net.2 at [tokens, 14336])."""
    from ptq.formats import triton_quant

    blocks = 30
    shapes = {"x3072_3dest": ((tokens, 3072), 3, blocks), "x3072": ((tokens, 3072), 1, 4 * blocks),
              "text_2dest": ((RUN.text[0], 3072), 2, blocks), "x14336": ((tokens, 14336), 1, blocks)}
    saved = dict(triton_quant.AMAX_CONFIG)
    res: dict[str, Any] = {"tokens": tokens, "launches_per_graph": launches, "buffers": buffers}
    best, best_us = saved, float("inf")
    xs = {s: [(torch.randn(shape, device=RUN.device) * 3).to(torch.bfloat16) for _ in range(buffers)]
          for s, (shape, _, _) in shapes.items()}
    for cname, cfg in AMAX_CANDIDATES.items():
        triton_quant.AMAX_CONFIG.clear()
        triton_quant.AMAX_CONFIG.update(cfg)
        row, total = _amax_kernel_row(shapes, xs, launches, reps, buffers)
        if ("error" not in row and total < best_us
                and all(v["correct"] for v in row.values() if isinstance(v, dict))):
            best, best_us = cfg, total
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


def _amax_kernel_row(shapes: dict[str, tuple], xs: dict[str, list[torch.Tensor]], launches: int, reps: int,
                     buffers: int) -> tuple[dict[str, Any], float]:
    """(per-shape timings of the installed configuration, us per forward); an error a launch shape cannot take
    is recorded in the row."""
    row: dict[str, Any] = {}
    total = 0.0
    try:
        for sname, (shape, n_dest, count) in shapes.items():
            us, ok = _amax_launch_us(xs[sname], shape, n_dest, launches, reps, buffers)
            row[sname] = {"us_per_launch": us, "gb_per_s": xs[sname][0].numel() * 2 / (us * 1e-6) / 1e9,
                          "correct": ok}
            total += us * count
        row["us_per_forward"] = total
    except Exception as exc:  # noqa: BLE001 - a launch shape a GPU cannot take
        row["error"] = repr(exc)[:300]
    return row, total


def _amax_launch_us(xs: list[torch.Tensor], shape: tuple[int, int], n_dest: int, launches: int, reps: int,
                    buffers: int) -> tuple[float, bool]:
    """(us per launch over ``xs`` into ``n_dest`` destinations, whether the maxima are right)."""
    from ptq.formats import triton_quant

    dests = [(torch.zeros(shape[-1], device=RUN.device), torch.zeros(9, device=RUN.device)) for _ in range(n_dest)]
    idx = torch.tensor([2], device=RUN.device)

    def launch(x: torch.Tensor) -> None:
        triton_quant.amax_update_(x, dests[0][0], dests[0][1], idx, more=dests[1:])

    for x in xs:
        launch(x)
    sync()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(launches):
            launch(xs[i % buffers])
    g.replay()
    ts = [timed(g.replay) for _ in range(reps)]
    us = median(ts) / launches * 1e6
    ref = torch.stack([x.float().abs().amax(0) for x in xs]).amax(0)
    ok = torch.equal(dests[-1][0], ref)
    del g
    return us, ok


# ---------------------------------------------------------------------------------------------- batched kernel


def part_amax_batch(tokens: int, reps: int = 10) -> dict[str, int]:
    """The batched amax launches of one whole 5B calibration forward (the observer's queue: sibling sharing, up
    to ``AMAX_BATCH_ITEMS`` tensors / ``AMAX_BATCH_BYTES`` per launch) over distinct buffers for all 30 blocks
    (a cold L2, as in the model), captured in one CUDA graph; GPU ms per forward for each launch configuration.
    The fastest is kept for the rest of the run."""
    from ptq.formats import triton_quant

    groups, launches = _forward_amax_launches(tokens)
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
            ms, ok = _amax_batch_ms(groups, launches, reps)
            res[name] = {"ms_per_forward": ms, "tb_per_s": res["bytes_per_forward"] / (ms * 1e-3) / 1e12,
                         "correct": ok}
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


Group = tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]


def _forward_amax_launches(tokens: int) -> tuple[list[Group], list[list[Group]]]:
    """(every (input, destinations) of one forward in forward order, the same split into the observer's
    launches)."""
    from ptq.calibration.observers import AMAX_BATCH_BYTES
    from ptq.formats import triton_quant

    def t(shape: tuple[int, int]) -> torch.Tensor:
        return (torch.randn(shape, device=RUN.device) * 3).to(torch.bfloat16)

    groups = []  # (x, destinations) in forward order
    text = t((RUN.text[0], 3072))
    for _ in range(30):
        for shape, nd in (((tokens, 3072), 3), ((tokens, 3072), 1), ((tokens, 3072), 1), (None, 2),
                          ((tokens, 3072), 1), ((tokens, 3072), 1), ((tokens, 14336), 1)):
            x = text if shape is None else t(shape)
            groups.append((x, [(torch.zeros(x.shape[-1], device=RUN.device), torch.zeros(9, device=RUN.device))
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
    return groups, launches


def _amax_batch_ms(groups: list[Group], launches: list[list[Group]], reps: int) -> tuple[float, bool]:
    """(GPU ms of one forward's launches replayed from a CUDA graph, whether the first block's maxima are
    right)."""
    from ptq.formats import triton_quant

    idx = torch.tensor([2], device=RUN.device)
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
    del g
    return ms, ok
