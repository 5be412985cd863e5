"""Diagnostic: where do QuantLinear's CUDA fast path and its torch reference path part ways (trained tiny WAN)?

Calibrates ``ptq/assets/tiny_wan`` (16 prompts x 8 steps), quantizes it to NVFP4, runs one forward per path and
reports the first Linear whose output differs for an identical input: Triton vs torch-on-CUDA vs torch-on-CPU
activation quantization (differing elements, examples) and the GEMM epilogues. Output: JSON on stdout.

    PYTHONPATH=. python scripts/diag_fastpath.py            # GPU
    DEV=cpu STEPS=1 TRITON_INTERPRET=1 PYTHONPATH=. python scripts/diag_fastpath.py   # CPU, Triton interpreter
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ptq.algorithms.qlinear import QuantLinear, kernel_options  # noqa: E402
from ptq.algorithms.quantize import quantize_  # noqa: E402
from ptq.algorithms.recipe import QuantRecipe  # noqa: E402
from ptq.calibration.observers import LinearInputObserver  # noqa: E402
from ptq.formats import nvfp4  # noqa: E402
from ptq.formats import triton_quant as tq  # noqa: E402
from ptq.models import tiny_wan  # noqa: E402

#: (layer name, its input, its output) of every QuantLinear call of one forward, in call order
Calls = list[tuple[str, torch.Tensor, torch.Tensor]]


def quantized_tiny_wan(device: str, steps: int) -> tuple[nn.Module, torch.Tensor]:
    """The trained tiny WAN transformer on ``device``, calibrated on 16 prompts and quantized to NVFP4, and the
    embeddings of 4 eval prompts."""
    comps = tiny_wan.load_tiny_wan(tiny_wan.TINY_WAN_PATH, dtype=torch.bfloat16, device="cpu")
    tr = comps.transformer.to(device)
    calib = tiny_wan.read_prompts("ptq/data/tiny_calib.txt")[:16]
    evalp = tiny_wan.read_prompts("ptq/data/tiny_eval.txt")[:4]
    emb_c, emb_e = tiny_wan.encode_prompts(comps, calib), tiny_wan.encode_prompts(comps, evalp)
    neg_c = tiny_wan.encode_prompts(comps, [""] * 16)
    names = [n for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")]
    obs = LinearInputObserver(tr, names, num_steps=8)
    with obs:
        tiny_wan.generate_latents(comps, calib, prompt_embeds=emb_c, negative_prompt_embeds=neg_c,
                                  num_inference_steps=steps, seed=7)
    stats = obs.stats()
    obs = None
    quantize_(tr, QuantRecipe(format="nvfp4"), stats, progress=False)
    return tr, emb_e


def record(tr: nn.Module, inputs: dict[str, Any], fast: bool) -> tuple[Calls, torch.Tensor]:
    """One forward on the fast (``fast``) or the reference path: every QuantLinear call, and the output."""
    names = {m: n for n, m in tr.named_modules() if isinstance(m, QuantLinear)}
    rec: Calls = []
    hs = [m.register_forward_hook(lambda m, a, y: rec.append((names[m], a[0].detach().clone(), y.detach().clone())))
          for m in names]
    with kernel_options(fast_path=fast):
        y = tr(**inputs)[0]
    for h in hs:
        h.remove()
    return rec, y


def first_divergence(rf: Calls, rr: Calls) -> tuple[str, int] | None:
    """("input", i) or ("output", i) at the first call where the two paths' inputs, else outputs, differ."""
    for i, ((n, xa, ya), (n2, xb, yb)) in enumerate(zip(rf, rr)):
        assert n == n2
        if not torch.equal(xa, xb):
            return "input", i
        if not torch.equal(ya, yb):
            return "output", i
    return None


