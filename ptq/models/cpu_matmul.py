"""Fast bf16 Linears on CPUs without native bf16 GEMMs.

On CPUs without AVX512-BF16 / AMX, PyTorch's bf16 ``addmm`` is emulated and runs 5-10x slower than float32 (measured
on this project's 2-core AVX2 CI machine: 86% of a tiny-WAN forward). :class:`Float32LinearOnCPU` computes every
bf16/fp16 ``F.linear`` on the CPU as a float32 GEMM of the (exactly up-cast) operands, bias added in float32, and
rounds the result once to the input dtype: the arithmetic of a bf16 GEMM with float32 accumulation (what GPU GEMMs
and oneDNN's bf16 kernels compute), up to the order of the float32 summation.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_HALF = (torch.bfloat16, torch.float16)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 / AMX)."""
    cap = torch.backends.cpu.get_cpu_capability()
    return "AMX" in cap.upper() or "BF16" in cap.upper()


class Float32LinearOnCPU(TorchFunctionMode):
    """Torch function mode: bf16/fp16 ``F.linear`` on CPU as float32 GEMM + one rounding (see module docstring).

    Float32 copies of weights are cached (keyed by the weight tensor and its version, freed with it) up to
    ``max_cache_bytes``; beyond that weights are up-cast per call. Other ops and devices are untouched.
    """

    def __init__(self, max_cache_bytes: int = 2 << 30) -> None:
        super().__init__()
        self.max_cache_bytes = max_cache_bytes
        self._cache: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}
        self._cached_bytes = 0
        self.calls = 0

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

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear and len(args) >= 2:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and x.device.type == "cpu"
                    and x.dtype in _HALF and w.dtype == x.dtype and not torch.is_grad_enabled()):
                self.calls += 1
                y = F.linear(x.float(), self._weight32(w), None if b is None else b.float())
                return y.to(x.dtype)
        return func(*args, **kwargs)


__all__ = ["Float32LinearOnCPU", "cpu_has_fast_bf16"]
