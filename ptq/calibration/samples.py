"""Random |x| samples of observed Linears' inputs (for percentile / MSE clipping searches).

Each call keeps about ``per_call`` values, evenly strided from a random offset drawn on the host from a
``random.Random`` (seeded by ``seed``; by ``(seed, prompt)`` in prompt mode, so a prompt's samples depend on the
prompt only), as float32 tensors on the input's device (CPU in records and totals) with the denoising step of
each call. With ``block > 1`` the samples are
aligned runs of ``block`` consecutive elements along ``in_features`` (16 = NVFP4's runtime blocks; layers whose
``in_features`` is not a multiple of it sample single elements).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch

from ptq.calibration.collector import HookHost, LayerCollector
from ptq.calibration.records import step_column


@dataclass
class Samples:
    """One layer's samples: float32 ``[k]`` tensors (one per call, or per folded prompt), ``(step, count)`` per
    call, and the run length of the blocks they hold."""

    values: list[torch.Tensor] = field(default_factory=list)
    steps: list[tuple[int, int]] = field(default_factory=list)
    block: int = 1


class SampleCollector(LayerCollector[Samples]):
    """About ``per_call`` random |x| values per call, in aligned runs of ``block`` where possible (module
    docstring); ``per_call <= 0`` takes none."""

    def __init__(self, hooks: HookHost, per_call: int, block: int, seed: int) -> None:
        if block < 1:
            raise ValueError(f"sample_block={block}: expected >= 1")
        super().__init__(hooks)
        self.per_call, self.block, self.seed = per_call, block, seed
        self.active = per_call > 0
        self.graph_safe = per_call == 0  # positions are drawn on the host per call
        self._rng = random.Random(seed)

    def begin_prompt(self, index: int) -> None:
        self._rng = random.Random(f"{self.seed}:{index}")

    def observe(self, name: str, x: torch.Tensor, capturing: bool) -> None:
        st = self.open.get(name)
        if st is None:
            st = self.open[name] = Samples()
        if self.block == 1:  # the original element sampler (kept bit-identical)
            flat = x.reshape(-1)
            n = flat.numel()
            k = min(self.per_call, n)
            stride = max(n // k, 1)
            offset = self._rng.randrange(stride)
            samp = flat[offset::stride][:k].abs().float()
        else:
            samp, st.block = self._blocks(x)
        st.values.append(samp)
        st.steps.append((self.hooks.step_label, samp.numel()))

    def _blocks(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """About ``per_call`` |x| values (float32 1-D), in aligned runs of ``block`` when possible; the run length."""
        block = self.block if x.shape[-1] % self.block == 0 else 1
        flat = x.reshape(-1, block)
        n = flat.shape[0]
        k = min(max(self.per_call // block, 1), n)
        stride = max(n // k, 1)
        offset = self._rng.randrange(stride)
        return flat[offset::stride][:k].abs().float().reshape(-1), block

    def record(self, name: str) -> dict[str, Any]:
        st = self.open.get(name) or Samples()
        part = {"samples": torch.cat(st.values).cpu() if st.values else None, "sample_steps": list(st.steps),
                "sample_block": st.block}
        st.values, st.steps = [], []
        return part

    def fold_layer(self, name: str, part: dict[str, Any]) -> None:
        total = self.totals.get(name)
        if total is None:
            total = self.totals[name] = Samples()
        total.block = part["sample_block"]
        if part["samples"] is not None:
            total.values.append(part["samples"])
        total.steps += part["sample_steps"]

    def total(self, name: str) -> dict[str, Any]:
        t = self.totals[name]
        return {"samples": torch.cat(t.values) if t.values else None, "sample_steps": list(t.steps),
                "sample_block": t.block}

    def stats(self, name: str, totals: bool) -> dict[str, Any]:
        st = (self.totals if totals else self.open).get(name) or Samples()
        return {"samples": torch.cat(st.values) if st.values else None, "sample_steps": step_column(st.steps),
                "sample_block": st.block}


__all__ = ["SampleCollector", "Samples"]
