"""ConvRot W4A4 (registry name ``"convrot_w4a4"``; ComfyUI's per-layer format ``convrot_w4a4``): signed int4 codes of
the Hadamard-rotated weight with one float32 scale per output row; at run time the activation is rotated by the
same matrix and quantized per row, to int4 where the GPU has int4 tensor cores and to int8 where it has not.

Layout, as comfy-kitchen 0.2.40 writes and reads it (``tensor/convrot_w4a4.py``, ``backends/eager/convrot_w4a4.py``,
``backends/eager/svdquant.py`` int4 packing; ComfyUI ``comfy/ops.py`` / ``comfy/quant_ops.py``):

* ``weight`` int8 ``[out, in/2]``: two signed int4 codes per byte, the even input column in the LOW nibble; the
  codes are ``clamp(round(W_rot / s), -7, 7)`` (round half to even; -8 is never written) of ``W_rot = W_g @ H^T``
  (:func:`ptq.formats.int8_convrot.rotate_weight`, groups of ``convrot_groupsize`` = 256 inputs);
* ``weight_scale`` float32 ``[out]``: ``s = max(amax(row of W_rot), 1e-10) / 7``;
* layer JSON ``{"format": "convrot_w4a4", "convrot_groupsize": 256}`` (+ ``"linear_dtype": "int8"`` to force W4A8);
  ComfyUI fixes ``quant_group_size`` to 64 (a kernel constant; the weight scale stays per row);
* dequantization: ``rotate(unpack(codes).float() * s)`` in float32, then the compute dtype.

The linear (``convrot_w4a4_linear``), per backend (the ``variant`` of :meth:`ConvRotW4A4Format.dynamic_linear`):

* ``"eager"`` (comfy-kitchen's eager backend: ComfyUI on the CPU, and GPUs without its CUDA backend): ``x_rot =
  x_g @ H`` in ``x.dtype``; per-row ``a = max(amax(x_rot), 1e-10)`` and ``s_x = a / 7`` in ``x.dtype``; codes
  ``clamp(round(x_rot / s_x), -7, 7)``; the product of the codes as a GEMM in ``x.dtype``; then ``* s_x`` and
  ``* s_w`` (both cast to ``x.dtype``) and ``+ bias``, each rounded in ``x.dtype``. Bit-exact to the kitchen code.
* ``"int4"`` (CUDA int4 MMA: Turing, Ampere, Ada): the rotated activation rounded once to ``x.dtype`` from a
  float32 rotation, per-row int4 codes with ``s_x = amax / 7`` in float32, an exact integer GEMM, the epilogue
  ``acc * s_x * s_w + bias`` in float32 rounded once. Modelled on kitchen's int8 CUDA kernels (the int4 kernels
  are compiled code, not read): W4A4.
* ``"int8"`` (CUDA without int4 MMA: Hopper, Blackwell; or ``linear_dtype: "int8"`` anywhere): the activation
  quantized as int8 ConvRot does it (:func:`ptq.formats.int8.int8_linear`, ``mode="float32"``) against the int4
  weight codes: W4A8.
"""

from __future__ import annotations

import torch

from .base import DynamicActivationFormat, QuantizedWeight
from .fp8 import divide_exact
from .int8 import int8_linear, int8_rowwise_activation
from .int8_convrot import CONVROT_GROUP, rotate_activation, rotate_hessian, rotate_weight
from .nvfp4 import NibbleOrder, pack_e2m1, unpack_e2m1

__all__ = ["CONVROT_W4A4", "CONVROT_W4A8", "INT4_MAX", "INT4_MIN_AMAX", "ConvRotW4A4Format", "ConvRotW4A8Format",
           "convrot_w4a4_linear", "int4_rowwise", "pack_int4", "unpack_int4"]

