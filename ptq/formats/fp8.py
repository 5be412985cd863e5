"""FP8 E4M3 (``torch.float8_e4m3fn``) quantization with per-tensor or per-output-channel float32 scales.

Conventions (the ones ComfyUI / comfy-kitchen files use):

* ``scale = amax / 448`` (float32), ``q = fp8(clamp(x / scale, -448, 448))``, ``x ~= q.float() * scale``.
* ``scale`` is a float32 ``[]`` tensor (per tensor) or ``[out, 1]`` (per output channel of a
  ``[out, in]`` weight).

comfy-kitchen 0.2.40's backends do *not* agree with each other for bf16/fp16 inputs, so the arithmetic
is selectable (``mode``); every mode clamps to +-448 and casts with round-to-nearest-even:

* ``"ck_eager"`` (default): ``x * (1/scale).to(x.dtype)``, the product computed in ``x.dtype``: ck's
  **eager** (CPU) backend bit for bit, i.e. what ``comfy_kitchen.quantize_per_tensor_fp8`` returns for
  CPU tensors. For bf16 input the intermediate is bf16 (two roundings).
* ``"float32"``: ``x.float() * fl32(1/scale)``. Bit-identical to ck's **CUDA** backend, which is what
  ComfyUI runs on NVIDIA GPUs (measured on an H100, float32 and bf16 inputs). Same as ``"ck_eager"`` for
  float32 inputs; for a bf16 matrix about 1-3% of the elements differ by one FP8 step.
* ``"divide"``: IEEE ``x.float() / scale``. Differs from ``"float32"`` only where ``x * fl(1/scale)`` and
  ``x / scale`` straddle an FP8 rounding midpoint (~1e-7 of elements). (ck's Triton backend writes a
  division, but Triton compiles it to the approximate ``div.full.f32``; on the H100 its results equalled
  ``"float32"`` on all four test matrices, including 3 elements where exact division differs.)

An unclamped cast of a value beyond +-448 to ``float8_e4m3fn`` gives NaN, which is why the clamp is
always applied.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .checks import FormatError, check_finite, check_float, check_rank

__all__ = [
    "FP8_DTYPE",
    "FP8_E4M3_MAX",
    "FP8_MODES",
    "FP8_SCALE_FOR_ZERO",
    "dequantize_fp8",
    "fake_quantize_fp8",
    "fp8_scale_from_amax",
    "quantize_fp8",
    "quantize_fp8_weight",
]

FP8_E4M3_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn
#: Arithmetic variants of the FP8 quantizer (see the module docstring); the first is the default.
FP8_MODES = ("ck_eager", "float32", "divide")

#: Scale returned for an all-zero amax. 1.0 keeps the reciprocal finite, quantizes zeros to exact zeros
#: and, should the tensor later hold non-zero values, still represents magnitudes up to 448.
FP8_SCALE_FOR_ZERO = 1.0
#: Smallest normal float32. A positive scale is never smaller than this, so ``1/scale`` stays finite
#: (``1/2**-126 = 2**126``); a smaller float32 scale (from amax < ~5e-36) would make the reciprocal inf.
_MIN_SCALE = torch.finfo(torch.float32).tiny


def divide_exact(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """``x / divisor`` as a correctly rounded division on every device. (PyTorch on CUDA divides by a Python
    scalar by multiplying with its rounded reciprocal, which differs from true division in the last bit for some
    values: CPU and GPU would then produce different scales.)"""
    return x / x.new_tensor(divisor)


def _safe_scale(amax: torch.Tensor, divisor: float, name: str) -> torch.Tensor:
    """``amax / divisor`` in float32, with 0 -> 1.0 and tiny -> smallest normal float32."""
    if not isinstance(amax, torch.Tensor):
        amax = torch.as_tensor(amax)
    amax = amax.to(torch.float32)
    check_finite(amax, name)
    if bool((amax < 0).any()):
        raise FormatError(f"{name}: expected amax >= 0, got min {float(amax.min())}")
    scale = divide_exact(amax, divisor)
    scale = torch.where(amax == 0, torch.full_like(scale, FP8_SCALE_FOR_ZERO), scale)
    return torch.clamp(scale, min=_MIN_SCALE)


def fp8_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """FP8 scale ``amax / 448`` (float32, same shape as ``amax``).

    Zero-safe: ``amax == 0`` gives ``FP8_SCALE_FOR_ZERO`` (1.0), never 0 or NaN (comfy-kitchen's own
    ``scale = amax/448`` would give 0 and then ``x * (1/0) = 0*inf = NaN``). A positive amax whose
    quotient would fall below the smallest normal float32 is raised to it, so ``1/scale`` is finite.
    Raises :class:`FormatError` for a negative or non-finite amax.
    """
    return _safe_scale(amax, FP8_E4M3_MAX, "amax")


def _as_scale(scale: torch.Tensor | float, x: torch.Tensor, name: str) -> torch.Tensor:
    """Coerce ``scale`` to a float32 tensor on x's device; allow shape ``[]`` or ``[out, 1]`` for 2-D x."""
    scale = torch.as_tensor(scale, device=x.device)
    if scale.dtype != torch.float32:
        scale = scale.to(torch.float32)
    if scale.dim() == 0 or (x.dim() == 2 and tuple(scale.shape) == (x.shape[0], 1)):
        return scale
    expected = f"[] or [{x.shape[0]}, 1]" if x.dim() == 2 else "[] (per-channel [out, 1] needs a 2-D input)"
    raise FormatError(
        f"{name}: expected a float32 scale of shape {expected}, got shape {tuple(scale.shape)} "
        f"for input shape {tuple(x.shape)}"
    )


