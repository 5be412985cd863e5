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
from triton.language.extra import libdevice

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
def _fp8_act_kernel(x_ptr, out_ptr, mult_ptr, n, BLOCK: tl.constexpr, BF16_PRODUCT: tl.constexpr,
                    VALUES: tl.constexpr):
    """``fp8(clamp(x * mult, -448, 448))``: uint8 bit patterns, or (``VALUES``) the FP8 values themselves in
    ``out_ptr``'s dtype (exact in bf16/fp32: 4 significant bits); the product rounded to bf16 first if asked."""
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
    val, code = _e4m3_round(a)
    if VALUES:  # signed value; -0.0 stays -0.0 (its code is 0x80)
        v = (val.to(tl.int32, bitcast=True) | (p.to(tl.int32, bitcast=True) & -2147483648)).to(tl.float32,
                                                                                                bitcast=True)
        tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        code = tl.where(neg, code + 128, code)
        tl.store(out_ptr + offs, code.to(tl.uint8), mask=mask)


@triton.jit
def _amax_tile(pid_k, pid_m, x_ptr, M, K, stride_m, c0, c1, c2, c3, s0, s1, s2, s3, idx,
               BM: tl.constexpr, BK: tl.constexpr, ITERS: tl.constexpr, STAGES: tl.constexpr,
               N_DEST: tl.constexpr, HAS_STEP: tl.constexpr):
    """max |x| over rows ``[pid_m * ITERS * BM, +ITERS * BM)`` of column tile ``pid_k``, folded atomically into
    ``c0..c{N_DEST-1}`` (per column) and, with ``HAS_STEP``, the tile's max into ``s_i[idx]``."""
    cols = pid_k * BK + tl.arange(0, BK)
    cmask = cols < K
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    lo = pid_m * (ITERS * BM)
    for i in tl.range(ITERS, num_stages=STAGES):  # loads pipelined
        rows = lo + i * BM + tl.arange(0, BM)
        m = (rows[:, None] < M) & cmask[None, :]
        ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_m + cols[None, :]
        acc = tl.maximum(acc, tl.abs(tl.load(ptrs, mask=m, other=0.0).to(tl.float32)))
    col_max = tl.max(acc, axis=0)
    tl.atomic_max(c0 + cols, col_max, mask=cmask)
    if N_DEST > 1:
        tl.atomic_max(c1 + cols, col_max, mask=cmask)
    if N_DEST > 2:
        tl.atomic_max(c2 + cols, col_max, mask=cmask)
    if N_DEST > 3:
        tl.atomic_max(c3 + cols, col_max, mask=cmask)
    if HAS_STEP:
        tile_max = tl.max(col_max, axis=0)
        tl.atomic_max(s0 + idx, tile_max)
        if N_DEST > 1:
            tl.atomic_max(s1 + idx, tile_max)
        if N_DEST > 2:
            tl.atomic_max(s2 + idx, tile_max)
        if N_DEST > 3:
            tl.atomic_max(s3 + idx, tile_max)


@triton.jit
def _amax_kernel(x_ptr, c0, c1, c2, c3, s0, s1, s2, s3, step_ptr, step, M, K, stride_m,
                 BM: tl.constexpr, BK: tl.constexpr, ITERS: tl.constexpr, STAGES: tl.constexpr,
                 N_DEST: tl.constexpr, HAS_STEP: tl.constexpr, STEP_FROM_PTR: tl.constexpr):
    """One tensor: grid (column tiles, row slabs) of :func:`_amax_tile`; ``step`` read from ``step_ptr`` when
    ``STEP_FROM_PTR`` (CUDA-graph replays then follow the current step)."""
    idx = step
    if HAS_STEP:
        if STEP_FROM_PTR:
            idx = tl.load(step_ptr)
    _amax_tile(tl.program_id(0), tl.program_id(1), x_ptr, M, K, stride_m, c0, c1, c2, c3, s0, s1, s2, s3, idx,
               BM, BK, ITERS, STAGES, N_DEST, HAS_STEP)


