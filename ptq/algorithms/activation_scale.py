"""Choosing the activation clipping value (hence ``input_scale``) of a Linear from calibration statistics.

The file stores one static ``input_scale`` per layer: ``clip / 448`` (FP8) or ``clip / (6 * 448)`` (NVFP4, the
activation's global scale; block scales are computed at run time). Methods:

* ``"max"``: clip = the observed max |x| (no clipping).
* ``"percentile"``: clip = that percentile of the sampled |x| (never above the max).
* ``"mse"``: clip minimising the squared quantization error of the sampled activations, simulated with the runtime
  quantizer itself: NVFP4 samples are real runs of 16 consecutive inputs (``LinearInputObserver(sample_block=16)``)
  quantized with block scales computed as the kernel does (``fp8(min(block_amax / 6 / input_scale, 448))``), so
  saturation above the clip, float8 rounding of the block scales and their subnormal range are all modelled.
  Candidates: a log grid of ``clip / amax`` in ``[lo, 1]`` plus every per-step max (``step_amax``) in that range.
  ``"mse_steps"`` (``step_weighting="relative"``) sums the error per denoising step divided by that step's signal
  power (each step counts equally, whatever its activation scale) instead of the plain sum over all samples:
  the per-step ranges reduced to the one scale the file stores.
"""

from __future__ import annotations

import math

import torch

from ptq.calibration.observers import LinearInputStats
from ptq.formats import NumberFormat, get_format

STEP_WEIGHTINGS = ("none", "relative")
#: Activation methods by name (see the module docstring); ``choose_input_amax`` takes these labels.
ACTIVATION_LABELS = ("max", "percentile", "mse", "mse_steps")


def _fmt(fmt: str | NumberFormat) -> NumberFormat:
    return get_format(fmt) if isinstance(fmt, str) else fmt


def input_scale_from_amax(amax: torch.Tensor, fmt: str | NumberFormat) -> torch.Tensor:
    """float32 ``[]``: the format's static activation scale for clip ``amax`` (FP8 amax/448, NVFP4 amax/(6*448))."""
    return _fmt(fmt).input_scale_from_amax(amax)


def _fake_quant(values: torch.Tensor, clip: torch.Tensor, fmt: NumberFormat) -> torch.Tensor:
    """Runtime quantize + dequantize of ``values`` (float32; ``[n, fmt.activation_block]`` blocks) with input scale
    from ``clip``; values beyond the clip saturate exactly as in the kernels."""
    return fmt.fake_quantize_activation(values, fmt.input_scale_from_amax(clip))


#: The MSE search uses at most this many sampled values per layer (evenly strided whole blocks; deterministic).
MAX_SEARCH_SAMPLES = 1 << 17


