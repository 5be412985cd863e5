"""Fast half-precision Linears on CPUs.

On CPUs without AVX512-BF16 / AMX, PyTorch's bf16 ``addmm`` is emulated and runs 5-10x slower than float32 (measured
on a 2-core AVX2 machine: 86% of a tiny-WAN forward); float16 ``addmm`` is slow on every CPU without AVX512-FP16.
:class:`Float32LinearOnCPU` computes those ``F.linear`` calls on the CPU as float32 GEMMs of the (exactly up-cast)
operands, bias added in float32, and rounds the result once to the input dtype: the arithmetic of a half-precision
GEMM with float32 accumulation (what GPU GEMMs and oneDNN's bf16 kernels compute), up to the order of the float32
summation. Where the CPU has native bf16 GEMMs, bf16 Linears are left to oneDNN (:func:`float32_linear_dtypes`).
"""

from __future__ import annotations

import functools
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_HALF = (torch.bfloat16, torch.float16)


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX-BF16: oneDNN's bf16 GEMM then
    beats a float32 GEMM). Read from ``/proc/cpuinfo``'s flags (Linux); False where they cannot be read."""
    cap = torch.backends.cpu.get_cpu_capability().upper()
    if "AMX" in cap or "BF16" in cap:
        return True
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def float32_linear_dtypes() -> tuple[torch.dtype, ...]:
    """The Linear input dtypes worth computing as float32 GEMMs on this CPU: float16 always (no CPU this project
    runs on has a fast float16 GEMM), bf16 only where its GEMM is not native (:func:`cpu_has_fast_bf16`)."""
    return (torch.float16,) if cpu_has_fast_bf16() else _HALF


class Float32LinearOnCPU(TorchFunctionMode):
    """Torch function mode: half-precision ``F.linear`` and ``F.conv{1,2,3}d`` on CPU as float32 GEMM /
    convolution + one rounding (see module docstring).

    Float32 copies of weights are cached (keyed by the weight tensor and its version, freed with it) up to
    ``max_cache_bytes``; beyond that weights are up-cast per call. Other ops and devices are untouched.
    """

    def __init__(self, max_cache_bytes: int = 2 << 30, dtypes: tuple[torch.dtype, ...] = _HALF) -> None:
        super().__init__()
        self.max_cache_bytes = max_cache_bytes
        self.dtypes = dtypes
        self._cache: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}
        self._cached_bytes = 0
        self.calls = 0

    @classmethod
    def for_this_cpu(cls) -> Float32LinearOnCPU:
        """The mode with :func:`float32_linear_dtypes` of this CPU."""
        return cls(dtypes=float32_linear_dtypes())

    def _forget(self, key: int) -> None:
        entry = self._cache.pop(key, None)
        if entry is not None:
            self._cached_bytes -= entry[2].numel() * 4

    def _weight32(self, w: torch.Tensor) -> torch.Tensor:
        key = id(w)
        entry = self._cache.get(key)
        if entry is not None and entry[0]() is w and entry[1] == w._version:
            return entry[2]
        w32 = w.detach().float()
        if entry is not None:
            self._forget(key)
        if self._cached_bytes + w32.numel() * 4 <= self.max_cache_bytes:
            owner = weakref.ref(self)

            def on_free(_ref: weakref.ref, k: int = key) -> None:
                mode = owner()
                if mode is not None:
                    mode._forget(k)

            ref = weakref.ref(w, on_free)
            self._cache[key] = (ref, w._version, w32)
            self._cached_bytes += w32.numel() * 4
        return w32

    def _usable(self, x: Any, w: Any) -> bool:
        return (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and x.device.type == "cpu"
                and x.dtype in self.dtypes and w.dtype == x.dtype and not torch.is_grad_enabled())

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2 and self._usable(args[0], args[1]):
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            self.calls += 1
            return F.linear(x.float(), self._weight32(w), None if b is None else b.float()).to(x.dtype)
        if func in _CONVS and len(args) >= 2 and self._usable(args[0], args[1]):
            x, w, rest = args[0], args[1], args[2:]
            b, rest = (rest[0], rest[1:]) if rest else (kwargs.pop("bias", None), rest)
            self.calls += 1
            return func(x.float(), self._weight32(w), None if b is None else b.float(), *rest, **kwargs).to(x.dtype)
        return func(*args, **kwargs)


#: convolutions the mode computes in float32 (WAN's patch embedding is a Conv3d; CPU float16 convolutions run a
#: slow reference path that also rounds differently from a float32-accumulating GPU convolution)
_CONVS = (F.conv1d, F.conv2d, F.conv3d)


__all__ = ["Float32LinearOnCPU", "cpu_has_fast_bf16", "float32_linear_dtypes"]
