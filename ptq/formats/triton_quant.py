"""Fused Triton kernels for the hot paths: NVFP4 / FP8 activation quantization and calibration amax.

Each function is one kernel launch and computes bit for bit what the torch reference computes:

* :func:`nvfp4_activation_values` == ``nvfp4.quantize_nvfp4_activation(x, input_scale).to(bfloat16)`` (block
  values ``e2m1(code) * float(block_scale)``, exact in bf16; 16-element blocks along the last dim).
* :func:`fp8_activation_codes` == ``fp8.quantize_fp8(x, input_scale, mode=mode, validate=False)``;
  :func:`fp8_activation_values` == the same ``.to(bfloat16)``.
* :func:`amax_update_` folds ``max |x|`` per input channel (and over the whole tensor) into float32 accumulators,
  as ``torch.maximum(acc, x.abs().amax(0), out=acc)`` does; :func:`amax_update_batch_` does it for up to four
  tensors in one launch.

triton is imported on first use only (``ptq.formats._triton_kernels``), so CPU-only installs never need it.
Inputs: CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``), float16 / bfloat16 / float32, last dim
contiguous. No NaN semantics are promised (a NaN input gives an unspecified block / code).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch

from .fp8 import FP8_DTYPE, FP8_MODES
from .nvfp4 import NVFP4_BLOCK

__all__ = [
    "amax_update_",
    "amax_update_batch_",
    "fp8_activation_codes",
    "fp8_activation_values",
    "fp8_multiplier",
    "gelu_tanh_amax",
    "gelu_tanh_exact",
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


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x [..., k]`` as ``[m, k]`` with unit stride along k (a view when possible) for the row-tiled kernels."""
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


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
    return _fp8_act(x, input_scale, mode, mult, None).view(FP8_DTYPE)


