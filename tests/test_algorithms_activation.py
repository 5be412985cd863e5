"""Activation ranges (``input_scale``): max / percentile / MSE clipping with samples taken as the kernels see them
(aligned runs of 16 for NVFP4's runtime blocks), per-step weighting, and the fast CPU Linear used by ``ptq run``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ptq.algorithms import activation_scale as act
from ptq.calibration.observers import LinearInputObserver, LinearInputStats
from ptq.formats import nvfp4 as nf


def _stats(samples: torch.Tensor, block: int = 16, steps: torch.Tensor | None = None) -> LinearInputStats:
    amax = samples.abs().max().reshape(())
    return LinearInputStats(amax, amax.reshape(1), None if steps is None else torch.zeros(4), samples.abs(),
                            1, 1, block, steps)


def outlier_activations(n_blocks: int, seed: int) -> torch.Tensor:
    """Gaussian blocks of 16 plus rare huge outliers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_blocks, 16, generator=g)
    x.view(-1)[torch.randint(0, x.numel(), (8,), generator=g)] *= 300.0
    return x


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_mse_clip_is_the_argmin_of_the_runtime_error(fmt: str) -> None:
    """Gaussian activations: the search clips a little below amax (measured 0.975 NVFP4 / 0.926 FP8) and its
    clip has the least runtime quantization error of all candidates; the error is the real quantizer's."""
    x = torch.randn(8192, 16, generator=torch.Generator().manual_seed(0))
    st = _stats(x.reshape(-1))
    clip = act.choose_input_amax(st, "mse", fmt)
    cands = act.clip_candidates(st.amax)
    errs = act.clip_errors(st.samples, cands, fmt, sample_block=16)
    best = float(torch.tensor(cands[int(torch.argmin(errs))], dtype=torch.float32))
    assert float(clip) == best < float(st.amax)
    assert float(errs.min()) < float(errs[0])  # errs[0]: clip = amax (max calibration)
    scale = act.input_scale_from_amax(clip, fmt)
    blocks = st.samples.reshape(-1, 16)
    if fmt == "nvfp4":
        deq = nf.quantize_nvfp4_activation(blocks, scale) * scale
    else:
        deq = torch.clamp(blocks * (1.0 / scale), -448, 448).to(torch.float8_e4m3fn).float() * scale
    assert torch.allclose((deq - blocks).double().pow(2).sum(), errs.min(), rtol=1e-6)


@pytest.mark.parametrize("fmt", ["nvfp4", "fp8"])
def test_mse_keeps_max_under_rare_outliers(fmt: str) -> None:
    """Clipping a 300x outlier costs more squared error than any gain on the bulk: max calibration stays."""
    st = _stats(outlier_activations(4096, 0).reshape(-1))
    assert float(act.choose_input_amax(st, "mse", fmt)) == float(st.amax)


def test_percentile_never_above_max() -> None:
    x = outlier_activations(256, 1).reshape(-1)
    st = _stats(x)
    p = act.choose_input_amax(st, "percentile", "nvfp4", percentile=99.0)
    assert float(p) < float(st.amax)
    assert float(act.choose_input_amax(st, "percentile", "nvfp4", percentile=100.0)) == float(st.amax)


def test_step_weighting_counts_each_step_equally() -> None:
    """Step 0's activations are 1e5x step 1's: the plain MSE clip serves step 0 (measured 0.90 amax); with every
    step weighted equally (``mse_steps``, measured 0.58 amax) step 1's small blocks escape float8 block-scale
    underflow and their error drops (measured 0.75x)."""
    g = torch.Generator().manual_seed(3)
    big = torch.randn(2048, 16, generator=g) * 100.0
    small = torch.randn(2048, 16, generator=g) * 0.001
    x = torch.cat([big, small]).reshape(-1)
    steps = torch.cat([torch.zeros(big.numel()), torch.ones(small.numel())]).long()
    st = _stats(x, steps=steps)
    plain = float(act.choose_input_amax(st, "mse", "nvfp4"))
    steps_w = float(act.choose_input_amax(st, "mse_steps", "nvfp4"))
    e_small = act.clip_errors(small.reshape(-1).abs(), [plain, steps_w], "nvfp4", sample_block=16)
    assert steps_w < 0.8 * plain and float(e_small[1]) < 0.85 * float(e_small[0])
    with pytest.raises(ValueError, match="step_weighting"):
        act.clip_errors(x, [plain], "nvfp4", step_weighting="bogus")