@triton.jit
def _amax_batch_kernel(step_ptr, end0, end1, end2,
                       xa, Ma, Ka, sma, ca0, ca1, ca2, ca3, sa0, sa1, sa2, sa3,
                       xb, Mb, Kb, smb, cb0, cb1, cb2, cb3, sb0, sb1, sb2, sb3,
                       xc, Mc, Kc, smc, cc0, cc1, cc2, cc3, sc0, sc1, sc2, sc3,
                       xd, Md, Kd, smd, cd0, cd1, cd2, cd3, sd0, sd1, sd2, sd3,
                       BM: tl.constexpr, BK: tl.constexpr, ITERS: tl.constexpr, STAGES: tl.constexpr,
                       N_ITEMS: tl.constexpr, NDA: tl.constexpr, NDB: tl.constexpr, NDC: tl.constexpr,
                       NDD: tl.constexpr, HAS_STEP: tl.constexpr):
    """Up to four tensors (items a..d, same dtype) in one launch: a 1-D grid whose programs ``[0, end0)`` tile
    item a (column tiles fastest), ``[end0, end1)`` item b, and so on; the step index is read from ``step_ptr``."""
    pid = tl.program_id(0)
    idx = 0
    if HAS_STEP:
        idx = tl.load(step_ptr)
    if pid < end0:
        ct = tl.cdiv(Ka, BK)
        _amax_tile(pid % ct, pid // ct, xa, Ma, Ka, sma, ca0, ca1, ca2, ca3, sa0, sa1, sa2, sa3, idx,
                   BM, BK, ITERS, STAGES, NDA, HAS_STEP)
    if N_ITEMS > 1:
        if (pid >= end0) & (pid < end1):
            ct = tl.cdiv(Kb, BK)
            q = pid - end0
            _amax_tile(q % ct, q // ct, xb, Mb, Kb, smb, cb0, cb1, cb2, cb3, sb0, sb1, sb2, sb3, idx,
                       BM, BK, ITERS, STAGES, NDB, HAS_STEP)
    if N_ITEMS > 2:
        if (pid >= end1) & (pid < end2):
            ct = tl.cdiv(Kc, BK)
            q = pid - end1
            _amax_tile(q % ct, q // ct, xc, Mc, Kc, smc, cc0, cc1, cc2, cc3, sc0, sc1, sc2, sc3, idx,
                       BM, BK, ITERS, STAGES, NDC, HAS_STEP)
    if N_ITEMS > 3:
        if pid >= end2:
            ct = tl.cdiv(Kd, BK)
            q = pid - end2
            _amax_tile(q % ct, q // ct, xd, Md, Kd, smd, cd0, cd1, cd2, cd3, sd0, sd1, sd2, sd3, idx,
                       BM, BK, ITERS, STAGES, NDD, HAS_STEP)


@triton.jit
def _gelu_tanh_amax_kernel(y_ptr, out_ptr, M, K, stride_y, c0, s0, step_ptr,
                           BM: tl.constexpr, BK: tl.constexpr, ITERS: tl.constexpr, HAS_STEP: tl.constexpr,
                           INTERPRET: tl.constexpr):
    """``out = gelu(y, approximate="tanh")`` computed as torch's CUDA kernel does (float opmath, libdevice
    ``tanhf``, one rounding to out's dtype), and ``max |out|`` folded atomically into ``c0`` (per column) and
    ``s0[step]``. (Triton's CPU interpreter has no libdevice: there tanh comes from exp, not bit-exact.)"""
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_k * BK + tl.arange(0, BK)
    cmask = cols < K
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    lo = pid_m * (ITERS * BM)
    for i in range(ITERS):
        rows = lo + i * BM + tl.arange(0, BM)
        m = (rows[:, None] < M) & cmask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        y = tl.load(y_ptr + r64 * stride_y + cols[None, :], mask=m, other=0.0).to(tl.float32)
        cube = y * y * y
        inner = 0.7978845608028654 * (y + 0.044715 * cube)  # kBeta * (x + kKappa * x^3), as torch writes it
        if INTERPRET:
            e = tl.exp(2.0 * inner)
            t = 1.0 - 2.0 / (e + 1.0)
        else:
            t = libdevice.tanh(inner)
        g = 0.5 * y * (1.0 + t)
        gq = g.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + r64 * K + cols[None, :], gq, mask=m)
        acc = tl.maximum(acc, tl.abs(gq.to(tl.float32)))
    col_max = tl.max(acc, axis=0)
    tl.atomic_max(c0 + cols, col_max, mask=cmask)
    if HAS_STEP:
        tl.atomic_max(s0 + tl.load(step_ptr), tl.max(col_max, axis=0))