def fp8_activation_values(
    x: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    *,
    mode: str = "ck_eager",
    mult: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The values of :func:`fp8_activation_codes` (``codes.to(out_dtype)``, exact in bf16 / float32) in one
    kernel: the operand of a bf16 GEMM that reproduces the FP8 GEMM's products exactly. Bytes moved: 2 in +
    2 out per element for bf16."""
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"fp8_activation_values: out_dtype must be bfloat16 or float32, got {out_dtype}")
    return _fp8_act(x, input_scale, mode, mult, out_dtype)


def _fp8_act(x: torch.Tensor, input_scale: torch.Tensor | None, mode: str, mult: torch.Tensor | None,
             values_dtype: torch.dtype | None) -> torch.Tensor:
    k = _need(x, "fp8_activation_codes")
    if mult is None:
        if input_scale is None:
            raise ValueError("fp8_activation_codes: give input_scale or mult")
        mult = fp8_multiplier(input_scale.to(x.device), x.dtype, mode)
    elif mode not in FP8_MODES[:2]:
        raise ValueError(f"fp8 kernel modes: 'ck_eager', 'float32'; got {mode!r}")
    xc = x.contiguous()
    out = torch.empty(x.shape, dtype=values_dtype or torch.uint8, device=x.device)
    n = xc.numel()
    if n:
        bf16_product = mode == "ck_eager" and x.dtype == torch.bfloat16
        if mode == "ck_eager" and x.dtype == torch.float16:
            raise TypeError("fp8_activation_codes: mode='ck_eager' with float16 input is not implemented")
        k._fp8_act_kernel[(triton_cdiv(n, FP8_ELEMENTS_PER_PROGRAM),)](
            xc, out, mult, n, BLOCK=FP8_ELEMENTS_PER_PROGRAM, BF16_PRODUCT=bf16_product,
            VALUES=values_dtype is not None, num_warps=8)
    return out


#: Launch shape of the amax kernel: rows x columns per tile, warps, and programs per SM to aim for.
#: (``scripts/bench_wan5b.py --part amax_kernel`` on an H200: the fastest of six shapes for the 5B's inputs.)
AMAX_CONFIG: dict[str, int] = {"bm": 64, "bk": 64, "num_warps": 4, "programs_per_sm": 8, "stages": 1}
#: Most destinations one amax launch updates (sibling layers reading one tensor share a launch).
AMAX_MAX_DESTINATIONS = 4


def amax_update_(
    x: torch.Tensor,
    channel_amax: torch.Tensor,
    step_amax: torch.Tensor | None = None,
    step: int | torch.Tensor = -1,
    *,
    more: Sequence[tuple[torch.Tensor, torch.Tensor | None]] = (),
) -> None:
    """Fold ``max |x|`` into ``channel_amax`` (float32 ``[k]``, per last-dim channel) and, when ``step_amax`` is
    given, the whole-tensor max into ``step_amax[step]``; one launch, in place, no host sync. ``x``: ``[..., k]``.

    ``step``: a Python int (ignored unless ``0 <= step < len(step_amax)``) or an int32/int64 ``[]``/``[1]``
    tensor on x's device that the kernel reads (a valid index, not checked: CUDA-graph replays then use its
    current value). ``more``: further ``(channel_amax, step_amax)`` pairs that receive the same update (sibling
    layers reading the same tensor; same shapes, ``step_amax`` all given or all None; at most
    ``AMAX_MAX_DESTINATIONS`` in all). Accumulators must hold values >= 0 (they start at zero)."""
    k = _need(x, "amax_update_")
    dests = [(channel_amax, step_amax), *more]
    if len(dests) > AMAX_MAX_DESTINATIONS:
        raise ValueError(f"amax_update_: {len(dests)} destinations, at most {AMAX_MAX_DESTINATIONS} per launch")
    if any((s is None) != (step_amax is None) for _, s in dests):
        raise ValueError("amax_update_: give step_amax for every destination or for none")
    x2 = _as_rows(x)
    m, kdim = x2.shape
    if m == 0 or kdim == 0:
        return
    cfg = AMAX_CONFIG
    bm, bk = cfg["bm"], cfg["bk"]
    col_tiles = triton_cdiv(kdim, bk)
    target = cfg["programs_per_sm"] * _sm_count(x.device)
    splits = max(1, min(triton_cdiv(m, bm), target // col_tiles))
    rows_per_prog = triton_cdiv(triton_cdiv(m, splits), bm) * bm
    splits = triton_cdiv(m, rows_per_prog)
    from_ptr = isinstance(step, torch.Tensor)
    has_step = step_amax is not None and (from_ptr or 0 <= step < step_amax.numel())
    chans = [c for c, _ in dests] + [channel_amax] * (AMAX_MAX_DESTINATIONS - len(dests))
    steps = [s if has_step else channel_amax for _, s in dests] + [channel_amax] * (AMAX_MAX_DESTINATIONS - len(dests))
    k._amax_kernel[(col_tiles, splits)](x2, *chans, *steps, step if from_ptr else channel_amax,
                                        0 if from_ptr or not has_step else step, m, kdim, x2.stride(0),
                                        BM=bm, BK=bk, ITERS=rows_per_prog // bm, STAGES=cfg.get("stages", 1),
                                        N_DEST=len(dests), HAS_STEP=has_step,
                                        STEP_FROM_PTR=from_ptr, num_warps=cfg["num_warps"])


#: Batched amax launches (:func:`amax_update_batch_`): tile shape, warps, pipelined loads, rows per program.
#: (``scripts/bench_wan5b.py --part graphs`` on an H200: 5B calibration forwards at 1,440 tokens.)
AMAX_BATCH_CONFIG: dict[str, int] = {"bm": 32, "bk": 64, "num_warps": 2, "stages": 3, "rows_per_program": 480}
#: Most tensors one batched launch reads.
AMAX_BATCH_ITEMS = 4


def amax_update_batch_(
    items: Sequence[tuple[torch.Tensor, Sequence[tuple[torch.Tensor, torch.Tensor | None]]]],
    step: torch.Tensor | None = None,
) -> None:
    """:func:`amax_update_` for several tensors in one launch (fewer launches: what bounds the calibration hooks
    of a small forward). ``items``: up to ``AMAX_BATCH_ITEMS`` pairs ``(x [..., k], destinations)``, all ``x`` of
    one dtype and device; ``destinations``: 1-4 ``(channel_amax float32 [k], step_amax float32 [s] or None)``.
    ``step``: int64 ``[1]`` tensor on the device holding a valid ``step_amax`` index (read by the kernel), required
    when the destinations have ``step_amax`` (all or none of them)."""
    if not items:
        return
    if len(items) > AMAX_BATCH_ITEMS:
        raise ValueError(f"amax_update_batch_: {len(items)} items, at most {AMAX_BATCH_ITEMS} per launch")
    k = _need(items[0][0], "amax_update_batch_")
    has_step = items[0][1][0][1] is not None
    if has_step and step is None:
        raise ValueError("amax_update_batch_: step_amax given without a step index tensor")
    cfg = AMAX_BATCH_CONFIG
    bm, bk = cfg["bm"], cfg["bk"]
    iters = max(1, cfg["rows_per_program"] // bm)
    args: list[Any] = []
    ends: list[int] = []
    n_dest: list[int] = []
    total = 0
    for x, dests in items:
        if x.dtype != items[0][0].dtype or x.device != items[0][0].device:
            raise ValueError("amax_update_batch_: all items must share dtype and device")
        if not 1 <= len(dests) <= AMAX_MAX_DESTINATIONS:
            raise ValueError(f"amax_update_batch_: 1-{AMAX_MAX_DESTINATIONS} destinations per item, got {len(dests)}")
        if any((s is None) == has_step for _, s in dests):
            raise ValueError("amax_update_batch_: give step_amax for every destination or for none")
        x2 = _as_rows(x)
        m, kdim = x2.shape
        if m == 0 or kdim == 0:
            continue
        total += triton_cdiv(kdim, bk) * triton_cdiv(m, iters * bm)
        chans = [c for c, _ in dests] + [dests[0][0]] * (AMAX_MAX_DESTINATIONS - len(dests))
        steps = [s if has_step else dests[0][0] for _, s in dests] + [dests[0][0]] * (AMAX_MAX_DESTINATIONS
                                                                                     - len(dests))
        args.append([x2, m, kdim, x2.stride(0), *chans, *steps])
        ends.append(total)
        n_dest.append(len(dests))
    if not args:
        return
    n = len(args)
    while len(args) < AMAX_BATCH_ITEMS:  # unused item slots (their code is compiled out)
        args.append(args[0])
        ends.append(total)
        n_dest.append(1)
    flat = [a for item in args for a in item]
    k._amax_batch_kernel[(total,)](step if has_step else args[0][4], ends[0], ends[1], ends[2], *flat,
                                   BM=bm, BK=bk, ITERS=iters, STAGES=cfg["stages"], N_ITEMS=n,
                                   NDA=n_dest[0], NDB=n_dest[1], NDC=n_dest[2], NDD=n_dest[3], HAS_STEP=has_step,
                                   num_warps=cfg["num_warps"])


def gelu_tanh_amax(
    y: torch.Tensor, channel_amax: torch.Tensor, step_amax: torch.Tensor | None = None,
    step: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.gelu(y, approximate="tanh")`` for bfloat16 ``y [..., k]`` (torch's CUDA arithmetic: float opmath, one
    rounding; bit-identical where :func:`gelu_tanh_exact` holds) with ``max |out|`` folded into ``channel_amax``
    (float32 ``[k]``) and ``step_amax[step]`` (``step``: int64 ``[1]`` tensor) in the same pass: the input
    statistics of the Linear that reads the result cost no extra read. Returns a contiguous tensor like ``y``."""
    k = _need(y, "gelu_tanh_amax")
    if y.dtype != torch.bfloat16:
        raise TypeError(f"gelu_tanh_amax: expected bfloat16, got {y.dtype}")
    if step_amax is not None and step is None:
        raise ValueError("gelu_tanh_amax: step_amax given without a step index tensor")
    y2 = _as_rows(y)
    out = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    m, kdim = y2.shape
    if m and kdim:
        bm, bk, iters = 32, 64, 8
        grid = (triton_cdiv(kdim, bk), triton_cdiv(m, bm * iters))
        k._gelu_tanh_amax_kernel[grid](y2, out, m, kdim, y2.stride(0), channel_amax,
                                       channel_amax if step_amax is None else step_amax,
                                       channel_amax if step is None else step, BM=bm, BK=bk, ITERS=iters,
                                       HAS_STEP=step_amax is not None, INTERPRET=_interpreting(), num_warps=4)
    return out


@functools.cache
def _gelu_tanh_exact_cached(device: str) -> bool:
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    x = x[torch.isfinite(x)]
    x = x[: x.numel() // 64 * 64].reshape(-1, 64).to(device)
    ch = torch.zeros(64, device=device)
    got = gelu_tanh_amax(x, ch)
    ref = torch.nn.functional.gelu(x, approximate="tanh")
    return bool(torch.equal(got.view(torch.int16), ref.view(torch.int16))
                and torch.equal(ch, ref.float().abs().amax(0)))


def gelu_tanh_exact(device: torch.device | str) -> bool:
    """Whether :func:`gelu_tanh_amax` equals torch's ``F.gelu(approximate="tanh")`` bit for bit on ``device``,
    checked once per device over every finite bfloat16 value (the kernel's ``tanh`` is libdevice's)."""
    dev = torch.device(device)
    if dev.type != "cuda" or not triton_available(dev):
        return False
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return _gelu_tanh_exact_cached(str(dev))


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
