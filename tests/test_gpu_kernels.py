"""Fused Triton kernels (``ptq.formats.triton_quant``) are bit-exact with the torch reference; QuantLinear's CUDA
fast path agrees with its CPU path; the fused observer gives the same statistics as the torch one.

The reference is the torch code run on CPU (comfy-kitchen's eager arithmetic). The same torch code run on CUDA is
not always identical: CUDA torch divides by a Python scalar as a multiplication by its float32 reciprocal, so
``block_amax / 6 / g`` can land on the other side of a float8 rounding tie (see :func:`tie_blocks`).

GPU tests are marked ``gpu`` (skipped without CUDA). ``test_kernels_in_triton_interpreter`` runs the same
bit-exactness checks on CPU through Triton's interpreter when triton is installed and no GPU is present.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ptq.formats import fp8, nvfp4

ROOT = Path(__file__).resolve().parents[1]


def adversarial(rows: int = 96, k: int = 512, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                device: str = "cpu") -> torch.Tensor:
    """Rows spanning 12 decades, zero / negative-zero blocks, E2M1 ties, tiny and huge values, heavy tails."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * torch.logspace(-6, 6, rows).unsqueeze(1)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    x[0] = 0.0
    x[1, :16] = 0.0
    x[1, 16:32] = -0.0
    x[2] = torch.cat([ties, -ties]).repeat(k // 16)
    x[3] = 1e-30
    x[4] = 3e30 if dtype != torch.float16 else 6e4
    x[5, ::2] = -x[5, ::2]
    x[6] = torch.cat([ties * 2.0**-8, -ties * 2.0**7]).repeat(k // 16)
    x[8:] = torch.distributions.StudentT(2.0).sample((rows - 8, k)) * torch.rand(rows - 8, 1) * 10
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    return x.to(dtype).to(device)


def all_bf16_values(device: str = "cpu") -> torch.Tensor:
    """Every finite bfloat16 value, as a [n, 16] matrix."""
    v = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    v = v[torch.isfinite(v)]
    return v[: v.numel() // 16 * 16].reshape(-1, 16).to(device)


def tie_blocks(amax: float = 12.25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 blocks whose NVFP4 block scale ``block_amax / 6 / g`` is exactly halfway between two float8_e4m3fn
    values (``g`` = the global scale of a tensor with amax ``amax``): ties, where CUDA torch's reciprocal
    multiplication rounds the other way for ~1/4 of the blocks at amax 12.25. Returns ``(x [n, 16], g)``."""
    vals = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float().unique()
    a = ((vals[1:] + vals[:-1]) / 2).double() * amax / 448
    a = a[(a.to(torch.bfloat16).double() == a) & (a > 0)].float()
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(4):
        x = (torch.rand(a.numel(), 16, generator=g) * 2 - 1) * a.unsqueeze(1)
        x[:, r * 3] = a if r % 2 == 0 else -a
        rows.append(x)
    return torch.cat(rows).to(torch.bfloat16), nvfp4.nvfp4_global_scale(torch.tensor(amax))


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(a.view(ints), b.view(ints))


def check_nvfp4_kernel(device: str) -> None:
    from ptq.formats import triton_quant as tq

    cases = []
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        for seed in range(2):
            x = adversarial(dtype=dtype, seed=seed, device=device)
            amax = x.float().abs().max()
            for g in (nvfp4.nvfp4_global_scale(amax), nvfp4.nvfp4_global_scale(amax * 0.05),
                      torch.tensor(1e-20, device=device), torch.tensor(1e3, device=device)):
                cases.append((x, g.to(device)))
    cases.append((all_bf16_values(device), torch.tensor(0.0123, device=device)))
    cases.append((torch.randn(3, 7, 48, device=device, dtype=torch.bfloat16), torch.tensor(0.002, device=device)))
    for a in (12.25, 3.0, 0.6875):
        x, g = tie_blocks(a)
        cases.append((x.to(device), g.to(device)))
    for x, g in cases:  # reference: the torch code on CPU
        ref = nvfp4.quantize_nvfp4_activation(x.cpu(), g.cpu()).to(torch.bfloat16)
        got = tq.nvfp4_activation_values(x, g).cpu()
        assert _same_bits(ref, got), f"nvfp4 mismatch dtype={x.dtype} g={float(g)}"
        got32 = tq.nvfp4_activation_values(x, g, out_dtype=torch.float32).cpu()
        assert _same_bits(nvfp4.quantize_nvfp4_activation(x.cpu(), g.cpu()), got32)


def check_fp8_kernel(device: str) -> None:
    from ptq.formats import triton_quant as tq

    xs = [adversarial(dtype=d, seed=s, device=device) for d in (torch.bfloat16, torch.float32) for s in range(2)]
    xs.append(all_bf16_values(device))
    for x in xs:
        amax = x.float().abs().max()
        for frac in (1.0, 0.1, 1e-4, 10.0):
            s = fp8.fp8_scale_from_amax((amax * frac).clamp(max=3e38)).to(device)
            for mode in ("ck_eager", "float32"):
                ref = fp8.quantize_fp8(x.cpu(), s.cpu(), mode=mode, validate=False)
                got = tq.fp8_activation_codes(x, s, mode=mode).cpu()
                assert got.dtype == fp8.FP8_DTYPE
                assert _same_bits(ref, got), f"fp8 mismatch dtype={x.dtype} mode={mode} frac={frac}"
                for out_dtype in (torch.bfloat16, torch.float32):  # the values kernel: codes.to(out_dtype)
                    vals = tq.fp8_activation_values(x, s, mode=mode, out_dtype=out_dtype).cpu()
                    assert _same_bits(ref.to(out_dtype), vals), f"fp8 values mismatch {x.dtype} {mode} {frac}"


def check_amax_kernel(device: str) -> None:
    """Fused amax update == torch: per channel and per step, up to four destinations, step read from a tensor."""
    from ptq.formats import triton_quant as tq

    for shape in ((1440, 3072), (3, 517, 304), (5, 48), (100, 300)):
        g = torch.Generator().manual_seed(shape[-1])
        x = (torch.randn(shape, generator=g) * torch.logspace(-2, 2, shape[-1])).to(torch.bfloat16)
        ref_ch = x.float().abs().reshape(-1, shape[-1]).amax(0)
        x = x.to(device)
        for n_dest in (1, 2, 4):
            ch0 = [torch.rand(shape[-1], generator=g).to(device) for _ in range(n_dest)]
            chs = [c.clone() for c in ch0]
            steps = [torch.zeros(5, device=device) for _ in range(n_dest)]
            idx = torch.tensor([3], device=device)
            tq.amax_update_(x, chs[0], steps[0], idx, more=list(zip(chs[1:], steps[1:])))
            for c, c0, st in zip(chs, ch0, steps):
                assert torch.equal(c.cpu(), torch.maximum(c0.cpu(), ref_ch))
                assert torch.equal(st.cpu(), torch.tensor([0, 0, 0, float(ref_ch.max()), 0]))
        ch, st = torch.zeros(shape[-1], device=device), torch.zeros(4, device=device)
        tq.amax_update_(x, ch, st, 1)  # step as an int; out-of-range ints leave step_amax alone
        tq.amax_update_(x, ch, st, 7)
        assert torch.equal(ch.cpu(), ref_ch) and torch.equal(st.cpu(), torch.tensor([0, float(ref_ch.max()), 0, 0]))
    with pytest.raises(ValueError, match="at most"):
        tq.amax_update_(x, ch, None, more=[(ch, None)] * 4)
    # batched: up to four tensors of different shapes (and destination counts) in one launch
    g = torch.Generator().manual_seed(5)
    xs = [(torch.randn(shape, generator=g) * 3).to(torch.bfloat16) for shape in
          ((1000, 192), (2, 37, 64), (1, 96), (517, 320))]
    for n_items in (1, 3, 4):
        items, refs = [], []
        for i, xb in enumerate(xs[:n_items]):
            dests = [(torch.rand(xb.shape[-1], generator=g).to(device), torch.zeros(3, device=device))
                     for _ in range(1 + i % 3)]
            refs.append([(torch.maximum(c.cpu(), xb.float().abs().reshape(-1, xb.shape[-1]).amax(0)),
                          float(xb.float().abs().max())) for c, _ in dests])
            items.append((xb.to(device), dests))
        tq.amax_update_batch_(items, torch.tensor([1], device=device))
        for (_, dests), ref in zip(items, refs):
            for (c, st), (rc, rmax) in zip(dests, ref):
                assert torch.equal(c.cpu(), rc) and st.cpu().tolist() == [0.0, rmax, 0.0]
    c = torch.zeros(192, device=device)
    tq.amax_update_batch_([(xs[0].to(device), [(c, None)])])  # no step statistics
    assert torch.equal(c.cpu(), xs[0].float().abs().amax(0))


def check_observer_fused(device: str) -> None:
    """The fused observer path (shared launches for siblings, device-side step) == the torch path."""
    from ptq.calibration.observers import LinearInputObserver

    model = _sibling_model().to(device)
    g = torch.Generator().manual_seed(1)
    xs = [(torch.randn(2, 33, 256, generator=g) * (i + 1)).to(torch.bfloat16).to(device) for i in range(4)]
    stats = {}
    for backend, batch in (("torch", 4), ("triton", 4), ("triton", 1)):
        obs = LinearInputObserver(model, num_steps=2, amax_backend=backend, amax_batch=batch)
        with obs, torch.no_grad():
            for i, x in enumerate(xs):
                obs.step = (0, 1, 5, 1)[i]  # step 5 is outside the schedule: channel maxima only
                model(x)
        stats[backend, batch] = obs.stats()
    a_all = stats["torch", 4]
    for key in (("triton", 4), ("triton", 1)):
        assert set(a_all) == set(stats[key]) == {"to_q", "to_k", "out"}
        for name, a in a_all.items():
            b = stats[key][name]
            assert torch.equal(a.channel_amax, b.channel_amax) and torch.equal(a.step_amax, b.step_amax), name
            assert (a.calls, a.tokens) == (b.calls, b.tokens) == (4, 4 * 66)
    ref = max(float(x.float().abs().max()) for x in xs[1::2])
    assert float(stats["triton", 4]["to_q"].step_amax[1]) == ref


# --------------------------------------------------------------------------------------------------
# CPU: Triton's interpreter (only where triton is installed and no GPU is present)
# --------------------------------------------------------------------------------------------------

_INTERPRET_SNIPPET = """
import sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from test_gpu_kernels import check_amax_kernel, check_fp8_kernel, check_nvfp4_kernel, check_observer_fused
check_nvfp4_kernel("cpu"); check_fp8_kernel("cpu"); check_amax_kernel("cpu"); check_observer_fused("cpu")
print("interpreter-ok")
"""


@pytest.mark.slow
def test_kernels_in_triton_interpreter() -> None:
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the GPU tests below cover the kernels")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = _INTERPRET_SNIPPET.format(root=str(ROOT), tests=str(ROOT / "tests"))
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert "interpreter-ok" in res.stdout, res.stderr[-3000:]


# --------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_nvfp4_activation_kernel_bit_exact() -> None:
    check_nvfp4_kernel("cuda")


@pytest.mark.gpu
def test_fp8_activation_kernel_bit_exact() -> None:
    check_fp8_kernel("cuda")


@pytest.mark.gpu
def test_nvfp4_kernel_large_random() -> None:
    from ptq.formats import triton_quant as tq

    for shape in ((1440, 3072), (4099, 14336), (2, 512, 3072)):
        x = (torch.randn(shape, device="cuda") * torch.rand(shape[-1], device="cuda") * 5).to(torch.bfloat16)
        xc = x.cpu()
        for frac in (1.0, 0.2):
            g = nvfp4.nvfp4_global_scale(xc.float().abs().max() * frac)
            ref = nvfp4.quantize_nvfp4_activation(xc, g).to(torch.bfloat16)
            assert _same_bits(ref, tq.nvfp4_activation_values(x, g.cuda()).cpu())
            s = fp8.fp8_scale_from_amax(xc.float().abs().max() * frac)
            assert _same_bits(fp8.quantize_fp8(xc, s, validate=False), tq.fp8_activation_codes(x, s.cuda()).cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1440, 3072), (3, 517, 14336), (5, 48), (100, 300), (27280 // 8, 3072)])
def test_amax_update_matches_torch(shape: tuple[int, ...]) -> None:
    from ptq.formats import triton_quant as tq

    x = (torch.randn(shape, device="cuda") * torch.logspace(-2, 2, shape[-1], device="cuda")).to(torch.bfloat16)
    ch0 = torch.rand(shape[-1], device="cuda")
    ch, steps = ch0.clone(), torch.zeros(4, device="cuda")
    tq.amax_update_(x, ch, steps, 2)
    assert torch.equal(ch, torch.maximum(ch0, x.float().abs().reshape(-1, shape[-1]).amax(0)))
    assert torch.equal(steps, torch.tensor([0, 0, float(x.float().abs().max()), 0], device="cuda"))
    xn = x.reshape(-1, shape[-1])[:, ::2]  # non-contiguous input
    ch = torch.zeros(xn.shape[-1], device="cuda")
    tq.amax_update_(xn, ch)
    assert torch.equal(ch, xn.float().abs().amax(0))


def _sibling_model() -> nn.Module:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.to_q, self.to_k = nn.Linear(256, 512), nn.Linear(256, 512)
            self.out = nn.Linear(512, 128, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.nn.functional.gelu(self.to_q(x) * self.to_k(x)))

    torch.manual_seed(0)
    return Block().to(torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,per_channel,gemm", [("nvfp4", False, "bf16"), ("fp8", False, "scaled_mm"),
                                                  ("fp8", False, "bf16"), ("fp8", True, "scaled_mm")])
def test_quantlinear_cuda_fast_path_matches_cpu(fmt: str, per_channel: bool, gemm: str) -> None:
    from ptq.algorithms.qlinear import QuantLinear
    from ptq.algorithms.quantize import quantize_
    from ptq.algorithms.recipe import LayerSelection, QuantRecipe, WeightMethod
    from ptq.calibration.observers import LinearInputObserver

    model = _sibling_model()
    x = (torch.randn(4, 300, 256) * torch.linspace(0.1, 4, 256)).to(torch.bfloat16)
    with LinearInputObserver(model) as obs:
        model(x)
    quantize_(model, QuantRecipe(format=fmt, weight=WeightMethod(fp8_per_channel=per_channel),
                                   layers=LayerSelection(exclude=[])), obs.stats(), progress=False)
    ref = model(x)  # CPU reference path
    model.cuda()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.refresh_cache()
    old = (QuantLinear.fast_path, QuantLinear.fp8_gemm)
    QuantLinear.fast_path, QuantLinear.fp8_gemm = True, gemm
    try:
        got = model(x.cuda()).cpu()
        QuantLinear.fast_path = False
        slow = model(x.cuda()).cpu()
    finally:
        QuantLinear.fast_path, QuantLinear.fp8_gemm = old
    scale = ref.float().abs().max()
    for y, frac in ((got, 0.5 if gemm == "scaled_mm" else 0.05), (slow, 0.05)):
        # torch._scaled_mm (cuBLASLt FP8) accumulates differently from an fp32 GEMM of the same values: on the
        # H100 ~30% of its bf16 outputs differ by about one bf16 step; the bf16 GEMM paths differ in few
        assert torch.isfinite(y).all()
        assert (y.float() - ref.float()).abs().max() <= 2**-6 * scale
        assert (y != ref).float().mean() < frac
    # the same operands: only fp32 summation order differs, so outputs agree to bf16 rounding
    assert (got.float() - slow.float()).abs().max() <= 2**-6 * scale
    if gemm == "scaled_mm" and not per_channel:  # per-tensor FP8 must really run torch._scaled_mm on Hopper
        assert not any(getattr(m, "_no_scaled_mm", False) for m in model.modules())


@pytest.mark.gpu
def test_gelu_tanh_amax_bit_exact() -> None:
    from ptq.formats import triton_quant as tq

    assert tq.gelu_tanh_exact("cuda")  # every finite bf16 value, against F.gelu(approximate="tanh")
    y = (torch.randn(3, 517, 1000, device="cuda") * 4).to(torch.bfloat16)
    ch, st = torch.zeros(1000, device="cuda"), torch.zeros(3, device="cuda")
    out = tq.gelu_tanh_amax(y, ch, st, torch.tensor([1], device="cuda"))
    ref = torch.nn.functional.gelu(y, approximate="tanh")
    assert torch.equal(out, ref) and torch.equal(ch, ref.float().abs().reshape(-1, 1000).amax(0))
    assert st.tolist() == [0.0, float(ref.float().abs().max()), 0.0]


@pytest.mark.gpu
def test_observer_fused_equals_torch() -> None:
    from ptq.calibration.observers import LinearInputObserver

    model = _sibling_model().cuda()
    xs = [(torch.randn(2, 333, 256, device="cuda") * (i + 1)).to(torch.bfloat16) for i in range(3)]
    stats = {}
    for backend in ("torch", "triton"):
        obs = LinearInputObserver(model, num_steps=2, amax_backend=backend)
        with obs, torch.no_grad():
            for i, x in enumerate(xs):
                obs.step = min(i, 1)
                model(x)
        stats[backend] = obs.stats()
    for name, a in stats["torch"].items():
        b = stats["triton"][name]
        assert torch.equal(a.amax, b.amax) and torch.equal(a.channel_amax, b.channel_amax)
        assert torch.equal(a.step_amax, b.step_amax)
        assert (a.calls, a.tokens) == (b.calls, b.tokens)