def test_observer_samples_real_aligned_blocks() -> None:
    """sample_block=16: every sampled run is 16 consecutive inputs of one token, starting at a multiple of 16."""
    model = nn.Sequential(nn.Linear(64, 8))
    tokens = torch.arange(40, dtype=torch.float32).reshape(40, 1)
    x = tokens * 1000.0 + torch.arange(64, dtype=torch.float32) + 1.0  # value encodes (token, channel)
    obs = LinearInputObserver(model, num_steps=2, samples_per_call=64, sample_block=16, seed=0)
    with obs:
        for step in (0, 1):
            obs.step = step
            model(x)
    st = obs.stats()["0"]
    assert st.sample_block == 16 and st.samples.numel() == 128
    runs = st.samples.reshape(-1, 16)
    channel = (runs % 1000.0) - 1.0
    token = torch.div(runs, 1000.0, rounding_mode="floor")
    assert bool((token == token[:, :1]).all())
    assert bool((channel == channel[:, :1] + torch.arange(16.0)).all()) and bool((channel[:, 0] % 16 == 0).all())
    assert torch.equal(st.sample_steps, torch.tensor([0] * 64 + [1] * 64))
    # a layer whose in_features is not a multiple of 16 samples single elements
    model2 = nn.Sequential(nn.Linear(24, 8))
    with LinearInputObserver(model2, samples_per_call=10, sample_block=16) as obs2:
        model2(torch.randn(5, 24))
    assert obs2.stats()["0"].sample_block == 1


def test_float32_linear_on_cpu_is_a_single_rounding() -> None:
    """The fast CPU Linear of ``ptq run`` equals a float32 GEMM of the bf16 operands rounded once to bf16."""
    from ptq.models.cpu_matmul import Float32LinearOnCPU

    torch.manual_seed(0)
    lin = nn.Linear(96, 80).to(torch.bfloat16)
    x = torch.randn(3, 7, 96).to(torch.bfloat16)
    expected = (x.float() @ lin.weight.float().t() + lin.bias.float()).to(torch.bfloat16)
    mode = Float32LinearOnCPU()
    with torch.no_grad(), mode:
        y = lin(x)
        y2 = lin(x)  # cached float32 weight
        lin.weight.mul_(2.0)  # in-place change: the cache sees the new version
        y3 = lin(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, expected) and torch.equal(y2, expected)
    assert torch.equal(y3, (x.float() @ lin.weight.float().t() + lin.bias.float()).to(torch.bfloat16))
    assert mode.calls == 3
    with mode:  # float32 and autograd calls are left alone
        lin32 = nn.Linear(4, 4)
        lin32(torch.randn(2, 4))
    assert mode.calls == 3


def test_float32_convolution_on_cpu_is_a_single_rounding() -> None:
    """float16 convolutions (WAN's patch embedding) in the mode: a float32 convolution rounded once; the dtypes the
    mode takes follow the CPU (float16 always, bf16 only without native bf16 GEMMs)."""
    from ptq.models.cpu_matmul import Float32LinearOnCPU, cpu_has_fast_bf16, float32_linear_dtypes

    torch.manual_seed(0)
    conv = nn.Conv3d(8, 16, (1, 2, 2), stride=(1, 2, 2)).to(torch.float16)
    x = torch.randn(1, 8, 3, 6, 6).to(torch.float16)
    expected = torch.nn.functional.conv3d(x.float(), conv.weight.float(), conv.bias.float(), stride=(1, 2, 2))
    mode = Float32LinearOnCPU(dtypes=(torch.float16,))
    with torch.no_grad(), mode:
        y = conv(x)
        lin = nn.Linear(4, 4).to(torch.bfloat16)
        lin(torch.randn(2, 4).to(torch.bfloat16))  # bf16 is not among this mode's dtypes
    assert y.dtype == torch.float16 and torch.equal(y, expected.to(torch.float16))
    assert mode.calls == 1
    want = (torch.float16,) if cpu_has_fast_bf16() else (torch.bfloat16, torch.float16)
    assert set(float32_linear_dtypes()) == set(want) and Float32LinearOnCPU.for_this_cpu().dtypes == float32_linear_dtypes()
