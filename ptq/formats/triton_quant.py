"""Fused Triton kernels for the hot paths: NVFP4 / FP8 activation quantization and calibration amax.

Each function is one kernel launch and computes bit for bit what the torch reference computes:

* :func:`nvfp4_activation_values` == ``nvfp4.quantize_nvfp4_activation(x, input_scale).to(bfloat16)`` (block
  values ``e2m1(code) * float(block_scale)``, exact in bf16; 16-element blocks along the last dim).
* :func:`fp8_activation_codes` == ``fp8.quantize_fp8(x, input_scale, mode=mode, validate=False)``.
* :func:`amax_update_` folds ``max |x|`` per input channel (and over the whole tensor) into float32 accumulators,
  as ``torch.maximum(acc, x.abs().amax(0), out=acc)`` does.

triton is imported on first use only (``ptq.formats._triton_kernels``), so CPU-only installs never need it.
Inputs: CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``), float16 / bfloat16 / float32, last dim
contiguous. No NaN semantics are promised (a NaN input gives an unspecified block / code).
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

from .fp8 import FP8_DTYPE, FP8_MODES
from .nvfp4 import NVFP4_BLOCK

__all__ = [
    "amax_update_",
    "fp8_activation_codes",
    "fp8_multiplier",
    "nvfp4_activation_values",
    "triton_available",
]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: 16-element blocks per program of the NVFP4 kernel (2,048 elements).
NVFP4_BLOCKS_PER_PROGRAM = 128
#: Elements per program of the FP8 kernel.
FP8_ELEMENTS_PER_PROGRAM = 4096


@functools.cache
def _kernels() -> ModuleType | None:
    try:
        from . import _triton_kernels
    except ImportError:
        return None
    return _triton_kernels


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available(device: torch.device | str | None = None) -> bool:
    """True if the kernels can run on ``device`` (default: CUDA): triton importable and a CUDA device present,
    or any device under ``TRITON_INTERPRET=1``."""
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda" and not _interpreting():
        return False
    if dev.type == "cuda" and not torch.cuda.is_available():
        return False
    return _kernels() is not None


def _need(x: torch.Tensor, name: str) -> ModuleType:
    k = _kernels()
    if k is None:
        raise RuntimeError(f"{name}: triton is not installed")
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{name}: expected float16/bfloat16/float32, got {x.dtype}")
    return k


def _scalar(t: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(t, device=device)
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    return t.reshape(())


def nvfp4_activation_values(
    x: torch.Tensor, input_scale: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """NVFP4 block values of ``x [..., k]`` (``k % 16 == 0``) with the static global scale ``input_scale``.

    ``input_scale``: float32 ``[]`` > 0 on x's device (calibrated ``amax / 2688``; read by the kernel, no host
    sync). Returns ``out_dtype`` ``[..., k]`` (bf16 and float32 hold the values exactly): for each block of 16,
    ``s = e4m3(min(amax / 6 / input_scale, 448))``, ``value = e2m1(x / (input_scale * s)) * s``; zero blocks
    give +0. Bit-identical to ``quantize_nvfp4_activation(x, input_scale).to(out_dtype)``. Bytes moved: 2 in +
    2 out per element for bf16.
    """
    k = _need(x, "nvfp4_activation_values")
    if x.dim() == 0 or x.shape[-1] % NVFP4_BLOCK:
        raise ValueError(f"nvfp4_activation_values: last dim must be a multiple of 16, got {tuple(x.shape)}")
    xc = x.contiguous()
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    n_blocks = xc.numel() // NVFP4_BLOCK
    if n_blocks:
        grid = (triton_cdiv(n_blocks, NVFP4_BLOCKS_PER_PROGRAM),)
        k._nvfp4_act_kernel[grid](xc, out, _scalar(input_scale, x.device), n_blocks,
                                  BLOCKS=NVFP4_BLOCKS_PER_PROGRAM, num_warps=4)
    return out


def fp8_multiplier(input_scale: torch.Tensor, dtype: torch.dtype, mode: str = "ck_eager") -> torch.Tensor:
    """float32 ``[]``: the number :func:`fp8_activation_codes` multiplies ``x`` (of ``dtype``) by.

    ``1/scale`` in float32 (``mode="float32"``), rounded to ``dtype`` for ``"ck_eager"`` (as
    ``fp8._fp8_chunks`` does). Compute once per layer and pass as ``mult=`` to skip the two tiny kernels.
    ``"divide"`` is not supported by the kernel.
    """
    if mode not in FP8_MODES[:2]:
        raise ValueError(f"fp8 kernel modes: 'ck_eager', 'float32'; got {mode!r}")
    recip = 1.0 / _scalar(input_scale, input_scale.device)
    return recip.to(dtype).to(torch.float32) if mode == "ck_eager" else recip


def fp8_activation_codes(
    x: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    *,
    mode: str = "ck_eager",
    mult: torch.Tensor | None = None,
) -> torch.Tensor:
    """``float8_e4m3fn`` codes of ``x`` (any shape) with the static per-tensor ``input_scale`` (float32 ``[]``).

    Bit-identical to ``fp8.quantize_fp8(x, input_scale, mode=mode, validate=False)`` for ``mode`` "ck_eager"
    (``x * bf16(1/scale)`` rounded to x's dtype, then clamp +-448 and cast: comfy-kitchen eager) or "float32"
    (``x.float() * (1/scale)``: comfy-kitchen CUDA). ``mult`` = :func:`fp8_multiplier` precomputed (then
    ``input_scale`` is not read). Bytes moved: 2 in + 1 out per element for bf16.
    """
    k = _need(x, "fp8_activation_codes")
    if mult is None:
        if input_scale is None:
            raise ValueError("fp8_activation_codes: give input_scale or mult")
        mult = fp8_multiplier(input_scale.to(x.device), x.dtype, mode)
    elif mode not in FP8_MODES[:2]:
        raise ValueError(f"fp8 kernel modes: 'ck_eager', 'float32'; got {mode!r}")
    xc = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    n = xc.numel()
    if n:
        bf16_product = mode == "ck_eager" and x.dtype == torch.bfloat16
        if mode == "ck_eager" and x.dtype == torch.float16:
            raise TypeError("fp8_activation_codes: mode='ck_eager' with float16 input is not implemented")
        k._fp8_act_kernel[(triton_cdiv(n, FP8_ELEMENTS_PER_PROGRAM),)](
            xc, out, mult, n, BLOCK=FP8_ELEMENTS_PER_PROGRAM, BF16_PRODUCT=bf16_product, num_warps=8)
    return out.view(FP8_DTYPE)


def amax_update_(
    x: torch.Tensor, channel_amax: torch.Tensor, step_amax: torch.Tensor | None = None, step: int = -1
) -> None:
    """Fold ``max |x|`` into ``channel_amax`` (float32 ``[k]``, per last-dim channel) and, when ``step_amax`` is
    given and ``0 <= step < len(step_amax)``, the whole-tensor max into ``step_amax[step]``; one launch, in place,
    no host sync. ``x``: ``[..., k]``. Accumulators must hold values >= 0 (they start at zero)."""
    k = _need(x, "amax_update_")
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, kdim = x2.shape
    if m == 0 or kdim == 0:
        return
    bm, bk = 32, 128
    col_tiles = triton_cdiv(kdim, bk)
    target = 4 * _sm_count(x.device)
    splits = max(1, min(triton_cdiv(m, bm), target // col_tiles))
    rows_per_prog = triton_cdiv(triton_cdiv(m, splits), bm) * bm
    splits = triton_cdiv(m, rows_per_prog)
    has_step = step_amax is not None and 0 <= step < step_amax.numel()
    k._amax_kernel[(col_tiles, splits)](x2, channel_amax, step_amax if has_step else channel_amax,
                                        step if has_step else 0, m, kdim, x2.stride(0), rows_per_prog,
                                        BM=bm, BK=bk, HAS_STEP=has_step, num_warps=4)


@functools.cache
def _sm_count_cached(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return _sm_count_cached(device.index if device.index is not None else torch.cuda.current_device())


def triton_cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ints."""
    return -(-a // b)