def _blocks(samples: torch.Tensor, sample_block: int, fmt: NumberFormat) -> torch.Tensor:
    """Samples as the quantizer sees them: ``[n, fmt.activation_block]`` runtime blocks (NVFP4 16, FP8 1); at
    most ``MAX_SEARCH_SAMPLES`` values (every k-th block)."""
    x = samples.float().flatten()
    width = fmt.activation_block
    n = (x.numel() // width) * width
    x = x[:n].reshape(-1, width)
    stride = -(-x.shape[0] * width // MAX_SEARCH_SAMPLES)
    return x[::stride] if stride > 1 else x


def clip_candidates(amax: torch.Tensor, *, grid: int = 48, lo: float = 0.3,
                    step_amax: torch.Tensor | None = None) -> list[float]:
    """Clip values to try (floats, descending from ``amax``): ``amax * lo**(k/(grid-1))`` plus the per-step maxima
    within ``[lo*amax, amax]``. ``amax`` comes first, so ties keep max calibration."""
    a = float(amax)
    cands = [a * lo ** (k / max(grid - 1, 1)) for k in range(grid)]
    if step_amax is not None:
        cands += [float(v) for v in step_amax.flatten().tolist() if lo * a <= float(v) < a]
    seen, out = set(), []
    for c in cands:
        if c > 0 and c not in seen:
            seen.add(c)
            out.append(c)
    return out


def clip_errors(samples: torch.Tensor, clips: list[float], fmt: str | NumberFormat, *, sample_block: int = 1,
                sample_steps: torch.Tensor | None = None, step_weighting: str = "none") -> torch.Tensor:
    """float64 ``[len(clips)]``: the (step-weighted) squared quantization error of the samples for each clip."""
    fmt = _fmt(fmt)
    if step_weighting not in STEP_WEIGHTINGS:
        raise ValueError(f"step_weighting={step_weighting!r}: expected one of {STEP_WEIGHTINGS}")
    x = _blocks(samples, sample_block, fmt)
    weights = None
    if step_weighting == "relative" and sample_steps is not None and sample_steps.numel() == samples.numel():
        steps = _blocks(sample_steps.float(), sample_block, fmt)[:, 0].long()
        power = torch.zeros(int(steps.max()) + 2, dtype=torch.float64)
        power.index_add_(0, steps + 1, x.double().pow(2).sum(1))
        weights = (1.0 / power.clamp_min(1e-30))[steps + 1]
    errs = []
    for c in clips:
        e = (_fake_quant(x, torch.tensor(c, dtype=torch.float32), fmt) - x).double().pow(2).sum(1)
        errs.append(float(e.sum() if weights is None else (e * weights).sum()))
    return torch.tensor(errs, dtype=torch.float64)


def mse_clip(samples: torch.Tensor, amax: torch.Tensor, fmt: str | NumberFormat, *, grid: int = 48, lo: float = 0.3,
             sample_block: int = 1, step_amax: torch.Tensor | None = None,
             sample_steps: torch.Tensor | None = None, step_weighting: str = "none") -> torch.Tensor:
    """Clip value in ``[lo*amax, amax]`` minimising the runtime quantization error of ``samples`` (|x| values;
    NVFP4: runs of ``sample_block`` = 16 consecutive inputs); float32 ``[]``. See the module docstring."""
    a = amax.float().reshape(())
    if float(a) <= 0 or not math.isfinite(float(a)):
        return a
    clips = clip_candidates(a, grid=grid, lo=lo, step_amax=step_amax)
    errs = clip_errors(samples, clips, fmt, sample_block=sample_block, sample_steps=sample_steps,
                       step_weighting=step_weighting)
    best = int(torch.argmin(errs))  # first minimum: amax wins ties
    return torch.tensor(clips[best], dtype=torch.float32)


def clip_max(stats: LinearInputStats) -> torch.Tensor:
    """The observed amax (float32 ``[]``): no clipping."""
    return stats.amax.float().reshape(())


def _need_samples(stats: LinearInputStats, method: str) -> None:
    if stats.samples is None or stats.samples.numel() == 0:
        raise ValueError(f"activation method {method!r} needs sampled values: calibrate with samples_per_call > 0")


def clip_percentile(stats: LinearInputStats, percentile: float) -> torch.Tensor:
    """That percentile (0-100) of the sampled |x|, never above the observed amax (float32 ``[]``)."""
    amax = clip_max(stats)
    _need_samples(stats, "percentile")
    s = stats.samples.float()
    k = max(1, min(s.numel(), int(round(s.numel() * percentile / 100.0))))
    value = s.kthvalue(k).values if k < s.numel() else s.max()
    return torch.minimum(value.to(amax.device), amax).reshape(())


def clip_mse(stats: LinearInputStats, fmt: str | NumberFormat, *, step_weighting: str = "none", grid: int = 48,
             lo: float = 0.3) -> torch.Tensor:
    """Clip minimising the runtime quantization error of the samples for ``fmt`` (float32 ``[]``)."""
    amax = clip_max(stats)
    _need_samples(stats, "mse")
    # samples without sample_block=16 are independent elements regrouped into 16s: the block scales then see
    # random neighbours (an approximation; calibrate with LinearInputObserver(sample_block=16))
    samples = stats.samples.float().cpu()
    clip = mse_clip(samples, amax.cpu(), fmt, grid=grid, lo=lo, sample_block=stats.sample_block,
                    step_amax=None if stats.step_amax is None else stats.step_amax.float().cpu(),
                    sample_steps=stats.sample_steps, step_weighting=step_weighting)
    return clip.to(amax.device)


def choose_input_amax(stats: LinearInputStats, method: str, fmt: str | NumberFormat, *, percentile: float = 99.99,
                      step_weighting: str = "none") -> torch.Tensor:
    """Clipping value (float32 ``[]``) for one layer by method label: "max" = observed amax; "percentile" of the
    sampled |x| (never above amax); "mse" = clip minimising the runtime quantization error of the samples for
    ``fmt``; "mse_steps" = the same with every denoising step weighted equally (``step_weighting="relative"``)."""
    if method == "max":
        return clip_max(stats)
    if method == "percentile":
        return clip_percentile(stats, percentile)
    if method in ("mse", "mse_steps"):
        return clip_mse(stats, fmt, step_weighting="relative" if method == "mse_steps" else step_weighting)
    raise ValueError(f"unknown activation method {method!r}; expected one of {', '.join(ACTIVATION_LABELS)}")
