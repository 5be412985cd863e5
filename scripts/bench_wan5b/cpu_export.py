"""Part ``quant_export`` on CPU: ``quantize_`` of the 300 block Linears to NVFP4 + ComfyUI export (safetensors write).
The weights are generated and quantized block by block (the whole bf16 model plus its quantized copy would not fit
in 24 GB at once)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

from bench_wan5b.common import RESULTS, block_targets, log, save, synthetic_stats
from bench_wan5b.simfwd import export_comfyui
from ptq.algorithms.quantize import quantize_
from ptq.algorithms.recipe import QuantRecipe


def materialize_(module: nn.Module, prefix: str, keep: set[str], gen: torch.Generator,
                 dtype: torch.dtype = torch.bfloat16, recurse: bool = True) -> None:
    """Replace meta parameters/buffers of ``module`` (and its children if ``recurse``) by seeded random CPU
    tensors (fp32 for diffusers' keep-in-fp32 modules, ``keep``), one tensor at a time."""
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
            setattr(sub, pname, nn.Parameter(t, requires_grad=False))
        for bname, b in list(sub.named_buffers(recurse=False)):
            if b is not None and b.is_meta:
                setattr(sub, bname, torch.zeros(b.shape, dtype=b.dtype))


def part_quant_export_cpu(export_dir: Path) -> None:
    from ptq.models.wan import build_meta_transformer, fp32_module_names

    torch.set_grad_enabled(False)
    model = build_meta_transformer()
    keep = fp32_module_names(model)
    gen = torch.Generator().manual_seed(0)
    recipe = QuantRecipe(format="nvfp4")
    targets = set(block_targets(model, recipe))
    t_gen = time.perf_counter()
    for name, sub in model.named_children():
        if name != "blocks":
            materialize_(sub, name, keep, gen)
    materialize_(model, "", keep, gen, recurse=False)  # top-level parameters (scale_shift_table)
    gen_s = time.perf_counter() - t_gen
    quant_s = 0.0
    n_q = 0
    for i, block in enumerate(model.blocks):
        t0 = time.perf_counter()
        materialize_(block, f"blocks.{i}", keep, gen)
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
