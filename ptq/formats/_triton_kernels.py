"""Triton kernels behind :mod:`ptq.formats.triton_quant` (imported lazily: importing this module imports triton).

Every rounding is written out with integer and exactly-rounded float32 operations (IEEE add, multiply and
``div_rn``), so each kernel computes the same bits on the GPU and in Triton's CPU interpreter, and the same bits
as the torch reference in :mod:`ptq.formats.nvfp4` / :mod:`ptq.formats.fp8`:

* E2M1 round-to-nearest-even: ``a + 2**(e-1+23)`` leaves ``round(a / 2**(e-1))`` in the mantissa field (the
  float adder does the rounding), exactly like ``nvfp4._encode_unchecked``.
* float8_e4m3fn round-to-nearest-even (what torch's cast does) of ``0 <= v <= 448``: the same trick with step
  ``2**(max(e, -6) - 3)``; the FP8 bit pattern is then ``((max(expfield, 121) - 121) << 3) + k``, which also
  covers subnormals and the carry into the next binade.
* float32 -> bfloat16 round-to-nearest-even: ``(bits + 0x7FFF + lsb) & 0xFFFF0000`` (torch's own formula).

No fused multiply-add can form: no product feeds an addition.
"""

from __future__ import annotations

import triton
import triton.language as tl

E2M1_MAX = 6.0
FP8_E4M3_MAX = 448.0


@triton.jit
def _e4m3_round(v):
    """float8_e4m3fn RNE of float32 ``0 <= v <= 448``: returns (value as float32, 7-bit magnitude code int32)."""
    eb = tl.maximum(v.to(tl.int32, bitcast=True) >> 23, 121)  # biased exponent, at least 2**-6
    magic = ((eb + 20) << 23).to(tl.float32, bitcast=True)  # step * 2**23, step = 2**(eb - 127 - 3)
    k = (v + magic).to(tl.int32, bitcast=True) & 0x7FFFFF  # round(v / step), ties to even; 0..16
    step = ((eb - 3) << 23).to(tl.float32, bitcast=True)
    return k.to(tl.float32) * step, ((eb - 121) << 3) + k


@triton.jit
def _nvfp4_act_kernel(x_ptr, out_ptr, g_ptr, n_blocks, BLOCKS: tl.constexpr):
    """Per 16-element block: amax -> e4m3 block scale relative to the global scale -> E2M1 -> block values."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS).to(tl.int64)
    offs = rows[:, None] * 16 + tl.arange(0, 16)[None, :]
    mask = rows[:, None] < n_blocks
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr)
    amax = tl.max(tl.abs(x), axis=1)
    s = tl.math.div_rn(tl.math.div_rn(amax, 6.0), g)  # two float32 divisions, in this order
    s = tl.minimum(s, 448.0)
    s8, _ = _e4m3_round(s)
    total = g * s8
    zero = total == 0.0
    y = tl.math.div_rn(x, tl.where(zero, 1.0, total)[:, None])
    y = tl.where(zero[:, None], 0.0, y)  # zero blocks -> +0
    sign = y.to(tl.int32, bitcast=True) & -2147483648  # sign bit (-0.0 included)
    a = tl.minimum(tl.abs(y), 6.0)
    e = tl.maximum(a.to(tl.int32, bitcast=True) >> 23, 127)
    magic = ((e + 22) << 23).to(tl.float32, bitcast=True)
    k = (a + magic).to(tl.int32, bitcast=True) & 0x7FFFFF  # round(a / 2**(e-128)), ties to even
    r = k.to(tl.float32) * ((e - 1) << 23).to(tl.float32, bitcast=True)  # E2M1 magnitude
    v = r * s8[:, None]  # exact: <= 6 significant bits
    v = (v.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)  # (unary minus is 0 - v: +0, not -0)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fp8_act_kernel(x_ptr, out_ptr, mult_ptr, n, BLOCK: tl.constexpr, BF16_PRODUCT: tl.constexpr):
    """``fp8(clamp(x * mult, -448, 448))`` as uint8 bit patterns; the product rounded to bf16 first if asked."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = x * tl.load(mult_ptr)
    if BF16_PRODUCT:  # the product as torch computes it in bfloat16 (round to nearest even)
        b = p.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        p = b.to(tl.float32, bitcast=True)
    neg = p.to(tl.int32, bitcast=True) < 0
    a = tl.minimum(tl.abs(p), 448.0)
    _, code = _e4m3_round(a)
    code = tl.where(neg, code + 128, code)
    tl.store(out_ptr + offs, code.to(tl.uint8), mask=mask)


@triton.jit
def _amax_kernel(x_ptr, chan_ptr, step_ptr, step, M, K, stride_m, ROWS_PER_PROG,
                 BM: tl.constexpr, BK: tl.constexpr, HAS_STEP: tl.constexpr):
    """max |x| over a slab of rows of one column tile, folded into ``chan`` (per column) and ``*step`` atomically."""
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_k * BK + tl.arange(0, BK)
    cmask = cols < K
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    lo = pid_m * ROWS_PER_PROG
    for i in range(0, ROWS_PER_PROG, BM):  # ROWS_PER_PROG is a multiple of BM
        rows = lo + i + tl.arange(0, BM)
        m = (rows[:, None] < M) & cmask[None, :]
        ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_m + cols[None, :]
        acc = tl.maximum(acc, tl.abs(tl.load(ptrs, mask=m, other=0.0).to(tl.float32)))
    col_max = tl.max(acc, axis=0)
    tl.atomic_max(chan_ptr + cols, col_max, mask=cmask)
    if HAS_STEP:
        tl.atomic_max(step_ptr + step, tl.max(col_max, axis=0))
