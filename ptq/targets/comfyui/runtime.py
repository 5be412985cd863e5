"""What stock ComfyUI computes with a quantized file on each kind of GPU (and on the CPU), as data.

Read from ComfyUI 0.30.0's code (``comfy/ops.py`` ``pick_operations`` / mixed-precision ``Linear``,
``comfy/model_management.py`` ``supports_fp8_compute`` / ``supports_nvfp4_compute`` / ``unet_dtype`` /
``unet_manual_cast``, ``comfy/supported_models.py`` WAN ``supported_inference_dtypes``):

* a quantized layer runs its format's low-precision kernel ("native": the activation quantized with the file's
  ``input_scale``, or with run-time scales for int8 / MXFP8) only where ComfyUI enables the format: NVFP4 and MXFP8
  on compute capability >= 10, FP8 on >= 8.9, int8 and ConvRot W4A4 on >= 7.5 and on the CPU (comfy-kitchen's
  eager kernels; ConvRot W4A4 computes int4 activations up to SM 8.9 and int8 ones from SM 9.0:
  ``NumberFormat.runtime_variant``);
  everywhere else ComfyUI dequantizes the weight and runs a matmul in the compute dtype (W4A16 / W8A16 numerics,
  ``input_scale`` unused). Weight-only files (``full_precision_matrix_mult``) always dequantize.
  ``pre_quant_scale`` multiplies the input in both cases. Which capability each format needs is a fact of the
  number format (``NumberFormat.native_min_capability``, ``NumberFormat.portable_kernel``; whether its arithmetic
  depends on the backend: ``NumberFormat.backend_arithmetic``).
* the compute dtype of a quantized WAN file is float16 on every NVIDIA GPU of compute capability >= 7.5 (WAN's
  ``supported_inference_dtypes`` list float16 first and ``should_use_fp16`` is true there) and float32 on the CPU
  (``--cpu``: neither fp16 nor bf16 is used); every parameter of the model is cast to it.
* comfy-kitchen's CUDA backend (torch built for CUDA >= 13) quantizes FP8 activations as
  ``fp8(x.float() * (1/scale))`` and dequantizes weights in float32, rounding once; its eager fallback (older torch
  builds; variant ``+eager``, e.g. ``ada+eager``) computes ``x * (1/scale)`` and the dequantization in the compute
  dtype (``QuantLinear.fp8_act_mode="ck_eager"``).
* ComfyUI after 0.30.0 (15989f87, "Speedup LTX and Wan", #15138; in no release at 6db4fa2f) folds WAN's FFN
  GELU(tanh) into the int8 activation quantizer of ``ffn.2`` for ``int8_tensorwise`` layers (ConvRot included, not
  ``convrot_w4a4``). comfy-kitchen's eager backend applies the GELU in the input dtype and then quantizes: what ptq
  computes. Its CUDA kernel's arithmetic (compiled code) is not simulated.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ptq.formats import get_format


@dataclass(frozen=True)
class Runtime:
    """One target of ComfyUI: ``name`` (the ``eval.runtimes`` value), the GPUs it stands for, their compute
    capability (None = CPU), ComfyUI's compute dtype for WAN there, and comfy-kitchen's arithmetic: ``fp8_act_mode``
    (FP8 activation rounding, ``ptq.formats.fp8`` modes) and ``dequant_float32`` (weights dequantized in float32,
    rounded once, vs in the compute dtype)."""

    name: str
    gpus: str
    capability: tuple[int, int] | None
    compute_dtype: torch.dtype
    fp8_act_mode: str = "float32"
    dequant_float32: bool = True

    def native(self, fmt: str) -> bool:
        """Whether ComfyUI runs ``fmt``'s own kernel here (activations quantized)."""
        number_format = get_format(fmt)
        if self.capability is None:
            return number_format.portable_kernel
        need = number_format.native_min_capability
        return need is not None and self.capability >= need

    def describe(self, fmt: str) -> str:
        """How a W+A layer of ``fmt`` runs here: "native" or "dequantized"."""
        return "native" if self.native(fmt) else "dequantized"


#: The runtimes by name (``eval.runtimes``); a ``+eager`` suffix selects comfy-kitchen's eager arithmetic.
RUNTIMES: dict[str, Runtime] = {r.name: r for r in (
    Runtime("blackwell", "B200, B300, GB200, RTX 50xx, RTX PRO 6000 (SM 10.x / 12.x)", (10, 0), torch.float16),
    Runtime("hopper", "H100, H200, GH200 (SM 9.0)", (9, 0), torch.float16),
    Runtime("ada", "RTX 40xx, L40S, L4, RTX 6000 Ada (SM 8.9)", (8, 9), torch.float16),
    Runtime("ampere", "A100, A10, A40, RTX 30xx, RTX A6000 (SM 8.0 / 8.6)", (8, 0), torch.float16),
    Runtime("turing", "RTX 20xx, T4, Quadro RTX (SM 7.5)", (7, 5), torch.float16),
    Runtime("cpu", "CPU (ComfyUI --cpu)", None, torch.float32, fp8_act_mode="ck_eager", dequant_float32=False),
)}
EAGER_SUFFIX = "+eager"


def get_runtime(name: str) -> Runtime:
    """The runtime ``name`` (``NAME`` or ``NAME+eager``); ValueError listing the known names otherwise."""
    base, eager = (name[: -len(EAGER_SUFFIX)], True) if name.endswith(EAGER_SUFFIX) else (name, False)
    if base not in RUNTIMES:
        raise ValueError(f"eval.runtimes: unknown runtime {name!r}; expected one of {', '.join(RUNTIMES)} "
                         f"(optionally with {EAGER_SUFFIX!r})")
    rt = RUNTIMES[base]
    return replace(rt, name=name, fp8_act_mode="ck_eager", dequant_float32=False) if eager else rt


__all__ = ["EAGER_SUFFIX", "RUNTIMES", "Runtime", "get_runtime"]
