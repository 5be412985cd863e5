"""INT8 W8A8 with ConvRot (registry name ``"int8_convrot"``; ComfyUI: format ``int8_tensorwise`` with
``"convrot": true, "convrot_groupsize": 256`` in the layer's ``comfy_quant``): the weight is rotated offline by a
group-wise Hadamard matrix before int8 quantization, the activation by the same matrix at run time, so outliers
spread over each group of 256 inputs.

Layout, as comfy-kitchen 0.2.40 writes and reads it (``tensor/int8_utils.py``, ``backends/eager/quantization.py``
``quantize_int8_convrot_weight`` / ``dequantize_int8_convrot_weight`` / ``int8_linear(convrot=True)``; ComfyUI
``comfy/ops.py`` reads ``convrot`` / ``convrot_groupsize`` from the layer config):

* ``H``: the normalised "regular" Hadamard matrix of size ``g = 256`` (``kron`` powers of
  ``[[1,1,1,-1],[1,1,-1,1],[1,-1,1,1],[-1,1,1,1]]``, divided by ``sqrt(g)``); symmetric and orthogonal, ``H H = I``.
* stored weight ``[out, in]`` int8: the per-row int8 quantization of ``W_rot = W_g @ H^T`` for every group ``W_g``
  of ``g`` consecutive inputs; ``weight_scale`` float32 ``[out, 1]`` (per row).
* dequantization: ``((code.float() * scale) per group @ H^T).to(dtype)``, i.e. the rotation undone.
* the linear: ``x_rot = x_g @ H`` per group (in ``x.dtype``), then the int8 linear of :mod:`ptq.formats.int8`
  on ``x_rot`` and the stored codes (``x W^T = x_rot W_rot^T``).

``mode``: ``"ck_eager"`` rotates with a matmul in ``x.dtype`` (the eager backend); ``"float32"`` / ``"divide"``
rotate in float32 and round the rotated activation to ``x.dtype`` once (comfy-kitchen's fused CUDA kernel, which
sums in a different order: a rare last-bit difference in the rotated activation is possible).
"""

from __future__ import annotations

import math

import torch

from .base import QuantizedWeight
from .int8 import INT8Format, dequantize_int8, int8_linear, int8_scale_from_amax, quantize_int8

__all__ = ["CONVROT_GROUP", "INT8_CONVROT", "INT8ConvRotFormat", "hadamard", "rotate_activation", "rotate_hessian",
           "rotate_weight"]

#: Hadamard group size (ComfyUI's default ``convrot_groupsize``; the size of comfy-kitchen's fused CUDA kernel).
CONVROT_GROUP = 256
_H4 = ((1, 1, 1, -1), (1, 1, -1, 1), (1, -1, 1, 1), (-1, 1, 1, 1))
_CACHE: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}


def hadamard(size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalised regular Hadamard matrix ``[size, size]`` (size a power of 4), as comfy-kitchen builds it."""
    key = (size, str(device), dtype)
    if key not in _CACHE:
        if size < 4 or size & (size - 1) or math.log(size, 4) % 1:
            raise ValueError(f"regular Hadamard size must be a power of 4, got {size}")
        h4 = torch.tensor(_H4, dtype=dtype, device=device)
        h = h4
        while h.shape[0] < size:
            h = torch.kron(h, h4)
        _CACHE[key] = h / (size**0.5)
    return _CACHE[key]


def rotate_weight(w: torch.Tensor, group: int = CONVROT_GROUP) -> torch.Tensor:
    """``W_g @ H^T`` for every group of ``group`` inputs of ``w [out, in]`` (in ``w.dtype``)."""
    out_f, in_f = w.shape
    h_t = hadamard(group, w.device, torch.float32).T.to(w.dtype)
    return torch.matmul(w.reshape(out_f, in_f // group, group), h_t).reshape(out_f, in_f)


def rotate_activation(x: torch.Tensor, group: int = CONVROT_GROUP, *, mode: str = "ck_eager") -> torch.Tensor:
    """``x_g @ H`` for every group of ``group`` inputs of ``x [..., in]``, in ``x.dtype`` (``mode`` as in the module
    docstring)."""
    xg = x.reshape(-1, x.shape[-1] // group, group)
    if mode == "ck_eager":
        return torch.matmul(xg, hadamard(group, x.device, torch.float32).to(x.dtype)).reshape(x.shape)
    return torch.matmul(xg.float(), hadamard(group, x.device, torch.float32)).to(x.dtype).reshape(x.shape)


def rotate_hessian(h: torch.Tensor, group: int = CONVROT_GROUP) -> torch.Tensor:
    """``R^T H R`` for the block-diagonal rotation ``R`` of the activation (``x_rot = x R``): the input Hessian of
    the rotated layer."""
    n = h.shape[0] // group
    hd = hadamard(group, h.device, torch.float32)
    h4 = h.float().reshape(n, group, n, group)
    return torch.einsum("ki,akbl,lj->aibj", hd, h4, hd).reshape(h.shape)


class INT8ConvRotFormat(INT8Format):
    """:class:`~ptq.formats.int8.INT8Format` on Hadamard-rotated weights and activations, per-row weight scales."""

    name = "int8_convrot"
    group_size = CONVROT_GROUP

    def unsupported(self, in_features: int, out_features: int) -> str | None:
        if in_features % self.group_size:
            return f"in_features={in_features} is not a multiple of {self.group_size} (ConvRot Hadamard groups)"
        return None

    def storage_bits(self, out_features: int, in_features: int, *, per_channel: bool = False) -> float:
        """``n*8`` code bits + one float32 scale per row (ConvRot weights are always scaled per row)."""
        return out_features * in_features * 8.0 + 32.0 * out_features

    def quantize_weight(self, w: torch.Tensor, name: str = "weight", *, per_channel: bool = False) -> QuantizedWeight:
        """Per-row int8 of the rotated float32 weight (comfy-kitchen's ``quantize_int8_convrot_weight``)."""
        self.check_weight(w, name)
        w_rot = rotate_weight(w.float(), self.group_size)
        scale = int8_scale_from_amax(w_rot.abs().amax(dim=1, keepdim=True))
        return QuantizedWeight(quantize_int8(w_rot, scale), scale, None)

    def quantize_with_scale(self, w: torch.Tensor, scale: torch.Tensor, name: str = "weight") -> QuantizedWeight:
        """Codes of the rotated ``w`` for a given float32 scale ``[out, 1]`` (in the rotated basis)."""
        self.check_weight(w, name)
        scale = scale.to(device=w.device, dtype=torch.float32)
        return QuantizedWeight(quantize_int8(rotate_weight(w.float(), self.group_size), scale), scale, None)

    def dequantize_weight(self, q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight in the original basis: ``rotate(code * scale)`` in float32, then ``dtype``."""
        return rotate_weight(dequantize_int8(q.weight, q.scale), self.group_size).to(dtype)

    rotated_codes = True

    def code_domain(self, w: torch.Tensor, hessian: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        w_rot = rotate_weight(w.float(), self.group_size)
        return w_rot, None if hessian is None else rotate_hessian(hessian, self.group_size)

    def dynamic_linear(self, x: torch.Tensor, q: QuantizedWeight, bias: torch.Tensor | None, *,
                       mode: str, variant: str = "") -> torch.Tensor:
        x_rot = rotate_activation(x, self.group_size, mode=mode)
        return int8_linear(x_rot, q.weight, q.scale, bias, mode=mode)


INT8_CONVROT = INT8ConvRotFormat()
