"""NVFP4: E2M1 4-bit codes, one float8_e4m3fn scale per 16 consecutive inputs, one float32 global scale.

Value of element ``(r, c)``::

    x[r, c] ~= e2m1(code[r, c]) * float(block_scale[r, c // 16]) * global_scale

* **E2M1 code** (4 bits): bit 3 = sign, bits 0-2 index the magnitudes ``E2M1_VALUES``
  ``(0, 0.5, 1, 1.5, 2, 3, 4, 6)``. Rounding is to nearest, ties to the even code, saturating at 6.
* **Packing**: two codes per byte. ``NibbleOrder.HIGH_FIRST`` puts element ``2i`` in bits 4-7
  (comfy-kitchen default, the order of ComfyUI files); ``NibbleOrder.LOW_FIRST`` puts it in bits 0-3
  (TensorRT Model Optimizer, compressed-tensors, torchao). Same shapes, different bytes.
* **Block scales**: logical ``[rows, cols/16]`` float8_e4m3fn. ``ScaleLayout.ROW_MAJOR`` stores exactly
  that; ``ScaleLayout.TILED`` is the cuBLAS 128x4 "blocked" layout of comfy-kitchen's ``to_blocked``,
  zero-padded to ``[roundup(rows, 128), roundup(cols/16, 4)]``. For matrices whose rows are a multiple of 128 and
  cols/16 a multiple of 4 both layouts have the same shape; only the values tell them apart.
* **Global scale**: ``amax / (6 * 448)`` float32 ``[]`` (``weight_scale_2`` / ``input_scale``).

The quantizer reproduces comfy-kitchen 0.2.40's eager ``quantize_nvfp4`` exactly (see
:func:`quantize_nvfp4`), and :func:`dequantize_nvfp4` its ``dequantize_nvfp4``. Everything is vectorised
torch code; it runs unchanged on CUDA tensors.
"""

from __future__ import annotations

from enum import Enum

import torch

from .checks import FormatError, check_block_multiple, check_finite, check_float, check_rank
from .fp8 import FP8_DTYPE, FP8_E4M3_MAX, _safe_scale, divide_exact, map_row_chunks

__all__ = [
    "E2M1_MAX",
    "E2M1_VALUES",
    "NVFP4_BLOCK",
    "NVFP4_DEFAULT_FALLBACK",
    "NVFP4_DEQUANT_MODES",
    "NibbleOrder",
    "ScaleLayout",
    "decode_e2m1",
    "dequantize_nvfp4",
    "encode_e2m1",
    "fake_quantize_nvfp4",
    "from_tiled",
    "nvfp4_block_values",
    "nvfp4_global_scale",
    "pack_e2m1",
    "quantize_nvfp4",
    "quantize_nvfp4_activation",
    "tiled_shape",
    "to_tiled",
    "unpack_e2m1",
]

E2M1_MAX = 6.0
NVFP4_BLOCK = 16
#: The 8 E2M1 magnitudes, indexed by the low 3 bits of a code.
E2M1_VALUES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: What :func:`quantize_nvfp4` says happens to a layer whose in_features is not a multiple of 16.
NVFP4_DEFAULT_FALLBACK = (
    "pad in_features with zeros to a multiple of 16 (as ComfyUI's TensorCoreNVFP4Layout does) "
    "or keep the layer in FP8/bf16"
)

#: Tile of the cuBLAS block-scale layout: 128 rows x 4 scale columns, stored as 32 x 16.
_TILE_ROWS, _TILE_COLS = 128, 4


class NibbleOrder(str, Enum):
    """Which nibble of a packed byte holds the even-indexed element ``2i``."""

    LOW_FIRST = "low_first"  # element 2i in bits 0-3: ModelOpt, compressed-tensors, torchao
    HIGH_FIRST = "high_first"  # element 2i in bits 4-7: comfy-kitchen default, ComfyUI files


class ScaleLayout(str, Enum):
    """Storage layout of the ``[rows, cols/16]`` block-scale matrix."""

    ROW_MAJOR = "row_major"  # [rows, cols/16] as is
    TILED = "cublas_tiled"  # cuBLAS 128x4 tiled ("blocked"), padded, as comfy-kitchen's to_blocked


