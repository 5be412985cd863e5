"""Input validation for the number-format layer.

Every check raises :class:`FormatError` (a ``ValueError``) whose message names the tensor (``name``, e.g.
``"layers.3.mlp.up.weight"``), says what was expected and what was found, so a failure deep inside
a model export points at the offending layer.
"""

from __future__ import annotations

import torch

__all__ = [
    "FormatError",
    "UnsupportedShapeError",
    "check_block_multiple",
    "check_finite",
    "check_float",
    "check_rank",
]

#: Floating dtypes accepted as *inputs* to the quantizers (float8 inputs are rejected on purpose).
_FLOAT_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class FormatError(ValueError):
    """A tensor cannot be quantized/dequantized as asked (bad values, dtype, rank or layout)."""


class UnsupportedShapeError(FormatError):
    """The tensor's shape does not fit the format (e.g. in_features not a multiple of the block)."""


def check_float(x: object, name: str) -> None:
    """Require a float16/bfloat16/float32/float64 ``torch.Tensor``."""
    if not isinstance(x, torch.Tensor):
        raise FormatError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_INPUT_DTYPES:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in _FLOAT_INPUT_DTYPES)
        raise FormatError(f"{name}: expected a floating-point tensor ({allowed}), got dtype {x.dtype}")


def check_rank(x: torch.Tensor, rank: int, name: str) -> None:
    """Require ``x.dim() == rank``."""
    if x.dim() != rank:
        raise FormatError(f"{name}: expected a {rank}-D tensor, got {x.dim()}-D with shape {tuple(x.shape)}")


def check_finite(x: torch.Tensor, name: str) -> None:
    """Require every element finite; the message gives the NaN/Inf counts and the first bad index.

    Fast path: one ``aminmax`` pass (NaN propagates into it, +-Inf shows up as an extreme) and one
    device->host sync of two scalars; counts and index are computed only on failure.
    """
    if x.numel() == 0:
        return
    if not x.is_floating_point():
        return  # integers are always finite
    xv = x.detach() if x.dtype.itemsize > 1 else x.detach().float()  # aminmax has no float8 kernels
    lo, hi = torch.aminmax(xv)
    if bool(torch.isfinite(torch.stack((lo, hi)).float()).all()):
        return
    bad = ~torch.isfinite(x)
    n_bad = int(bad.sum())
    n_nan = int(torch.isnan(x).sum())
    n_inf = n_bad - n_nan
    flat_first = int(bad.reshape(-1).nonzero()[0, 0])
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_first), x.shape)) if x.dim() else ()
    value = float(x.reshape(-1)[flat_first])
    raise FormatError(
        f"{name}: expected all values finite, found {n_bad} non-finite value(s) "
        f"({n_nan} NaN, {n_inf} Inf) of {x.numel()}; first at index {index} (value {value})"
    )


def check_block_multiple(in_features: int, block: int, name: str, fallback: str) -> None:
    """Require ``in_features % block == 0``; otherwise raise :class:`UnsupportedShapeError`.

    ``fallback`` says what the caller does instead (e.g. ``"layer kept in bf16"``) and is quoted in the
    message so the log tells the user what happened to the layer.
    """
    if in_features % block != 0:
        raise UnsupportedShapeError(
            f"{name}: in_features={in_features} is not a multiple of the {block}-element block "
            f"({in_features} = {in_features // block}*{block} + {in_features % block}); "
            f"fallback: {fallback}"
        )