#: On CPU, elementwise pipelines run over row chunks of about this many elements so that their
#: temporaries stay in cache (3-6x faster on a 9.4M-element matrix). CUDA tensors are processed whole.
CPU_CHUNK_ELEMENTS = 1 << 17


def map_row_chunks(
    fn: Callable[..., tuple[torch.Tensor, ...]],
    x: torch.Tensor,
    row_args: tuple[torch.Tensor, ...] = (),
    args: tuple = (),
) -> tuple[torch.Tensor, ...]:
    """``fn(x, *row_args, *args)`` evaluated over slices of dim 0 on CPU, results concatenated on dim 0.

    ``row_args`` are sliced together with ``x``; ``fn`` must be row-local (each output row depends on
    the same input rows only) and return a tuple of tensors whose dim 0 matches its input. Results are
    identical to one call on the whole tensor; on CUDA (or for small inputs) it is exactly one call.
    """
    if x.device.type != "cpu" or x.dim() == 0 or x.numel() <= CPU_CHUNK_ELEMENTS:
        return fn(x, *row_args, *args)
    rows = max(1, CPU_CHUNK_ELEMENTS // max(1, x[0].numel()))
    outs: tuple[torch.Tensor, ...] | None = None
    for i in range(0, x.shape[0], rows):
        part = fn(x[i : i + rows], *(r[i : i + rows] for r in row_args), *args)
        if outs is None:
            outs = tuple(torch.empty((x.shape[0], *p.shape[1:]), dtype=p.dtype) for p in part)
        for o, p in zip(outs, part):
            o[i : i + rows] = p
    assert outs is not None
    return outs


def _check_mode(mode: str) -> str:
    if mode not in FP8_MODES:
        raise ValueError(f"unknown FP8 mode {mode!r}; expected one of {', '.join(FP8_MODES)}")
    return mode


def _q_fp8(x: torch.Tensor, scale: torch.Tensor, mult: torch.Tensor, mode: str) -> torch.Tensor:
    """FP8 codes of ``x``; ``mult`` = 1/scale in float32 (``float32``) or in x.dtype (``ck_eager``)."""
    if mode == "float32":
        temp = x.to(torch.float32) * mult
    elif mode == "ck_eager":
        temp = x * mult
    else:
        temp = x.to(torch.float32) / scale
    return torch.clamp(temp, -FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)


def _dq_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, mode: str) -> torch.Tensor:
    if mode == "ck_eager":
        return q.to(dtype) * scale.to(dtype)
    return (q.to(torch.float32) * scale).to(dtype)


def _fp8_chunks(
    x: torch.Tensor, scale: torch.Tensor, mode: str, fake: bool, dq_mode: str = "float32"
) -> torch.Tensor:
    """Quantize (``fake=False``: float8 codes) or quantize+dequantize (``fake=True``: x.dtype)."""
    recip = 1.0 / scale
    mult = recip.to(x.dtype) if mode == "ck_eager" else recip

    def run(xc: torch.Tensor, sc: torch.Tensor, mc: torch.Tensor) -> tuple[torch.Tensor]:
        codes = _q_fp8(xc, sc, mc, mode)
        return (_dq_fp8(codes, sc, xc.dtype, dq_mode),) if fake else (codes,)

    if scale.dim() == 0:  # per tensor: chunk the flattened tensor
        flat = x.reshape(-1, x.shape[-1]) if x.dim() >= 2 else x.reshape(-1, 1)
        (out,) = map_row_chunks(run, flat, (), (scale, mult))
        return out.reshape(x.shape)
    (out,) = map_row_chunks(run, x, (scale, mult))
    return out