def explain(m: QuantLinear, i: int, n: str, xa: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor) -> dict[str, Any]:
    """Activation quantization (Triton vs torch on the device vs torch on CPU) and GEMM epilogues of layer ``m``
    on the input where the paths first differ."""
    x2 = xa.reshape(-1, xa.shape[-1])
    a_tri = tq.nvfp4_activation_values(x2, m.input_scale)
    a_gpu = nvfp4.quantize_nvfp4_activation(x2, m.input_scale).to(torch.bfloat16)
    a_cpu = nvfp4.quantize_nvfp4_activation(x2.cpu(), m.input_scale.cpu()).to(torch.bfloat16)
    alpha = m.epilogue_scale
    d = {"call": i, "layer": n, "shape": list(xa.shape), "contig": xa.is_contiguous(), "stride": list(xa.stride()),
         "out_frac_differ": float((ya != yb).float().mean()),
         "tri_vs_gpu_ref_differ": int((a_tri.view(torch.int16) != a_gpu.view(torch.int16)).sum()),
         "gpu_ref_vs_cpu_ref_differ": int((a_gpu.cpu().view(torch.int16) != a_cpu.view(torch.int16)).sum()),
         "input_scale": float(m.input_scale), "alpha": alpha}
    bad = (a_tri.view(torch.int16) != a_gpu.view(torch.int16)).nonzero()[:3].tolist()
    d["examples"] = [[x2[r, (c // 16) * 16:(c // 16) * 16 + 16].float().tolist(), float(a_tri[r, c]),
                      float(a_gpu[r, c])] for r, c in bad]
    bias = (torch.zeros(m.out_features, dtype=torch.bfloat16, device=x2.device) if m.bias is None
            else m.bias.detach().to(device=x2.device, dtype=torch.bfloat16))
    y_add = torch.addmm(bias, a_gpu, m.weight_values.t(), beta=1, alpha=alpha)
    acc = torch.mm(a_gpu, m.weight_values.t(), out_dtype=torch.float32)
    y_ref = (acc * (m.input_scale * m.weight_scale_2) + m.bias.float()).to(torch.bfloat16)
    d["gemm_addmm_vs_ref_differ"] = float((y_add != y_ref).float().mean())
    acc2 = torch.addmm(torch.zeros_like(acc), a_gpu.float(), m.weight_values.float().t())
    d["mm_fp32out_vs_fp32gemm_differ"] = float((acc != acc2).float().mean())
    ya2 = torch.addmm(bias.float(), a_gpu.float(), m.weight_values.float().t(), alpha=alpha).to(torch.bfloat16)
    d["fp32_addmm_vs_ref_differ"] = float((ya2 != y_ref).float().mean())
    return d


def layers_differing(tr: nn.Module, rr: Calls) -> str:
    """How many layers' fast-path outputs differ from the reference path's on the reference path's inputs."""
    mods = dict(tr.named_modules())
    cnt = 0
    for n, xb, yb in rr:
        with kernel_options(fast_path=True):
            y1 = mods[n](xb)
        cnt += int(not torch.equal(y1, yb))
    return f"{cnt} of {len(rr)}"


def diagnose(device: str, steps: int) -> dict[str, Any]:
    tr, emb_e = quantized_tiny_wan(device, steps)
    g = torch.Generator().manual_seed(123)
    x = torch.randn(4, 48, 9, 16, 16, generator=g).to(device, torch.bfloat16)
    inputs = {"hidden_states": x, "timestep": tiny_wan.expand_timestep(torch.tensor([900.0] * 4), x),
              "encoder_hidden_states": emb_e.to(device, torch.bfloat16), "return_dict": False}
    rf, yf = record(tr, inputs, fast=True)
    rr, yr = record(tr, inputs, fast=False)
    _, yf2 = record(tr, inputs, fast=True)
    out: dict[str, Any] = {"fast_deterministic": bool(torch.equal(yf, yf2)), "model_out_equal": bool(torch.equal(yf, yr)),
                           "model_out_rel": float((yf.float() - yr.float()).norm() / yr.float().norm())}
    div = first_divergence(rf, rr)
    if div is not None:
        kind, i = div
        n, xa, ya = rf[i]
        if kind == "input":
            out["first_input_diff"] = (i, n)
        else:
            out["first_diff"] = explain(dict(tr.named_modules())[n], i, n, xa, ya, rr[i][2])
    out["layers_differing_on_same_input"] = layers_differing(tr, rr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=os.environ.get("DEV", "cuda"), help="default: $DEV, else cuda")
    ap.add_argument("--steps", type=int, default=int(os.environ.get("STEPS", 8)),
                    help="calibration steps (default: $STEPS, else 8)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    off_gpu = torch.device(args.device).type != "cuda"
    if off_gpu and not tq.triton_available(args.device):
        raise SystemExit(f"the fused path cannot run on {args.device}: needs triton and TRITON_INTERPRET=1")
    # off the GPU the fused path runs under Triton's interpreter
    with kernel_options(fast_path_any_device=True) if off_gpu else contextlib.nullcontext():
        print(json.dumps(diagnose(args.device, args.steps), indent=1))


if __name__ == "__main__":
    main()