# --------------------------------------------------------------------------------------------------
# E2M1 codes
# --------------------------------------------------------------------------------------------------

_LUT_CACHE: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def e2m1_lut(device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 16 E2M1 code values ``[16]`` in ``dtype`` on ``device`` (exact in every float dtype), code 8 = -0.0;
    index with ``codes.to(torch.int32)`` to decode without validation (hot loops)."""
    device = torch.device(device)
    t = _LUT_CACHE.get((device, dtype))
    if t is None:
        t = torch.tensor(list(E2M1_VALUES) + [-v for v in E2M1_VALUES], dtype=dtype, device=device)
        _LUT_CACHE[(device, dtype)] = t
    return t


def _encode_unchecked(y: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8 0..15) of float32 ``y``: round to nearest even, saturate at 6, sign bit kept.

    With ``a = min(|y|, 6)`` and ``e = max(floor(log2 a), 0)`` (0, 1 or 2), the E2M1 grid around ``a`` has
    step ``2**(e-1)`` and the code is ``round(a / step) + 2*e`` (0.5-steps give codes 0..4 on [0, 2],
    1-steps codes 4..6 on [2, 4], 2-steps codes 6..7 on [4, 6]). ``round`` is done by the float adder:
    ``a + step * 2**23`` has ulp ``step``, so IEEE round-to-nearest-even leaves ``round(a/step)`` in its
    mantissa field, ties to even. Branch-free, integer/float ops only (runs on any device).
    """
    a = torch.clamp(y.abs(), max=E2M1_MAX)
    e = torch.clamp(a.view(torch.int32) >> 23, min=127)  # biased exponent, at least 2**0
    magic = ((e + 22) << 23).view(torch.float32)  # step * 2**23 = 2**(e - 127 + 22)
    k = (a + magic).view(torch.int32) & 0x7FFFFF
    code = (k + ((e - 127) << 1)).to(torch.uint8)
    return code | (torch.signbit(y).to(torch.uint8) << 3)


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round ``x`` (already divided by its scale) to E2M1 codes, uint8 in 0..15, same shape.

    Round to nearest, ties to even code (bit-identical to comfy-kitchen's ``_f32_to_floatx_unpacked``),
    ``|x| > 6`` saturates to code 7/15, the sign comes from the sign bit (``-0.0`` and negatives that
    round to zero give code 8). The comparison is done in float32 (bf16/fp16 convert exactly; float64
    is rounded to float32 first). Raises :class:`FormatError` for NaN/Inf.
    """
    check_float(x, "encode_e2m1 input")
    check_finite(x, "encode_e2m1 input")
    return _encode_unchecked(x.to(torch.float32))


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8 0..15, any shape) -> float32 values, same shape (code 8 -> -0.0)."""
    _check_codes(codes, "decode_e2m1 codes")
    return e2m1_lut(codes.device, torch.float32)[codes.to(torch.int32)]


def _check_codes(codes: torch.Tensor, name: str) -> None:
    if codes.dtype != torch.uint8:
        raise FormatError(f"{name}: expected uint8 E2M1 codes, got dtype {codes.dtype}")
    if codes.numel() and int(codes.max()) > 15:
        raise FormatError(f"{name}: expected codes in 0..15, got max {int(codes.max())}")


def _pack_unchecked(codes: torch.Tensor, order: NibbleOrder) -> torch.Tensor:
    first, second = codes[..., 0::2], codes[..., 1::2]
    if NibbleOrder(order) is NibbleOrder.HIGH_FIRST:
        return (first << 4) | second
    return (second << 4) | first


def _unpack_unchecked(packed: torch.Tensor, order: NibbleOrder) -> torch.Tensor:
    hi, lo = packed >> 4, packed & 0x0F
    pair = (hi, lo) if NibbleOrder(order) is NibbleOrder.HIGH_FIRST else (lo, hi)
    return torch.stack(pair, dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def pack_e2m1(codes: torch.Tensor, order: NibbleOrder = NibbleOrder.HIGH_FIRST) -> torch.Tensor:
    """Pack uint8 codes ``[..., n]`` (n even) two per byte -> uint8 ``[..., n/2]`` in nibble ``order``."""
    _check_codes(codes, "pack_e2m1 codes")
    if codes.dim() == 0 or codes.shape[-1] % 2:
        raise FormatError(f"pack_e2m1 codes: expected an even last dimension, got shape {tuple(codes.shape)}")
    return _pack_unchecked(codes, order)


def unpack_e2m1(packed: torch.Tensor, order: NibbleOrder = NibbleOrder.HIGH_FIRST) -> torch.Tensor:
    """Unpack uint8 ``[..., m]`` -> uint8 codes ``[..., 2m]`` (inverse of :func:`pack_e2m1`)."""
    if packed.dtype != torch.uint8:
        raise FormatError(f"unpack_e2m1: expected packed uint8, got dtype {packed.dtype}")
    if packed.dim() == 0:
        raise FormatError("unpack_e2m1: expected at least a 1-D tensor, got a scalar")
    return _unpack_unchecked(packed, order)


# --------------------------------------------------------------------------------------------------
# cuBLAS tiled ("blocked") scale layout
# --------------------------------------------------------------------------------------------------


def tiled_shape(rows: int, cols: int) -> tuple[int, int]:
    """Shape of the tiled layout of a ``[rows, cols]`` scale matrix: ``(roundup(rows,128), roundup(cols,4))``."""
    return (-(-rows // _TILE_ROWS) * _TILE_ROWS, -(-cols // _TILE_COLS) * _TILE_COLS)


def to_tiled(scales: torch.Tensor) -> torch.Tensor:
    """Row-major ``[rows, cols]`` block scales -> cuBLAS tiled layout ``[roundup(rows,128), roundup(cols,4)]``.

    The matrix is zero-padded, cut into 128x4 tiles taken row-of-tiles by row-of-tiles, and each tile is
    stored as 512 consecutive bytes where tile element ``(32*j + i, k)`` goes to offset ``16*i + 4*j + k``
    (i < 32, j < 4, k < 4). The result is that byte stream viewed as a 2-D tensor of the padded shape,
    which is what comfy-kitchen's ``to_blocked(x, flatten=False)`` returns (bit-identical). Any dtype.
    """
    if scales.dim() != 2:
        raise FormatError(
            f"to_tiled: expected a 2-D [rows, cols] scale matrix, got shape {tuple(scales.shape)}"
        )
    rows, cols = scales.shape
    prows, pcols = tiled_shape(rows, cols)
    dtype = scales.dtype
    src = scales.view(torch.uint8) if dtype.itemsize == 1 and dtype != torch.uint8 else scales
    if (prows, pcols) != (rows, cols):
        src = torch.nn.functional.pad(src, (0, pcols - cols, 0, prows - rows))
    # [row_tile, j, i, col_tile, k] -> [row_tile, col_tile, i, j, k]
    t = src.reshape(prows // 128, 4, 32, pcols // 4, 4).permute(0, 3, 2, 1, 4).reshape(prows, pcols)
    return t.view(dtype) if src.dtype != dtype else t


def from_tiled(tiled: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`to_tiled`: tiled scales (2-D padded or flattened) -> row-major ``[rows, cols]``."""
    prows, pcols = tiled_shape(rows, cols)
    if tiled.numel() != prows * pcols:
        raise FormatError(
            f"from_tiled: a [{rows}, {cols}] scale matrix tiles to [{prows}, {pcols}] = {prows * pcols} "
            f"elements, got shape {tuple(tiled.shape)}"
        )
    t = tiled.reshape(prows // 128, pcols // 4, 32, 4, 4).permute(0, 3, 2, 1, 4).reshape(prows, pcols)
    return t[:rows, :cols]


# --------------------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------------------


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """NVFP4 global (per-tensor) scale ``amax / (6 * 448)`` in float32, same shape as ``amax``.

    Zero-safe like :func:`~ptq.formats.fp8.fp8_scale_from_amax`: ``amax == 0`` gives 1.0 (an all-zero
    tensor then has zero block scales and zero codes; comfy-kitchen with a 0 global scale would produce
    NaN block scales), a positive amax below ``2688 * 2**-126`` gives the smallest normal float32.
    Computed from ``amax.float()`` in float32 (ComfyUI's ``"recalculate"`` path divides a bf16 amax in bf16).
    """
    return _safe_scale(amax, E2M1_MAX * FP8_E4M3_MAX, "amax")


def _as_global(
    global_scale: torch.Tensor | float, device: torch.device, name: str, check: bool
) -> torch.Tensor:
    g = torch.as_tensor(global_scale, device=device)
    if g.dtype != torch.float32:
        g = g.to(torch.float32)
    if g.numel() != 1:
        raise FormatError(f"{name}: expected a float32 scalar global scale, got shape {tuple(g.shape)}")
    g = g.reshape(())
    if check and not (bool(torch.isfinite(g)) and float(g) > 0):
        raise FormatError(
            f"{name}: expected a finite global scale > 0 (nvfp4_global_scale is zero-safe), got {float(g)}"
        )
    return g


def _block_scales(xb: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block_scales float8_e4m3fn [rows, cols/16], global * float(block_scale) float32 [rows, cols/16])`` of
    blocks ``xb`` [rows, cols/16, 16] under global scale ``g`` (comfy-kitchen's eager math, step by step)."""
    block_amax = xb.abs().amax(dim=-1).to(torch.float32)  # exact: amax in x.dtype, then widened
    s = divide_exact(block_amax, E2M1_MAX) / g  # two correctly rounded float32 divisions, in this order
    s8 = torch.clamp(s, max=FP8_E4M3_MAX).to(FP8_DTYPE)  # RNE; may round to 0 for tiny blocks
    return s8, g * s8.to(torch.float32)


def _quantize_blocks(x2d: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Core of NVFP4 quantization, comfy-kitchen eager math step by step.

    ``x2d`` [rows, cols] (cols % 16 == 0, any float dtype), ``g`` float32 []. Returns
    ``(codes uint8 [rows, cols], block_scales float8_e4m3fn [rows, cols/16])``.
    """
    rows, cols = x2d.shape
    xb = x2d.reshape(rows, cols // NVFP4_BLOCK, NVFP4_BLOCK)
    s8, total = _block_scales(xb, g)
    zero = total == 0
    y = xb.to(torch.float32) / torch.where(zero, torch.ones_like(total), total).unsqueeze(-1)
    y = torch.where(zero.unsqueeze(-1), torch.zeros_like(y), y)  # zero blocks -> +0 codes, never NaN
    y = torch.clamp(y, -E2M1_MAX, E2M1_MAX)
    return _encode_unchecked(y).reshape(rows, cols), s8


def round_to_e2m1(y: torch.Tensor) -> torch.Tensor:
    """float32 ``y`` -> the E2M1 value :func:`encode_e2m1` picks (nearest, ties to even code, saturate at 6, sign
    kept), as float32 (``y`` is left as it is). Same trick as :func:`_encode_unchecked` without the
    codes: ``(a + magic) - magic`` with ``magic = step * 2**23`` rounds ``a`` to a multiple of the E2M1 step."""
    a = y.abs().clamp_(max=E2M1_MAX)
    magic = (a.view(torch.int32) >> 23).clamp_(min=127).add_(22).bitwise_left_shift_(23).view(torch.float32)
    return (a + magic).sub_(magic).copysign_(y)


def _quantized_block_values(x2d: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``_block_values(*_quantize_blocks(x2d, g))`` without the codes (2-4x fewer passes over the data): float32
    ``e2m1 value * float(block_scale)`` [rows, cols]; a block whose scale rounds to 0 gives +-0."""
    rows, cols = x2d.shape
    xb = x2d.reshape(rows, cols // NVFP4_BLOCK, NVFP4_BLOCK)
    s8, total = _block_scales(xb, g)
    total = torch.where(total == 0, torch.full_like(total, float("inf")), total)  # x / inf = +-0, never NaN
    y = xb.to(torch.float32) / total.unsqueeze(-1)  # a new tensor: x.to(float32) is x itself for float32 input
    return round_to_e2m1(y).mul_(s8.to(torch.float32).unsqueeze(-1)).reshape(rows, cols)


def check_nvfp4_matrix(x: torch.Tensor, name: str, fallback: str = NVFP4_DEFAULT_FALLBACK) -> None:
    """The input checks of NVFP4 weight quantization: float dtype, 2-D, ``cols % 16 == 0`` (else
    :class:`UnsupportedShapeError` quoting ``fallback``), finite; :class:`FormatError` naming ``name``."""
    check_float(x, name)
    check_rank(x, 2, name)
    check_block_multiple(x.shape[1], NVFP4_BLOCK, name, fallback)
    check_finite(x, name)


def quantize_nvfp4(
    x: torch.Tensor,
    global_scale: torch.Tensor,
    order: NibbleOrder = NibbleOrder.HIGH_FIRST,
    name: str = "tensor",
    *,
    fallback: str = NVFP4_DEFAULT_FALLBACK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` ``[rows, cols]`` (float16/bf16/float32) to NVFP4.

    Returns ``(packed uint8 [rows, cols/2] in nibble `order`, block_scales float8_e4m3fn [rows, cols/16]
    ROW_MAJOR)``; use :func:`to_tiled` for the cuBLAS/ComfyUI layout. ``global_scale``: float32 ``[]`` > 0,
    normally :func:`nvfp4_global_scale` of the tensor's amax. Math (comfy-kitchen eager, bit-exact)::

        s     = fp8(min(block_amax / 6 / global, 448))          # float32 divisions, RNE to E4M3
        total = global * float(s)
        code  = e2m1(clamp(x.float() / total, -6, 6))           # true division; total == 0 -> code 0

    A block whose scale rounds to 0 in E4M3 (block_amax < ~6 * global * 2**-10) becomes all zeros.
    ``cols`` must be a multiple of 16, else :class:`UnsupportedShapeError` quoting ``fallback``. ComfyUI
    (``TensorCoreNVFP4Layout``, ``pad_16x``) zero-pads rows and cols to multiples of 16 instead and
    stores the padded tensors; rows need no padding here. NaN/Inf, non-float dtypes and non-2-D inputs
    raise :class:`FormatError` naming ``name``.
    """
    check_nvfp4_matrix(x, name, fallback)
    g = _as_global(global_scale, x.device, f"{name} global_scale", check=True)
    order = NibbleOrder(order)

    def run(xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes, s8 = _quantize_blocks(xc, g)
        return _pack_unchecked(codes, order), s8.view(torch.uint8)

    packed, s8 = map_row_chunks(run, x)
    return packed, s8.view(FP8_DTYPE)


def _scales_row_major(
    block_scales: torch.Tensor, layout: ScaleLayout, rows: int, nblocks: int
) -> torch.Tensor:
    if block_scales.dtype != FP8_DTYPE:
        raise FormatError(f"block_scales: expected {FP8_DTYPE}, got {block_scales.dtype}")
    if ScaleLayout(layout) is ScaleLayout.TILED:
        return from_tiled(block_scales, rows, nblocks)
    if tuple(block_scales.shape) != (rows, nblocks):
        raise FormatError(
            f"block_scales: expected ROW_MAJOR shape [{rows}, {nblocks}], got {tuple(block_scales.shape)} "
            "(tiled scales need layout=ScaleLayout.TILED)"
        )
    return block_scales


def _packed_dims(packed: torch.Tensor) -> tuple[int, int]:
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise FormatError(
            f"packed: expected a 2-D uint8 [rows, cols/2] tensor, got {packed.dtype} {tuple(packed.shape)}"
        )
    rows, cols = packed.shape[0], 2 * packed.shape[1]
    if cols % NVFP4_BLOCK:
        raise FormatError(f"packed: cols = 2*{packed.shape[1]} = {cols} is not a multiple of {NVFP4_BLOCK}")
    return rows, cols


def dequantize_nvfp4(
    packed: torch.Tensor,
    block_scales: torch.Tensor,
    global_scale: torch.Tensor,
    order: NibbleOrder = NibbleOrder.HIGH_FIRST,
    layout: ScaleLayout = ScaleLayout.ROW_MAJOR,
    shape: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    mode: str = "ck_eager",
) -> torch.Tensor:
    """NVFP4 -> ``dtype`` ``[rows, cols]``; ``packed`` uint8 ``[rows, cols/2]``.

    ``block_scales``: float8_e4m3fn, ``[rows, cols/16]`` (ROW_MAJOR) or tiled/padded (TILED, 2-D or flat).
    ``shape``: the logical ``(rows, cols)`` to return when ``packed`` holds zero padding (ComfyUI's
    ``pad_16x``); default ``(rows, 2 * packed.shape[1])``. Both modes use comfy-kitchen's order
    ``value(code) * (global * scale)``:

    * ``mode="ck_eager"`` (default): computed in ``dtype`` like ck's eager backend, so HIGH_FIRST + TILED
      is bit-identical to ``comfy_kitchen.dequantize_nvfp4(..., output_type=dtype)`` on CPU for every
      dtype. For bf16 this rounds ``global * scale`` to bf16 first.
    * ``mode="float32"``: computed in float32, rounded once to ``dtype``. Same as the default for
      ``dtype=float32``; for bf16 ~15-20% of elements differ from it by one bf16 ulp. ck's CUDA backend
      (ComfyUI on NVIDIA GPUs) matched this mode on an H100 (bf16 output), not the eager one.

    :func:`nvfp4_block_values` gives the exact ``value * scale`` without the global scale.
    """
    _check_nvfp4_mode(mode)
    rows, cols = _packed_dims(packed)
    scales = _scales_row_major(block_scales, layout, rows, cols // NVFP4_BLOCK)
    g = _as_global(global_scale, packed.device, "global_scale", check=False)
    order = NibbleOrder(order)

    def run(pc: torch.Tensor, sc: torch.Tensor) -> tuple[torch.Tensor]:
        return (_dequant_codes(_unpack_unchecked(pc, order), sc, g, dtype, mode),)

    (out,) = map_row_chunks(run, packed, (scales,))
    if shape is not None:
        r, c = shape
        if r > rows or c > cols:
            raise FormatError(f"dequantize_nvfp4: shape {tuple(shape)} exceeds the stored [{rows}, {cols}]")
        out = out[:r, :c]
    return out


#: Arithmetic variants of NVFP4 dequantization (see :func:`dequantize_nvfp4`); the first is the default.
NVFP4_DEQUANT_MODES = ("ck_eager", "float32")


def _check_nvfp4_mode(mode: str) -> None:
    if mode not in NVFP4_DEQUANT_MODES:
        raise ValueError(f"unknown NVFP4 mode {mode!r}; expected one of {', '.join(NVFP4_DEQUANT_MODES)}")


def _dequant_codes(
    codes: torch.Tensor, s8: torch.Tensor, g: torch.Tensor, dtype: torch.dtype, mode: str
) -> torch.Tensor:
    rows, cols = codes.shape
    cdt = dtype if mode == "ck_eager" else torch.float32
    vals = e2m1_lut(codes.device, cdt)[codes.to(torch.int32)]
    total = g.to(cdt) * s8.to(cdt)
    out = vals.reshape(rows, cols // NVFP4_BLOCK, NVFP4_BLOCK) * total.unsqueeze(-1)
    return out.reshape(rows, cols).to(dtype)


def nvfp4_block_values(
    packed: torch.Tensor,
    block_scales: torch.Tensor,
    order: NibbleOrder = NibbleOrder.HIGH_FIRST,
    layout: ScaleLayout = ScaleLayout.ROW_MAJOR,
) -> torch.Tensor:
    """``e2m1(code) * float(block_scale)`` as float32 ``[rows, cols]``, WITHOUT the global scale.

    Every such value is exact in float32 and also exactly representable in bf16: an E2M1 value has at most
    2 significant bits, an E4M3 scale (normal or subnormal) at most 4, so the product has at most 5 <= 8
    significant bits, and its exponent (>= 2**-10 for non-zero values, <= 6*448) is well inside bf16's
    range. Hence a bf16 GEMM with float32 accumulation over these values, multiplied afterwards by
    ``global_a * global_b``, reproduces the NVFP4 tensor-core numerics up to the float32 summation order
    (products of two such values have <= 10 significant bits and are exact in float32 too).
    """
    rows, cols = _packed_dims(packed)
    scales = _scales_row_major(block_scales, layout, rows, cols // NVFP4_BLOCK)
    order = NibbleOrder(order)

    def run(pc: torch.Tensor, sc: torch.Tensor) -> tuple[torch.Tensor]:
        return (_block_values(_unpack_unchecked(pc, order), sc),)

    return map_row_chunks(run, packed, (scales,))[0]


def _block_values(codes: torch.Tensor, s8: torch.Tensor) -> torch.Tensor:
    """float32 ``value(code) * float(scale)`` for codes ``[r, c]`` and scales ``[r, c/16]`` (exact)."""
    r, c = codes.shape
    vals = e2m1_lut(codes.device, torch.float32)[codes.to(torch.int32)].reshape(r, c // NVFP4_BLOCK, NVFP4_BLOCK)
    return (vals * s8.to(torch.float32).unsqueeze(-1)).reshape(r, c)


def _activation_2d(x: torch.Tensor, name: str) -> torch.Tensor:
    check_float(x, name)
    if x.dim() == 0:
        raise FormatError(f"{name}: expected at least a 1-D tensor [..., k], got a scalar")
    check_block_multiple(x.shape[-1], NVFP4_BLOCK, name, NVFP4_DEFAULT_FALLBACK)
    return x.reshape(-1, x.shape[-1])


def quantize_nvfp4_activation(
    x: torch.Tensor, input_scale: torch.Tensor, name: str = "activation"
) -> torch.Tensor:
    """NVFP4 activation quantization as the kernels do it; returns float32 ``[..., k]`` block values.

    ``input_scale``: static float32 ``[]`` global scale (calibrated ``amax / (6*448)``); block scales
    are computed at run time per 16 consecutive elements of the last dim (``k % 16 == 0``). The result
    is ``e2m1(code) * float(block_scale)`` WITHOUT the global scale (see :func:`nvfp4_block_values`);
    multiply by ``input_scale`` for the dequantized activation. No finiteness check (hot path): a NaN
    poisons its block (NaN out), an Inf saturates its block. Values beyond ``2688 * input_scale``
    saturate (block scale clamped to 448).
    """
    x2 = _activation_2d(x, name)
    g = _as_global(input_scale, x.device, f"{name} input_scale", check=False)
    (out,) = map_row_chunks(lambda xc: (_quantized_block_values(xc, g),), x2)
    return out.reshape(x.shape)


def fake_quantize_nvfp4(
    x: torch.Tensor, global_scale: torch.Tensor, name: str = "tensor", *, mode: str = "ck_eager"
) -> torch.Tensor:
    """Quantize + dequantize ``x`` ``[..., k]`` to NVFP4 (blocks along the last dim); returns ``x.dtype``.

    Equals ``dequantize_nvfp4(*quantize_nvfp4(x, g), g, dtype=x.dtype, mode=mode)``; hence, for 2-D
    inputs and the default mode, bit-identical to ``comfy_kitchen.dequantize_nvfp4(
    *comfy_kitchen.quantize_nvfp4(x, g), output_type=x.dtype)`` (eager backend) for every dtype.
    ``mode="float32"`` rounds once to ``x.dtype`` instead (the ck CUDA backend's dequantization).
    (``quantize_nvfp4_activation(x, g) * g`` computes ``(value*scale)*g`` instead of ck's
    ``value*(global*scale)`` and differs from it by one float32 ulp in ~15% of elements.)
    No finiteness check (hot path), see :func:`quantize_nvfp4_activation`.
    """
    _check_nvfp4_mode(mode)
    x2 = _activation_2d(x, name)
    g = _as_global(global_scale, x.device, f"{name} global_scale", check=False)
    (out,) = map_row_chunks(lambda xc: (_dequant_codes(*_quantize_blocks(xc, g), g, xc.dtype, mode),), x2)
    return out.reshape(x.shape)