def quantize_fp8(
    x: torch.Tensor,
    scale: torch.Tensor,
    name: str = "tensor",
    *,
    mode: str = "ck_eager",
    validate: bool = True,
) -> torch.Tensor:
    """Quantize ``x`` (any shape; float16/bf16/float32) to ``float8_e4m3fn`` (same shape).

    ``scale``: float32 ``[]`` or ``[out, 1]`` (x must then be ``[out, in]``), strictly positive.
    ``mode``: ``"ck_eager"`` (default: ``clamp(x * (1/scale).to(x.dtype), +-448)``, bit-identical to
    comfy-kitchen's eager ``quantize_per_tensor_fp8``), ``"float32"`` (``x.float() * (1/scale)``:
    comfy-kitchen's CUDA backend, i.e. ComfyUI on NVIDIA GPUs) or ``"divide"`` (IEEE float32 division); all
    three agree for float32 inputs up to ~1e-7 of elements and differ for bf16 inputs (see module doc).
    Raises :class:`FormatError` for NaN/Inf in ``x``, a non-float ``x``, a bad scale shape or a
    non-positive/non-finite scale. ``validate=False`` skips the value checks (no device sync; for
    activations in a hot loop): NaN then stays NaN and Inf saturates to +-448.
    """
    _check_mode(mode)
    check_float(x, name)
    s = _as_scale(scale, x, f"{name} scale")
    if validate:
        check_finite(x, name)
        check_finite(s, f"{name} scale")
        if bool((s <= 0).any()):
            raise FormatError(f"{name} scale: expected > 0, got min {float(s.min())}")
    return _fp8_chunks(x, s, mode, fake=False)


def dequantize_fp8(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32, *, mode: str = "float32"
) -> torch.Tensor:
    """float8_e4m3fn ``q`` -> ``dtype``; ``scale`` float32 ``[]`` or ``[out, 1]``.

    ``mode="float32"`` (default): ``(q.float() * scale).to(dtype)``, one rounding to ``dtype``;
    bit-identical to comfy-kitchen's ``dequantize_per_tensor_fp8`` on its CUDA and Triton backends for
    float32 and bf16 output (measured on an H100), and on its eager backend for float32. ``mode="ck_eager"``: ``q.to(dtype) *
    scale.to(dtype)`` computed in ``dtype`` (ck eager; for bf16 it rounds the scale first and differs
    from the default by one bf16 ulp in ~10-40% of elements).
    """
    if mode not in ("float32", "ck_eager"):
        raise ValueError(f"unknown FP8 dequantization mode {mode!r}; expected 'float32' or 'ck_eager'")
    if q.dtype != FP8_DTYPE:
        raise FormatError(f"dequantize_fp8: expected a {FP8_DTYPE} tensor, got {q.dtype}")
    s = torch.as_tensor(scale, device=q.device).to(torch.float32)
    return _dq_fp8(q, s, dtype, mode)


def quantize_fp8_weight(
    w: torch.Tensor, per_channel: bool = False, name: str = "weight", *, mode: str = "ck_eager"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight to FP8 with a scale from its amax.

    Returns ``(q, scale)``: ``q`` float8_e4m3fn with ``w``'s shape; ``scale`` float32 ``[]`` (per tensor,
    ``amax(|w|)/448``) or ``[out, 1]`` (``per_channel=True``, amax over each row of a 2-D ``[out, in]``
    weight). ``w ~= q.float() * scale``. ``mode`` as in :func:`quantize_fp8`.
    """
    _check_mode(mode)
    check_float(w, name)
    if per_channel:
        check_rank(w, 2, name)
    check_finite(w, name)
    if per_channel:
        amax = w.abs().amax(dim=1, keepdim=True)
    else:
        amax = w.abs().amax() if w.numel() else torch.zeros((), device=w.device)
    scale = _safe_scale(amax, FP8_E4M3_MAX, f"{name} amax")
    return _fp8_chunks(w, scale, mode, fake=False), scale


def fake_quantize_fp8(x: torch.Tensor, scale: torch.Tensor, *, mode: str = "ck_eager") -> torch.Tensor:
    """``dequantize_fp8(quantize_fp8(x, scale, mode=mode), scale, x.dtype)``: static FP8 fake quantization.

    ``mode`` selects the quantizer arithmetic (see :func:`quantize_fp8`); the dequantization is always
    the default one, ``(q.float() * scale).to(x.dtype)`` (one rounding). Used for activations with a
    calibrated ``input_scale`` (float32 ``[]``) or for weights (``[]`` or ``[out, 1]``). No validation
    (hot path, no device sync): NaN in ``x`` propagates as NaN; values beyond ``448*scale`` saturate to
    ``+-448*scale``.
    """
    _check_mode(mode)
    s = torch.as_tensor(scale, device=x.device).to(torch.float32)
    if s.dim() != 0:
        s = _as_scale(s, x, "fake_quantize_fp8 scale")
    return _fp8_chunks(x, s, mode, fake=True)
