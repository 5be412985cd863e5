"""Second-order statistics of the quantized inputs a layer will see at run time (activation-aware GPTQ).

For each observed Linear with its runtime input transform (``pre_quant_scale`` ``p`` or None, then the format's
activation quantizer ``q``): ``x_s = x * p`` rounded to the input dtype (as ComfyUI computes it) and
``H_qq = sum q(x_s)^T q(x_s)``, ``H_sq = sum x_s^T q(x_s)`` (float32 ``[in, in]`` on the model's device), divided
by the number of tokens when read. Memory: ``8 * in_features**2`` bytes per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

#: A layer's runtime input transform: (pre_quant_scale ``[in]`` or None, activation quantize+dequantize of a float32
#: ``[tokens, in]`` matrix).
InputQuantizer = tuple[torch.Tensor | None, Callable[[torch.Tensor], torch.Tensor]]


class QuantizedInputObserver:
    """Forward pre-hooks accumulating ``H_qq`` and ``H_sq`` (module docstring) for the named Linears of ``model``.
    Use as a context manager around calibration forwards; ``step`` is accepted (and ignored) like
    :class:`~ptq.calibration.observers.LinearInputObserver`'s, and the hooks are never CUDA-graph safe."""

    graph_safe = False

    def __init__(self, model: nn.Module, quantizers: Mapping[str, InputQuantizer]) -> None:
        modules = dict(model.named_modules())
        for n in quantizers:
            if not isinstance(modules.get(n), nn.Linear):
                raise KeyError(f"{n!r} is not an nn.Linear of the model")
        self.model = model
        self.quantizers = dict(quantizers)
        self.step = 0
        self._h: dict[str, list] = {}  # name -> [H_qq, H_sq, tokens]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, name: str):
        p, quantize = self.quantizers[name]

        @torch.no_grad()
        def hook(_m: nn.Module, args: tuple) -> None:
            x = args[0]
            xs = x if p is None else x * p.to(x.device, x.dtype)
            flat = xs.reshape(-1, xs.shape[-1]).float()
            xq = quantize(flat)
            acc = self._h.get(name)
            if acc is None:
                n = flat.shape[1]
                acc = self._h[name] = [torch.zeros(n, n, device=flat.device), torch.zeros(n, n, device=flat.device), 0]
            acc[0].addmm_(xq.t(), xq)
            acc[1].addmm_(flat.t(), xq)
            acc[2] += flat.shape[0]

        return hook

    def __enter__(self) -> QuantizedInputObserver:
        modules = dict(self.model.named_modules())
        for name in self.quantizers:
            self._handles.append(modules[name].register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def hessians(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (``H_qq``, ``H_sq``) divided by the tokens seen (layers never called are absent)."""
        return {n: (hqq / max(t, 1), hsq / max(t, 1)) for n, (hqq, hsq, t) in self._h.items()}
