"""Choosing the activation clipping value (hence ``input_scale``) of a Linear from calibration statistics."""

from __future__ import annotations

import torch

from ptq.calibration.observers import LinearInputStats
from ptq.formats import fp8 as fp8_fmt
from ptq.formats import nvfp4 as nvfp4_fmt


def input_scale_from_amax(amax: torch.Tensor, fmt: str) -> torch.Tensor:
    """float32 ``[]``: amax/448 for fp8, amax/(6*448) for nvfp4 (the activation's global scale)."""
    if fmt == "nvfp4":
        return nvfp4_fmt.nvfp4_global_scale(amax)
    if fmt == "fp8":
        return fp8_fmt.fp8_scale_from_amax(amax)
    raise ValueError(f"unknown format {fmt!r}")


def _fake_quant(values: torch.Tensor, amax: torch.Tensor, fmt: str) -> torch.Tensor:
    scale = input_scale_from_amax(amax, fmt)
    if fmt == "nvfp4":
        return nvfp4_fmt.fake_quantize_nvfp4(values, scale)
    return fp8_fmt.fake_quantize_fp8(values, scale)


def mse_clip(samples: torch.Tensor, amax: torch.Tensor, fmt: str, *, grid: int = 48, lo: float = 0.3) -> torch.Tensor:
    """Clip value in [lo*amax, amax] minimising the quantization MSE of ``samples`` (|x| values; float32 ``[]``).

    NVFP4 samples are regrouped in blocks of 16 so block scales behave as at run time (approximation: the sampled
    values are not the real neighbours of each other, so this favours the global-scale effect).
    """
    x = samples.float().flatten()
    if fmt == "nvfp4":
        n = (x.numel() // 16) * 16
        x = x[:n].reshape(-1, 16)
    best, best_err = amax, None
    for frac in torch.linspace(lo, 1.0, grid).tolist():
        clip = amax * frac
        err = (_fake_quant(torch.minimum(x, clip), clip, fmt) - x).pow(2).mean()
        if best_err is None or err < best_err:
            best, best_err = clip, err
    return best.reshape(())


def choose_input_amax(stats: LinearInputStats, method: str, fmt: str, *, percentile: float = 99.99) -> torch.Tensor:
    """Clipping value (float32 ``[]``) for one layer: "max" = observed amax; "percentile" of the sampled |x|
    (never above amax); "mse" = MSE-optimal clip of the sampled |x| for ``fmt``."""
    amax = stats.amax.float().reshape(())
    if method == "max":
        return amax
    if stats.samples is None or stats.samples.numel() == 0:
        raise ValueError(f"activation method {method!r} needs sampled values: calibrate with samples_per_call > 0")
    if method == "percentile":
        s = stats.samples.float()
        k = max(1, min(s.numel(), int(round(s.numel() * percentile / 100.0))))
        value = s.kthvalue(k).values if k < s.numel() else s.max()
        return torch.minimum(value, amax).reshape(())
    if method == "mse":
        return mse_clip(stats.samples, amax, fmt)
    raise ValueError(f"unknown activation method {method!r}")