#: Largest int4 code written (symmetric: -8 is representable but never emitted).
INT4_MAX = 7.0
#: comfy-kitchen's clamp of a row's absolute maximum before dividing by 7.
INT4_MIN_AMAX = 1e-10
#: The lowest compute capability with int4 tensor-core MMA in comfy-kitchen (Turing) and the first without (Hopper).
INT4_MMA_MIN, INT4_MMA_END = (7, 5), (9, 0)
VARIANTS = ("eager", "int4", "int8")


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Signed int4 codes ``[..., k]`` (any integer dtype, values in [-8, 7]) -> int8 ``[..., k/2]``, the even column
    in the low nibble (comfy-kitchen's ``_pack_int4_row_major``): the two's-complement nibbles packed by
    :func:`~ptq.formats.nvfp4.pack_e2m1` in LOW_FIRST order."""
    return pack_e2m1((codes.to(torch.int32) & 0x0F).to(torch.uint8), NibbleOrder.LOW_FIRST).view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int8 ``[..., k/2]`` -> signed int4 codes int8 ``[..., k]`` in [-8, 7] (inverse of :func:`pack_int4`)."""
    nibbles = unpack_e2m1(packed.view(torch.uint8), NibbleOrder.LOW_FIRST).to(torch.int8)
    return (nibbles ^ 8) - 8  # sign-extend the 4-bit two's complement


def int4_rowwise(x: torch.Tensor, *, float32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row signed int4 codes of ``x [m, k]`` (int8 values in [-7, 7]) and their scales ``[m, 1]``: ``max(amax,
    1e-10) / 7``, computed in ``x.dtype`` (the eager backend) or in float32 (``float32``; codes of ``x.float()``)."""
    v = x.float() if float32 else x
    amax = v.abs().amax(dim=-1, keepdim=True).clamp(min=INT4_MIN_AMAX)
    scale = divide_exact(amax, INT4_MAX) if float32 else amax / INT4_MAX
    return torch.round(v / scale).clamp(-INT4_MAX, INT4_MAX).to(torch.int8), scale


def convrot_w4a4_linear(x: torch.Tensor, codes: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor | None, *, variant: str, group: int = CONVROT_GROUP) -> torch.Tensor:
    """``x [..., in] @ W^T + bias`` for int4 weight ``codes [out, in]`` (int8 storage) and per-row ``weight_scale``
    (``[out]`` or ``[out, 1]``), as the backend ``variant`` computes it (module docstring); ``[..., out]`` in
    ``x.dtype``."""
    if variant not in VARIANTS:
        raise ValueError(f"convrot_w4a4 variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    dtype, out_f = x.dtype, codes.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    ws = weight_scale.reshape(-1)
    if variant == "int8":
        return int8_linear(rotate_activation(x2, group, mode="float32"), codes, ws.reshape(-1, 1), bias,
                           mode="float32").reshape(*x.shape[:-1], out_f)
    if variant == "eager":
        xq, xs = int4_rowwise(rotate_activation(x2, group, mode="ck_eager"), float32=False)
        y = xq.to(dtype) @ codes.to(x.device, dtype).t()
        y = y * xs.reshape(-1, 1).float().to(dtype)
        y = y * ws.to(x.device, dtype).reshape(1, -1)
        if bias is not None:
            y = y + bias.to(x.device, dtype).reshape(1, -1)
        return y.reshape(*x.shape[:-1], out_f)
    xq, xs = int4_rowwise(rotate_activation(x2, group, mode="float32"), float32=True)
    acc = xq.float() @ codes.to(x.device).float().t()  # exact: |sum| <= 49 * in < 2**24
    y = acc * xs * ws.to(x.device).float().reshape(1, -1)
    if bias is not None:
        y = y + bias.to(device=x.device, dtype=dtype).float().reshape(1, -1)
    return y.to(dtype).reshape(*x.shape[:-1], out_f)


class ConvRotW4A4Format(DynamicActivationFormat):
    """int4 codes of the ConvRot-rotated weight (packed two per byte), a float32 scale per row, activations rotated
    and quantized per row at run time (int4 or int8, by GPU)."""

    name = "convrot_w4a4"
    block_size = None
    storage_dtype = torch.int8
    weight_bits = 4.0
    codes_per_element = 2
    activation_block = 1
    activation_scaling = "rotates and quantizes activations per row (int4 or int8 by GPU)"
    group_size = CONVROT_GROUP
    #: ``linear_dtype`` of the layer JSON: "int4" (int4 activations where the GPU has int4 MMA) or "int8"
    linear_dtype = "int4"
    # comfy-kitchen: int4 MMA from SM 7.5 (Turing), its int8 fallback above; ComfyUI never disables the format, and
    # on the CPU the eager backend computes the same W4A4 arithmetic
    native_min_capability = INT4_MMA_MIN
    backend_arithmetic = True
    portable_kernel = True
    rotated_codes = True
    runtime_note = ("int4 weights with activations rotated and quantized per row at run time: W4A4 (int4 MMA) on CUDA "
                    "compute capability 7.5-8.9 (RTX 20xx / 30xx / 40xx, A100, L40S), W4A8 (int8 activations) from "
                    "9.0 (H100, RTX 50xx, B200) and with linear_dtype int8; on CPU comfy-kitchen's eager kernel "
                    "computes W4A4; needs comfy-kitchen with the convrot_w4a4 layout (0.2.40 has it)")

    def unsupported(self, in_features: int, out_features: int) -> str | None:
        if in_features % self.group_size:
            return f"in_features={in_features} is not a multiple of {self.group_size} (ConvRot Hadamard groups)"
        return None

    def storage_bits(self, out_features: int, in_features: int, *, per_channel: bool = False) -> float:
        """``n*4`` code bits + one float32 scale per row."""
        return out_features * in_features * 4.0 + 32.0 * out_features

    def runtime_variant(self, capability: tuple[int, int] | None) -> str:
        """"eager" on the CPU, "int4" with int4 MMA (SM 7.5 - 8.9) unless the layer asks for int8, else "int8"."""
        if capability is None:
            return "eager"
        return "int4" if self.linear_dtype == "int4" and INT4_MMA_MIN <= capability < INT4_MMA_END else "int8"

    def quantize_weight(self, w: torch.Tensor, name: str = "weight", *, per_channel: bool = False) -> QuantizedWeight:
        """Per-row int4 of the rotated float32 weight (comfy-kitchen's ``quantize_convrot_w4a4_weight``)."""
        self.check_weight(w, name)
        codes, scale = int4_rowwise(rotate_weight(w.float(), self.group_size), float32=True)
        return self.from_codes(codes, scale, None, name)

    def quantize_with_scale(self, w: torch.Tensor, scale: torch.Tensor, name: str = "weight") -> QuantizedWeight:
        """Codes of the rotated ``w`` for a given float32 scale ``[out, 1]`` (in the rotated basis)."""
        self.check_weight(w, name)
        codes, _ = self.gptq_round(rotate_weight(w.float(), self.group_size), scale.to(w.device, torch.float32))
        return self.from_codes(codes, scale, None, name)

    def from_codes(self, codes: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor | None = None,
                   name: str = "weight") -> QuantizedWeight:
        """Packed ``[out, in/2]`` int8 weight of int4 ``codes [out, in]`` and their float32 scale ``[out, 1]``."""
        return QuantizedWeight(pack_int4(codes), scale.to(torch.float32).reshape(-1, 1), None)

    def codes(self, q: QuantizedWeight) -> torch.Tensor:
        """The int4 codes ``[out, in]`` (int8) of ``q``."""
        return unpack_int4(q.weight)

    def dequantize_weight(self, q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight in the original basis: ``rotate(code * scale)`` in float32, then ``dtype``."""
        w_rot = self.codes(q).float() * q.scale.float().reshape(-1, 1)
        return rotate_weight(w_rot, self.group_size).to(dtype)

    def gemm_operand(self, q: QuantizedWeight) -> torch.Tensor:
        return self.codes(q).float()

    def gemm_alpha(self, q: QuantizedWeight) -> torch.Tensor:
        return q.scale.reshape(-1)

    def code_domain(self, w: torch.Tensor, hessian: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        w_rot = rotate_weight(w.float(), self.group_size)
        return w_rot, None if hessian is None else rotate_hessian(hessian, self.group_size)

    def dynamic_linear(self, x: torch.Tensor, q: QuantizedWeight, bias: torch.Tensor | None, *, mode: str,
                       variant: str = "") -> torch.Tensor:
        """``variant`` from :meth:`runtime_variant` ("" = the file's nominal W4A4: "int4", or "eager" for the
        eager arithmetic ``mode="ck_eager"``)."""
        variant = variant or ("eager" if mode == "ck_eager" else "int4")
        return convrot_w4a4_linear(x, self.codes(q), q.scale, bias, variant=variant, group=self.group_size)

    models_dynamic_quantizer = True

    def fake_quantize_dynamic(self, x: torch.Tensor, variant: str = "") -> torch.Tensor:
        """``x`` rotated, quantized per row as ``variant`` does ("" / "int4" / "eager": int4, "int8": int8), times
        its scale and rotated back (``H`` is symmetric and orthogonal): float32 ``[tokens, in]``."""
        x_rot = rotate_activation(x.float(), self.group_size, mode="float32")
        if variant == "int8":
            xq, xs = int8_rowwise_activation(x_rot, mode="float32")
        else:
            xq, xs = int4_rowwise(x_rot, float32=True)
        return rotate_activation(xq.float() * xs.reshape(-1, 1), self.group_size, mode="float32")

    def gptq_round(self, col: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``clamp(round(col / scale), -7, 7)`` in float32 and its value ``code * scale``."""
        c = torch.clamp(torch.round(col / scale), -INT4_MAX, INT4_MAX)
        return c.to(torch.int8), c * scale


class ConvRotW4A8Format(ConvRotW4A4Format):
    """The same file with ``"linear_dtype": "int8"``: int8 activations on every GPU (W4A8 from SM 7.5, also where
    int4 MMA exists); comfy-kitchen's eager backend ignores the key (W4A4 on the CPU)."""

    name = "convrot_w4a8"
    linear_dtype = "int8"
    activation_scaling = "rotates and quantizes activations per row to int8"
    runtime_note = ("int4 weights (ConvRot W4A4 layout with linear_dtype int8) with activations rotated and quantized "
                    "per row to int8 at run time: W4A8 on CUDA compute capability >= 7.5; on CPU comfy-kitchen's "
                    "eager kernel ignores linear_dtype and computes W4A4")


CONVROT_W4A4 = ConvRotW4A4Format()
CONVROT_W4A8 = ConvRotW4A8Format()
