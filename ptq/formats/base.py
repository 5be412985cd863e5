"""Number formats as objects: what every algorithm, ``QuantLinear``, the mixed-precision planner and the report
ask of a format, in one interface.

A format object holds no state; its methods are pure tensor math over one weight matrix ``[out, in]`` or one
activation ``[..., in]``. A quantized weight is a :class:`QuantizedWeight` in the format's in-memory layout (each
format documents it); exporters convert that layout to their target's.

The simulated matmul of every format is ``y = (Xv @ Wv^T) * (x_scale * w_alpha) + bias``: ``Xv`` and ``Wv`` are
values that are exact in bf16 (codes times their block scales: :meth:`NumberFormat.activation_values`,
:meth:`NumberFormat.gemm_operand`), the GEMM accumulates in float32, and the per-tensor / per-channel scales are
applied once in the epilogue (:meth:`NumberFormat.gemm_alpha`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .checks import FormatError, UnsupportedShapeError, check_finite, check_float, check_rank


@dataclass
class QuantizedWeight:
    """One quantized weight matrix in its format's in-memory layout: ``weight`` (codes), ``scale`` (per tensor,
    channel or block) and ``scale_2`` (a second-level scale, e.g. NVFP4's global scale; None if unused)."""

    weight: torch.Tensor
    scale: torch.Tensor
    scale_2: torch.Tensor | None = None


class NumberFormat(ABC):
    """Interface of a weight/activation number format (see the module docstring).

    Class attributes: ``name`` (registry key, the ``quant.format`` value), ``block_size`` (inputs sharing one weight
    scale along ``in_features``; None = per tensor or per channel), ``storage_dtype`` (dtype of the stored codes),
    ``weight_bits`` (storage bits per weight, block scales included, per-tensor scales not), ``activation_block`` (runtime activation blocks along ``in_features``: the unit the activation-clip search
    quantizes; 1 = elementwise). Capabilities the algorithms read instead of format names: :attr:`scale_scheme`,
    :attr:`activation_sample_block`, :attr:`four_over_six`, :attr:`dynamic_activations`, :attr:`rotated_codes`.
    """

    name: ClassVar[str]
    block_size: ClassVar[int | None] = None
    storage_dtype: ClassVar[torch.dtype]
    weight_bits: ClassVar[float]
    activation_block: ClassVar[int] = 1
    #: Calibration keeps activation samples in aligned runs of this many inputs along ``in_features`` (a multiple of
    #: ``activation_block``, checked by :func:`register_format`: the activation-clip search regroups the runs into
    #: runtime blocks). 16 suits every elementwise format.
    activation_sample_block: ClassVar[int] = 16
    #: Four-over-Six weight scales apply (``WeightMethod.scales="four_over_six"``: each block's max mapped to code
    #: 6 or 4, whichever is closer; arXiv 2512.02010).
    four_over_six: ClassVar[bool] = False
    #: Activation scales are computed from each input at run time (per row / per block): a file stores no
    #: ``input_scale``, calibration collects nothing for the activations, and the simulated W+A linear is
    #: :meth:`dynamic_linear` (the static methods ``input_scale_from_amax`` / ``activation_values`` do not apply).
    dynamic_activations: ClassVar[bool] = False
    #: codes per stored weight element (2 where two 4-bit codes share a byte): the weight's in_features are its
    #: stored last dimension times this
    codes_per_element: ClassVar[int] = 1
    #: Runtime facts, as data for per-GPU reports: the lowest CUDA compute capability on which ComfyUI runs the
    #: format's W+A kernel (None: no native kernel); ``portable_kernel``: ComfyUI also runs the same W+A arithmetic
    #: without that kernel (on CPU: comfy-kitchen's eager backend) instead of dequantizing the weight.
    native_min_capability: ClassVar[tuple[int, int] | None] = None
    portable_kernel: ClassVar[bool] = False
    #: The W+A arithmetic differs between comfy-kitchen's CUDA kernels and its eager backend (the ``mode`` argument
    #: of the activation quantizer: ``"float32"`` vs ``"ck_eager"``).
    backend_arithmetic: ClassVar[bool] = False
    #: What ComfyUI computes with the format's W+A layers per device, for ``ptq inspect`` ("" = its generic line).
    runtime_note: ClassVar[str] = ""

    @property
    def scale_scheme(self) -> str:
        """How the weight scales are laid out, hence how GPTQ and the scale searches choose them (one of
        :data:`SCALE_SCHEMES`): by default "tensor" without ``block_size``, "block" with one."""
        return "tensor" if self.block_size is None else "block"

    # -- shapes and sizes -----------------------------------------------------------------------------------
    def unsupported(self, in_features: int, out_features: int) -> str | None:
        """Why a Linear of this shape cannot take the format (None: it can)."""
        if self.block_size and in_features % self.block_size:
            return f"in_features={in_features} is not a multiple of {self.block_size} ({self.name} blocks)"
        return None

    @abstractmethod
    def storage_bits(self, out_features: int, in_features: int, *, per_channel: bool = False) -> float:
        """Total storage bits of one weight matrix in this format, its scales included (bias excluded)."""

    def check_weight(self, w: torch.Tensor, name: str) -> None:
        """Raise :class:`~ptq.formats.checks.FormatError` naming ``name`` unless ``w`` can be quantized (float,
        2-D, finite, shape supported)."""
        check_float(w, name)
        check_rank(w, 2, name)
        check_finite(w, name)
        why = self.unsupported(w.shape[1], w.shape[0])
        if why:
            raise UnsupportedShapeError(f"{name}: {why}")

    # -- weights --------------------------------------------------------------------------------------------
    @abstractmethod
    def quantize_weight(self, w: torch.Tensor, name: str = "weight", *, per_channel: bool = False) -> QuantizedWeight:
        """Round-to-nearest with scales from the absolute maximum."""

    def from_codes(self, codes: torch.Tensor, scale: torch.Tensor, scale_2: torch.Tensor | None = None,
                   name: str = "weight") -> QuantizedWeight:
        """The in-memory weight for codes (as :meth:`gptq_round` returns them, ``[out, in]``) and their scales."""
        return QuantizedWeight(codes, scale.to(torch.float32), scale_2)

    @abstractmethod
    def dequantize_weight(self, q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight ``[out, in]`` a loader computes from ``q``, in ``dtype`` (the loaders' arithmetic)."""

    @abstractmethod
    def gemm_operand(self, q: QuantizedWeight) -> torch.Tensor:
        """float32 ``[out, in]`` weight values of the simulated GEMM, exact in bf16 (see the module docstring)."""

    @abstractmethod
    def gemm_alpha(self, q: QuantizedWeight) -> torch.Tensor:
        """The weight's factor of the GEMM epilogue: float32 ``[]`` or ``[out]``."""

    # -- activations ----------------------------------------------------------------------------------------
    @abstractmethod
    def input_scale_from_amax(self, amax: torch.Tensor) -> torch.Tensor:
        """The static activation scale (``input_scale``, float32 ``[]``) for a clipping value ``amax``."""

    @abstractmethod
    def activation_values(self, x: torch.Tensor, input_scale: torch.Tensor, *, mode: str) -> torch.Tensor:
        """Runtime activation quantization of ``x [..., in]``: float32 values, exact in bf16, such that the
        quantized activation is ``values * input_scale``. ``mode``: the arithmetic variant (format-specific)."""

    @abstractmethod
    def fake_quantize_activation(self, x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
        """Quantize + dequantize ``x`` (float32; ``[n, activation_block]`` blocks) as the runtime kernel does
        (values beyond the range saturate); used to search clipping values."""

    # -- CUDA fast path (optional) --------------------------------------------------------------------------
    def fast_prepare(self, input_scale: torch.Tensor, dtype: torch.dtype, mode: str) -> Any:
        """Per-layer constant of :meth:`fast_activation` (computed once at construction)."""
        return None

    def fast_activation(self, x2: torch.Tensor, input_scale: torch.Tensor, *, mode: str, prepared: Any,
                        codes: bool = False) -> torch.Tensor | None:
        """Fused-kernel :meth:`activation_values` of the bf16 CUDA matrix ``x2 [m, in]`` (bf16 values; or the raw
        codes for a native GEMM when ``codes``), or None when the format has no such kernel."""
        return None

    # -- dynamic activations (optional) ---------------------------------------------------------------------
    def runtime_variant(self, capability: tuple[int, int] | None) -> str:
        """The kernel the runtime picks for this format on a GPU of ``capability`` (None: the CPU), passed to
        :meth:`dynamic_linear` as ``variant``; "" where every GPU computes the same."""
        return ""

    #: :meth:`fake_quantize_dynamic` is implemented (activation-aware GPTQ can fit weights to the run-time quantizer)
    models_dynamic_quantizer: ClassVar[bool] = False

    def fake_quantize_dynamic(self, x: torch.Tensor, variant: str = "") -> torch.Tensor:
        """Formats with :attr:`dynamic_activations` and :attr:`models_dynamic_quantizer`: the activation ``x``
        (float32 ``[tokens, in]``) as the runtime kernel ``variant`` quantizes it, dequantized in the weight's basis
        (float32)."""
        raise NotImplementedError(f"format {self.name!r} does not model its run-time activation quantizer")

    def dynamic_linear(self, x: torch.Tensor, q: QuantizedWeight, bias: torch.Tensor | None, *,
                       mode: str, variant: str = "") -> torch.Tensor:
        """Formats with :attr:`dynamic_activations`: the runtime W+A linear of ``x [..., in]`` with activation
        scales computed from ``x`` itself, ``[..., out]`` in ``x.dtype`` (``mode``: the arithmetic variant;
        ``variant``: :meth:`runtime_variant` of the GPU simulated, "" for the format's nominal kernel)."""
        raise NotImplementedError(f"format {self.name!r} has static activation scales (input_scale)")

    # -- GPTQ -----------------------------------------------------------------------------------------------
    def gptq_round(self, col: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Round a weight column (float32, any shape) to the format's grid given the total scale of each element
        (same shape or broadcastable); returns ``(codes, dequantized float32 values)``. GPTQ calls it once per
        column with fixed scales."""
        raise NotImplementedError(f"format {self.name!r} does not implement GPTQ column rounding")

    def block_scale_candidates(self, blocks: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Block formats whose block scales GPTQ and the MSE search choose one block at a time: candidate scales of
        ``blocks`` (float32 ``[..., block_size]``), each ``(stored scale [...], float32 element scale [...])``, the
        round-to-nearest (amax) candidate first."""
        raise NotImplementedError(f"format {self.name!r} has no per-block scale candidates")

    #: True when :meth:`code_domain` changes the basis (the codes are not rounded from the weight as given)
    rotated_codes: bool = False

    def code_domain(self, w: torch.Tensor, hessian: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight (float32 ``[out, in]``) and input Hessian in the basis the codes are stored in, for methods
        that round the codes themselves (GPTQ): unchanged for most formats; rotated for formats that rotate the
        weight offline."""
        return w.float(), hessian


class DynamicActivationFormat(NumberFormat):
    """A format whose activation scales are computed from each input at run time (:attr:`dynamic_activations`):
    the static-scale methods raise a :class:`~ptq.formats.checks.FormatError` saying so; subclasses implement
    :meth:`dynamic_linear`. ``activation_scaling``: how the runtime scales activations (for that message)."""

    dynamic_activations = True
    activation_scaling: ClassVar[str] = "computes its activation scales"

    def _no_static(self) -> FormatError:
        return FormatError(f"format {self.name!r} {self.activation_scaling} at run time: it has no static "
                           "input_scale (use quant.activation=dynamic, or none for weight-only)")

    def input_scale_from_amax(self, amax: torch.Tensor) -> torch.Tensor:
        raise self._no_static()

    def activation_values(self, x: torch.Tensor, input_scale: torch.Tensor, *, mode: str) -> torch.Tensor:
        raise self._no_static()

    def fake_quantize_activation(self, x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
        raise self._no_static()


#: The weight-scale layouts (:attr:`NumberFormat.scale_scheme`): "tensor" = one float scale per tensor or per output
#: channel (fixed while GPTQ rounds); "block" = one scale per ``block_size`` inputs, chosen among
#: :meth:`NumberFormat.block_scale_candidates`; "global_block" = a float32 global scale times float8 E4M3 block
#: scales of 16 inputs relative to it, searched per block (NVFP4's two levels).
SCALE_SCHEMES = ("tensor", "block", "global_block")

#: The registered formats, by name (``quant.format``). Filled by :mod:`ptq.formats`.
FORMATS: dict[str, NumberFormat] = {}


def register_format(fmt: NumberFormat) -> NumberFormat:
    """Add ``fmt`` to :data:`FORMATS` under ``fmt.name``; ValueError for a name registered twice or inconsistent
    capabilities."""
    if fmt.name in FORMATS:
        raise ValueError(f"number format {fmt.name!r} is registered twice")
    if fmt.scale_scheme not in SCALE_SCHEMES:
        raise ValueError(f"number format {fmt.name!r}: scale_scheme={fmt.scale_scheme!r}, expected one of "
                         f"{', '.join(SCALE_SCHEMES)}")
    if fmt.activation_sample_block % fmt.activation_block:
        raise ValueError(f"number format {fmt.name!r}: activation_sample_block={fmt.activation_sample_block} is not "
                         f"a multiple of activation_block={fmt.activation_block}")
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> NumberFormat:
    """The registered format ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown number format {name!r}; known: {', '.join(sorted(FORMATS))}") from None
